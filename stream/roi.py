"""Scan-region detection: the sector or rectangle of real ultrasound image inside a frame.

:func:`detect_scan_region` finds it in one frame (~1 ms at 640x480); :class:`RegionTracker` caches it for a stream and
re-detects only when the frame shape changes, periodically, or when a cheap per-frame check sees the geometry move.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
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


# --------------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------------
#
# Ultrasound frames are a convex patch of speckle (a fan for convex/phased probes, a rectangle for linear probes) on a
# black background carrying thin bright UI: text, rulers, depth ticks, logos.  The detector works on a copy scaled so its
# longest side is ``_WORK_SIDE`` pixels (speed, and a scale-independent notion of "thin"):
#
#   1. grayscale, box blur (speckle -> a continuous level), threshold just above the background level;
#   2. morphological open (erases strokes thinner than the kernel: text, ticks, caliper crosses, ruler lines) and close
#      (merges the remaining speckle blobs);
#   3. keep the largest connected component (plus any other *big* one, in case an anechoic band splits the image);
#   4. convex hull (sectors and rectangles are convex; this also fills cysts, shadows and other dark holes);
#   5. classify rectangle vs sector by how much of the hull's bounding box it fills, rasterise at full resolution and
#      erode a few pixels so the bright rim of the sector never counts as image.
#
# Anything implausible (nothing bright, a tiny blob, or a hull covering practically the whole frame) gives ``"full"``.

_WORK_SIDE = 256  # longest side of the working copy
_MIN_AREA_FRAC = 0.04  # a region smaller than this fraction of the frame is not a scan
_FULL_AREA_FRAC = 0.96  # a hull covering more than this is "the whole frame"
_RECT_FILL = 0.95  # hull area / bbox area above which the region is a rectangle
_SECONDARY_FRAC = 0.35  # other components at least this fraction of the largest are kept too


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        gray = image
    elif image.shape[2] == 1:
        gray = image[:, :, 0]
    elif image.shape[2] == 4:
        gray = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    else:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if gray.dtype != np.uint8:
        g = gray.astype(np.float32)
        hi = float(np.nanmax(g)) if g.size else 0.0
        gray = np.clip(g * (255.0 / hi) if hi > 255 else g, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(gray)


def _background_threshold(small: np.ndarray) -> int:
    """Just above the background: the darkest few percent of the frame are background (black or a dark UI grey)."""
    p = float(np.percentile(small, 3))
    return int(min(max(p + 5.0, 7.0), 48.0))


def _small_gray(image: np.ndarray) -> np.ndarray:
    """The working copy: grayscale, longest side at most ``_WORK_SIDE`` (area-averaged, which also tames speckle)."""
    gray = _to_gray(np.asarray(image))
    h, w = gray.shape
    scale = min(1.0, _WORK_SIDE / max(h, w, 1))
    if scale < 1.0:
        sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
        return cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_AREA)
    return gray


def _detect(image: np.ndarray) -> tuple[ScanRegion, bool]:
    """Return ``(region, blank)``; ``blank`` is True when the frame holds no image at all (black / flat)."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    if h < 8 or w < 8:
        return ScanRegion.full(h, w), False
    return _detect_small(_small_gray(image), h, w)


def _detect_small(small: np.ndarray, h: int, w: int) -> tuple[ScanRegion, bool]:
    sh, sw = small.shape
    if int(small.max()) - int(small.min()) < 12:
        return ScanRegion.full(h, w), True  # flat frame: black, frozen grey, test pattern

    # Full-resolution speckle needs a wider blur than the area-averaged working copy (which already smoothed it);
    # a narrow one keeps UI text that sits a few pixels from the image from merging into it.
    k = 3 if min(h / sh, w / sw) >= 2.0 else 5
    blur = cv2.blur(small, (k, k))
    binary = (blur > _background_threshold(small)).astype(np.uint8)
    k_open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, k_open)

    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return ScanRegion.full(h, w), True
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = int(np.argmax(areas))
    if areas[best] < _MIN_AREA_FRAC * sh * sw:
        return ScanRegion.full(h, w), True
    keep = np.flatnonzero(areas >= _SECONDARY_FRAC * areas[best]) + 1
    if len(keep) == 1:
        comp = (labels == keep[0]).astype(np.uint8)
    else:
        comp = np.isin(labels, keep).astype(np.uint8)
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours, axis=0))
    hull_area = cv2.contourArea(hull)
    if hull_area >= _FULL_AREA_FRAC * sh * sw:
        return ScanRegion.full(h, w), False  # textured edge to edge: the whole frame is image

    # Back to full resolution.  Pixel centres: small pixel i covers [i, i+1) / scale in the full frame.
    inv = np.array([w / sw, h / sh])
    pts = hull.reshape(-1, 2).astype(np.float64)
    hx, hy, hw_, hh_ = cv2.boundingRect(hull)
    fill = hull_area / max(1.0, float((hw_ - 1) * (hh_ - 1)))
    kind = "rectangle" if fill >= _RECT_FILL else "sector"
    # Outer edge of the boundary pixels: push hull vertices half a pixel away from the centroid, then rescale.
    c = pts.mean(axis=0)
    d = pts - c
    nrm = np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
    pts_full = (pts + 0.5 + 0.5 * d / nrm) * inv - 0.5
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, np.round(pts_full * 16).astype(np.int32), 255, cv2.LINE_8, shift=4)

    erode = max(1, int(round(0.006 * max(h, w))))  # a few px: the sector's bright rim is not image
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * erode + 1, 2 * erode + 1))
    # Erode against an "inside" border so regions touching the frame edge don't lose a strip there.
    mask = cv2.erode(mask, k, borderType=cv2.BORDER_CONSTANT, borderValue=255)
    ys, xs = _mask_extent(mask)
    if ys is None:
        return ScanRegion.full(h, w), True
    area = int(np.count_nonzero(mask))
    if area < _MIN_AREA_FRAC * h * w:
        return ScanRegion.full(h, w), True
    bbox = (xs[0], ys[0], xs[1] - xs[0] + 1, ys[1] - ys[0] + 1)
    return ScanRegion(bbox, mask, kind), False


