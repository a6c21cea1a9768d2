"""Scan-region detection: the sector or rectangle of real ultrasound image inside a frame.

(Interface fixed here; detection is filled in by the ROI work.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScanRegion:
    """Where the real image is.

    ``bbox`` is ``(x, y, w, h)`` in frame pixels; ``mask`` is a full-frame ``uint8`` array (255 inside the scan, 0 for
    UI text, rulers, logos and background); ``kind`` is ``"sector"``, ``"rectangle"`` or ``"full"``.
    """

    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    kind: str = "full"

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.mask.shape[:2]

    @classmethod
    def full(cls, height: int, width: int) -> "ScanRegion":
        return cls((0, 0, width, height), np.full((height, width), 255, np.uint8), "full")

    def crop(self, image: np.ndarray) -> np.ndarray:
        x, y, w, h = self.bbox
        return image[y : y + h, x : x + w]

    def crop_mask(self) -> np.ndarray:
        return self.crop(self.mask)
