"""Drawing primitives for the operating-room display: heatmap layer, contours, score gauge, HUD, banners.

All functions take ``uint8`` BGR frames (``H x W x 3``) and are pure by default: they return a new frame and leave the
input alone.  ``inplace=True`` (or ``out=`` for :func:`blend_heatmap`) draws into the given array instead; the
compositor uses that on its own copy to stay within its time budget.

Conventions: the anomaly map ``amap`` is ``float32 H x W`` in card-normalised units (0 = typical normal, 1.0 = the
detection threshold, > 1 above it; negative and NaN mean 0), and so is the image score.
"""
from __future__ import annotations

import threading
from typing import Sequence

import cv2
import numpy as np

# ------------------------------------------------------------------------------------------------------------- colours
# BGR.  Understated clinical palette: neutral greys for chrome, traffic-light colours only where they carry meaning.
WHITE = (255, 255, 255)
TEXT = (235, 235, 235)
TEXT_DIM = (170, 170, 170)
GREEN = (96, 200, 72)
AMBER = (0, 176, 255)
RED = (56, 56, 230)
PANEL_DARKEN = 0.42  # panels keep this fraction of the pixels underneath (semi-transparent black)

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_BOLD = cv2.FONT_HERSHEY_DUPLEX

#: The heatmap saturates at this many thresholds: alpha and colour both reach their maximum at ``amap == AMAP_MAX``.
AMAP_MAX = 1.5
LEVELS = 256  # the map is quantised to this many levels before colouring

DEFAULT_COLORMAP = cv2.COLORMAP_TURBO
_LUTS: dict[int, np.ndarray] = {}


def colormap_lut(colormap: int = DEFAULT_COLORMAP) -> np.ndarray:
    """``256 x 1 x 3`` uint8 BGR lookup table of an OpenCV colormap (computed once per colormap, then cached)."""
    lut = _LUTS.get(colormap)
    if lut is None:
        lut = cv2.applyColorMap(np.arange(LEVELS, dtype=np.uint8).reshape(LEVELS, 1), colormap)
        lut.setflags(write=False)
        _LUTS[colormap] = lut
    return lut


colormap_lut(DEFAULT_COLORMAP)  # precomputed at import
_LEVEL_SCALE = np.float32((LEVELS - 1) / AMAP_MAX)

