"""Pre- and post-processing shared by every backend (the numbers must not depend on the backend).

``preprocess``  : BGR frame + scan region -> float32 ``[1, C, H, W]`` (channel 0: per-frame z-score of the grayscale crop
                  computed from pixels inside the scan mask only, 0 outside, clipped to +-clip; channel 1 when the card asks
                  for 2 channels: the scan mask as 0/1).
``postprocess`` : raw map / raw score -> frame-sized float32 heatmap (1.0 == pixel threshold) + normalised score
                  (1.0 == image threshold).
``TemporalSmoother`` : flicker damping across frames that never delays a rising finding.
"""
from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np

from sonomaly.stream.roi import ScanRegion

from .card import ModelCard


_MASKS_SMALL: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _region_mask_small(region: ScanRegion, size_hw: tuple[int, int]) -> np.ndarray:
    """Scan mask cropped to the bbox and resized to the model input: bool ``[H, W]`` (read-only).

    Cached for the last few regions (a live region is the same object frame after frame, and resizing a 1080p mask
    costs more than the model at 128²); region masks are never changed in place."""
    key = (id(region.mask), region.bbox, tuple(size_hw))
    hit = _MASKS_SMALL.get(key)
    if hit is not None and hit[0] is region.mask:
        return hit[1]
    m = region.crop_mask()
    h, w = size_hw
    if m.shape[:2] != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)
    small = m > 127
    small.setflags(write=False)
    if len(_MASKS_SMALL) > 8:
        _MASKS_SMALL.clear()
    _MASKS_SMALL[key] = (region.mask, small)
    return small


def preprocess(image_bgr: np.ndarray, region: ScanRegion, card: ModelCard, out: np.ndarray | None = None) -> np.ndarray:
    """One frame -> float32 ``[1, C, H, W]`` model input (see module doc). ``out`` may be a reusable buffer."""
    h, w = card.input_size
    c = card.input.channels
    clip = card.input.clip
    crop = region.crop(image_bgr)
    if crop.size == 0:
        raise ValueError(f"scan region bbox {region.bbox} is empty for a frame of shape {image_bgr.shape}")
    if crop.ndim == 3:
        gray = cv2.cvtColor(crop, cv2.COLOR_BGRA2GRAY if crop.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    else:
        gray = crop
    if gray.shape != (h, w):
        gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
    inside = _region_mask_small(region, (h, w))
    if out is None:
        out = np.empty((1, c, h, w), np.float32)
    z = out[0, 0]
    np.copyto(z, gray, casting="unsafe")
    n = int(np.count_nonzero(inside))
    if n >= 2:
        vals = z[inside]
        mean = float(vals.mean())
        std = float(vals.std())
    else:  # degenerate region: nothing to normalise against
        mean, std = float(z.mean()), float(z.std())
    std = max(std, 1.0)  # a flat frame (std < 1 grey level) must not explode into noise
    z -= mean
    z *= 1.0 / std
    np.clip(z, -clip, clip, out=z)
    z[~inside] = 0.0
    if c >= 2:
        np.copyto(out[0, 1], inside, casting="unsafe")
    if c > 2:
        out[0, 2:] = 0.0
    return out


def preprocess_batch(images: Iterable[np.ndarray], regions: Iterable[ScanRegion] | ScanRegion, card: ModelCard) -> np.ndarray:
    """Many frames -> float32 ``[N, C, H, W]``; ``regions`` is one region for all frames or one per frame."""
    images = list(images)
    if isinstance(regions, ScanRegion):
        regions = [regions] * len(images)
    regions = list(regions)
    if len(regions) != len(images):
        raise ValueError(f"{len(images)} images but {len(regions)} regions")
    h, w = card.input_size
    out = np.empty((len(images), card.input.channels, h, w), np.float32)
    for i, (img, reg) in enumerate(zip(images, regions)):
        preprocess(img, reg, card, out=out[i : i + 1])
    return out


def normalise_map(raw_map: np.ndarray, card: ModelCard) -> np.ndarray:
    return card.map_normalisation.apply(np.asarray(raw_map, np.float32)).astype(np.float32, copy=False)


def normalise_score(raw_score, card: ModelCard) -> float:
    return float(card.score_normalisation.apply(float(np.asarray(raw_score, np.float64).reshape(-1)[0])))


class PostResult(tuple):
    """``(amap, score)`` tuple that also carries ``.nonfinite`` (how many NaN/inf raw values were replaced by 0)."""

    nonfinite: int = 0

    def __new__(cls, amap, score, nonfinite=0):
        self = super().__new__(cls, (amap, score))
        self.nonfinite = nonfinite
        return self


def postprocess(
    raw_map: np.ndarray,
    raw_score,
    region: ScanRegion,
    card: ModelCard,
    frame_shape: tuple[int, ...],
    *,
    smooth_sigma: float = 2.0,
    out: np.ndarray | None = None,
    work_side: int | None = None,
) -> PostResult:
    """Raw model outputs -> ``(amap, score)``.

    ``amap`` is float32 ``frame_shape[:2]``: the normalised map (0 = typical normal, 1.0 = pixel threshold, negatives
    clamped to 0) resized into the region bbox (bilinear), Gaussian-smoothed with ``smooth_sigma`` frame pixels, and 0
    outside the scan mask.  ``score`` is the normalised image score (1.0 = image threshold).  NaN/inf in the raw
    outputs never raise: they become 0 and are counted in ``result.nonfinite``.  ``out`` may be a reusable
    float32 buffer of the output's shape (otherwise one is allocated per call).

    ``work_side``: when the frame's longer side exceeds it, the map is made at the frame's size scaled down to that
    side instead (the same geometry, frame-aligned: :func:`sonomaly.overlay.compose` stretches it back over the frame).
    The live pipeline uses this so that smoothing and the temporal filter cost the same at 1080p as at 450².
    """
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    if work_side and max(fh, fw) > int(work_side):
        scale = int(work_side) / max(fh, fw)
        region = _scaled_region(region, (max(1, round(fh * scale)), max(1, round(fw * scale))))
        fh, fw = region.frame_shape
        smooth_sigma = smooth_sigma * scale
    m = np.asarray(raw_map, np.float32)
    m = m.reshape(m.shape[-2], m.shape[-1])
    nonfinite = 0
    if not np.isfinite(m).all():
        bad = ~np.isfinite(m)
        nonfinite += int(bad.sum())
        m = np.where(bad, np.float32(card.map_normalisation.low), m)
    mn = card.map_normalisation
    small = (m - np.float32(mn.low)) * np.float32(1.0 / (mn.high - mn.low))
    np.maximum(small, 0.0, out=small)
    s = np.asarray(raw_score, np.float64).reshape(-1)
    s0 = float(s[0]) if s.size else float("nan")
    if not math.isfinite(s0):
        nonfinite += 1
        score = 0.0
    else:
        score = float(card.score_normalisation.apply(s0))

    if out is None or out.shape[:2] != (fh, fw) or out.dtype != np.float32:
        out = np.zeros((fh, fw), np.float32)
    else:
        out.fill(0.0)
    x, y, w, h = region.bbox
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, fw), min(y + h, fh)
    if x1 <= x0 or y1 <= y0:
        return PostResult(out, score, nonfinite)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if smooth_sigma and smooth_sigma >= 0.3:
        cv2.GaussianBlur(big, (0, 0), smooth_sigma, dst=big, borderType=cv2.BORDER_REPLICATE)
    big = big[y0 - y : y0 - y + (y1 - y0), x0 - x : x0 - x + (x1 - x0)]
    roi_out = out[y0:y1, x0:x1]
    mask = region.mask[y0:y1, x0:x1]
    np.copyto(roi_out, big, where=mask > 0)
    return PostResult(out, score, nonfinite)


