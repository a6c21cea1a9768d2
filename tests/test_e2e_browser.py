"""End to end, real parts only: `sonomaly serve` on a bundled clip → aiortc → headless Chromium (Debian's)."""
from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.browser


def _wait(page, expr: str, timeout_s: float) -> None:
    page.wait_for_function(expr, timeout=timeout_s * 1000)


def _until(cond, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.1)


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


def test_a_stalled_stream_is_marked_not_live_in_kiosk_mode(serve, browser, demo_clip):
    """The server stops dead (SIGSTOP: no packet, no goodbye; Chromium still reads "connected"): the theatre display
    must not show the frozen last image as if it were live. Then the server resumes and the banner goes."""
    server = serve("--source", str(demo_clip), "--loop")
    page = browser.new_page(viewport={"width": 800, "height": 600})
    stopped = False
    try:
        page.goto(server.url + "/?kiosk=1")
        _wait(page, "window.sonomaly.connection === 'connected' && window.sonomaly.framesPresented > 30", 20)
        time.sleep(3.0)  # frames flowing: never NOT LIVE
        s = page.evaluate("window.sonomaly")
        assert s["stale"] is False and s["staleEvents"] == 0 and not page.is_visible("#stale")
        assert not page.is_visible("#bar")  # kiosk: the status bar is hidden, the banner will not be

        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped = True
        _wait(page, "window.sonomaly.stale === true", 5)
        s = page.evaluate("window.sonomaly")
        assert s["staleEvents"] == 1 and s["staleLimitMs"] == 500  # a 30-fps stream: the 500-ms floor
        assert s["staleLimitMs"] < s["staleAtMs"] <= s["staleLimitMs"] + 250  # checked every 100 ms
        assert page.is_visible("#stale") and page.inner_text("#stale").startswith("NOT LIVE")
        frames = s["framesPresented"]
        time.sleep(1.0)
        assert page.evaluate("window.sonomaly.framesPresented") == frames  # nothing new reached the screen
        assert float(page.inner_text("#stale").split("last image ")[1].split(" s")[0]) >= 1.0  # the age counts up

        os.kill(server.proc.pid, signal.SIGCONT)
        stopped = False
        _wait(page, "window.sonomaly.stale === false && window.sonomaly.framesPresented > %d" % (frames + 10), 15)
        assert not page.is_visible("#stale")
        assert page.evaluate("window.sonomaly.staleEvents") == 1
        # the page told the server (report channel): /health counts what the theatre display saw
        _until(lambda: server.health()["viewer_stalled_s"] > 0, 5.0)
        h = server.health()
        assert h["viewer_stalls"] == 1 and h["viewers_not_live"] == 0 and h["viewer_reports_bad"] == 0, h
        assert 1.0 <= h["viewer_stalled_s"] <= 15.0, h  # the ~1.5 s the server was stopped and its catch-up
        (me,) = h["viewer_list"]  # and which screen it was
        assert me["stalls"] == 1 and me["stalled_s"] == h["viewer_stalled_s"] and not me["not_live"]
        assert me["state"] == "connected" and me["kind"] == "offer"
    finally:
        if stopped:
            os.kill(server.proc.pid, signal.SIGCONT)
        page.close()
