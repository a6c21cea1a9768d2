"""End to end, real parts only: `sonomaly serve` on a bundled clip → aiortc → headless Chromium (Debian's).

The viewer page's NOT LIVE banner under a stalled server is the fault scenario `output.server_stalled`
(stream/faults.py, run by tests/test_faults.py)."""
from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.browser


def _wait(page, expr: str, timeout_s: float) -> None:
    page.wait_for_function(expr, timeout=timeout_s * 1000)


def test_chromium_decodes_at_least_90_percent_of_frames(serve, browser, demo_clip, lung_model, tmp_path):
    server = serve("--source", str(demo_clip), "--model", str(lung_model), "--loop")
    page = browser.new_page(viewport={"width": 800, "height": 600})
    try:
        page.goto(server.url + "/")
        _wait(page, "window.sonomaly && window.sonomaly.connection === 'connected'", 20)
        _wait(page, "window.sonomaly.framesPresented > 10", 20)
        # the data channel delivers per-frame metadata
        _wait(page, "window.sonomaly.lastMeta !== null", 10)

        f0 = page.evaluate("window.sonomaly.framesPresented")
        h0 = server.health()
        time.sleep(5.0)
        f1 = page.evaluate("window.sonomaly.framesPresented")
        h1 = server.health()

        sent = h1["frames_out"] - h0["frames_out"]
        presented = f1 - f0
        assert sent >= 0.9 * 5 * 39 * 0.9, f"server composed too few frames: {sent}"
        assert presented >= 0.9 * sent, f"Chromium presented {presented} of {sent} frames"

        meta = page.evaluate("window.sonomaly.lastMeta")
        assert meta["signal"] is True and meta["ai"] in ("ok", "delayed")
        assert isinstance(meta["frame_id"], int)
        assert h1["viewers"] == 1 and h1["model"] and h1["backend"] == "onnxruntime"

        page.screenshot(path=str(tmp_path / "viewer.png"))
        # the picture is not blank: the ultrasound (and heatmap) reached the screen
        shot = page.evaluate("""() => {
            const v = document.getElementById('video');
            const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
            const g = c.getContext('2d'); g.drawImage(v, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data;
            let sum = 0; for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i+1] + d[i+2];
            return {w: c.width, h: c.height, mean: sum / (d.length / 4) / 3};
        }""")
        assert shot["w"] == 450 and shot["h"] == 450
        assert shot["mean"] > 10
    finally:
        page.close()



def test_a_hidden_tab_is_not_a_stall(serve, browser, demo_clip):
    """A tab that is hidden presents nothing by design: neither the banner nor a stall report to the server, even if
    the stream also stops meanwhile; back in view, the 500-ms clock starts again."""
    server = serve("--source", str(demo_clip), "--loop")
    page = browser.new_page(viewport={"width": 800, "height": 600})
    try:
        page.goto(server.url + "/")
        _wait(page, "window.sonomaly.connection === 'connected' && window.sonomaly.framesPresented > 30", 20)
        set_hidden = """h => { Object.defineProperty(document, 'hidden', {value: h, configurable: true});
                              document.dispatchEvent(new Event('visibilitychange')); }"""
        page.evaluate(set_hidden, True)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            assert page.evaluate("window.sonomaly.stale") is False and not page.is_visible("#stale")
            page.evaluate(set_hidden, False)
            time.sleep(0.3)
            assert page.evaluate("window.sonomaly.stale") is False  # the clock restarted on becoming visible
            _wait(page, "window.sonomaly.stale === true", 3)  # and a stream that is still stopped is then NOT LIVE
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        _wait(page, "window.sonomaly.stale === false", 15)
        assert page.evaluate("window.sonomaly.staleEvents") == 1
    finally:
        page.close()
