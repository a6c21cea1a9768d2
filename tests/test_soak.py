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
        assert len(s["viewer_max_gap_ms"]) == 2 and all(1000 / 20 * 0.5 < g < 2000 for g in s["viewer_max_gap_ms"])
    # frames whose server record was not polled yet are carried to the next window, not lost
    assert sum(s["unmatched"] for s in samples) <= 0.05 * sum(sum(s["viewer_fps"]) * 4 for s in samples)
    summary = report["summary"]
    assert summary["viewers_min"] == 2 and summary["viewer_reconnects"] == 0
    assert "each in a process of its own" in md.read_text() and "| engine process RSS (MB) |" in md.read_text()
    assert summary["engine_restarts"] == 0
    assert summary["viewer_max_gap_ms"] == max(g for s in samples for g in s["viewer_max_gap_ms"] if g is not None)
    assert "NOT LIVE limit" in md.read_text()


def test_longest_gap_spans_takes():
    from sonomaly.tools.soak import longest_gap

    ms = 1_000_000
    assert longest_gap(None, []) == (None, None)
    assert longest_gap(None, [(1, 5 * ms)]) == (None, 5 * ms)  # one frame: no gap yet
    gap, last = longest_gap(5 * ms, [(3, 70 * ms), (2, 38 * ms), (2, 38 * ms)])  # unsorted, one read twice
    assert (gap, last) == (33.0, 70 * ms)
    gap, last = longest_gap(last, [(4, 690 * ms), (5, 723 * ms)])  # the gap across two takes counts
    assert (gap, last) == (620.0, 723 * ms)
    assert longest_gap(last, []) == (None, 723 * ms)  # nothing shown in a window: the last frame is kept


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
