"""Inference backends: every one takes the preprocessed ``[1,C,H,W]`` float32 tensor and returns the raw
``(anomaly_map [1,1,h,w] float32, score [1] float32)`` of the same ONNX/torch model; normalisation lives in the card."""
from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package missing, no GPU...); the message says why and what to do."""
