"""The naive baseline: the integration a user writes first, measured by the same latency harness as Sonomaly.

It follows aiortc's ``examples/server`` (``MediaPlayer`` + ``MediaRelay`` + a ``VideoStreamTrack`` that transforms
frames inside ``recv()``), with the same detector as Sonomaly:

* **the source** is read by one capture thread at its own pace ("the camera"); every frame is stamped with its capture
  time when the source delivers it (same definition as Sonomaly's) and appended to each viewer's FIFO — what
  ``MediaRelay.subscribe(track)`` (``buffered=True``, the default) and an OpenCV/FFmpeg network reader do: nothing is
  dropped, a viewer that falls behind gets a backlog. The FIFO starts when the viewer's track is created (in the
  offer handler, as in the example), so frames that arrive while the connection is being set up queue up. A safety
  cap (``max_backlog``, 300 frames = 10 s at 30 fps) drops the oldest frames only so that a stalled viewer cannot eat
  the machine's memory;
* **one track per viewer**, a ``VideoStreamTrack`` subclass whose ``recv()`` awaits aiortc's ``next_timestamp()``
  (the fixed 30 fps pacer), reads the next frame from its FIFO (blocking, like ``cap.read()``), then runs the detector
  inline on the event loop: ``RegionTracker`` → ``engines.processing.preprocess`` → ``engine.infer`` →
  ``postprocess`` → ``overlay.compose``, and returns a ``bgr24`` frame. aiortc encodes it (one encoder per viewer,
  default settings);
* ``POST /offer`` (``{sdp, type}``), ``GET /health`` and ``GET /api/records`` (the same per-frame records and
  ``clock`` pair as Sonomaly's, so ``sonomaly latency`` measures both the same way). With several viewers each frame is
  processed once per viewer; the record keeps the first viewer's stage times.

The only departure from the example: ``iceServers=[]`` (the example's default STUN server cannot be reached on a
closed network, and waiting for it would only add set-up time, not streaming latency).

    python -m sonomaly.tools.naive --source stamp:data/demo/lung_convex_covid_blines_01.mp4?fps=30 --model models/lung
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from sonomaly.stream.frame import Frame, now_ns

log = logging.getLogger("sonomaly.naive")


class LiveFeed:
    """One capture thread reading ``source``; each subscriber gets every frame in order (a FIFO)."""

    def __init__(self, source, *, max_backlog: int = 300) -> None:
        self.source = source
        self.max_backlog = max_backlog
        self.frames_in = 0
        self.overflow_drops = 0
        self.ended = False
        self._subs: list[tuple[deque, threading.Condition]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="naive-capture", daemon=True)

    def start(self) -> "LiveFeed":
        self.source.open()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.source.close()
        self._thread.join(3)

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.source.read()
            if frame is None:
                break
            self.frames_in += 1
            with self._lock:
                subs = list(self._subs)
            for q, cond in subs:
                with cond:
                    if len(q) >= self.max_backlog:
                        q.popleft()
                        self.overflow_drops += 1
                    q.append(frame)
                    cond.notify()
        self.ended = True
        with self._lock:
            subs = list(self._subs)
        for _, cond in subs:
            with cond:
                cond.notify_all()

    def subscribe(self) -> tuple[deque, threading.Condition]:
        sub = (deque(), threading.Condition())
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def read(self, sub, timeout: float = 5.0) -> Frame | None:
        """The next frame of this subscriber, blocking (like ``cap.read()``); None when the source has ended."""
        q, cond = sub
        with cond:
            if not q and not self.ended:
                cond.wait(timeout)
            return q.popleft() if q else None


class Detector:
    """The same detector Sonomaly runs, called the straightforward way: one function, one frame."""

    def __init__(self, model_dir: str | None, backend: str = "auto", threads: int | None = None) -> None:
        self.engine = None
        if model_dir:
            from sonomaly import engines

            opts = {} if threads is None else {"threads": threads}
            self.engine = engines.load(model_dir, backend=backend, **opts)

    def __call__(self, image, tracker) -> tuple[Any, dict[str, float], float | None]:
        from sonomaly import overlay
        from sonomaly.engines.processing import postprocess, preprocess

        t0 = now_ns()
        region = tracker.update(image)
        t1 = now_ns()
        stages = {"roi": (t1 - t0) / 1e6}
        amap, score = None, None
        if self.engine is not None:
            x = preprocess(image, region, self.engine.card)
            t2 = now_ns()
            raw_map, raw_score = self.engine.infer(x)
            t3 = now_ns()
            amap, score = postprocess(raw_map, raw_score, region, self.engine.card, image.shape[:2])
            t4 = now_ns()
            stages.update(preprocess=(t2 - t1) / 1e6, infer=(t3 - t2) / 1e6, postprocess=(t4 - t3) / 1e6)
            t1 = t4
        out = overlay.compose(image, amap, region, score=score)
        stages["overlay"] = (now_ns() - t1) / 1e6
        return out, stages, score


class Records:
    """Per-frame timing records, first processing of each frame id wins (thread-safe, bounded)."""

    def __init__(self, keep: int = 20_000) -> None:
        self._items: deque[dict] = deque(maxlen=keep)
        self._seen: deque[int] = deque(maxlen=keep)
        self._seen_set: set[int] = set()
        self._lock = threading.Lock()
        self.frames_out = 0

    def add(self, record: dict) -> None:
        with self._lock:
            self.frames_out += 1
            fid = record["frame_id"]
            if fid in self._seen_set:
                return
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(fid)
            self._seen_set.add(fid)
            self._items.append(record)

    def since(self, frame_id: int, limit: int) -> list[dict]:
        with self._lock:
            items = [r for r in self._items if r["frame_id"] > frame_id]
        items.sort(key=lambda r: r["frame_id"])
        return items[:max(1, limit)]


class DetectorTrack(VideoStreamTrack):
    """aiortc server-example style: pace with ``next_timestamp()``, read the next frame, detect, draw, return."""

    def __init__(self, feed: LiveFeed, detector: Detector, records: Records) -> None:
        super().__init__()
        from sonomaly.stream.roi import RegionTracker

        self.feed = feed
        self.detector = detector
        self.records = records
        self.tracker = RegionTracker()
        self.sub = feed.subscribe()

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = self.feed.read(self.sub)  # blocks the event loop, like cap.read() in recv() does
        if frame is None:
            self.stop()
            raise MediaStreamError
        t_read = now_ns()
        image, stages, score = self.detector(frame.image, self.tracker)
        out = av.VideoFrame.from_ndarray(image, format="bgr24")
        out.pts = pts
        out.time_base = time_base
        t_done = now_ns()
        stages = {"queue": (t_read - frame.t_capture_ns) / 1e6, **stages}
        self.records.add({"frame_id": frame.id, "t_capture_ns": frame.t_capture_ns, "t_composed_ns": t_done,
                          "stages_ms": stages, "ai": "ok" if self.detector.engine is not None else "off",
                          "score": None if score is None else round(float(score), 4), "signal": True})
        return out

    def stop(self) -> None:
        self.feed.unsubscribe(self.sub)
        super().stop()


def create_app(feed: LiveFeed, detector: Detector, records: Records | None = None) -> FastAPI:
    records = records or Records()
    pcs: set[RTCPeerConnection] = set()

    @asynccontextmanager
    async def lifespan(app):
        feed.start()
        try:
            yield
        finally:
            await asyncio.gather(*(pc.close() for pc in list(pcs)), return_exceptions=True)
            feed.stop()

    app = FastAPI(title="naive aiortc baseline", lifespan=lifespan)

    @app.post("/offer")
    async def offer(request: Request) -> JSONResponse:
        try:
            params = await request.json()
            desc = RTCSessionDescription(sdp=params["sdp"], type=params["type"])
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(400, f"bad offer: {exc}") from None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)
        track = DetectorTrack(feed, detector, records)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                track.stop()
                pcs.discard(pc)
                await pc.close()

        await pc.setRemoteDescription(desc)
        pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
        return JSONResponse({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    @app.get("/api/records")
    async def api_records(since_frame_id: int = -1, limit: int = 2000) -> dict:
        clock = {"monotonic_ns": time.monotonic_ns(), "unix_ns": time.time_ns()}
        return {"clock": clock, "records": records.since(since_frame_id, min(limit, 10_000))}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "server": "naive", "frames_in": feed.frames_in, "frames_out": records.frames_out,
                "overflow_drops": feed.overflow_drops, "viewers": len(pcs),
                "backend": getattr(detector.engine, "backend", None)}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sonomaly.tools.naive", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="any Sonomaly source URI (stamp:... for the latency harness)")
    p.add_argument("--model", default=None, help="model directory; none: video only")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-loop", action="store_true", help="do not loop a file source")
    p.add_argument("--max-backlog", type=int, default=300, help="safety cap of each viewer's FIFO (frames)")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING))

    import uvicorn

    from sonomaly.stream.sources import open_source

    feed = LiveFeed(open_source(a.source, loop=not a.no_loop), max_backlog=a.max_backlog)
    app = create_app(feed, Detector(a.model, a.backend, a.threads))
    print(f"naive baseline: {a.source} on http://{a.host}:{a.port}/", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
