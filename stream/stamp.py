"""Frame-id barcodes for glass-to-glass latency measurement.

``stamp:<uri>`` (see :func:`sonomaly.stream.sources.open_source`) wraps any source in a :class:`StampSource`, which
writes each frame's id into the image as a block of large black and white cells. The server already records every
frame's capture time under its id (``/api/records``); a receiver that reads the id back from the pixels it is about
to show knows when that very frame was captured, so ``presentation time - capture time`` is the glass-to-glass
latency, with no clock other than the host's own.

The code (``ROWS x COLS`` cells of ``cell`` px)::

    row 0      1 0 1 0      start guard (known white/black cells: they calibrate the threshold)
    rows 1-6   24 bits      frame id (mod 2**24), most significant bit first, row by row
    rows 7-8    8 bits      CRC-8 (poly 0x07) of the id's three bytes
    row 9      0 1 0 1      stop guard

* **Cells are codec macroblocks**: 16 x 16 px (8 for frames under 192 lines), pure black or white, on the 16-px grid
  counted from the top-left corner — the grid VP8 and H.264 code in. Each cell is then one flat block: even at the
  coarsest quantiser its reconstructed level stays on the right side of the threshold (a cell straddling blocks
  would share them with its neighbours and depend on AC coefficients, the first thing a starved encoder drops). The
  decoder averages only the central half of each cell, away from the deblocking filter's reach.
* **Where**: at the left edge, vertically centred (``layout``). The overlay uses all four corners (score gauge,
  HUD) and the top centre (banners), so no corner of the *composed* frame is reliably free; the left-edge middle is.
  When that spot lies outside the scan region (letter-boxed linear probes, wide UI margins), the code is drawn in the
  frame with a black quiet zone; when it would cover the scan — the usual case for a convex probe that fills the
  frame — the frame is padded on the left by a black band ``band_width(height, width)`` px wide (80 px at 450 lines:
  the code's 64 px and a gap, ``gap_width``, that keeps the scan-region detector from merging code and scan). The
  scan region detector ignores the band (background), so the model sees the same pixels either way.
* **Decoding** (:func:`decode`, and the same algorithm in JavaScript, :data:`JS_DECODER`, for a browser: the luma
  plane of a WebCodecs ``VideoFrame``, or canvas RGBA pixels): sample the cell centres, set the threshold half way between the guard cells' black and white levels,
  require clear contrast and every guard cell on the right side, then check the CRC. Anything else is unreadable
  (``None``; :func:`decode_detail` says whether there was no code at all or a damaged one), never a wrong id in
  practice (a false accept needs 8 guards and an 8-bit CRC to agree by chance).

Frame ids are re-drawn whenever a frame's ``id`` is reassigned (``ReconnectingSource`` renumbers the frames of the
sources it wraps), so the code always shows the id the server records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sonomaly.stream.frame import Frame

ROWS, COLS = 10, 4
ID_BITS, CRC_BITS = 24, 8
ID_MASK = (1 << ID_BITS) - 1
GUARD_START = (1, 0, 1, 0)
GUARD_STOP = (0, 1, 0, 1)
MIN_CONTRAST = 40.0
"""Minimum gap (luma levels, 0-255) between the darkest white guard cell and the brightest black one."""
PREFIX = "stamp:"


def crc8(data: bytes, poly: int = 0x07) -> int:
    """CRC-8 (ATM/SMBus polynomial x^8+x^2+x+1, init 0, no reflection)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def cell_size(height: int) -> int:
    """Cell side in pixels: 16 (one codec macroblock), or 8 for frames under 192 lines."""
    return 16 if height >= (ROWS + 2) * 16 else 8


def gap_width(height: int, width: int) -> int:
    """Black columns between the code and the picture (a multiple of the cell, so the picture starts on a macroblock
    boundary). Wide enough that the scan-region detector, which works on a copy ~256 px across, sees at least 6 px of
    background there and never merges the code into the scan (measured: without a gap the code's cells joined the
    sector's hull and the heatmap was blended over them)."""
    c = cell_size(height)
    need = 6.0 * max(height, width + COLS * c + c) / 256.0
    return max(c, int(math.ceil(need / c)) * c)


def band_width(height: int, width: int) -> int:
    """Width of the padding band for a ``height x width`` picture: the code's columns plus the gap (80 px at 450)."""
    return COLS * cell_size(height) + gap_width(height, width)