def _mask_extent(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None, None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def detect_scan_region(image: np.ndarray) -> ScanRegion:
    """Find the scan sector/rectangle in an ``HxWx3`` BGR (or ``HxW`` gray) frame.

    Returns a :class:`ScanRegion` whose mask excludes text, rulers, logos and background.  Frames with no
    identifiable region (black, flat, or image edge to edge) give ``ScanRegion.full`` with ``kind == "full"``.
    """
    return _detect(image)[0]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (nonzero = inside)."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


# --------------------------------------------------------------------------------------------------------------------
# Tracking
# --------------------------------------------------------------------------------------------------------------------


class RegionTracker:
    """Caches the scan region of a stream and re-detects only when needed.

    Every frame is reduced to the detector's small grayscale copy (~0.2 ms) and folded into a slowly fading running
    maximum, so the periodic re-detection sees the sector's full extent even while its far field or edges go dark for a
    moment (lung shadows, probe tilt).  Re-detection happens:

    * on the first frame and whenever the frame shape changes (the history is reset);
    * every ``redetect_every`` frames, on the running maximum;
    * when a cheap check sees the geometry move: the fraction of bright pixels outside the mask, or of dark pixels
      inside it, jumps by more than ``jump`` from its value at the last detection.  That re-detection uses the current
      frame alone (and restarts the history), so a sector that shrank is not held at its old size.

    A re-detection that finds the same geometry (IoU >= ``same_iou``) keeps the cached object, so ``update`` returns
    the identical :class:`ScanRegion` while nothing changes; a blank frame (probe lifted, freeze to black) keeps the
    last region too.  ``changes`` counts geometry changes (the first detection is not one); ``detections`` counts
    detector runs.
    """

    def __init__(self, redetect_every: int = 150, *, jump: float = 0.2, same_iou: float = 0.85,
                 fade: int = 2) -> None:
        self.redetect_every = max(1, int(redetect_every))
        self.jump = float(jump)
        self.same_iou = float(same_iou)
        self.fade = int(fade)  # grey levels the running maximum loses per frame
        self.region: ScanRegion | None = None
        self.changes = 0
        self.detections = 0
        self._since = 0
        self._acc: np.ndarray | None = None
        self._mask_s: np.ndarray | None = None
        self._base: tuple[float, float] = (0.0, 0.0)

    @property
    def current(self) -> ScanRegion | None:
        """The cached region (``None`` before the first frame)."""
        return self.region

    def reset(self) -> None:
        """Forget the cached region (the next ``update`` detects afresh; not counted as a change)."""
        self.region = None
        self._acc = None
        self._mask_s = None

    def _stats(self, small: np.ndarray) -> tuple[float, float]:
        inside = self._mask_s
        n_in = int(np.count_nonzero(inside))
        n_out = inside.size - n_in
        bright_out = float(np.count_nonzero((small > 40) & ~inside)) / n_out if n_out else 0.0
        dark_in = float(np.count_nonzero((small < 12) & inside)) / n_in if n_in else 1.0
        return bright_out, dark_in

    def _adopt(self, region: ScanRegion, small: np.ndarray) -> ScanRegion:
        sh, sw = small.shape
        self._mask_s = cv2.resize(region.mask, (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
        self.region = region
        self._base = self._stats(small)
        self._since = 0
        return region

    def _redetect(self, source: np.ndarray, small: np.ndarray, h: int, w: int) -> ScanRegion:
        self.detections += 1
        new, blank = _detect_small(source, h, w) if min(h, w) >= 8 else (ScanRegion.full(h, w), False)
        old = self.region
        if old is None:
            return self._adopt(new, small)
        if blank or (new.kind == old.kind and mask_iou(new.mask, old.mask) >= self.same_iou):
            return self._adopt(old, small)  # same geometry (or nothing to see): keep the cached object
        self.changes += 1
        return self._adopt(new, small)

    def update(self, image: np.ndarray) -> ScanRegion:
        image = np.asarray(image)
        h, w = image.shape[:2]
        small = _small_gray(image) if min(h, w) > 0 else np.zeros((max(h, 1), max(w, 1)), np.uint8)
        if self.region is None or self.region.frame_shape != (h, w):
            changed = self.region is not None
            self.region = None
            self._acc = small.copy()
            region = self._redetect(small, small, h, w)
            self.changes += int(changed)
            return region
        if self.fade > 0:
            cv2.subtract(self._acc, self.fade, dst=self._acc)
        np.maximum(self._acc, small, out=self._acc)
        self._since += 1
        bright_out, dark_in = self._stats(small)
        b0, d0 = self._base
        if abs(bright_out - b0) > self.jump or abs(dark_in - d0) > self.jump:
            self._acc = small.copy()  # geometry may have moved: judge on this frame alone, restart the history
            return self._redetect(small, small, h, w)
        if self._since >= self.redetect_every:
            return self._redetect(self._acc, small, h, w)
        return self.region
