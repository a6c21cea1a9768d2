"""WHIP end to end: `sonomaly serve --whip` → Debian's simple-whip-server → Debian's Janus (videoroom) → a real
headless Chromium subscribing through Janus's HTTP API. Everything runs on loopback (media over this machine's own
address: ICE never uses loopback). The SFU is started by :mod:`sonomaly.tools.sfu`, as `sonomaly latency --via
janus` starts it.

Needs `janus` (apt) and simple-whip-server unpacked with its Node dependencies under build/whip/app (`make janus`
does both; `make test` runs it when it can). Skips with the reason when they are missing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sonomaly.tools import latency, sfu

pytestmark = [pytest.mark.janus, pytest.mark.browser]


@pytest.fixture
def janus():
    reason = sfu.missing()
    if reason:
        pytest.skip(reason)
    with sfu.Janus() as j:
        yield j

SUBSCRIBE_JS = """async (offer) => {
  const pc = new RTCPeerConnection({iceServers: []});
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  window.sub = {frames: 0, width: 0, height: 0, state: 'new'};
  pc.ontrack = (ev) => { video.srcObject = ev.streams[0] || new MediaStream([ev.track]); };
  pc.onconnectionstatechange = () => { window.sub.state = pc.connectionState; };
  const onFrame = (now, md) => { window.sub.frames = md.presentedFrames; window.sub.width = md.width;
                                 window.sub.height = md.height; video.requestVideoFrameCallback(onFrame); };
  video.requestVideoFrameCallback(onFrame);
  await pc.setRemoteDescription(offer);
  await pc.setLocalDescription(await pc.createAnswer());
  if (pc.iceGatheringState !== 'complete') {
    await new Promise(r => { const t = setTimeout(r, 3000);
      pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') { clearTimeout(t); r(); } }); });
  }
  window.subPc = pc;
  return {type: 'answer', sdp: pc.localDescription.sdp};
}"""


def test_whip_publish_through_janus_to_chromium(serve, browser, demo_clip, janus):
    server = serve("--source", str(demo_clip), "--loop", "--whip", janus.whip_url, "--whip-token", janus.token)
    sfu.wait_for(lambda: server.health().get("whip", {}).get("state") == "publishing", 20, "the WHIP session")
    sub = janus.subscribe()  # Janus 1.1.2 has no WHEP: its HTTP API
    page = browser.new_page()
    try:
        page.goto("about:blank")
        janus.start_subscription(sub, page.evaluate(SUBSCRIBE_JS, sub.offer))
        page.wait_for_function("window.sub.frames > 5", timeout=20_000)
        f0 = page.evaluate("window.sub.frames")
        time.sleep(3.0)
        got = page.evaluate("window.sub")
        fps = (got["frames"] - f0) / 3.0
        assert (got["width"], got["height"]) == (450, 450)
        assert fps > 20, f"Chromium presented {fps:.1f} fps through Janus"
        h = server.health()
        assert h["whip"]["sessions"] == 1 and h["encoder"]["frames_encoded"] > 0
    finally:
        page.close()
        janus.destroy(sub.session)


def test_latency_harness_through_janus(serve, browser, demo_clip, lung_model, janus):
    """`sonomaly latency --via janus`: two Chromium viewers in one page and two load sessions subscribe through Janus
    while the server publishes once (WHIP); every viewer reads every frame's code, the run says it went through the
    SFU and counts Janus's CPU apart, and the server served one session (the WHIP upload), not one per viewer."""
    server = serve("--source", f"stamp:{demo_clip}?fps=30", "--model", str(lung_model), "--loop",
                   "--whip", janus.whip_url, "--whip-token", janus.token)
    sfu.wait_for(lambda: server.health().get("whip", {}).get("state") == "publishing", 20, "the WHIP session")
    r = latency.measure(server.url, "sonomaly", viewer="chromium", viewers=2, seconds=4, warmup=1.5,
                        browser=browser, quiet=True, layout="page", sfu=janus, server_pid=server.proc.pid,
                        load_viewers=2)
    assert r["via"] == "janus" and r["sfu"]["kind"] == "janus" and r["sfu"]["version"]
    g = r["glass_to_glass_ms"]
    assert 0 < g["p50"] <= g["p99"] < 1000 and r["frames_lost"] <= 0.1 * r["frames"]
    for v in r["per_viewer"]:
        assert v["glass_to_glass_ms"]["n"] >= 0.5 * 30 * 4  # each viewer saw the stream through Janus
        assert v["receiver"]["frameHeight"] == 450
    h = r["health"]  # no viewer of the server's own: the fan-out writes one output, the WHIP upload
    assert h["viewers"] == 0 and h["whip"]["state"] == "publishing" and h["whip"]["sessions"] == 1
    assert h["fanout"]["viewers"] == 1
    lv = r["load_viewers"]  # two aiortc sessions that answered Janus's offers, each fed by Janus
    assert lv["via"] == "janus" and lv["received"] == 2 and lv["fps_min"] >= 0.5 * 30
    assert r["cpu"]["sfu_pct"] > 0 and "server_pct" in r["cpu"]
    assert janus.sessions == set()  # the run's Janus sessions ended with it
    with pytest.raises(ValueError, match="Chromium"):
        latency.measure(server.url, "sonomaly", viewer="aiortc", viewers=1, seconds=1, sfu=janus, quiet=True)


def test_latency_cli_starts_janus_itself(demo_clip, tmp_path):
    """`sonomaly latency --serve … --via janus`: the command starts Janus and the WHIP server, the server with
    --whip, measures through the SFU and stops them all."""
    reason = sfu.missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "sfu.json"
    before = set(Path(tempfile.gettempdir()).glob("sonomaly-janus-*"))
    # a process of its own, as a user runs it (Playwright's sync API will not start beside the browser fixture's)
    p = subprocess.run([sys.executable, "-m", "sonomaly.tools", "latency", "--serve", str(demo_clip), "--fps", "30",
                        "--viewers", "1", "--via", "janus", "--seconds", "3", "--warmup", "1", "--json", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (r,) = json.loads(out.read_text())["runs"]
    assert r["via"] == "janus" and r["label"] == "sonomaly via janus" and r["health"]["whip"]["sessions"] == 1
    assert r["glass_to_glass_ms"]["n"] >= 0.5 * 30 * 3 and r["cpu"]["sfu_pct"] >= 0
    assert set(Path(tempfile.gettempdir()).glob("sonomaly-janus-*")) <= before  # its folder went with it