# Scratch buffers, reused between calls: frame-sized temporaries allocated afresh on every call cost more in page
# faults (fresh mmap'd memory) than the arithmetic itself.  One set per thread; each grows to the largest size seen.
_WORK = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A contiguous, uninitialised array of ``shape`` backed by a per-thread buffer reused across calls."""
    n = int(np.prod(shape))
    dtype = np.dtype(dtype)
    bufs = _WORK.__dict__.setdefault("bufs", {})
    key = (name, dtype.str)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), dtype)
        bufs[key] = buf
    return buf[:n].reshape(shape)



def _as_bgr(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 frame, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def _target(image: np.ndarray, inplace: bool) -> np.ndarray:
    bgr = _as_bgr(image)
    if inplace and bgr is image:
        return image
    return bgr.copy() if bgr is image else bgr


def _mask255(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.full(shape, 255, np.uint8)
    mask = np.asarray(mask)
    if mask.shape[:2] != shape:
        raise ValueError(f"mask shape {mask.shape[:2]} != frame shape {shape}")
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    if mask.dtype == np.uint8 and mask.size >= _CV_MIN:
        return cv2.compare(mask, 0, cv2.CMP_GT)  # 255 / 0
    return (mask > 0).astype(np.uint8) * np.uint8(255)


# OpenCV's Python bindings read arrays of up to 4 elements as scalars; tiny inputs take a numpy path instead.
_CV_MIN = 1024


def _amap(amap: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """2-D float32 view of a map; with ``shape``, it must be exactly that shape."""
    amap = np.asarray(amap)
    if amap.ndim == 3:
        amap = amap[:, :, 0]
    if amap.ndim != 2:
        raise ValueError(f"amap must be 2-D, got shape {amap.shape}")
    if shape is not None and amap.shape != shape:
        raise ValueError(f"amap shape {amap.shape} != frame shape {shape}")
    return amap if amap.dtype == np.float32 else amap.astype(np.float32)


def _map_window(amap: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int]):
    """The part of ``amap`` (frame-sized, or a smaller map stretched over the whole frame) under the frame box
    ``(x, y, w, h)``: ``(window, (sx, ox, sy, oy))`` where window pixel ``c`` has its centre at box coordinate
    ``(c + 0.5) * s + o - 0.5``."""
    x, y, bw, bh = box
    mh, mw = amap.shape
    h, w = shape
    if (mh, mw) == (h, w):
        return amap[y : y + bh, x : x + bw], (1.0, 0.0, 1.0, 0.0)
    rx, ry = mw / w, mh / h
    cx0, cy0 = int(np.floor(x * rx)), int(np.floor(y * ry))
    cx1, cy1 = min(mw, max(cx0 + 1, int(np.ceil((x + bw) * rx)))), min(mh, max(cy0 + 1, int(np.ceil((y + bh) * ry))))
    return amap[cy0:cy1, cx0:cx1], (1.0 / rx, cx0 / rx - x, 1.0 / ry, cy0 / ry - y)


def quantise(amap: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Map levels ``0..255`` (uint8, rounded): 0 where ``amap <= 0`` or NaN, 255 from ``amap >= AMAP_MAX`` (+inf too)."""
    # NaN and -inf -> 0 here (np.fmax takes the number where one side is NaN), +inf -> finite: what OpenCV's
    # saturating cast makes of a NaN is not defined (255 with opencv 5.1 on an AMD EPYC VM; 0 where it passed before)
    a = np.fmax(amap, np.float32(0.0), out=_scratch("q", amap.shape, np.float32))
    np.minimum(a, np.float32(2 * AMAP_MAX), out=a)
    # saturating, rounding conversion: > 255 -> 255
    if a.size < _CV_MIN:
        q = np.clip(np.rint(a * _LEVEL_SCALE), 0, 255).astype(np.uint8)
        if out is None:
            return q
        out[...] = q
        return out
    if out is None:
        return cv2.multiply(a, float(_LEVEL_SCALE), dtype=cv2.CV_8U)
    return cv2.multiply(a, float(_LEVEL_SCALE), dst=out, dtype=cv2.CV_8U)


