"""Inference engines: one model (``card.json`` + ``model.onnx`` + ``model.pt``), many backends, same numbers.

    from sonomaly.engines import load
    eng = load("models/lung")                  # backend="auto": TensorRT if usable, else ONNX Runtime (reason recorded)
    eng = load("models/lung", precision="int8")  # a variant from `sonomaly export` (falls back to fp32, saying why)
    x = preprocess(frame_bgr, region, eng.card)  # sonomaly.engines.processing
    raw_map, raw_score = eng.infer(x)          # [1,1,h,w] float32, [1] float32
    amap, score = postprocess(raw_map, raw_score, region, eng.card, frame_bgr.shape)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BackendUnavailable
from .card import CardError, ModelCard

__all__ = ["load", "Engine", "BackendUnavailable", "ModelCard", "CardError", "BACKENDS", "PRECISIONS", "LIVE_OPTIONS"]

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
# CPU options of a live stream (``sonomaly serve`` and model switches through the control API): one inference thread
# that sleeps between frames, not ORT's spin-waiting pool (docs/ENGINES.md, "Live serving")
LIVE_OPTIONS = {"threads": 1, "spin": False}
PRECISIONS = ("fp32", "fp16", "int8")
# options each backend understands (``auto`` passes only these on, so a TensorRT option never breaks the fallback)
BACKEND_OPTIONS = {
    "onnxruntime": ("threads", "inter_op_threads", "providers", "graph_optimization", "spin", "file", "device"),
    "torch": ("threads",),
    "tensorrt": ("device", "workspace_mb", "rebuild", "calib", "calib_batches", "cuda_graph", "fp16"),
}


@dataclass
class Engine:
    card: ModelCard
    backend: str
    backend_reason: str
    model_dir: Path
    impl: Any = field(repr=False)
    precision: str = "fp32"

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed float32 ``[1,C,H,W]`` -> raw ``(anomaly_map [1,1,h,w] float32, score [1] float32)``."""
        x = np.asarray(x)
        want = (1, self.card.input.channels, *self.card.input_size)
        if x.shape != want:
            raise ValueError(f"input shape {x.shape} != model input {want} (use processing.preprocess)")
        amap, score = self.impl.infer(x)
        return (np.asarray(amap, np.float32).reshape(self.card.map_shape),
                np.asarray(score, np.float32).reshape(1))

    @property
    def isolated(self) -> bool:
        """Whether this engine runs in a process of its own (``load(process=...)``; ``impl.stats()`` then has it)."""
        return getattr(self.impl, "isolated", False)

    def close(self) -> None:
        if hasattr(self.impl, "close"):
            self.impl.close()


def _make(backend: str, model_dir: Path, card: ModelCard, opts: dict, precision: str):
    opts = {k: v for k, v in opts.items() if k in BACKEND_OPTIONS.get(backend, ())}
    if backend == "onnxruntime":
        from .backends.onnxruntime import OrtBackend

        return OrtBackend(model_dir, card, precision=precision, **opts)
    if backend == "torch":
        from .backends.torch import TorchBackend

        if precision != "fp32":
            raise BackendUnavailable(f"torch (the FP32 reference) has no {precision} variant")
        return TorchBackend(model_dir, card, **opts)
    if backend == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model_dir, card, precision=precision, **opts)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def _make_with_precision(backend: str, model_dir: Path, card: ModelCard, opts: dict, precision: str):
    """``(impl, precision used, note)``: an unavailable ONNX variant (not exported, or INT8 rejected by the accuracy
    gate) or a torch FP16/INT8 request falls back to FP32 and says why."""
    try:
        return _make(backend, model_dir, card, opts, precision), precision, ""
    except BackendUnavailable as e:
        if precision == "fp32" or backend == "tensorrt" or (backend == "onnxruntime" and opts.get("file")):
            raise
        why = str(e)
    return _make(backend, model_dir, card, opts, "fp32"), "fp32", f"{precision} unavailable ({why}); using fp32"


def load(model_dir: str | Path, backend: str = "auto", precision: str | None = None, *,
         process: bool | dict = False, **opts) -> Engine:
    """Load the model in ``model_dir`` (``card.json`` + model files) on ``backend``.

    ``backend``: ``"auto"`` (TensorRT when importable and a GPU is present, else ONNX Runtime; ``Engine.backend_reason``
    says why), ``"tensorrt"``, ``"onnxruntime"`` or ``"torch"`` (the reference).
    ``precision``: ``"fp32"`` | ``"fp16"`` | ``"int8"``; default FP16 on TensorRT, FP32 elsewhere.  On ONNX Runtime
    it selects the variant file recorded in the card by ``sonomaly export``; a variant that does not exist (or an INT8
    that failed the export's accuracy gate) falls back to FP32, and ``backend_reason`` says so.
    ``opts`` go to the backend (onnxruntime: ``threads=2``, ``providers="auto"``, ``graph_optimization="all"``,
    ``spin``; tensorrt: ``device=0``, ``calib``, ``cuda_graph``; torch: ``threads``).
    An explicitly requested backend that cannot run raises :class:`BackendUnavailable`.
    ``process``: run the engine in a process of its own (:mod:`sonomaly.engines.isolated`; a dict passes its options,
    e.g. ``{"timeout_s": 5}``), so that a native crash or hang in the inference library cannot take the caller down.
    """
    model_dir = Path(model_dir)
    card = ModelCard.load(model_dir)
    if process:
        from .isolated import IsolatedBackend

        impl = IsolatedBackend(model_dir, backend, precision, **(process if isinstance(process, dict) else {}), **opts)
        info = impl.info
        return Engine(card, info["backend"], f"{info['backend_reason']}; in a process of its own", model_dir, impl,
                      info["precision"])
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if "fp16" in opts and precision is None and backend in ("tensorrt", "auto"):  # the older TensorRT option
        precision = "fp16" if opts["fp16"] else "fp32"
    if backend != "auto":
        prec = precision or ("fp16" if backend == "tensorrt" else "fp32")
        impl, used, note = _make_with_precision(backend, model_dir, card, opts, prec)
        return Engine(card, backend, "requested" + (f"; {note}" if note else ""), model_dir, impl, used)
    from .backends.tensorrt import available

    ok, why = available()
    if ok:
        try:
            prec = precision or "fp16"
            return Engine(card, "tensorrt", f"auto: GPU available: {why}", model_dir,
                          _make("tensorrt", model_dir, card, opts, prec), prec)
        except Exception as e:  # build failure etc.: fall back, but say so
            why = f"tensorrt failed: {e}"
    else:
        why = f"tensorrt unavailable: {why}"
    impl, used, note = _make_with_precision("onnxruntime", model_dir, card, opts, precision or "fp32")
    return Engine(card, "onnxruntime", f"auto: {why}; using onnxruntime" + (f"; {note}" if note else ""), model_dir,
                  impl, used)
