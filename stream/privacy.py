"""De-identification of frames that leave the live path (feedback datasets, recordings, event clips).

Scanners burn patient names, IDs and dates into the picture, mostly in the margins but sometimes over the image.
:func:`deidentify` blacks out everything outside the scan region *and* every burned-in annotation mark found on the raw
frame (thin bright strokes and saturated colours: text, calipers — see :func:`sonomaly.engines.regions.overlay_marks`),
wherever it lies. The marks are found on the raw frame, so a composed frame keeps its heatmap colours.
"""
from __future__ import annotations

import numpy as np

from sonomaly.engines.regions import overlay_marks


def deidentify(image: np.ndarray, region, raw: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``image`` without the margins and without burned-in annotations (found on ``raw``, default ``image``)."""
    raw = image if raw is None else raw
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    if region is not None and getattr(region, "frame_shape", None) == (h, w):
        keep = region.mask > 0
    else:  # no region known for this size: keep nothing but the central 80 % (margins are where text sits)
        keep = np.zeros((h, w), bool)
        keep[h // 10: h - h // 10, w // 10: w - w // 10] = True
    if raw.shape[:2] == (h, w):
        # more eager than the detector's defaults: here a missed stroke is a privacy leak, an extra one a few pixels
        keep &= ~overlay_marks(raw, bright=140, tophat=30, grow=3, min_area=60)
    out[keep] = image[keep]
    return out