# ----------------------------------------------------------------------------------------------------------- heatmap
class HeatLayer:
    """The heatmap of one anomaly map, and optionally its threshold contours, ready to draw over any number of frames
    of ``shape``, as one premultiplied layer: inside ``box``, ``out = round(frame * mult / 255) + add`` (per pixel
    and channel, saturating; ``mult`` 255 and ``add`` 0 leave a pixel exactly as it was).

    It is the heat (``frame * (1 - alpha) + colour * alpha``, alpha growing with the map) with the contour strokes
    composited over it (a dark halo, then the line, each by its anti-aliased coverage), all clipped to the mask,
    folded into the two arrays.  Everything that depends only on the map (quantising, stretching, colouring,
    tracing and rasterising the contours) is done once, in :func:`heat_layer`; :meth:`apply` is two vectorised
    passes over the box, whatever the map holds.  The live pipeline makes one per AI result, in its AI worker, and
    draws it on every frame that shows that result."""

    __slots__ = ("shape", "box", "mult", "add", "key", "_pooled")

    def __init__(self, shape: tuple[int, int], box: tuple[int, int, int, int] = (0, 0, 0, 0),
                 mult: np.ndarray | None = None, add: np.ndarray | None = None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.box = box  # (x, y, w, h) in the frame
        self.mult, self.add = mult, add  # uint8 (h, w, 3) each, over ``box``
        self.key = None  # what it was drawn with (set by the compositor, which checks it before reuse)
        self._pooled = False  # its arrays came from the layer pool and go back there with the layer

    def __del__(self) -> None:
        if self._pooled:
            try:
                _pool_put(self.mult)
                _pool_put(self.add)
            except Exception:  # interpreter shutdown: the module's globals may be gone
                pass

    @property
    def empty(self) -> bool:
        """Nothing to draw (a map at or below zero everywhere inside the mask, and no contour)."""
        return self.mult is None

    def apply(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Draw over ``image`` (a frame of :attr:`shape`); ``out`` as in :func:`blend_heatmap` (may be ``image``)."""
        src = _as_bgr(image)
        if src.shape[:2] != self.shape:
            raise ValueError(f"layer made for frames of {self.shape}, got {src.shape[:2]}")
        if out is None:
            out = src.copy()
        elif out is not src:
            if out.shape != src.shape or out.dtype != np.uint8:
                raise ValueError("out must be a uint8 frame shaped like image")
            np.copyto(out, src)
        if self.mult is not None:
            x, y, bw, bh = self.box
            sub = out[y : y + bh, x : x + bw]
            if self.mult.size < _CV_MIN:  # tiny: numpy (the same arithmetic and rounding)
                res = np.rint(sub * self.mult.astype(np.float32) * np.float32(1.0 / 255.0)) + self.add
                sub[...] = np.minimum(res, 255).astype(np.uint8)
            else:
                scaled = cv2.multiply(sub, self.mult, dst=_scratch("blend", (bh, bw, 3), np.uint8), scale=1.0 / 255.0)
                cv2.add(scaled, self.add, dst=sub)
        return out


def heat_layer(amap: np.ndarray, mask: np.ndarray | None, shape: tuple[int, int], *, opacity: float = 0.6,
               colormap: int = DEFAULT_COLORMAP, heat: bool = True, contour_level: float | None = None,
               contour_color=WHITE, contour_thickness: int = 2, halo: bool = True,
               scratch: bool = False) -> HeatLayer:
    """The :class:`HeatLayer` of ``amap`` for frames of ``shape``: the heatmap of :func:`blend_heatmap` (unless
    ``heat=False``) and, with ``contour_level``, the contours of :func:`draw_contours` over it, inside ``mask`` only.

    ``scratch=True`` keeps the layer's arrays in this thread's reused buffers: valid until the next call on the same
    thread (one-frame use); by default the layer owns its arrays and can be handed to another thread."""
    h, w = int(shape[0]), int(shape[1])
    layer = HeatLayer((h, w))
    if h == 0 or w == 0:
        return layer
    m = _mask255(mask, (h, w))
    x, y, bw, bh = _nonzero_box(m)  # work only inside the scan region's box
    if bw == 0 or bh == 0:
        return layer
    a = _amap(amap)
    m_box = m[y : y + bh, x : x + bw]
    level, hbox = None, None
    if heat:
        if a.shape == (h, w):
            level = quantise(a[y : y + bh, x : x + bw], out=_scratch("level", (bh, bw), np.uint8))
        else:  # quantise at the map's own size, then stretch the levels over the frame (a reused buffer), take the box
            full = cv2.resize(quantise(a), (w, h), dst=_scratch("stretch", (h, w), np.uint8),
                              interpolation=cv2.INTER_LINEAR)
            level = full[y : y + bh, x : x + bw]
        np.bitwise_and(level, m_box, out=level)  # outside the mask: level 0 -> no change
        lx, ly, lw, lh = _nonzero_box(level)  # and only where the map is above zero
        if lw and lh:
            hbox = (x + lx, y + ly, lw, lh)
            level = level[ly : ly + lh, lx : lx + lw]
    strokes, th = None, max(1, int(contour_thickness))
    if contour_level is not None:
        strokes = _contour_strokes(a, (h, w), (x, y, bw, bh), m_box, float(contour_level), th)
    boxes = [b for b in (hbox, None if strokes is None else strokes[0]) if b is not None]
    if not boxes:
        return layer
    ux0, uy0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    ux1, uy1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    uw, uh = ux1 - ux0, uy1 - uy0
    # what the layer keeps of the frame (one channel while it is built: the same for B, G and R) and what it adds
    buf = _scratch if scratch else (lambda name, shp, dt: _pool_get(shp))
    keep, add = _scratch("keep", (uh, uw), np.uint8), buf("add", (uh, uw, 3), np.uint8)
    if hbox is None or hbox != (ux0, uy0, uw, uh):  # the strokes reach past the heat: start from "no change"
        keep.fill(255)
        add.fill(0)
    if hbox is not None:
        hx, hy, hw_, hh = hbox[0] - ux0, hbox[1] - uy0, hbox[2], hbox[3]
        keep_lut, add_lut = _heat_luts(float(min(max(opacity, 0.0), 1.0)), colormap)
        kh, ah = keep[hy : hy + hh, hx : hx + hw_], add[hy : hy + hh, hx : hx + hw_]
        if level.size < _CV_MIN:
            kh[...], ah[...] = keep_lut[0, level], add_lut[:, level].transpose(1, 2, 0)
        else:
            cv2.LUT(level, keep_lut, dst=kh)
            planes = [cv2.LUT(level, add_lut[c : c + 1], dst=_scratch(f"plane{c}", (hh, hw_), np.uint8))
                      for c in range(3)]
            if (hh, hw_) == (uh, uw):
                cv2.merge(planes, dst=ah)
            else:
                ah[...] = cv2.merge(planes, dst=_scratch("planes", (hh, hw_, 3), np.uint8))
    if strokes is not None:
        # the strokes composited over the heat by cv2's anti-aliased rasteriser itself: a stroke of colour c and
        # coverage t turns (keep, add) into (keep * (1 - t), add * (1 - t) + c * t) -- drawn on copies of their box,
        # copied back through the mask (nothing lands outside it)
        (sx, sy, sw, sh), polys, m = strokes
        sx, sy = sx - ux0, sy - uy0
        k_sub, a_sub = keep[sy : sy + sh, sx : sx + sw], add[sy : sy + sh, sx : sx + sw]
        k_drawn, a_drawn = _scratch("k_drawn", (sh, sw), np.uint8), _scratch("a_drawn", (sh, sw, 3), np.uint8)
        np.copyto(k_drawn, k_sub)
        np.copyto(a_drawn, a_sub)
        colour = tuple(int(c) for c in contour_color)[:3]
        if halo:
            cv2.polylines(k_drawn, polys, True, 0, th + 2, cv2.LINE_AA, _SHIFT)
            cv2.polylines(a_drawn, polys, True, (0, 0, 0), th + 2, cv2.LINE_AA, _SHIFT)
        cv2.polylines(k_drawn, polys, True, 0, th, cv2.LINE_AA, _SHIFT)
        cv2.polylines(a_drawn, polys, True, colour, th, cv2.LINE_AA, _SHIFT)
        if k_drawn.size >= _CV_MIN:
            cv2.copyTo(k_drawn, m, dst=k_sub)
            cv2.copyTo(a_drawn, m, dst=a_sub)
        else:
            np.copyto(k_sub, k_drawn, where=m > 0)
            np.copyto(a_sub, a_drawn, where=m[:, :, None] > 0)
    mult = buf("mult", (uh, uw, 3), np.uint8)
    if keep.size < _CV_MIN:
        mult[...] = keep[:, :, None]
    else:
        cv2.merge((keep, keep, keep), dst=mult)
    layer.box, layer.mult, layer.add, layer._pooled = (ux0, uy0, uw, uh), mult, add, not scratch
    return layer


# Frame-sized layer arrays, recycled: a layer's arrays go back here when the layer is freed (nothing else holds
# them: they are the layer's own), and the next layer of that size takes them instead of fresh memory, whose page
# faults on first touch cost more than filling it (a 1080p layer is 12 MB; the pipeline makes one per AI result).
_POOL: dict[tuple, list[np.ndarray]] = {}
_POOL_PER_SHAPE = 4


def _pool_get(shape: tuple[int, ...]) -> np.ndarray:
    free = _POOL.get(tuple(shape))
    if free:
        try:
            return free.pop()
        except IndexError:  # another thread took the last one
            pass
    return np.empty(shape, np.uint8)


def _pool_put(arr: np.ndarray | None) -> None:
    if arr is None or arr.size < _CV_MIN or not arr.flags.owndata:
        return
    free = _POOL.setdefault(arr.shape, [])
    if len(free) < _POOL_PER_SHAPE:
        free.append(arr)
    if len(_POOL) > 16:  # many sizes (a resized stream): start again
        _POOL.clear()


def blend_heatmap(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *, opacity: float = 0.6,
                  out: np.ndarray | None = None, colormap: int = DEFAULT_COLORMAP) -> np.ndarray:
    """Blend the colour-mapped anomaly map over ``image`` where ``mask > 0``.

    Per-pixel alpha is ``opacity * clip(amap, 0, 1.5) / 1.5``: it grows with the anomaly and is exactly 0 where
    ``amap <= 0`` (or NaN), so a zero map leaves the frame bit-exact; pixels outside the mask never change.
    ``out`` may be ``image`` itself (blend in place) or another frame of the same shape.  A map smaller than the
    frame is stretched over the whole frame (bilinear, after quantising: cheap at any frame size).
    """
    src = _as_bgr(image)
    layer = heat_layer(amap, mask, src.shape[:2], opacity=opacity, colormap=colormap, scratch=True)
    return layer.apply(src, out=out)


def _nonzero_box(a: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of the nonzero pixels of a 2-D uint8 array (all zeros: width/height 0)."""
    if a.size >= _CV_MIN:
        return cv2.boundingRect(a)
    rows = np.flatnonzero(a.any(axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(a.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


_HEAT_LUTS: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}


def _heat_luts(opacity: float, colormap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per map level, what the heat keeps of the frame, ``round(255 * (1 - alpha))`` (``1 x 256``), and what it adds,
    ``round(colour * alpha)`` (``3 x 256``: B, G, R rows), ``alpha = opacity * level / 255``; uint8 tables for
    ``cv2.LUT`` (one channel at a time: a 3-channel table is several times slower)."""
    key = (opacity, colormap)
    luts = _HEAT_LUTS.get(key)
    if luts is None:
        alpha = np.arange(LEVELS, dtype=np.float64) * (opacity / (LEVELS - 1))
        keep_lut = np.rint(255.0 * (1.0 - alpha)).astype(np.uint8).reshape(1, LEVELS)
        add_lut = np.ascontiguousarray(
            np.rint(colormap_lut(colormap)[:, 0, :].astype(np.float64) * alpha[:, None]).astype(np.uint8).T)
        keep_lut.setflags(write=False)
        add_lut.setflags(write=False)
        if len(_HEAT_LUTS) > 64:
            _HEAT_LUTS.clear()
        luts = _HEAT_LUTS[key] = (keep_lut, add_lut)
    return luts


def draw_contours(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *, level: float = 1.0,
                  color=WHITE, thickness: int = 2, halo: bool = True, inplace: bool = False) -> np.ndarray:
    """Outline where ``amap`` crosses ``level``, drawn inside the mask only (anti-aliased, with a thin dark halo).

    Nothing is drawn when the map stays on one side of the level everywhere.  The frame border is not a crossing.
    A map smaller than the frame is stretched over the whole frame (traced at its own size).
    """
    out = _target(image, inplace)
    layer = heat_layer(amap, mask, out.shape[:2], heat=False, contour_level=level, contour_color=color,
                       contour_thickness=thickness, halo=halo)
    return layer.apply(out, out=out)


def _contour_strokes(a: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int], m_box: np.ndarray,
                     level: float, thickness: int):
    """``level``'s contours under the frame box ``(x, y, w, h)`` (scan mask ``m_box`` there), ready to stroke:
    ``((x, y, w, h) in the frame of the area the strokes can touch, the polylines relative to it with
    :data:`_SHIFT` fractional bits, the mask under it)``; ``None`` when there is nothing to draw."""
    polys = _contour_polylines(a, shape, box, level)
    if not polys:
        return None
    x, y, bw, bh = box
    allp = np.concatenate(polys).reshape(-1, 2) >> _SHIFT
    grow = thickness + 3
    rx0, ry0 = (max(0, int(v) - grow) for v in allp.min(axis=0))
    rx1, ry1 = min(bw, int(allp[:, 0].max()) + grow + 1), min(bh, int(allp[:, 1].max()) + grow + 1)
    if rx1 <= rx0 or ry1 <= ry0:
        return None
    off = np.array([rx0, ry0], np.int32) << _SHIFT
    return (x + rx0, y + ry0, rx1 - rx0, ry1 - ry0), [c - off for c in polys], m_box[ry0:ry1, rx0:rx1]


def _contour_polylines(a: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int],
                       level: float) -> list[np.ndarray]:
    """The crossings of ``level`` in map ``a`` (frame-sized or smaller, stretched over ``shape``) under the frame box
    ``(x, y, w, h)``, as closed polylines in box coordinates with :data:`_SHIFT` fractional bits (for
    ``cv2.polylines``); single-pixel noise dropped; ``[]`` when the map stays on one side of the level."""
    a, (sx, ox, sy, oy) = _map_window(a, shape, box)
    # Trace on a copy of at most ~_CONTOUR_SIDE px (smoother lines, bounded cost on noisy maps), draw at full size.
    ah0, aw0 = a.shape
    f = max(1, int(np.ceil(max(aw0, ah0) / _CONTOUR_SIDE)))
    if f > 1:
        a = cv2.resize(a, (max(1, aw0 // f), max(1, ah0 // f)), interpolation=cv2.INTER_AREA)
        sx, sy = sx * aw0 / a.shape[1], sy * ah0 / a.shape[0]
    above = np.greater_equal(a, np.float32(level)).view(np.uint8)  # NaN -> below
    n_above = int(np.count_nonzero(above))
    if n_above == 0 or n_above == above.size:
        return []
    pad = 4  # replicate past the border so the frame edge never reads as a crossing
    padded = cv2.copyMakeBorder(above, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    contours, _ = cv2.findContours(padded, cv2.RETR_LIST, cv2.CHAIN_APPROX_TC89_L1, offset=(-pad, -pad))
    # drop single-pixel noise; the padded frame's own border (if any) lies outside the canvas and is clipped away
    keep = []
    for c in contours:
        _, _, cw, ch = cv2.boundingRect(c)
        if cw * ch >= _CONTOUR_MIN_BOX:
            keep.append(c)
    scale = np.array([sx, sy]) * (1 << _SHIFT)
    offset = (np.array([sx, sy]) * 0.5 + np.array([ox, oy]) - 0.5) * (1 << _SHIFT)
    return [np.round(c.reshape(-1, 2) * scale + offset).astype(np.int32).reshape(-1, 1, 2) for c in keep]


_SHIFT = 3  # fractional bits of contour coordinates
_CONTOUR_SIDE = 320
_CONTOUR_MIN_BOX = 4


# ------------------------------------------------------------------------------------------------------------- text
def ui_scale(height: int) -> float:
    """Size unit of the chrome: 1.0 at 720 lines, never so small that text is illegible at 240p."""
    return max(height, 1) / 720.0


def _font_scale(height: int, size: float, minimum: float) -> float:
    return max(minimum, size * ui_scale(height))


def _thickness(scale: float) -> int:
    return max(1, int(round(scale * 1.6)))


def _darken(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, keep: float = PANEL_DARKEN) -> None:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 > x0 and y1 > y0:
        roi = image[y0:y1, x0:x1]
        cv2.convertScaleAbs(roi, dst=roi, alpha=keep)


def _text(image, text, org, scale, color, thickness, font=FONT, shadow=True) -> None:
    if shadow:
        cv2.putText(image, text, (org[0] + 1, org[1] + 1), font, scale, (0, 0, 0), thickness + 1, cv2.LINE_AA)
    cv2.putText(image, text, org, font, scale, color, thickness, cv2.LINE_AA)


# ------------------------------------------------------------------------------------------------------------ gauge
def gauge_color(score: float, threshold: float = 1.0) -> tuple[int, int, int]:
    """Green below ~70 % of the threshold, through amber to red at the threshold and above."""
    if not np.isfinite(score) or threshold <= 0:
        return TEXT_DIM
    r = score / threshold
    g0, a, rd = np.array(GREEN, float), np.array(AMBER, float), np.array(RED, float)
    if r <= 0.7:
        c = g0
    elif r < 0.85:
        c = g0 + (a - g0) * (r - 0.7) / 0.15
    elif r < 1.0:
        c = a + (rd - a) * (r - 0.85) / 0.15
    else:
        c = rd
    return tuple(int(round(v)) for v in c)


def gauge_size(height: int, width: int) -> tuple[int, int]:
    """Outer size (w, h) of the gauge panel."""
    u = ui_scale(height)
    gh = max(40, int(round(170 * u)))
    gw = max(24, int(round(54 * u)))
    return min(gw, max(1, width)), min(gh, max(1, height))


def gauge_origin(height: int, width: int, mask: np.ndarray | None = None,
                 avoid: Sequence[str] = ("bottom_left",)) -> tuple[int, int]:
    """Top-left corner for the gauge: the frame corner whose box overlaps the scan mask least (right side first)."""
    gw, gh = gauge_size(height, width)
    margin = max(4, int(round(12 * ui_scale(height))))
    corners = {
        "bottom_right": (width - gw - margin, height - gh - margin),
        "top_right": (width - gw - margin, margin),
        "top_left": (margin, margin),
        "bottom_left": (margin, height - gh - margin),
    }
    order = [k for k in corners if k not in avoid] or list(corners)
    if mask is None:
        return tuple(max(0, v) for v in corners[order[0]])
    best, best_cover = None, None
    for k in order:
        x, y = (max(0, v) for v in corners[k])
        cover = int(np.count_nonzero(mask[y : y + gh, x : x + gw]))
        if best_cover is None or cover < best_cover:
            best, best_cover = (x, y), cover
    return best


def draw_gauge(image: np.ndarray, score: float | None, *, threshold: float = 1.0, origin=None,
               mask: np.ndarray | None = None, label: str = "AI", inplace: bool = False) -> np.ndarray:
    """Vertical bar gauge of the image score with a threshold tick; green -> amber -> red.

    The bar spans ``0 .. 1.5 * threshold`` (the tick sits at two thirds).  ``origin`` is the panel's top-left corner;
    by default the gauge goes to the frame corner that covers the scan region ``mask`` least.  A ``None``/NaN score
    draws an empty gauge reading ``--``.
    """
    out = _target(image, inplace)
    h, w = out.shape[:2]
    if h < 8 or w < 8:
        return out
    gw, gh = gauge_size(h, w)
    if origin is None:
        origin = gauge_origin(h, w, None if mask is None else _mask255(mask, (h, w)))
    x0, y0 = int(origin[0]), int(origin[1])
    u = ui_scale(h)
    fs = _font_scale(h, 0.52, 0.34)
    th = _thickness(fs * 0.8)
    _darken(out, x0, y0, x0 + gw, y0 + gh)

    (lw, lh), _ = cv2.getTextSize(label, FONT, fs, th)
    pad = max(2, int(round(6 * u)))
    text_h = lh + 2 * pad
    bar_w = max(4, int(round(12 * u)))
    bx0 = x0 + (gw - bar_w) // 2
    by0 = y0 + text_h
    by1 = y0 + gh - text_h
    if by1 - by0 < 8:
        return out
    score_ok = score is not None and np.isfinite(score)
    top = 1.5 * threshold if threshold > 0 else 1.5
    frac = min(max((score if score_ok else 0.0) / top, 0.0), 1.0)
    cv2.rectangle(out, (bx0, by0), (bx0 + bar_w - 1, by1), (90, 90, 90), 1)  # track
    fill_top = int(round(by1 - frac * (by1 - by0)))
    if score_ok and fill_top < by1:
        cv2.rectangle(out, (bx0 + 1, fill_top), (bx0 + bar_w - 2, by1 - 1), gauge_color(score, threshold), -1)
    ty = int(round(by1 - (threshold / top) * (by1 - by0)))  # threshold tick, wider than the bar
    tick = max(3, int(round(7 * u)))
    cv2.line(out, (bx0 - tick, ty), (bx0 + bar_w - 1 + tick, ty), WHITE, max(1, int(round(1.5 * u))), cv2.LINE_AA)

    _text(out, label, (x0 + (gw - lw) // 2, y0 + pad + lh), fs, TEXT_DIM, th, shadow=False)
    val = f"{score:.2f}" if score_ok else "--"
    fsv = fs * (0.9 if len(val) > 4 else 1.0)
    (vw, vh), _ = cv2.getTextSize(val, FONT, fsv, th)
    color = gauge_color(score, threshold) if score_ok else TEXT_DIM
    _text(out, val, (x0 + (gw - vw) // 2, y0 + gh - pad), fsv, color, th, shadow=False)
    return out


# --------------------------------------------------------------------------------------------------------- HUD, banner
def draw_hud(image: np.ndarray, lines: Sequence[str], *, corner: str = "bottom_left",
             inplace: bool = False) -> np.ndarray:
    """Small semi-transparent text box (fps, latency, backend, model) in a corner of the frame."""
    out = _target(image, inplace)
    h, w = out.shape[:2]
    lines = [str(s) for s in lines if s is not None and str(s) != ""]
    if not lines or h < 8 or w < 8:
        return out
    fs = _font_scale(h, 0.56, 0.36)
    th = _thickness(fs * 0.7)
    sizes = [cv2.getTextSize(s, FONT, fs, th)[0] for s in lines]
    line_h = max(s[1] for s in sizes)
    gap = max(3, int(round(line_h * 0.55)))
    pad = max(3, int(round(line_h * 0.6)))
    box_w = max(s[0] for s in sizes) + 2 * pad
    box_h = len(lines) * line_h + (len(lines) - 1) * gap + 2 * pad
    margin = max(4, int(round(12 * ui_scale(h))))
    x0 = margin if "left" in corner else w - margin - box_w
    y0 = margin if "top" in corner else h - margin - box_h
    x0, y0 = max(0, x0), max(0, y0)
    _darken(out, x0, y0, x0 + box_w, y0 + box_h)
    y = y0 + pad + line_h
    for s in lines:
        _text(out, s, (x0 + pad, y), fs, TEXT, th, shadow=False)
        y += line_h + gap
    return out


_BANNER_STYLE = {  # level -> (background, text)
    "info": ((110, 80, 40), WHITE),
    "warn": (AMBER, (20, 20, 20)),
    "error": (RED, WHITE),
    "off": (RED, WHITE),
}


def banner_rect(height: int, width: int, text: str) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the banner box for a frame of this size (top centre, a band of ~9 % of the height)."""
    fs, th = _banner_font(height)
    (tw, tht), base = cv2.getTextSize(text, FONT_BOLD, fs, th)
    pad_x = max(6, int(round(tht * 1.0)))
    pad_y = max(3, int(round(tht * 0.45)))
    bw = min(width, tw + 2 * pad_x)
    bh = min(height, tht + base + 2 * pad_y)
    x0 = (width - bw) // 2
    y0 = max(0, int(round(10 * ui_scale(height))))
    return x0, y0, x0 + bw, y0 + bh


def _banner_font(height: int) -> tuple[float, int]:
    fs = _font_scale(height, 1.0, 0.5)
    return fs, _thickness(fs * 1.1)


def draw_banner(image: np.ndarray, text: str, *, level: str = "warn", inplace: bool = False) -> np.ndarray:
    """Status banner ("AI DELAYED" amber, "AI OFF" red) at the top centre: big, clear, away from the scan centre."""
    out = _target(image, inplace)
    h, w = out.shape[:2]
    if not text or h < 8 or w < 8:
        return out
    bg, fg = _BANNER_STYLE.get(level, _BANNER_STYLE["warn"])
    fs, th = _banner_font(h)
    x0, y0, x1, y1 = banner_rect(h, w, text)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), bg, -1)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 0), 1)
    (tw, tht), base = cv2.getTextSize(text, FONT_BOLD, fs, th)
    tx = x0 + max(0, (x1 - x0 - tw) // 2)
    ty = y0 + (y1 - y0 + tht) // 2 - max(0, base // 4)
    cv2.putText(out, text, (tx, ty), FONT_BOLD, fs, fg, th, cv2.LINE_AA)
    return out


def no_signal_frame(height: int, width: int, text: str = "NO SIGNAL", detail: str | None = None) -> np.ndarray:
    """Dark grey placeholder frame with big centred text and an optional detail line (``"reconnecting in 2 s"``)."""
    height, width = max(0, int(height)), max(0, int(width))
    frame = np.full((height, width, 3), 28, np.uint8)
    if height < 4 or width < 4:
        return frame
    fs = _font_scale(height, 1.6, 0.45)
    th = _thickness(fs * 1.0)
    (tw, tht), _ = cv2.getTextSize(text, FONT_BOLD, fs, th)
    if tw > 0.9 * width:  # keep it on screen in narrow frames
        fs *= 0.9 * width / tw
        th = _thickness(fs)
        (tw, tht), _ = cv2.getTextSize(text, FONT_BOLD, fs, th)
    cy = height // 2 + (tht // 2 if not detail else 0)
    cv2.putText(frame, text, ((width - tw) // 2, cy), FONT_BOLD, fs, (200, 200, 200), th, cv2.LINE_AA)
    line_w = max(1, int(round(2 * ui_scale(height))))
    lx = max(1, tw // 2)
    ly = cy + max(4, int(round(tht * 0.6)))
    cv2.line(frame, (width // 2 - lx, ly), (width // 2 + lx, ly), (70, 70, 70), line_w, cv2.LINE_AA)
    if detail:
        fsd = max(0.35, fs * 0.42)
        thd = _thickness(fsd * 0.8)
        (dw, dh), _ = cv2.getTextSize(detail, FONT, fsd, thd)
        if dw > 0.95 * width:
            fsd *= 0.95 * width / dw
            (dw, dh), _ = cv2.getTextSize(detail, FONT, fsd, thd)
        cv2.putText(frame, detail, ((width - dw) // 2, ly + max(6, int(round(dh * 2.0)))), FONT, fsd, TEXT_DIM, thd,
                    cv2.LINE_AA)
    return frame
