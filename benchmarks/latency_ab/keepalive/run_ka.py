"""Throw-away: the harness page with a keep-alive animation (KA=raf|css|none)."""
import os, sys
from sonomaly.tools import latency as L
ka = os.environ.get("KA", "none")
snip = {
 "raf": """<div id="ka" style="position:fixed;right:0;bottom:0;width:2px;height:2px;background:#111"></div>
<script>(function tick(t){document.getElementById('ka').style.transform='translateX('+(Math.floor(t/16)%2)+'px)';requestAnimationFrame(tick);})(0);</script>""",
 "css": """<style>@keyframes ka{from{transform:translateX(0)}to{transform:translateX(1px)}}</style>
<div style="position:fixed;right:0;bottom:0;width:2px;height:2px;background:#111;animation:ka 0.5s linear infinite alternate"></div>""",
 "none": "",
}[ka]
L.HARNESS_PAGE = L.HARNESS_PAGE.replace("</script></body></html>", "</script>" + snip + "</body></html>")
from sonomaly.tools.cli import main
sys.exit(main(sys.argv[1:]))
