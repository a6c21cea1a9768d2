"""Raw-first behaviour with fault injection: slow, raising, NaN-returning and stalling engines, a vanishing source.

Real parts: the bundled clip paced at its own 39 fps, the bundled model on ONNX Runtime, wrapped to misbehave.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from sonomaly import engines
from sonomaly.stream.pipeline import Pipeline, PipelineConfig
from sonomaly.stream.sources import ReconnectingSource, open_source

FPS = 39.0


class Wrapped:
    """The real engine, made to misbehave on demand."""

    def __init__(self, inner, *, delay_s: float = 0.0, raise_exc: bool = False, nan: bool = False) -> None:
        self.inner, self.card, self.backend, self.backend_reason = inner, inner.card, inner.backend, None
        self.delay_s, self.raise_exc, self.nan = delay_s, raise_exc, nan
        self.calls = 0

    def infer(self, x):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.raise_exc:
            raise RuntimeError("injected engine failure")
        m, s = self.inner.infer(x)
        if self.nan:
            m = np.full_like(m, np.nan)
        return m, s


class Collector:
    """Consumes the output hub on a thread, like a viewer would, and keeps what it saw."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p, self.items, self._stop = pipeline, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq2, out = self.p.out.slot.get_newer(seq, timeout=0.1, take=False)
            if out is not None and seq2 > seq:
                self.items.append((time.monotonic(), out.meta, out.image))
                seq = seq2

    def stop(self) -> list:
        self._stop.set()
        self._t.join(2)
        return self.items

    def since(self, t0: float) -> list:
        return [it for it in self.items if it[0] >= t0]


@pytest.fixture(scope="module")
def engine(lung_model):
    return engines.load(str(lung_model), backend="onnxruntime")


def run(pipeline: Pipeline, seconds: float, warmup: float = 1.0) -> list:
    pipeline.start()
    c = Collector(pipeline)
    try:
        time.sleep(warmup)
        t0 = time.monotonic()
        time.sleep(seconds)
        return c.since(t0)
    finally:
        c.stop()
        pipeline.stop()


def max_gap_ms(items) -> float:
    t = [it[0] for it in items]
    return max(np.diff(t)) * 1000 if len(t) > 1 else float("inf")


def source(clip, loop=True):
    return ReconnectingSource(lambda: open_source(str(clip), loop=loop))


def test_fast_engine_draws_heatmaps_at_the_source_rate(demo_clip, engine):
    p = Pipeline(source(demo_clip), engine)
    items = run(p, 2.0)
    assert len(items) >= 0.85 * 2.0 * FPS
    states = [m["ai"] for _, m, _ in items]
    assert states.count("ok") >= 0.9 * len(states)
    lags = [m["ai_lag_ms"] for _, m, _ in items if m["ai"] == "ok"]
    assert max(lags) <= 100
    assert all(m["score"] is not None for _, m, _ in items if m["ai"] == "ok")
    rec = p.records[-1]
    for stage in ("grab", "roi", "preprocess", "infer", "postprocess", "overlay"):
        assert stage in rec["stages_ms"] and rec["stages_ms"][stage] >= 0


def test_ai_max_fps_caps_the_heatmaps_not_the_video(demo_clip, engine):
    """``ai_max_fps``: the worker makes at most that many heatmaps a second (each from the newest frame), every frame
    still goes out with the newest heatmap, and the composer does not wait for heatmaps of frames the resting worker
    will never take (a 40-ms alignment window, long enough that waiting on each of them would show: ~24 ms a
    frame); without the cap the same worker keeps up with the source."""
    seen = {}
    for cap in (8.0, None):
        p = Pipeline(source(demo_clip), engine, PipelineConfig(ai_max_fps=cap, max_ai_lag_ms=300, ai_wait_ms=40))
        items = run(p, 2.0)
        ai_ids = {m["ai_frame_id"] for _, m, _ in items if m["ai"] == "ok"}
        waits = [r["stages_ms"]["ai_wait"] for r in list(p.records)[-40:] if "ai_wait" in r["stages_ms"]]
        seen[cap] = ai_ids
        assert p.stats()["ai_max_fps"] == cap  # /health says the cap
        assert len(items) >= 0.85 * 2.0 * FPS  # the video is not capped
        assert sum(m["ai"] == "ok" for _, m, _ in items) >= 0.9 * len(items)  # each frame shows a heatmap
        if cap:
            assert 0.6 * cap * 2.0 <= len(ai_ids) <= cap * 2.0 + 2, len(ai_ids)
            assert float(np.median(waits)) < 2.0, waits  # frames between heatmaps are not held back
    assert len(seen[None]) >= 2 * len(seen[8.0])
    for bad in (-1.0, float("nan"), float("inf"), 1001.0):
        with pytest.raises(ValueError):
            p.set_ai_max_fps(bad)


