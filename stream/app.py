"""The FastAPI application: viewer page, WebRTC signalling and health.

``create_app(pipeline)`` serves one running :class:`~sonomaly.stream.pipeline.Pipeline`:

* ``GET /`` — the viewer page (fills the window; ``?kiosk=1`` hides the status bar);
* ``POST /offer`` — JSON ``{"sdp", "type": "offer"}`` → the answer (aiortc example convention); malformed → 400;
* ``GET /health`` — JSON: ``status``, ``frames_in``, ``frames_out``, ``frames_dropped``, ``ai``, ``backend``, ``model``…
* ``POST /whep`` (``application/sdp`` → ``201`` + ``Location`` + answer), ``DELETE /whep/{id}`` — WHEP (RFC 9725 style);
* the control API (:mod:`.control`), ``GET /metrics`` (Prometheus), ``GET /api/records``.

:class:`ServerOptions` chooses the encode mode (one shared encoder, or aiortc's one per viewer), codec and bitrate,
tokens, CORS, rate limit, recording and feedback folders, and an optional WHIP publisher. See docs/STREAMING.md.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from aiortc import RTCSessionDescription
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from sonomaly.stream import control as control_api
from sonomaly.stream.encoder import DEFAULT_BITRATE, DEFAULT_VP8_SPEED, SharedEncoder, set_aiortc_bitrate
from sonomaly.stream.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sonomaly.stream.metrics import Metrics
from sonomaly.stream.pipeline import Pipeline
from sonomaly.stream.recorder import EventConfig, Recorder
from sonomaly.stream.security import Guard, SecurityConfig
from sonomaly.stream.webrtc import OfferError, TooManyViewers, WebRTCServer, parse_offer

log = logging.getLogger("sonomaly.app")

MAX_OFFER_BYTES = 64 * 1024


def _viewer_html() -> str:
    return resources.files("sonomaly.stream").joinpath("static/viewer.html").read_text(encoding="utf-8")


@dataclass
class ServerOptions:
    encode: str = "shared"
    """``shared``: one encoder for all viewers (encode once, fan out); ``per-viewer``: aiortc's one per peer."""
    engine_process: bool | dict = True
    """Models loaded through the control API run in a process of their own (``engines.load(process=...)``; a dict
    passes options such as ``timeout_s``); ``False``: in the server's process."""
    fanout: str = "pass"
    """With the shared encoder: ``pass``, every viewer written in one pass per frame (``stream.fanout``); ``tasks``,
    aiortc's own sender loop per viewer."""
    codec: str = "vp8"
    bitrate: int = DEFAULT_BITRATE
    vp8_speed: int = DEFAULT_VP8_SPEED
    """libvpx's realtime speed for the shared VP8 encoder (0..16, higher is faster; see ``stream.encoder``)."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    recordings_dir: Path = Path("recordings")
    dataset_dir: Path = Path("feedback")
    models_dir: Path | None = None
    events: EventConfig = field(default_factory=EventConfig)
    whip_url: str | None = None
    whip_token: str | None = None
    max_viewers: int = 64
    """Direct WebRTC viewers at most (more get 503: put an SFU behind --whip for large audiences)."""
    playout_delay: tuple[int, int] | None = (0, 0)
    """(min, max) ms sent in the ``playout-delay`` RTP header extension (:mod:`sonomaly.stream.playout`): ``(0, 0)``
    asks browsers to show each frame as soon as it is decoded; ``None`` leaves their smoothing as it is."""


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` (by its Content-Length, or
    while it streams in), so a huge upload is never read whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
        except ValueError:
            raise HTTPException(400, "bad Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(pipeline: Pipeline, *, ice_servers: list[str] | None = None, manage_pipeline: bool = True,
               options: ServerOptions | None = None) -> FastAPI:
    """Build the app. With ``manage_pipeline`` the app starts the pipeline on startup and stops it on shutdown."""
    opts = options or ServerOptions()
    if opts.encode not in ("shared", "per-viewer"):
        raise ValueError("encode must be 'shared' or 'per-viewer'")
    encoder = None
    if opts.encode == "shared":
        encoder = SharedEncoder(pipeline.out, pipeline._t0_ns, codec=opts.codec, bitrate=opts.bitrate, speed=opts.vp8_speed,
                                on_encoded=lambda out, a, b: Pipeline.stamp_record(out, "encode", a, b))
    elif options is not None:  # per-viewer, configured: aiortc's encoders at the same bitrate (not its 0.5–1.5M)
        set_aiortc_bitrate(opts.bitrate)
    from sonomaly.stream import playout

    if opts.playout_delay is not None:
        playout.enable(*opts.playout_delay)
    else:
        playout.disable()
    webrtc = WebRTCServer(pipeline.out, pipeline._t0_ns, ice_servers=ice_servers, encoder=encoder,
                          max_viewers=opts.max_viewers, fanout=opts.fanout)
    guard = Guard(opts.security)
    recorder = Recorder(pipeline, opts.recordings_dir, events=opts.events)
    metrics = Metrics(pipeline, webrtc, guard, recorder)
    state = control_api.ControlState(pipeline, recorder, models_dir=opts.models_dir, dataset_dir=opts.dataset_dir,
                                     engine_process=opts.engine_process)
    whip = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal whip
        if manage_pipeline:
            pipeline.start()
        if encoder is not None:
            encoder.start()
        recorder.start_thread()
        if opts.whip_url:
            from sonomaly.stream.whip import WhipPublisher

            whip = WhipPublisher(opts.whip_url, webrtc, token=opts.whip_token)
            app.state.whip = whip
            metrics.whip = whip
            whip.start()
        try:
            yield
        finally:
            if whip is not None:
                await whip.close()
            await webrtc.close()
            recorder.stop_thread()
            if encoder is not None:
                encoder.stop()
            if manage_pipeline:
                pipeline.stop()
                engine = pipeline.engine
                if getattr(engine, "isolated", False):
                    engine.close()  # its process ends with the server

    app = FastAPI(title="Sonomaly", version="0.1.0", lifespan=lifespan,
                  description="Live ultrasound anomaly heatmaps over WebRTC.")
    if opts.security.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(opts.security.cors_origins),
                           allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Location"])
    app.state.pipeline = pipeline
    app.state.webrtc = webrtc
    app.state.encoder = encoder
    app.state.guard = guard
    app.state.recorder = recorder
    app.state.control = state
    app.state.whip = None
    app.state.options = opts
    viewer_page = _viewer_html()
    as_viewer = [Depends(guard.viewer)]
    signalling = [Depends(guard.rate_limit), Depends(guard.viewer)]
    app.include_router(control_api.router(state, guard))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer() -> HTMLResponse:
        return HTMLResponse(viewer_page, headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.post("/offer", summary="WebRTC offer → answer (JSON {sdp, type})", dependencies=signalling)
    async def offer(request: Request) -> JSONResponse:
        body = await read_limited(request, MAX_OFFER_BYTES)
        try:
            desc = parse_offer(body, MAX_OFFER_BYTES)
            answer = await webrtc.answer(desc, remote=request.client.host if request.client else "?")
        except OfferError as exc:
            raise HTTPException(400, str(exc)) from None
        except TooManyViewers as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        return JSONResponse({"sdp": answer.sdp, "type": answer.type})

    @app.post("/whep", status_code=201, dependencies=signalling, summary="WHEP: SDP offer → 201, Location, SDP answer",
              response_class=Response, responses={201: {"content": {"application/sdp": {}}}})
    async def whep(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/sdp":
            raise HTTPException(415, "WHEP needs Content-Type: application/sdp")
        body = await read_limited(request, MAX_OFFER_BYTES)
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "the offer is not UTF-8 text") from None
        if not sdp.lstrip().startswith("v=0") or "m=video" not in sdp:
            raise HTTPException(400, "the body is not an SDP offer with a video section")
        try:
            viewer = await webrtc.answer_viewer(RTCSessionDescription(sdp=sdp, type="offer"),
                                                remote=request.client.host if request.client else "?", kind="whep")
        except OfferError as exc:
            raise HTTPException(400, str(exc)) from None
        except TooManyViewers as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        return Response(viewer.pc.localDescription.sdp, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/whep/{viewer.id}", "Cache-Control": "no-store"})

    @app.delete("/whep/{resource_id}", dependencies=as_viewer, summary="WHEP: leave (end the session)")
    async def whep_delete(resource_id: str) -> Response:
        if not await webrtc.drop_id(resource_id):
            raise HTTPException(404, "no such WHEP session")
        return Response(status_code=200)

    @app.patch("/whep/{resource_id}", include_in_schema=False)
    async def whep_patch(resource_id: str) -> Response:
        # no trickle ICE: the answer already carries all of the server's candidates
        return Response(status_code=405, headers={"Allow": "DELETE"})

    @app.options("/whep", include_in_schema=False)
    async def whep_options() -> Response:
        return Response(status_code=204, headers={"Accept-Post": "application/sdp", "Allow": "POST, OPTIONS"})

    @app.get("/metrics", dependencies=[Depends(guard.control)], response_class=Response,
             summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/api/records", dependencies=as_viewer,
             summary="Per-frame timing records (capture, stage times, AI state) of recent frames")
    async def records(since_frame_id: int = -1, limit: int = 2000) -> dict:
        """Records of composed frames with ``frame_id > since_frame_id``, oldest first.

        ``clock`` pairs the server's monotonic clock with the wall clock, read at the same moment, so a receiver on
        the same host (e.g. a browser, whose timestamps are wall-clock based) can put both on one time line.
        """
        items = [r for r in list(pipeline.records) if r["frame_id"] is not None and r["frame_id"] > since_frame_id]
        clock = {"monotonic_ns": time.monotonic_ns(), "unix_ns": time.time_ns()}
        return {"clock": clock, "records": items[-max(1, min(limit, 10_000)):]}

    @app.get("/health", summary="Pipeline, AI and viewer state")
    async def health() -> dict:
        stats = pipeline.stats()
        engine = pipeline.engine
        if not pipeline.signal:
            status = "no_signal"
        elif stats["ai"] != "ok":
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            **stats,
            "signal": pipeline.signal,
            "backend": getattr(engine, "backend", None),
            "backend_reason": getattr(engine, "backend_reason", None),
            "engine_process": engine.impl.stats() if getattr(engine, "isolated", False) else None,
            "model": pipeline.model_name,
            **webrtc.stats(),
            **({"whip": whip.stats()} if whip is not None else {}),
        }

    return app
