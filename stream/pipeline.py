"""The live pipeline: grabber → AI worker → raw-first composer → outputs.

Three threads, joined only by one-slot buffers (latest frame wins, nothing queues):

* the **grabber** keeps the newest raw frame;
* the **worker** takes the newest raw frame whenever it is free: scan region, preprocess, ``engine.infer``,
  postprocess, and publishes an :class:`AIResult`;
* the **composer** handles *every* raw frame as it arrives, at the source's rate, whatever the worker does. It blends
  the newest heatmap only when that heatmap is younger than ``max_ai_lag_ms``; otherwise the raw frame goes out with an
  "AI DELAYED" banner, or "AI OFF" when the engine is failing. When no frame arrives for ``no_signal_after_ms`` it emits
  "NO SIGNAL" frames at the nominal rate so viewers never freeze on a stale picture.

Outputs (WebRTC tracks, recorders, tests) subscribe to :class:`OutputHub`, which hands each subscriber the newest
composed frame; a slow subscriber skips frames, it never slows the others down.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from sonomaly import overlay
from sonomaly.stream.frame import Frame, now_ns
from sonomaly.stream.grabber import Grabber
from sonomaly.stream.roi import RegionTracker, ScanRegion
from sonomaly.stream.slot import LatestSlot

log = logging.getLogger("sonomaly.pipeline")


def lower_thread_priority(increment: int) -> int | None:
    """Raise the calling thread's nice value by ``increment`` (capped at 19) and return the new value; None where the
    platform has no per-thread nice (not Linux) or ``increment`` <= 0. Only this thread changes: Linux keeps the nice
    value per thread (setpriority(2) on the thread id), and threads started by this one inherit it."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(increment)))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as e:  # e.g. a seccomp profile that forbids it: the worker runs at the normal priority
        log.warning("could not lower the AI worker's priority: %s", e)
        return None


def stamp_stage(record: dict[str, Any] | None, stage: str, start_ns: int, end_ns: int) -> None:
    """Add a stage that runs after composition (``encode``, ``send``) to a frame's record, from any thread.

    The stage dict is replaced, never mutated, so a reader serialising the records never sees it change size.
    """
    if record is not None:
        record["stages_ms"] = {**record["stages_ms"], stage: (end_ns - start_ns) / 1e6}


@dataclass
class PipelineConfig:
    max_ai_lag_ms: float = 100.0
    """A heatmap older than this (capture time of its frame vs. the frame on screen) is not drawn: "AI DELAYED"."""
    ai_wait_ms: float = 15.0
    """How long the composer may wait for the heatmap of the very frame it is composing before using the newest one."""
    no_signal_after_ms: float = 200.0
    """Without a new frame for this long (or 2.5 frame intervals of a slow source, whichever is longer), the outputs
    show "NO SIGNAL" frames: a lost source never looks like a frozen picture for longer than that."""
    fallback_fps: float = 30.0
    """Rate of "NO SIGNAL" frames when the source gives none."""
    engine_retry_s: float = 1.0
    """After an engine failure, the worker tries again after this long (the video goes on meanwhile)."""
    temporal_alpha: float | None = 0.5
    """Temporal smoothing of heatmaps across frames (None: off)."""
    map_side: int | None = 320
    """The worker makes heatmaps at the frame's size scaled down to this longer side (None: full frame size); the
    composer stretches them over the frame.  Postprocessing and temporal smoothing then cost the same at 1080p as at
    450², and the map (from a 32-64 cell model output) loses nothing visible."""
    overlay_enabled: bool = True
    style: overlay.OverlayStyle = field(default_factory=overlay.OverlayStyle)
    hud: bool = True
    records: int = 2000
    """How many per-frame records to keep for /health and the latency harness."""
    ai_nice: int = 0
    """Nice increment of the AI worker thread (Linux keeps a nice value per thread; 0, the default: the same priority
    as the rest). When the CPU is short the kernel then favours the grab → compose → encode → send path and the
    heatmaps slow down ("AI DELAYED"), but the worker also yields to every other process on the machine, so it is
    off by default (docs/ENGINES.md has the measurements). Lowering one's own priority needs no privilege."""
    ai_max_fps: float | None = None
    """At most this many heatmaps a second (None, the default: one for every frame the worker can take). The worker
    rests between frames and then takes the newest one, like DeepStream's inference ``interval``: the CPU it frees
    goes to the encoder, the sender and the viewers. Every frame still goes out; each shows the newest heatmap while
    that is younger than ``max_ai_lag_ms`` (keep ``1000 / ai_max_fps`` well under it)."""

    def __post_init__(self) -> None:
        """Reject values that would stall or spin the loops (NaN compares false with everything, so it would
        silently disable every check it reaches): a clear error at construction, not a frozen display later."""

        def number(name: str, lo: float, *, lo_open: bool = False, hi: float = math.inf, optional: bool = False):
            v = getattr(self, name)
            if v is None and optional:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                rng = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
                raise ValueError(f"PipelineConfig.{name} must be a finite number {rng}"
                                 f"{' or None' if optional else ''}, not {v!r}")

        number("max_ai_lag_ms", 0, lo_open=True)
        number("ai_wait_ms", 0)
        number("no_signal_after_ms", 0, lo_open=True)
        number("fallback_fps", 0, lo_open=True, hi=1000)
        number("engine_retry_s", 0)
        number("temporal_alpha", 0, lo_open=True, hi=1, optional=True)
        number("ai_max_fps", 0, hi=1000, optional=True)  # 0: no cap (as in the control API)
        number("records", 1)
        number("ai_nice", 0, hi=19)
        if self.map_side is not None:
            number("map_side", 8)
            self.map_side = int(self.map_side)