@pytest.mark.parametrize("field,bad", [
    ("ai_max_fps", float("nan")), ("ai_max_fps", -1.0), ("ai_max_fps", 1001.0), ("max_ai_lag_ms", float("nan")), ("max_ai_lag_ms", 0.0),
    ("ai_wait_ms", -5.0), ("ai_wait_ms", float("inf")), ("no_signal_after_ms", float("nan")), ("fallback_fps", 0.0),
    ("engine_retry_s", -1.0), ("temporal_alpha", 1.5), ("temporal_alpha", float("nan")), ("records", 0),
    ("ai_nice", 20), ("ai_nice", -1), ("map_side", 0), ("ai_wait_ms", "15"), ("records", True)])
def test_config_rejects_values_that_would_stall_the_loops(field, bad):
    """NaN compares false with everything, so a NaN time would silently turn off the checks it reaches (the
    AI-lag banner, the NO SIGNAL timer): every number is checked when the config is made, with its name."""
    with pytest.raises(ValueError, match=field):
        PipelineConfig(**{field: bad})


def test_config_accepts_its_defaults_and_the_documented_offs():
    PipelineConfig()
    c = PipelineConfig(ai_max_fps=None, temporal_alpha=None, map_side=None, ai_wait_ms=0, engine_retry_s=0)
    assert c.ai_max_fps is None and c.map_side is None
    assert PipelineConfig(ai_max_fps=0).ai_max_fps == 0  # 0: no cap, as the control API and --ai-max-fps 0 say
    assert PipelineConfig(map_side=160.0).map_side == 160 and isinstance(PipelineConfig(map_side=160.0).map_side, int)


def test_heatmaps_made_at_map_side_are_drawn_over_the_whole_frame(demo_clip, engine):
    """``map_side``: the worker's maps are smaller than the frame (frame-aligned), and the composer still draws them:
    the same frames composed from full-size maps (``map_side=None``) look the same."""
    from sonomaly import overlay

    p = Pipeline(source(demo_clip), engine, PipelineConfig(map_side=160))
    p.start()
    try:
        assert _wait(lambda: p.ai_slot.peek()[1] is not None and p.out.latest() is not None)
        ai = p.ai_slot.peek()[1]
        frame = p.out.latest().raw.copy()
    finally:
        p.stop()
    h, w = ai.region.frame_shape
    assert max(ai.amap.shape) == 160 and ai.amap.shape[0] / ai.amap.shape[1] == pytest.approx(h / w, rel=0.02)
    from sonomaly.engines.processing import postprocess, preprocess

    raw = engine.infer(preprocess(frame, ai.region, engine.card))
    big, _ = postprocess(*raw, ai.region, engine.card, (h, w))
    small, _ = postprocess(*raw, ai.region, engine.card, (h, w), work_side=160)
    style = overlay.OverlayStyle(contours=False)  # contour lines may move by a pixel: compare the colour wash
    a = overlay.compose(frame, big, ai.region, style=style)
    b = overlay.compose(frame, small, ai.region, style=style)
    inside = ai.region.mask > 0
    assert np.abs(a.astype(int) - frame.astype(int))[inside].mean() > 5.0, "a heatmap must be drawn"
    d = np.abs(a.astype(int) - b.astype(int))[inside]
    assert d.mean() < 1.0 and np.percentile(d, 99) <= 10  # grey levels, of 255
    assert np.array_equal(a[~inside], frame[~inside]) and np.array_equal(b[~inside], frame[~inside])


def test_worker_draws_each_heatmap_once_as_a_layer(demo_clip, engine):
    """The AI worker hands the composer each result's heatmap and contours as a layer (stage ``layer``): drawn with it,
    a frame looks exactly as composed from the map alone; with the overlay off no layer is made."""
    from sonomaly import overlay

    p = Pipeline(source(demo_clip), engine, PipelineConfig())
    p.start()
    try:
        assert _wait(lambda: p.ai_slot.peek()[1] is not None and p.out.latest() is not None)
        ai = p.ai_slot.peek()[1]
        frame = p.out.latest().raw.copy()
        assert _wait(lambda: any("layer" in r["stages_ms"] for r in list(p.records)))
    finally:
        p.stop()
    assert ai.layer is not None and ai.layer.shape == ai.region.frame_shape == frame.shape[:2]
    style = p.config.style
    a = overlay.compose(frame, ai.amap, ai.region, style=style, layer=ai.layer)
    assert np.array_equal(a, overlay.compose(frame, ai.amap, ai.region, style=style))
    q = Pipeline(source(demo_clip), engine, PipelineConfig(overlay_enabled=False))
    q.start()
    try:
        assert _wait(lambda: q.ai_slot.peek()[1] is not None)
        assert q.ai_slot.peek()[1].layer is None
    finally:
        q.stop()


