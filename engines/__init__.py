"""Inference engines: one model (``card.json`` + ``model.onnx`` + ``model.pt``), many backends, same numbers.

    from sonomaly.engines import load
    eng = load("models/lung")                  # backend="auto": TensorRT if usable, else ONNX Runtime (reason recorded)
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

__all__ = ["load", "Engine", "BackendUnavailable", "ModelCard", "CardError", "BACKENDS"]

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


@dataclass
class Engine:
    card: ModelCard
    backend: str
    backend_reason: str
    model_dir: Path
    impl: Any = field(repr=False)

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed float32 ``[1,C,H,W]`` -> raw ``(anomaly_map [1,1,h,w] float32, score [1] float32)``."""
        x = np.asarray(x)
        want = (1, self.card.input.channels, *self.card.input_size)
        if x.shape != want:
            raise ValueError(f"input shape {x.shape} != model input {want} (use processing.preprocess)")
        amap, score = self.impl.infer(x)
        return (np.asarray(amap, np.float32).reshape(self.card.map_shape),
                np.asarray(score, np.float32).reshape(1))

    def close(self) -> None:
        if hasattr(self.impl, "close"):
            self.impl.close()


def _make(backend: str, model_dir: Path, card: ModelCard, opts: dict):
    if backend == "onnxruntime":
        from .backends.onnxruntime import OrtBackend

        return OrtBackend(model_dir, card, **opts)
    if backend == "torch":
        from .backends.torch import TorchBackend

        return TorchBackend(model_dir, card, **opts)
    if backend == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model_dir, card, **opts)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def load(model_dir: str | Path, backend: str = "auto", **opts) -> Engine:
    """Load the model in ``model_dir`` (``card.json`` + model files) on ``backend``.

    ``backend``: ``"auto"`` (TensorRT when importable and a GPU is present, else ONNX Runtime; ``Engine.backend_reason``
    says why), ``"tensorrt"``, ``"onnxruntime"`` or ``"torch"`` (the reference).  ``opts`` go to the backend
    (onnxruntime: ``threads=2``, ``providers=("cpu",)``; tensorrt: ``fp16=True``, ``device=0``; torch: ``threads``).
    An explicitly requested backend that cannot run raises :class:`BackendUnavailable`.
    """
    model_dir = Path(model_dir)
    card = ModelCard.load(model_dir)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend != "auto":
        return Engine(card, backend, "requested", model_dir, _make(backend, model_dir, card, opts))
    from .backends.tensorrt import available

    ok, why = available()
    if ok:
        try:
            return Engine(card, "tensorrt", f"auto: GPU available: {why}", model_dir,
                          _make("tensorrt", model_dir, card, opts))
        except Exception as e:  # build failure etc.: fall back, but say so
            why = f"tensorrt failed: {e}"
    else:
        why = f"tensorrt unavailable: {why}"
    ort_opts = {k: v for k, v in opts.items() if k in ("threads", "inter_op_threads", "providers")}
    return Engine(card, "onnxruntime", f"auto: {why}; using onnxruntime", model_dir,
                  _make("onnxruntime", model_dir, card, ort_opts))