_SCALED: dict[tuple, ScanRegion] = {}


def _scaled_region(region: ScanRegion, shape_hw: tuple[int, int]) -> ScanRegion:
    """``region`` on a frame resized to ``shape_hw`` (bbox scaled, mask resized); cached for the last few regions."""
    key = (id(region.mask), region.bbox, shape_hw)
    hit = _SCALED.get(key)
    if hit is not None and hit[0] is region.mask:
        return hit[1]
    fh, fw = region.frame_shape
    oh, ow = shape_hw
    sy, sx = oh / fh, ow / fw
    x, y, w, h = region.bbox
    x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
    x1 = min(ow, max(x0 + 1, int(np.ceil((x + w) * sx))))
    y1 = min(oh, max(y0 + 1, int(np.ceil((y + h) * sy))))
    mask = cv2.resize(region.mask, (ow, oh), interpolation=cv2.INTER_AREA)
    mask = np.where(mask > 127, np.uint8(255), np.uint8(0))
    small = ScanRegion((x0, y0, x1 - x0, y1 - y0), mask, region.kind)
    if len(_SCALED) > 8:
        _SCALED.clear()
    _SCALED[key] = (region.mask, small)
    return small


class TemporalSmoother:
    """Exponential moving average of heatmaps that reacts at once to a rise.

    Where the new map is above both the running average and ``immediate_above`` (default 0.5, i.e. half the pixel
    threshold) the output jumps straight to the new value, so a new finding is never delayed or dimmed; everywhere else
    the output moves by ``alpha`` towards the new value, so low-level flicker and dropouts are damped.  The state is
    reset when the scan region (bbox, mask or frame size) changes, or by :meth:`reset`.
    """

    def __init__(self, alpha: float = 0.5, immediate_above: float = 0.5):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.immediate_above = float(immediate_above)
        self._ema: np.ndarray | None = None
        self._region_key = None
        self._region_ref: ScanRegion | None = None

    def reset(self) -> None:
        self._ema = None
        self._region_key = None
        self._region_ref = None

    def _same_region(self, region: ScanRegion | None) -> bool:
        if region is None or self._region_ref is None:
            return region is None and self._region_ref is None
        if region is self._region_ref:
            return True
        if (region.bbox, region.mask.shape) != self._region_key:
            return False
        return bool(np.array_equal(region.mask, self._region_ref.mask))

    def update(self, amap: np.ndarray, region: ScanRegion | None = None) -> np.ndarray:
        amap = np.asarray(amap, np.float32)
        if self._ema is None or self._ema.shape != amap.shape or not self._same_region(region):
            self._ema = np.nan_to_num(amap, nan=0.0, posinf=0.0, neginf=0.0).copy()
            self._region_ref = region
            self._region_key = None if region is None else (region.bbox, region.mask.shape)
            return self._ema.copy()
        new = np.nan_to_num(amap, nan=0.0, posinf=0.0, neginf=0.0)
        ema = self._ema
        jump = (new > ema) & (new >= self.immediate_above)
        ema += self.alpha * (new - ema)
        np.copyto(ema, new, where=jump)
        return ema.copy()

    __call__ = update