@dataclass(frozen=True)
class Layout:
    x0: int
    y0: int
    cell: int

    @property
    def width(self) -> int:
        return COLS * self.cell

    @property
    def height(self) -> int:
        return ROWS * self.cell

    def quiet(self, gap: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the code plus its quiet zone (``gap`` px right, one cell above and below)."""
        c = self.cell
        return self.x0, self.y0 - c, self.x0 + self.width + gap, self.y0 + self.height + c


def layout(height: int, width: int | None = None) -> Layout:
    """Where the code sits in a frame of this size: at the left edge, vertically centred, every cell on the
    ``cell``-pixel grid (so on the encoders' 16x16 macroblock grid: each cell is one flat block that even a coarse
    quantiser reproduces on the right side of the threshold)."""
    c = cell_size(height)
    if height < (ROWS + 2) * c:
        raise ValueError(f"frame too small for a frame-id code: height {height} < {(ROWS + 2) * c}")
    if width is not None and width < (COLS + 1) * c:
        raise ValueError(f"frame too small for a frame-id code: width {width} < {(COLS + 1) * c}")
    return Layout(0, (height - ROWS * c) // 2 // c * c, c)


def bits_for(frame_id: int) -> np.ndarray:
    """The ``ROWS x COLS`` 0/1 cell pattern for ``frame_id`` (taken mod 2**24)."""
    v = int(frame_id) & ID_MASK
    crc = crc8(v.to_bytes(3, "big"))
    data = [(v >> (ID_BITS - 1 - i)) & 1 for i in range(ID_BITS)] + [(crc >> (CRC_BITS - 1 - i)) & 1
                                                                       for i in range(CRC_BITS)]
    grid = np.array([GUARD_START, *np.reshape(data, (ROWS - 2, COLS)).tolist(), GUARD_STOP], np.uint8)
    return grid


def clear_quiet_zone(image: np.ndarray) -> np.ndarray:
    """Blacken the code's spot and its quiet zone (for a code drawn inside the picture), in place."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = layout(h, w).quiet(gap_width(h, w))
    image[y0:y1, x0:x1] = 0
    return image


def draw(image: np.ndarray, frame_id: int) -> np.ndarray:
    """Write the code's cells for ``frame_id`` into ``image`` (H x W x 3 or H x W uint8), in place."""
    h, w = image.shape[:2]
    lay = layout(h, w)
    cells = np.kron(bits_for(frame_id), np.ones((lay.cell, lay.cell), np.uint8)) * 255
    region = image[lay.y0:lay.y0 + lay.height, lay.x0:lay.x0 + lay.width]
    if image.ndim == 3:
        region[:] = cells[:, :, None]
    else:
        region[:] = cells
    return image


def _luma(image: np.ndarray, order: str) -> np.ndarray:
    if image.ndim == 2:
        return image.astype(np.float32)
    img = image[:, :, :3].astype(np.float32)
    if order == "bgr":
        return 0.114 * img[:, :, 0] + 0.587 * img[:, :, 1] + 0.299 * img[:, :, 2]
    return 0.299 * img[:, :, 0] + 0.587 * img[:, :, 1] + 0.114 * img[:, :, 2]


def cell_levels(image: np.ndarray, order: str = "bgr") -> np.ndarray | None:
    """Mean luma of the central half of each cell (``ROWS x COLS`` float), or None when the frame is too small."""
    h, w = image.shape[:2]
    try:
        lay = layout(h, w)
    except ValueError:
        return None
    c = lay.cell
    a, b = c // 4, c - c // 4
    block = image[lay.y0:lay.y0 + lay.height, lay.x0:lay.x0 + lay.width]
    if block.shape[:2] != (lay.height, lay.width):
        return None
    y = _luma(block, order).reshape(ROWS, c, COLS, c)
    return y[:, a:b, :, a:b].mean(axis=(1, 3))


def decode(image: np.ndarray, order: str = "bgr") -> int | None:
    """The frame id (mod 2**24) written by :func:`draw`, read from decoded pixels; None when unreadable.

    ``image``: ``H x W`` luma/gray, or ``H x W x 3|4`` in ``order`` ("bgr": OpenCV/PyAV bgr24, "rgb": canvas RGBA).
    """
    return decode_detail(image, order)[0]


def decode_detail(image: np.ndarray, order: str = "bgr") -> tuple[int | None, str]:
    """``(id, "ok")``, ``(None, "no_code")`` (no guard pattern: a frame without a code, e.g. NO SIGNAL) or
    ``(None, "damaged")`` (the guards are there but the CRC fails: pixels the codec or an overlay spoiled)."""
    levels = cell_levels(np.asarray(image), order)
    if levels is None:
        return None, "no_code"
    guards = np.array([GUARD_START, GUARD_STOP], bool)
    g = levels[[0, -1]]
    white, black = g[guards], g[~guards]
    if white.min() - black.max() < MIN_CONTRAST:
        return None, "no_code"
    thr = (white.mean() + black.mean()) / 2.0
    data = (levels[1:-1] > thr).astype(np.uint32).ravel()
    v = 0
    for bit in data[:ID_BITS]:
        v = (v << 1) | int(bit)
    crc = 0
    for bit in data[ID_BITS:]:
        crc = (crc << 1) | int(bit)
    if crc8(v.to_bytes(3, "big")) != crc:
        return None, "damaged"
    return v, "ok"


def unwrap(code: int, reference: int) -> int:
    """The full id whose low 24 bits are ``code`` and which lies nearest to ``reference`` (ids wrap after 2**24)."""
    base = reference - (reference & ID_MASK)
    candidates = (base - (1 << ID_BITS) + code, base + code, base + (1 << ID_BITS) + code)
    return min(candidates, key=lambda c: abs(c - reference))


# JavaScript twin of `decode` for browser pixels: RGBA ImageData of the whole frame or of the code's bounding box, or
# the luma plane of the box (a VideoFrame's Y plane).
# `sonomalyStamp.layout(h, w)` gives the box to read: {x0, y0, cell, width, height}.
JS_DECODER = r"""
(() => {
  const ROWS = %(rows)d, COLS = %(cols)d, ID_BITS = %(id_bits)d, CRC_BITS = %(crc_bits)d, MIN_CONTRAST = %(contrast)s;
  const GUARD_START = %(gs)s, GUARD_STOP = %(ge)s;
  function crc8(bytes) {
    let crc = 0;
    for (const b of bytes) {
      crc ^= b;
      for (let i = 0; i < 8; i++) crc = (crc & 0x80) ? ((crc << 1) ^ 0x07) & 0xff : (crc << 1) & 0xff;
    }
    return crc;
  }
  function cellSize(h) { return h >= (ROWS + 2) * 16 ? 16 : 8; }
  function layout(h, w) {
    const c = cellSize(h);
    if (h < (ROWS + 2) * c || w < (COLS + 1) * c) return null;
    return { x0: 0, y0: Math.floor(Math.floor((h - ROWS * c) / 2) / c) * c, cell: c, width: COLS * c,
             height: ROWS * c };
  }
  // data: RGBA bytes of a box of width `bw` whose top-left pixel is frame pixel (ox, oy); or, with `luma` given
  // ({full: true|false}), one byte of luma (Y) a pixel: a VideoFrame's Y plane, full range or BT.601 limited range.
  // Returns the id, or null; `lastReason` says "ok", "no_code" (no guard pattern) or "damaged" (CRC fails).
  const api = { lastReason: "ok" };
  function decode(data, bw, lay, ox, oy, luma) {
    const px = luma ? 1 : 4, y0 = luma && !luma.full ? 16 : 0, k = luma && !luma.full ? 255 / 219 : 1;
    const c = lay.cell, a = Math.floor(c / 4), b = c - Math.floor(c / 4);
    const levels = [];
    for (let r = 0; r < ROWS; r++) {
      const row = [];
      for (let q = 0; q < COLS; q++) {
        let s = 0, n = 0;
        for (let y = a; y < b; y++) {
          const py = lay.y0 + r * c + y - oy;
          for (let x = a; x < b; x++) {
            const i = (py * bw + (lay.x0 + q * c + x - ox)) * px;
            s += luma ? (data[i] - y0) * k : 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2]; n++;
          }
        }
        row.push(s / n);
      }
      levels.push(row);
    }
    const white = [], black = [];
    for (let q = 0; q < COLS; q++) {
      (GUARD_START[q] ? white : black).push(levels[0][q]);
      (GUARD_STOP[q] ? white : black).push(levels[ROWS - 1][q]);
    }
    if (Math.min(...white) - Math.max(...black) < MIN_CONTRAST) { api.lastReason = "no_code"; return null; }
    const mean = v => v.reduce((x, y) => x + y, 0) / v.length;
    const thr = (mean(white) + mean(black)) / 2;
    const bits = [];
    for (let r = 1; r < ROWS - 1; r++) for (let q = 0; q < COLS; q++) bits.push(levels[r][q] > thr ? 1 : 0);
    let v = 0;
    for (let i = 0; i < ID_BITS; i++) v = v * 2 + bits[i];
    let crc = 0;
    for (let i = ID_BITS; i < ID_BITS + CRC_BITS; i++) crc = crc * 2 + bits[i];
    if (crc8([(v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff]) !== crc) { api.lastReason = "damaged"; return null; }
    api.lastReason = "ok";
    return v;
  }
  return Object.assign(api, { ROWS, COLS, crc8, cellSize, layout, decode });
})()
""" % {"rows": ROWS, "cols": COLS, "id_bits": ID_BITS, "crc_bits": CRC_BITS, "contrast": repr(MIN_CONTRAST),
       "gs": list(GUARD_START), "ge": list(GUARD_STOP)}


# ---------------------------------------------------------------------------------------------------------------------
# the stamping source
# ---------------------------------------------------------------------------------------------------------------------
class StampedFrame(Frame):
    """A :class:`Frame` whose code follows its id: assigning ``frame.id`` (as ``ReconnectingSource`` does) re-draws it.

    The image is this frame's own copy (the source pads or copies before drawing), so re-drawing in place is safe.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("id", "image"):
            d = self.__dict__
            if "id" in d and "image" in d and isinstance(d["image"], np.ndarray):
                draw(d["image"], d["id"])


def needs_band(image: np.ndarray) -> bool:
    """True when the code's spot (left edge, vertically centred, with its quiet zone and as much margin again)
    would touch the scan region of ``image``, or the frame is too small: then the frame gets a padding band."""
    from sonomaly.stream.roi import detect_scan_region

    h, w = image.shape[:2]
    try:
        lay = layout(h, w)
    except ValueError:
        return True
    if w < lay.width + 4 * gap_width(h, w):
        return True
    region = detect_scan_region(image)
    if region.kind == "full":
        return True
    gap = gap_width(h, w)
    x0, y0, x1, y1 = lay.quiet(gap)
    spot = region.mask[max(0, y0 - gap):y1 + gap, x0:x1 + gap]
    return bool(np.count_nonzero(spot))


def pad_band(image: np.ndarray) -> np.ndarray:
    """A new image: ``image`` with a black band of :func:`band_width` px on its left."""
    h, w = image.shape[:2]
    bw = band_width(h, w)
    out = np.zeros((h, w + bw, *image.shape[2:]), image.dtype)
    out[:, bw:] = image
    return out


class StampSource:
    """Wraps a source; every frame it returns carries its id as a code (see the module docstring).

    ``placement``: ``"auto"`` (in the frame when the spot is outside the scan region, else in a padding band; decided
    on the first frame and again whenever the frame size changes), ``"band"`` (always pad) or ``"inside"`` (never).
    All other attributes (``fps``, ``uri``, ``state``...) are the inner source's.
    """

    def __init__(self, inner, *, placement: str = "auto") -> None:
        if placement not in ("auto", "band", "inside"):
            raise ValueError(f"placement must be auto, band or inside, not {placement!r}")
        self.inner = inner
        self.placement = placement
        self._shape: tuple[int, ...] | None = None
        self._band = placement == "band"
        self.uri = PREFIX + str(getattr(inner, "uri", "?"))

    def __getattr__(self, name: str) -> Any:  # fps, state, last_error, reconnects, closed...
        return getattr(self.inner, name)

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "StampSource":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self):
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def read(self) -> Frame | None:
        frame = self.inner.read()
        if frame is None:
            return None
        return self.stamp(frame)

    def stamp(self, frame: Frame) -> StampedFrame:
        image = frame.image
        if image.shape != self._shape:
            self._shape = image.shape
            self._band = self.placement == "band" or (self.placement == "auto" and needs_band(image))
        image = pad_band(image) if self._band else clear_quiet_zone(image.copy())
        meta = dict(frame.meta)
        meta["stamp"] = "band" if self._band else "inside"
        return StampedFrame(id=frame.id, t_capture_ns=frame.t_capture_ns, image=image, meta=meta,
                            stages=dict(frame.stages))

    def __repr__(self) -> str:
        return f"StampSource({self.inner!r}, placement={self.placement!r})"
