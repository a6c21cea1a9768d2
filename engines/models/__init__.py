"""Detector families. Each is a ``torch.nn.Module`` whose ``forward(x [N,C,H,W])`` returns ``(anomaly_map [N,1,h,w],
score [N])`` with static shapes, exposes ``config()`` (kwargs to rebuild it) and ``fit(batches, epochs=..., progress=...)``."""
from __future__ import annotations

import torch.nn as nn


def families() -> dict[str, type]:
    from .ae import AutoEncoder
    from .classifier import CamClassifier
    from .conv_ae import ConvAE
    from .draem import SyntheticSegmenter
    from .patch_gaussian import PatchGaussian
    from .student_teacher import StudentTeacher

    return {"patch_gaussian": PatchGaussian, "conv_ae": ConvAE, "ae": AutoEncoder, "student_teacher": StudentTeacher,
            "draem": SyntheticSegmenter, "classifier": CamClassifier}


def build(family: str, **config) -> nn.Module:
    fams = families()
    if family not in fams:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(sorted(fams))})")
    return fams[family](**config)