@dataclass
class AIResult:
    frame_id: int
    t_capture_ns: int
    t_done_ns: int
    amap: np.ndarray
    score: float
    region: ScanRegion
    stages: dict[str, tuple[int, int]]
    layer: overlay.HeatLayer | None = None
    """The heatmap and contours drawn once for this result (the composer blends it over each frame that shows it)."""


@dataclass
class OutputFrame:
    """A composed frame ready for the outputs. ``yuv`` is I420 (``H*3/2 x W``), made once for all viewers."""

    seq: int
    frame_id: int
    t_capture_ns: int
    t_composed_ns: int
    image: np.ndarray
    yuv: np.ndarray
    meta: dict[str, Any]
    raw: np.ndarray | None = field(default=None, repr=False)
    """The raw captured image (no copy; ``None`` for NO SIGNAL frames): raw recordings, feedback."""
    record: dict[str, Any] | None = field(default=None, repr=False)
    """This frame's entry in ``Pipeline.records``; later stages (the shared encoder) add their times with
    :meth:`Pipeline.stamp_record`."""


class OutputHub:
    """Fan-out of the newest composed frame to any number of subscribers (threads or asyncio tasks)."""

    def __init__(self) -> None:
        self.slot: LatestSlot[OutputFrame] = LatestSlot()
        self._lock = threading.Lock()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._listeners: list = []

    def add_listener(self, fn) -> None:
        """``fn(out)`` is called in the composer's thread for every published frame: it must be O(1) and never block
        (e.g. a bounded deque's append)."""
        with self._lock:
            self._listeners.append(fn)

    def publish(self, out: OutputFrame) -> None:
        self.slot.put(out)
        with self._lock:
            waiters = list(self._async_waiters)
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(out)
            except Exception:  # noqa: BLE001 - a listener must never stop the composer
                pass
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed: the subscriber is gone
                self.unsubscribe_async((loop, event))

    def latest(self) -> OutputFrame | None:
        return self.slot.peek()[1]

    def subscribe_async(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        token = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._async_waiters.add(token)
        return token

    def unsubscribe_async(self, token) -> None:
        with self._lock:
            self._async_waiters.discard(token)

    async def next_async(self, token, last_seq: int, timeout: float | None = None) -> OutputFrame | None:
        """The newest frame with ``seq > last_seq``; waits for one (up to ``timeout``); ``None`` on timeout."""
        _, event = token
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self.latest()
            if out is not None and out.seq > last_seq:
                return out
            event.clear()
            out = self.latest()  # re-check after clear: a publish may have raced us
            if out is not None and out.seq > last_seq:
                return out
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._async_waiters)


