"""The soak harness (tools/soak.py) end to end, briefly: a real `sonomaly serve`, two aiortc viewers in processes of
their own, samples of memory / fds / threads / latency, the report."""
from __future__ import annotations

import json

from sonomaly.tools import soak


def test_short_soak_reports_every_viewer(tmp_path, demo_clip, lung_model):
    out = tmp_path / "soak.json"
    md = tmp_path / "soak.md"
    rc = soak.main(["--source", str(demo_clip), "--model", str(lung_model), "--minutes", "0.25", "--fps", "20",
                    "--viewers", "2", "--interval", "4", "--warmup", "0", "--quiet", "--json", str(out),
                    "--md", str(md)])
    assert rc == 0
    report = json.loads(out.read_text())
    samples = report["samples"]
    assert len(samples) >= 3
    for s in samples[1:]:
        assert len(s["viewer_fps"]) == 2
        assert all(f > 5 for f in s["viewer_fps"]), s  # both viewers decode the stream
        assert s["fps_out"] > 15 and s["viewers"] == 2
        assert 0 < s["viewer_p50_ms"] <= s["viewer_p99_ms"] < 2000
        assert s["rss_mb"] > 50 and s["fds"] > 3 and s["threads"] > 1
        assert s["engine_rss_mb"] > 20 and s["engine_starts"] == 1  # serve's engine process, measured on its own
    # frames whose server record was not polled yet are carried to the next window, not lost
    assert sum(s["unmatched"] for s in samples) <= 0.05 * sum(sum(s["viewer_fps"]) * 4 for s in samples)
    summary = report["summary"]
    assert summary["viewers_min"] == 2 and summary["viewer_reconnects"] == 0
    assert "each in a process of its own" in md.read_text() and "| engine process RSS (MB) |" in md.read_text()
    assert summary["engine_restarts"] == 0


def test_frames_count_in_the_window_they_were_shown_in():
    """30 fps for five 10-s windows; each take comes 0-40 ms after its window's end, so it holds frames of the next
    window too, and a few frames are reported twice. Every window counts exactly its own 300 frames, once each:
    what a viewer saw, whenever the take and the server's records arrive."""
    import random

    from sonomaly.tools.soak import shown_in_window

    rng = random.Random(3)
    period, window = 33_333_333, 10_000_000_000
    frames = [(i, 1_000_000 + i * period) for i in range(5 * 300 + 30)]
    carry: list = []
    last = 0
    for w in range(1, 6):
        win_end = w * window
        take_at = win_end + rng.randrange(0, 40_000_000)
        taken = [f for f in frames[last:] if f[1] < take_at]
        last += len(taken)
        taken += rng.sample(taken, 3)  # read twice
        n, carry = shown_in_window(carry, taken, win_end)
        assert n == sum(1 for _, t in frames if win_end - window <= t < win_end) == 300, (w, n)
        assert all(t >= win_end for _, t in carry)
