"""The FastAPI application: viewer page, WebRTC signalling and health.

``create_app(pipeline)`` serves one running :class:`~sonomaly.stream.pipeline.Pipeline`:

* ``GET /`` — the viewer page (fills the window; ``?kiosk=1`` hides the status bar);
* ``POST /offer`` — JSON ``{"sdp", "type": "offer"}`` → the answer (aiortc example convention); malformed → 400;
* ``GET /health`` — JSON: ``status``, ``frames_in``, ``frames_out``, ``frames_dropped``, ``ai``, ``backend``, ``model``…
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from sonomaly.stream.pipeline import Pipeline
from sonomaly.stream.webrtc import OfferError, WebRTCServer, parse_offer

log = logging.getLogger("sonomaly.app")

MAX_OFFER_BYTES = 64 * 1024


def _viewer_html() -> str:
    return resources.files("sonomaly.stream").joinpath("static/viewer.html").read_text(encoding="utf-8")


def create_app(pipeline: Pipeline, *, ice_servers: list[str] | None = None, manage_pipeline: bool = True) -> FastAPI:
    """Build the app. With ``manage_pipeline`` the app starts the pipeline on startup and stops it on shutdown."""
    webrtc = WebRTCServer(pipeline.out, pipeline._t0_ns, ice_servers=ice_servers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_pipeline:
            pipeline.start()
        try:
            yield
        finally:
            await webrtc.close()
            if manage_pipeline:
                pipeline.stop()

    app = FastAPI(title="Sonomaly", version="0.1.0", lifespan=lifespan,
                  description="Live ultrasound anomaly heatmaps over WebRTC.")
    app.state.pipeline = pipeline
    app.state.webrtc = webrtc
    viewer_page = _viewer_html()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer() -> HTMLResponse:
        return HTMLResponse(viewer_page, headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.post("/offer", summary="WebRTC offer → answer (JSON {sdp, type})")
    async def offer(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            raise HTTPException(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
        try:
            desc = parse_offer(body, MAX_OFFER_BYTES)
            answer = await webrtc.answer(desc, remote=request.client.host if request.client else "?")
        except OfferError as exc:
            raise HTTPException(400, str(exc)) from None
        return JSONResponse({"sdp": answer.sdp, "type": answer.type})

    @app.get("/api/records", summary="Per-frame timing records (capture, stage times, AI state) of recent frames")
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
            "model": pipeline.model_name,
            **webrtc.stats(),
        }

    return app