def even_size(image: np.ndarray) -> np.ndarray:
    """Crop to even width and height (I420 and most encoders need them)."""
    h, w = image.shape[:2]
    if h < 2 or w < 2:  # a 1-pixel frame would crop to nothing: pad it instead (cropping 0 x 0 kills I420)
        pad = ((0, max(0, 2 - h)), (0, max(0, 2 - w))) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, pad, mode="edge") if image.size else np.zeros((2, 2) + image.shape[2:], image.dtype)
        h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = image[: h - h % 2, : w - w % 2]
    return image


class Pipeline:
    """Owns the threads of one live stream. ``engine`` may be ``None`` (video only, "AI OFF")."""

    def __init__(self, source, engine=None, config: PipelineConfig | None = None, *,
                 model_name: str | None = None) -> None:
        self.config = config or PipelineConfig()
        self.grabber = Grabber(source)
        self.out = OutputHub()
        self.ai_slot: LatestSlot[AIResult] = LatestSlot()
        self.records: deque[dict[str, Any]] = deque(maxlen=self.config.records)
        self._engine = engine
        self._engine_lock = threading.Lock()
        self.model_name = model_name or (engine.card.name if engine is not None else None)
        self.tracker = RegionTracker()
        self._smoother = None
        self._stop = threading.Event()
        self._t0_ns = now_ns()
        # state shown in /health and the HUD
        self.frames_out = 0
        self.signal = True  # False while the outputs show NO SIGNAL
        self.no_signal_frames = 0
        self.ai_frames = 0
        self.ai_errors = 0
        self.compose_errors = 0  # frames the composer could not compose (sent raw or as an error card instead)
        self.ai_last_error: str | None = None
        self.ai_failing = engine is None
        self.ai_state = "off" if engine is None else "delayed"
        self.ai_reason: str | None = None if engine is not None else "no model loaded"
        self._fps_times: deque[int] = deque(maxlen=64)
        self._working_on: tuple[int, int] | None = None  # (frame id, start ns) of the frame the worker is on
        self._ai_ms_ema: float | None = None  # smoothed worker time per frame, to decide whether waiting pays
        self._ai_rest_until_ns = 0  # with ai_max_fps: the worker takes no frame before this time
        self._ai_wake = threading.Event()  # ends a rest early (a new cap, stop)
        self.ai_thread_nice: int | None = None  # the worker thread's nice value once it runs (None: not set)
        self._worker = threading.Thread(target=self._work, name="sonomaly-worker", daemon=True)
        self._composer = threading.Thread(target=self._compose_loop, name="sonomaly-composer", daemon=True)
        self._reset_smoother()

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Pipeline":
        self.grabber.start()
        self._worker.start()
        self._composer.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._ai_wake.set()
        self.grabber.stop(timeout)
        self.grabber.slot.close()
        self._composer.join(timeout)
        self._worker.join(timeout)
        self.out.slot.close()

    @property
    def engine(self):
        return self._engine

    def set_engine(self, engine, model_name: str | None = None) -> None:
        """Swap the model or backend while the video keeps flowing. An engine in a process of its own that is
        replaced is closed (in the background, once a call in flight has returned)."""
        with self._engine_lock:
            old, self._engine = self._engine, engine
            self.model_name = model_name or (engine.card.name if engine is not None else None)
            self.ai_failing = engine is None
            self.ai_reason = None if engine is not None else "no model loaded"
            self._reset_smoother()
        if old is not None and old is not engine and getattr(old, "isolated", False):
            threading.Thread(target=old.close, name="sonomaly-engine-close", daemon=True).start()

    def set_ai_max_fps(self, fps: float | None) -> None:
        """Change :attr:`PipelineConfig.ai_max_fps` live (None or 0: no cap); a resting worker takes the next frame
        at once and the new cap counts from there."""
        if fps is not None and not (math.isfinite(fps) and 0 <= fps <= 1000):
            raise ValueError(f"ai_max_fps must be a number from 0 to 1000, not {fps}")
        self.config.ai_max_fps = float(fps) if fps else None
        self._ai_rest_until_ns = 0
        self._ai_wake.set()

    @staticmethod
    def stamp_record(out: OutputFrame, stage: str, start_ns: int, end_ns: int) -> None:
        """Add a later stage's time (e.g. ``encode``) to ``out``'s record, from any thread (:func:`stamp_stage`)."""
        stamp_stage(out.record, stage, start_ns, end_ns)

    def _reset_smoother(self) -> None:
        from sonomaly.engines.processing import TemporalSmoother

        alpha = self.config.temporal_alpha
        self._smoother = TemporalSmoother(alpha) if alpha else None

    # ----------------------------------------------------------------------------------------------- AI worker
    def _work(self) -> None:
        from sonomaly.engines.processing import postprocess, preprocess

        self.ai_thread_nice = lower_thread_priority(self.config.ai_nice)
        seq = 0
        while not self._stop.is_set():
            rest_s = (self._ai_rest_until_ns - now_ns()) / 1e9
            if rest_s > 0:
                self._ai_wake.wait(rest_s)
                self._ai_wake.clear()
                continue
            seq, frame = self.grabber.slot.get_newer(seq, timeout=0.2, take=False)
            if frame is None or self._stop.is_set() or not frame.signal:
                continue
            with self._engine_lock:
                engine = self._engine
            if engine is None:
                continue
            stages: dict[str, tuple[int, int]] = {}
            t = now_ns()
            self._working_on = (frame.id, t)
            if self.config.ai_max_fps:
                self._ai_rest_until_ns = t + int(1e9 / self.config.ai_max_fps)
            try:
                region = self.tracker.update(frame.image)  # the smoother resets itself on a region change
                t1 = now_ns()
                stages["roi"] = (t, t1)
                x = preprocess(frame.image, region, engine.card)
                t2 = now_ns()
                stages["preprocess"] = (t1, t2)
                raw_map, raw_score = engine.infer(x)
                t3 = now_ns()
                stages["infer"] = (t2, t3)
                if not (np.isfinite(raw_map).all() and np.isfinite(raw_score).all()):
                    raise FloatingPointError("engine returned NaN or inf")
                amap, score = postprocess(raw_map, raw_score, region, engine.card, frame.image.shape[:2],
                                          work_side=self.config.map_side)
                if self._smoother is not None:
                    amap = self._smoother.update(amap, region)
                t4 = now_ns()
                stages["postprocess"] = (t3, t4)
                layer = None
                if self.config.overlay_enabled:
                    layer = overlay.layer_for(amap, region, frame.image.shape[:2], self.config.style)
                t_done = now_ns()
                if layer is not None:
                    stages["layer"] = (t4, t_done)
            except Exception as exc:  # no model exception ever stops the video
                self.ai_errors += 1
                self.ai_failing = True
                self.ai_last_error = f"{type(exc).__name__}: {exc}"
                self.ai_reason = self.ai_last_error
                log.warning("AI failed on frame %s: %s", frame.id, self.ai_last_error)
                self._stop.wait(self.config.engine_retry_s)
                continue
            finally:
                self._working_on = None
            self.ai_failing = False
            self.ai_reason = None
            self.ai_frames += 1
            took_ms = (t_done - t) / 1e6
            self._ai_ms_ema = took_ms if self._ai_ms_ema is None else 0.8 * self._ai_ms_ema + 0.2 * took_ms
            self.ai_slot.put(AIResult(frame.id, frame.t_capture_ns, t_done, amap, score, region, stages, layer))

    # ----------------------------------------------------------------------------------------------- composer
    def _compose_loop(self) -> None:
        cfg = self.config
        raw_seq = 0
        last_frame: Frame | None = None
        last_real_ns = now_ns()
        while not self._stop.is_set():
            fps = self._nominal_fps(last_frame)
            seq, frame = self.grabber.slot.get_newer(raw_seq, timeout=1.0 / fps)
            if self._stop.is_set():
                break
            if seq > raw_seq and frame is not None:
                raw_seq = seq
                if frame.signal:
                    last_real_ns = frame.t_capture_ns
                    last_frame = frame
                    try:
                        out = self._compose(frame)
                    except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the video
                        out = self._compose_failed(frame, exc)
                    self._emit(out)
                    continue
            silent_ms = (now_ns() - last_real_ns) / 1e6
            if silent_ms >= max(cfg.no_signal_after_ms, 2500.0 / fps) or (frame is not None and not frame.signal):
                try:
                    out = self._no_signal(last_frame)
                except Exception as exc:  # noqa: BLE001
                    out = self._compose_failed(None, exc)
                self._emit(out)

    def _compose_failed(self, frame: Frame | None, exc: BaseException) -> OutputFrame:
        """Composing failed (an odd frame, an overlay bug): send the raw frame as it is, else an error card, so the
        composer thread never dies and the picture never freezes."""
        self.compose_errors += 1
        if self.compose_errors == 1 or self.compose_errors % 100 == 0:
            log.error("composing frame %s failed (%d so far): %s: %s", getattr(frame, "id", None),
                      self.compose_errors, type(exc).__name__, exc)
        t = now_ns()
        meta = {"frame_id": None, "t_capture_ns": t, "score": None,
                "threshold": float(getattr(self.config.style, "threshold", 1.0)), "ai": "off", "ai_frame_id": None,
                "ai_lag_ms": None, "signal": False}
        try:
            img = frame.image
            if img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            image = even_size(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8))
            yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
            meta.update(frame_id=frame.id, t_capture_ns=frame.t_capture_ns, signal=True)
            return OutputFrame(0, frame.id, frame.t_capture_ns, t, image, yuv, meta)
        except Exception:  # noqa: BLE001 - not even the raw frame: an error card at a safe size
            image = overlay.no_signal_frame(480, 640, "VIDEO ERROR", f"{type(exc).__name__}"[:80])
            return OutputFrame(0, -1, t, t, image, cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), meta)

    def _nominal_fps(self, frame: Frame | None) -> float:
        fps = (frame.meta.get("fps") if frame is not None else None) or self.config.fallback_fps
        return float(min(max(fps, 1.0), 120.0))

    def _pick_ai(self, frame: Frame) -> AIResult | None:
        """The heatmap to draw on ``frame``: its own if it arrives within ``ai_wait_ms``, else the newest one."""
        ai_seq, ai = self.ai_slot.peek()
        if ai is not None and ai.frame_id >= frame.id:
            return ai
        working = self._working_on
        ema = self._ai_ms_ema
        if ema is not None and self.config.ai_wait_ms > 0 and not self.ai_failing:
            # Wait only when the worker is on this very frame (or idle, so about to take it) and its recent time per
            # frame says it will finish inside the window; a busy or slow worker costs no waiting at all.
            if working is None:  # idle: it takes this frame now, or when its rest (ai_max_fps) is over
                expected = max(now_ns(), self._ai_rest_until_ns) + int(ema * 1.2e6)
            elif working[0] == frame.id:
                expected = working[1] + int(ema * 1.2e6)
            else:
                return ai
            deadline = frame.t_capture_ns + int(self.config.ai_wait_ms * 1e6)
            if expected > deadline:
                return ai
            wait_s = (deadline - now_ns()) / 1e9
            while wait_s > 0:
                ai_seq, newer = self.ai_slot.get_newer(ai_seq, timeout=wait_s, take=False)
                if newer is not None:
                    ai = newer
                    if newer.frame_id >= frame.id:
                        break
                wait_s = (deadline - now_ns()) / 1e9
        return ai

    def _compose(self, frame: Frame) -> OutputFrame:
        cfg = self.config
        t0 = now_ns()
        ai = self._pick_ai(frame) if self._engine is not None else None
        t_ai = now_ns()
        lag_ms = None if ai is None else (frame.t_capture_ns - ai.t_capture_ns) / 1e6
        if self._engine is None or self.ai_failing:
            state, banner, level = "off", "AI OFF", "error"
        elif ai is None or lag_ms is None or lag_ms > cfg.max_ai_lag_ms:
            state, banner, level = "delayed", "AI DELAYED", "warn"
        else:
            state, banner, level = "ok", None, "warn"
        self.ai_state = state
        draw = state == "ok" and cfg.overlay_enabled
        region = ai.region if ai is not None else self.tracker.current
        if region is None or region.frame_shape != frame.image.shape[:2]:
            # no region of this frame's size (the frame size changed): a heatmap of the old size is not drawn
            region = ScanRegion.full(*frame.image.shape[:2])
            draw = False
        threshold = float(cfg.style.threshold)
        score = ai.score if (ai is not None and state == "ok") else None
        hud = self._hud_lines(frame) if cfg.hud else []
        image = overlay.compose(
            frame.image,
            ai.amap if draw else None,
            region,
            layer=ai.layer if draw else None,
            score=score if cfg.overlay_enabled else None,
            style=cfg.style,
            hud_lines=hud,
            banner=banner,
            banner_level=level,
        )
        image = even_size(image)
        yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
        t1 = now_ns()
        frame.stages["ai_wait"] = (t0, t_ai)
        frame.stamp("overlay", t_ai, t1)
        meta = {
            "frame_id": frame.id,
            "t_capture_ns": frame.t_capture_ns,
            "score": None if score is None else round(float(score), 4),
            "threshold": threshold,
            "ai": state,
            "ai_frame_id": None if ai is None else ai.frame_id,
            "ai_lag_ms": None if lag_ms is None else round(lag_ms, 2),
            "signal": True,
        }
        record = {
            **meta,
            "t_composed_ns": t1,
            "stages_ms": {**frame.stage_ms(), **({} if ai is None else
                                                 {k: (b - a) / 1e6 for k, (a, b) in ai.stages.items()})},
        }
        self.records.append(record)
        return OutputFrame(0, frame.id, frame.t_capture_ns, t1, image, yuv, meta, raw=frame.image, record=record)

    def _no_signal(self, last: Frame | None) -> OutputFrame:
        h, w = last.image.shape[:2] if last is not None else (480, 640)
        detail = getattr(self.grabber.source, "last_error", None) or self.grabber.last_error
        state = getattr(self.grabber.source, "state", None)
        text = "reconnecting..." if state in ("connecting", "reconnecting") else ("source ended" if self.grabber.ended
                                                                                    else None)
        image = even_size(overlay.no_signal_frame(h, w, "NO SIGNAL", text or (detail[:80] if detail else None)))
        t = now_ns()
        self.no_signal_frames += 1
        meta = {"frame_id": None, "t_capture_ns": t, "score": None, "threshold": float(self.config.style.threshold),
                "ai": self.ai_state,
                "ai_frame_id": None, "ai_lag_ms": None, "signal": False}
        return OutputFrame(0, -1, t, t, image, cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), meta)

    def _emit(self, out: OutputFrame) -> None:
        out.seq = self.out.slot.seq + 1
        self.signal = bool(out.meta["signal"])
        self.frames_out += 1
        self._fps_times.append(out.t_composed_ns)
        self.out.publish(out)

    def _hud_lines(self, frame: Frame) -> list[str]:
        fps = self.output_fps()
        last = self.records[-1] if self.records else None
        # capture → composed of the previous frame (this one is not composed yet); the network part is the viewer's
        latency = f"{(last['t_composed_ns'] - last['t_capture_ns']) / 1e6:3.0f} ms" if last else "  – ms"
        backend = getattr(self._engine, "backend", None) or "none"
        return [f"{fps:4.1f} fps  pipeline {latency}", f"{backend} | {self.model_name or 'no model'}"]

    # ----------------------------------------------------------------------------------------------- status
    def output_fps(self) -> float:
        times = list(self._fps_times)
        if len(times) < 2 or times[-1] == times[0]:
            return 0.0
        return (len(times) - 1) * 1e9 / (times[-1] - times[0])

    def stats(self) -> dict[str, Any]:
        src = self.grabber.source
        recent = list(self.records)[-60:]
        lat = sorted(r["t_composed_ns"] - r["t_capture_ns"] for r in recent)
        return {
            "frames_in": self.grabber.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self.grabber.dropped,
            "no_signal_frames": self.no_signal_frames,
            "fps_out": round(self.output_fps(), 2),
            "compose_latency_ms_p50": round(lat[len(lat) // 2] / 1e6, 2) if lat else None,
            "ai": self.ai_state,
            "ai_frames": self.ai_frames,
            "ai_errors": self.ai_errors,
            "compose_errors": self.compose_errors,
            "ai_reason": self.ai_reason,
            "ai_thread_nice": self.ai_thread_nice,
            "ai_max_fps": self.config.ai_max_fps,
            "source": {
                "uri": getattr(src, "uri", None),
                "state": getattr(src, "state", "ended" if self.grabber.ended else "live"),
                "last_error": getattr(src, "last_error", None) or self.grabber.last_error,
                "reconnects": getattr(src, "reconnects", 0),
            },
        }


def run_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (a helper for tools and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
