"""Recording: mp4 of the composed (overlay) or the raw stream, event clips with pre-roll, and a ring of recent frames.

One tap thread reads every composed frame from the pipeline's :class:`~sonomaly.stream.pipeline.OutputHub` (a side
consumer: it never slows the viewers or the composer; if writing falls behind it skips frames, newest wins) and

* keeps a bounded ring of the most recent frames (the pre-roll of event clips, and the frames feedback refers to);
* writes the manual recording, if one runs (``start(kind="overlay"|"raw")`` / ``stop()``);
* watches the score: when it stays over the display threshold for ``event_frames`` frames in a row, it writes an
  event clip that starts ``pre_roll_s`` before the trigger and ends ``post_roll_s`` after the score falls back.

Files are H.264 in mp4 (libx264, ``ultrafast``), timed by capture time.
"""
from __future__ import annotations

import fractions
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from sonomaly.stream.privacy import deidentify

log = logging.getLogger("sonomaly.recorder")


class Mp4Writer:
    """H.264 mp4, frames timed by their capture time (ms)."""

    def __init__(self, path: Path, fps: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.fps = max(1, int(round(fps)))
        self.stream = None
        self.size: tuple[int, int] | None = None
        self.t0_ns: int | None = None
        self.last_pts = -1
        self.frames = 0

    def write(self, image: np.ndarray, t_ns: int) -> None:
        if self.stream is None:
            h, w = image.shape[:2]
            self.size = (w - w % 2, h - h % 2)
            try:
                self.stream = self.container.add_stream("libx264", rate=self.fps)
                self.stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
            except Exception:  # an FFmpeg build without libx264
                self.stream = self.container.add_stream("mpeg4", rate=self.fps)
            self.stream.width, self.stream.height = self.size
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = fractions.Fraction(1, 1000)
            self.t0_ns = t_ns
        w, h = self.size
        if image.shape[1] != w or image.shape[0] != h:
            image = cv2.resize(image, (w, h)) if abs(image.shape[1] - w) > 1 or abs(image.shape[0] - h) > 1 \
                else image[:h, :w]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        pts = (t_ns - self.t0_ns) // 1_000_000
        if pts <= self.last_pts:
            pts = self.last_pts + 1
        self.last_pts = pts
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, 1000)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


@dataclass
class EventConfig:
    enabled: bool = False
    event_frames: int = 10
    """The score must stay over the threshold for this many frames in a row."""
    pre_roll_s: float = 3.0
    post_roll_s: float = 2.0
    max_clip_s: float = 60.0


