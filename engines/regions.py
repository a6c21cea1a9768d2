"""Scan region without burned-in overlays: :func:`stream.roi.detect_scan_region` plus removal of bright, thin marks
inside it (annotation text such as "LEFT BREAST", caliper crosses, dotted measurement lines, depth ticks).

Used before the detector and before the threshold (training, calibration and evaluation) so maps do not fire on them.
Marks are found as pixels that are both bright (>= ``bright``) and much brighter than their 3x3 morphological opening
(a white top-hat: 1-2 px strokes of text and calipers; bright tissue is blurred by the point-spread function, so its
top-hat at that scale is small), plus strongly coloured pixels, then dilated a few pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from sonomaly.stream.roi import ScanRegion, detect_scan_region


def overlay_marks(image: np.ndarray, bright: int = 170, tophat: int = 70, grow: int = 3, min_area: int = 90) -> np.ndarray:
    """bool ``[H, W]``: likely burned-in annotation pixels."""
    g = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    th = cv2.morphologyEx(g, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    marks = ((g >= bright) & (th >= tophat)).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] >= 3:  # coloured overlays (calipers are often yellow/green)
        b, gg, r = (image[..., i].astype(np.int16) for i in range(3))
        sat = (np.maximum(np.maximum(b, gg), r) - np.minimum(np.minimum(b, gg), r)) > 60
        marks |= sat.astype(np.uint8)
    if grow > 0 and marks.any():
        marks = cv2.dilate(marks, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    if marks.any():  # keep stroke clusters (text, caliper crosses, dotted lines); drop isolated bright speckle grains
        n, lab, stats, _ = cv2.connectedComponentsWithStats(marks, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        marks = keep[lab].astype(np.uint8)
    return marks > 0


def clean_scan_region(image: np.ndarray) -> ScanRegion:
    """Scan region with overlay marks removed from its mask (the bbox is unchanged)."""
    region = detect_scan_region(image)
    marks = overlay_marks(image)
    if not marks.any():
        return region
    mask = region.mask.copy()
    mask[marks] = 0
    if np.count_nonzero(mask) < 0.5 * np.count_nonzero(region.mask):  # implausible: keep the plain region
        return region
    return ScanRegion(region.bbox, mask, region.kind)


def inpaint_marks(image: np.ndarray) -> np.ndarray:
    """The image with overlay marks filled in from their surroundings (Telea inpainting), so that neither the detector
    nor its training data see the text / caliper strokes.  Returns ``image`` itself when there are none."""
    marks = overlay_marks(image)
    if not marks.any():
        return image
    return cv2.inpaint(image, marks.astype(np.uint8), 3, cv2.INPAINT_TELEA)