def _wait(pred, timeout: float = 10.0) -> bool:
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_slow_engine_never_slows_the_video(demo_clip, engine):
    slow = Wrapped(engine, delay_s=0.35)
    p = Pipeline(source(demo_clip), slow)
    items = run(p, 2.5)
    assert len(items) >= 0.85 * 2.5 * FPS, "raw frames must keep the source rate"
    assert max_gap_ms(items) < 200
    states = {m["ai"] for _, m, _ in items}
    assert "delayed" in states and "off" not in states
    # heatmaps are never drawn older than the allowed lag
    assert all(m["ai_lag_ms"] is None or m["ai_lag_ms"] > 100 for _, m, _ in items if m["ai"] == "delayed")


def test_raising_engine_gives_ai_off_and_the_video_goes_on(demo_clip, engine):
    bad = Wrapped(engine, raise_exc=True)
    p = Pipeline(source(demo_clip), bad, PipelineConfig(engine_retry_s=0.2))
    p.start()
    c = Collector(p)
    time.sleep(1.5)
    assert p.ai_errors >= 2 and "injected engine failure" in p.ai_reason
    t0 = time.monotonic()
    time.sleep(1.0)
    during = c.since(t0)
    bad.raise_exc = False  # the engine recovers by itself
    time.sleep(1.5)
    t1 = time.monotonic()
    time.sleep(1.0)
    after = c.since(t1)
    c.stop()
    p.stop()
    assert len(during) >= 0.85 * FPS and max_gap_ms(during) < 200
    assert {m["ai"] for _, m, _ in during} == {"off"}
    assert [m["ai"] for _, m, _ in after].count("ok") >= 0.8 * len(after)


def test_nan_from_the_engine_is_ai_off_not_a_crash(demo_clip, engine):
    p = Pipeline(source(demo_clip), Wrapped(engine, nan=True), PipelineConfig(engine_retry_s=0.2))
    items = run(p, 1.5)
    assert len(items) >= 0.85 * 1.5 * FPS
    assert {m["ai"] for _, m, _ in items} == {"off"}
    assert "NaN" in p.ai_reason


def test_engine_stall_of_two_seconds(demo_clip, engine):
    stall = Wrapped(engine)
    p = Pipeline(source(demo_clip), stall)
    p.start()
    c = Collector(p)
    time.sleep(1.0)
    stall.delay_s = 2.0
    time.sleep(0.3)
    stall.delay_s = 0.0  # the call in flight still takes 2 s
    time.sleep(3.5)
    items = c.stop()
    p.stop()
    states = [m["ai"] for _, m, _ in items]
    assert max_gap_ms(items) < 200
    assert "delayed" in states
    assert states[-10:].count("ok") >= 8, "the overlay catches up after the stall"


def test_source_that_ends_gives_no_signal_frames(tmp_path, demo_clip):
    # a non-looping short clip: the bundled one cut to 20 frames
    import av

    short = tmp_path / "short.mp4"
    with av.open(str(demo_clip)) as inp, av.open(str(short), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 450, 450, "yuv420p"
        for i, fr in enumerate(inp.decode(video=0)):
            if i == 20:
                break
            new = av.VideoFrame.from_ndarray(fr.to_ndarray(format="bgr24"), format="bgr24")
            new.pts = i
            for pkt in s.encode(new.reformat(format="yuv420p")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    p = Pipeline(ReconnectingSource(lambda: open_source(str(short)), backoff_max=0.5),
                 None, PipelineConfig(fallback_fps=30))
    p.start()
    c = Collector(p)
    time.sleep(2.5)
    items = c.stop()
    p.stop()
    signal = [m["signal"] for _, m, _ in items]
    assert signal[0] is True and signal[-1] is False
    first_lost = signal.index(False)
    # the picture never looks frozen for long: NO SIGNAL follows the last real frame within ~200 ms
    assert (items[first_lost][0] - items[first_lost - 1][0]) * 1000 < 300
    tail = [it for it in items if not it[1]["signal"]]
    assert len(tail) >= 20  # NO SIGNAL frames keep coming at about the nominal rate
    assert max_gap_ms(tail) < 200
    assert tail[-1][2].shape[:2] == (450, 450)


def _thread_nice(tid: int) -> int:
    """A thread's nice value as the kernel keeps it (field 19 of /proc/self/task/TID/stat)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_ai_worker_runs_below_the_video_path(demo_clip, engine):
    """``ai_nice``: the worker thread alone is lowered (the grabber, the composer and the caller keep their priority),
    /health says how far, and the heatmaps still come; ``ai_nice=0`` leaves every thread as it was."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for inc, want in ((7, min(19, base + 7)), (0, base)):
        p = Pipeline(source(demo_clip), engine, PipelineConfig(ai_nice=inc))
        p.start()
        try:
            assert _wait(lambda: p.ai_frames >= 3)
            assert _thread_nice(p._worker.native_id) == want
            assert _thread_nice(p._composer.native_id) == base
            assert _thread_nice(p.grabber._thread.native_id) == base
            assert os.getpriority(os.PRIO_PROCESS, 0) == base
            assert p.stats()["ai_thread_nice"] == (want if inc else None)
        finally:
            p.stop()