class Recorder:
    def __init__(self, pipeline, directory: str | Path = "recordings", *, ring_s: float = 5.0,
                 events: EventConfig | None = None, nominal_fps: float = 30.0) -> None:
        self.pipeline = pipeline
        self.hub = pipeline.out
        self.directory = Path(directory)
        self.events = events or EventConfig()
        self.fps = nominal_fps
        self.ring: deque = deque(maxlen=max(2, int(ring_s * nominal_fps)))
        # every composed frame enters the ring as it is published (an O(1) append in the composer's thread), so the
        # ring never lags behind the hub, even while this recorder's thread is busy encoding a clip
        self.hub.add_listener(self.ring.append)
        self._lock = threading.Lock()
        self._manual: Mp4Writer | None = None
        self._manual_kind = "overlay"
        self._manual_started: float | None = None
        self._event: Mp4Writer | None = None
        self._event_started_ns = 0
        self._over = 0
        self._under = 0
        self.event_clips = 0
        self.last_event: dict[str, Any] | None = None
        self.finished: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonomaly-recorder", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start_thread(self) -> "Recorder":
        self._thread.start()
        return self

    def stop_thread(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if self._manual is not None:
                self._close_manual()
            if self._event is not None:
                self._close_event()

    @property
    def active(self) -> bool:
        return self._manual is not None

    def start(self, kind: str = "overlay", name: str | None = None) -> dict[str, Any]:
        if kind not in ("overlay", "raw"):
            raise ValueError("kind must be 'overlay' or 'raw'")
        with self._lock:
            if self._manual is not None:
                raise RuntimeError(f"a recording is already running: {self._manual.path}")
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.directory / (name or f"recording-{stamp}-{kind}.mp4")
            self._manual = Mp4Writer(path, self.fps)
            self._manual_kind = kind
            self._manual_started = time.monotonic()
            return {"recording": True, "path": str(path), "kind": kind}

    def stop(self) -> dict[str, Any]:
        with self._lock:
            if self._manual is None:
                raise RuntimeError("no recording is running")
            return self._close_manual()

    def _close_manual(self) -> dict[str, Any]:
        w = self._manual
        self._manual = None
        w.close()
        info = {"recording": False, "path": str(w.path), "kind": self._manual_kind, "frames": w.frames,
                "seconds": round(time.monotonic() - (self._manual_started or time.monotonic()), 3)}
        self.finished.append(info)
        return info

    def status(self) -> dict[str, Any]:
        w = self._manual
        return {"recording": w is not None, "path": str(w.path) if w else None,
                "kind": self._manual_kind if w else None, "frames": w.frames if w else 0,
                "events": {**self.events.__dict__, "clips": self.event_clips, "last": self.last_event,
                           "active": self._event is not None}}

    def find(self, frame_id: int | None):
        """The most recent composed frame with ``frame_id`` (or the newest one) from the ring."""
        frames = list(self.ring)
        if frame_id is not None:
            for out in reversed(frames):
                if out.frame_id == frame_id:
                    return out
        return frames[-1] if frames else self.hub.latest()

    # ------------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq, out = self.hub.slot.get_newer(seq, timeout=0.2, take=False)
            if out is None or self._stop.is_set():
                continue
            with self._lock:
                try:
                    if self._manual is not None:
                        raw = out.raw if out.raw is not None else out.image
                        img = out.image if self._manual_kind == "overlay" else raw
                        self._manual.write(deidentify(img, self.pipeline.tracker.current, raw), out.t_capture_ns)
                    self._watch_events(out)
                except Exception as exc:  # a full disk must not stop the stream
                    log.error("recording failed: %s: %s", type(exc).__name__, exc)
                    if self._manual is not None:
                        try:
                            self._close_manual()
                        except Exception:
                            self._manual = None

    def _watch_events(self, out) -> None:
        cfg = self.events
        score, thr = out.meta.get("score"), out.meta.get("threshold", 1.0)
        over = score is not None and score > thr
        self._over = self._over + 1 if over else 0
        self._under = 0 if over else self._under + 1
        if self._event is not None:
            self._event.write(self._clean(out), out.t_capture_ns)
            too_long = (out.t_capture_ns - self._event_started_ns) / 1e9 > cfg.max_clip_s
            if self._under >= max(1, int(cfg.post_roll_s * self.fps)) or too_long or not cfg.enabled:
                self._close_event()
            return
        if cfg.enabled and self._over >= cfg.event_frames:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.directory / "events" / f"event-{stamp}.mp4"
            self._event = Mp4Writer(path, self.fps)
            self._event_started_ns = out.t_capture_ns
            pre_ns = int(cfg.pre_roll_s * 1e9)
            for f in list(self.ring):
                if out.t_capture_ns - f.t_capture_ns <= pre_ns:
                    self._event.write(self._clean(f), f.t_capture_ns)
            self.last_event = {"path": str(path), "trigger_frame_id": out.frame_id, "score": score}

    def _clean(self, out) -> np.ndarray:
        return deidentify(out.image, self.pipeline.tracker.current, out.raw if out.raw is not None else out.image)

    def _close_event(self) -> None:
        w = self._event
        self._event = None
        w.close()
        self.event_clips += 1
        if self.last_event is not None:
            self.last_event["frames"] = w.frames
        log.info("event clip %s: %d frames", w.path, w.frames)
