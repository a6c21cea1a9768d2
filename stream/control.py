"""The control API (FastAPI router; OpenAPI at ``/docs``): model and backend, display settings, snapshot, recording,
event clips and the viewers' feedback.

* ``GET /api/control`` — everything at once; ``PATCH /api/control/settings`` — threshold, opacity, overlay, smoothing, AI rate.
* ``PUT /api/control/model`` — load another model or backend in a thread, then swap it in with
  ``Pipeline.set_engine``: the video never stops (the composer keeps sending raw frames under "AI DELAYED"/"AI OFF"
  meanwhile). ``GET /api/control/models`` lists the models found.
* ``GET /api/snapshot.png`` — the newest composed frame (``?raw=1``: the raw image).
* ``POST /api/recording/start|stop``, ``GET /api/recording``; ``PUT /api/recording/events`` — event clips.
* ``POST /api/feedback`` — "false alarm" / "missed finding" from the viewer page: the frame (outside the scan region
  blacked out: burned-in patient text never leaves) and its metadata go into the dataset folder.

Every route needs the control token except feedback, which needs the viewer token (see :mod:`.security`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, Field

from sonomaly.stream.privacy import deidentify

log = logging.getLogger("sonomaly.control")


class Settings(BaseModel):
    threshold: float | None = Field(None, gt=0, le=100, description="display threshold, card-normalised (1.0 = the "
                                                                      "model card's threshold)")
    opacity: float | None = Field(None, ge=0, le=1, description="heatmap opacity")
    overlay: bool | None = Field(None, description="draw the heatmap, contours and gauge")
    smoothing: float | None = Field(None, ge=0, lt=1, description="temporal smoothing alpha (0: off)")
    ai_max_fps: float | None = Field(None, ge=0, le=1000, description="at most this many heatmaps a second "
                                                                      "(0: no cap; the video is never capped)")


class ModelChoice(BaseModel):
    model: str | None = Field(None, description="model name (a folder under the models directory) or a path; "
                                                "null: the current model")
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    threads: int | None = None


class RecordingStart(BaseModel):
    kind: Literal["overlay", "raw"] = "overlay"


class EventSettings(BaseModel):
    enabled: bool | None = None
    event_frames: int | None = Field(None, ge=1, le=10_000)
    pre_roll_s: float | None = Field(None, ge=0, le=30)
    post_roll_s: float | None = Field(None, ge=0, le=60)
    max_clip_s: float | None = Field(None, gt=0, le=3600)


class Feedback(BaseModel):
    kind: Literal["false_alarm", "missed_finding"]
    frame_id: int | None = Field(None, description="the frame the viewer saw (from the metadata channel)")
    note: str | None = Field(None, max_length=500, description="free text; do not enter patient data")


class ControlState:
    def __init__(self, pipeline, recorder, *, models_dir: str | Path | None = None,
                 dataset_dir: str | Path = "feedback", default_backend: str = "auto", loader=None,
                 engine_process: bool | dict = False) -> None:
        self.pipeline = pipeline
        self.recorder = recorder
        self.models_dir = Path(models_dir) if models_dir else None
        self.dataset_dir = Path(dataset_dir)
        self.default_backend = default_backend
        self.loader = loader
        self.engine_process = engine_process
        """``engines.load(process=...)`` for the models this API loads: in a process of their own, or not."""
        self.switching: dict | None = None
        self.last_switch: dict | None = None
        self._switch_lock = asyncio.Lock()

    def model_path(self, name: str) -> Path:
        p = Path(name)
        if p.is_dir() and (p / "card.json").exists():
            return p
        if self.models_dir is not None and "/" not in name and ".." not in name:
            q = self.models_dir / name
            if (q / "card.json").exists():
                return q
        raise HTTPException(404, f"no model {name!r} (known: {', '.join(self.list_models()) or 'none'})")

    def list_models(self) -> list[str]:
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        return sorted(d.name for d in self.models_dir.iterdir() if (d / "card.json").exists())

    def settings(self) -> dict:
        cfg = self.pipeline.config
        return {"threshold": cfg.style.threshold, "opacity": cfg.style.opacity, "overlay": cfg.overlay_enabled,
                "smoothing": cfg.temporal_alpha or 0.0, "ai_max_fps": cfg.ai_max_fps or 0.0}

    def snapshot(self) -> dict:
        p = self.pipeline
        engine = p.engine
        return {"model": p.model_name, "model_dir": str(getattr(engine, "model_dir", "") or "") or None,
                "backend": getattr(engine, "backend", None), "backend_reason": getattr(engine, "backend_reason", None),
                "ai": p.ai_state, "ai_reason": p.ai_reason, "models": self.list_models(),
                "switching": self.switching, "last_switch": self.last_switch, "settings": self.settings(),
                "recording": self.recorder.status() if self.recorder else None}


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise HTTPException(500, "PNG encoding failed")
    return buf.tobytes()


def router(state: ControlState, guard) -> APIRouter:
    r = APIRouter(tags=["control"])
    control = [Depends(guard.control)]

    @r.get("/api/control", dependencies=control, summary="Model, backend, AI state, display settings, recording")
    async def get_control() -> dict:
        return state.snapshot()

    @r.patch("/api/control/settings", dependencies=control, summary="Threshold, opacity, overlay, smoothing, AI rate")
    async def set_settings(s: Settings) -> dict:
        p = state.pipeline
        cfg = p.config
        if s.threshold is not None:
            cfg.style.threshold = float(s.threshold)
        if s.opacity is not None:
            cfg.style.opacity = float(s.opacity)
        if s.overlay is not None:
            cfg.overlay_enabled = bool(s.overlay)
        if s.smoothing is not None:
            cfg.temporal_alpha = float(s.smoothing) or None
            p._reset_smoother()
        if s.ai_max_fps is not None:
            p.set_ai_max_fps(float(s.ai_max_fps))  # a resting worker wakes: the new cap counts from now
        return state.settings()

    @r.get("/api/control/models", dependencies=control, summary="Models found in the models directory")
    async def models() -> dict:
        return {"models": state.list_models(), "current": state.pipeline.model_name}

    @r.put("/api/control/model", dependencies=control,
           summary="Switch model and/or backend without interrupting the video")
    async def set_model(choice: ModelChoice) -> dict:
        p = state.pipeline
        if choice.model is None:
            current = getattr(p.engine, "model_dir", None)
            if current is None:
                raise HTTPException(400, "no model is loaded: name one")
            path = Path(current)
        else:
            path = state.model_path(choice.model)
        if state._switch_lock.locked():
            raise HTTPException(409, "a model switch is already in progress")
        async with state._switch_lock:
            state.switching = {"model": str(path), "backend": choice.backend}
            from sonomaly.engines import LIVE_OPTIONS

            opts = {**LIVE_OPTIONS, **({} if choice.threads is None else {"threads": choice.threads})}
            loop = asyncio.get_running_loop()
            try:
                # load (and warm up) in a thread: the event loop keeps serving viewers, the pipeline keeps composing
                engine = await loop.run_in_executor(None, lambda: _load(state, path, choice.backend, opts))
            except Exception as exc:
                state.last_switch = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                raise HTTPException(422, f"cannot load {path} on {choice.backend}: {type(exc).__name__}: {exc}")
            finally:
                state.switching = None
            p.set_engine(engine)
            state.last_switch = {"ok": True, "model": p.model_name, "backend": getattr(engine, "backend", None),
                                 "at": datetime.now(timezone.utc).isoformat()}
        return state.snapshot()

    @r.delete("/api/control/model", dependencies=control, summary="Unload the model (video only, AI OFF)")
    async def unload_model() -> dict:
        state.pipeline.set_engine(None)
        return state.snapshot()

    @r.get("/api/snapshot.png", dependencies=control, summary="The newest composed frame as PNG (?raw=1: raw)",
           response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def snapshot(raw: bool = False) -> Response:
        out = state.pipeline.out.latest()
        if out is None:
            raise HTTPException(503, "no frame yet")
        image = out.raw if raw and out.raw is not None else out.image
        data = await asyncio.get_running_loop().run_in_executor(None, _png, image)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "no-store", "X-Frame-Id": str(out.frame_id)})

    @r.get("/api/recording", dependencies=control, summary="Recording and event-clip state")
    async def recording() -> dict:
        return state.recorder.status()

    @r.post("/api/recording/start", dependencies=control, summary="Start an mp4 recording of the overlay or raw stream")
    async def recording_start(body: RecordingStart | None = None) -> dict:
        try:
            return state.recorder.start((body or RecordingStart()).kind)
        except RuntimeError as exc:
            raise HTTPException(409, str(exc)) from None

    @r.post("/api/recording/stop", dependencies=control, summary="Stop the recording; returns its path and frames")
    async def recording_stop() -> dict:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, state.recorder.stop)
        except RuntimeError as exc:
            raise HTTPException(409, str(exc)) from None

    @r.put("/api/recording/events", dependencies=control,
           summary="Event clips: score over the threshold for N frames → clip with pre-roll")
    async def recording_events(body: EventSettings) -> dict:
        ev = state.recorder.events
        for k, v in body.model_dump(exclude_none=True).items():
            setattr(ev, k, v)
        return state.recorder.status()

    @r.post("/api/feedback", dependencies=[Depends(guard.viewer)], status_code=201,
            summary="'false alarm' / 'missed finding': save the frame (de-identified) and its metadata")
    async def feedback(fb: Feedback) -> dict:
        out = state.recorder.find(fb.frame_id)
        if out is None:
            raise HTTPException(503, "no frame yet")
        return await asyncio.get_running_loop().run_in_executor(None, _save_feedback, state, fb, out)

    return r


def _load(state: ControlState, path: Path, backend: str, opts: dict):
    if state.loader is not None:
        return state.loader(path, backend, **opts)
    from sonomaly import engines

    return engines.load(path, backend=backend, process=state.engine_process, **opts)


_feedback_lock = threading.Lock()


def _save_feedback(state: ControlState, fb: Feedback, out) -> dict:
    p = state.pipeline
    region = p.tracker.current
    item = uuid.uuid4().hex[:12]
    folder = state.dataset_dir / fb.kind
    folder.mkdir(parents=True, exist_ok=True)
    raw = out.raw if out.raw is not None else out.image
    cv2.imwrite(str(folder / f"{item}.png"), deidentify(raw, region))
    cv2.imwrite(str(folder / f"{item}_overlay.png"), deidentify(out.image, region, raw))
    meta = {
        "id": item, "kind": fb.kind, "note": fb.note,
        # a day, not a moment: the exam time is itself identifying
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "frame_id": out.frame_id, "requested_frame_id": fb.frame_id,
        "score": out.meta.get("score"), "threshold": out.meta.get("threshold"), "ai": out.meta.get("ai"),
        "model": p.model_name, "backend": getattr(p.engine, "backend", None),
        "model_card_threshold": 1.0, "settings": state.settings(),
        "image": f"{item}.png", "overlay": f"{item}_overlay.png",
        "shape": list(raw.shape[:2]), "deidentified": "outside the scan region blacked out; no source URI, "
                                                      "no time of day, no DICOM tags",
    }
    (folder / f"{item}.json").write_text(json.dumps(meta, indent=1))
    with _feedback_lock, open(state.dataset_dir / "index.jsonl", "a") as f:
        f.write(json.dumps({k: meta[k] for k in ("id", "kind", "frame_id", "score", "model")}) + "\n")
    return {"saved": True, **meta, "folder": str(folder)}
