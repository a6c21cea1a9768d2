"""Frame-id barcodes for glass-to-glass latency measurement.

``stamp:<uri>`` (see :func:`sonomaly.stream.sources.open_source`) wraps any source in a :class:`StampSource`, which
writes each frame's id into the image as a block of large black and white cells. The server already records every
frame's capture time under its id (``/api/records``); a receiver that reads the id back from the pixels it is about
to show knows when that very frame was captured, so ``presentation time - capture time`` is the glass-to-glass
latency, with no clock other than the host's own.

The code (``ROWS x COLS`` cells of ``cell`` px, a black quiet zone of one cell around it)::

    row 0      1 0 1 0      start guard (known white/black cells: they calibrate the threshold)
    rows 1-6   24 bits      frame id (mod 2**24), most significant bit first, row by row
    rows 7-8    8 bits      CRC-8 (poly 0x07) of the id's three bytes
    row 9      0 1 0 1      stop guard

* **Cells are big** (``cell_size(height)``: 10 px at 450 lines, 16 px at 720, never below 8) and pure black/white, so
  VP8 and H.264 at a few hundred kbit/s keep each cell's centre far from the threshold; the decoder averages only the
  central half of each cell.
* **Where**: at the left edge, vertically centred (``layout``). The overlay uses all four corners (score gauge,
  HUD) and the top centre (banners), so no corner of the *composed* frame is reliably free; the left-edge middle is.
  When that spot lies outside the scan region (letter-boxed linear probes, wide UI margins), the code is drawn in the
  frame; when it would cover the scan — the usual case for a convex probe that fills the frame — the frame is padded
  on the left by a black band ``band_width(height)`` px wide and the code goes into the band. The scan region
  detector ignores the band (background), so the model sees the same pixels either way.
* **Decoding** (:func:`decode`, and the same algorithm in JavaScript, :data:`JS_DECODER`, for canvas pixels in a
  browser): sample the cell centres, set the threshold half way between the guard cells' black and white levels,
  require clear contrast and every guard cell on the right side, then check the CRC. Anything else is "unreadable"
  (``None``), never a wrong id in practice (a false accept needs 8 guards and an 8-bit CRC to agree by chance).

Frame ids are re-drawn whenever a frame's ``id`` is reassigned (``ReconnectingSource`` renumbers the frames of the
sources it wraps), so the code always shows the id the server records.
"""
from __future__ import annotations

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
    """Cell side in pixels for a frame of this height (10 px at 450 lines, 16 at 720, 24 at 1080, min 8)."""
    return max(8, int(round(height / 45)))


def band_width(height: int) -> int:
    """Width of the padding band (the code plus a one-cell quiet zone each side), even for YUV 4:2:0."""
    w = (COLS + 2) * cell_size(height)
    return w + (w % 2)


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

    @property
    def quiet(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the code plus its one-cell quiet zone."""
        c = self.cell
        return self.x0 - c, self.y0 - c, self.x0 + self.width + c, self.y0 + self.height + c


def layout(height: int, width: int | None = None) -> Layout:
    """Where the code sits in a frame of this size: one cell from the left edge, vertically centred."""
    c = cell_size(height)
    if height < (ROWS + 2) * c:
        raise ValueError(f"frame too small for a frame-id code: height {height} < {(ROWS + 2) * c}")
    if width is not None and width < (COLS + 2) * c:
        raise ValueError(f"frame too small for a frame-id code: width {width} < {(COLS + 2) * c}")
    return Layout(c, (height - ROWS * c) // 2, c)


def bits_for(frame_id: int) -> np.ndarray:
    """The ``ROWS x COLS`` 0/1 cell pattern for ``frame_id`` (taken mod 2**24)."""
    v = int(frame_id) & ID_MASK
    crc = crc8(v.to_bytes(3, "big"))
    data = [(v >> (ID_BITS - 1 - i)) & 1 for i in range(ID_BITS)] + [(crc >> (CRC_BITS - 1 - i)) & 1
                                                                       for i in range(CRC_BITS)]
    grid = np.array([GUARD_START, *np.reshape(data, (ROWS - 2, COLS)).tolist(), GUARD_STOP], np.uint8)
    return grid


def draw(image: np.ndarray, frame_id: int) -> np.ndarray:
    """Write the code for ``frame_id`` into ``image`` (H x W x 3 or H x W uint8) in place, quiet zone included."""
    h, w = image.shape[:2]
    lay = layout(h, w)
    qx0, qy0, qx1, qy1 = lay.quiet
    image[qy0:qy1, max(0, qx0):qx1] = 0
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

    ``image``: ``H x W`` luma/gray, or ``H x W x 3|4`` in ``order`` ("bgr" for OpenCV/PyAV bgr24, "rgb" for canvas RGBA).
    """
    levels = cell_levels(np.asarray(image), order)
    if levels is None:
        return None
    guards = np.array([GUARD_START, GUARD_STOP], bool)
    g = levels[[0, -1]]
    white, black = g[guards], g[~guards]
    if white.min() - black.max() < MIN_CONTRAST:
        return None
    thr = (white.mean() + black.mean()) / 2.0
    data = (levels[1:-1] > thr).astype(np.uint32).ravel()
    v = 0
    for bit in data[:ID_BITS]:
        v = (v << 1) | int(bit)
    crc = 0
    for bit in data[ID_BITS:]:
        crc = (crc << 1) | int(bit)
    if crc8(v.to_bytes(3, "big")) != crc:
        return None
    return v


def unwrap(code: int, reference: int) -> int:
    """The full id whose low 24 bits are ``code`` and which lies nearest to ``reference`` (ids wrap after 2**24)."""
    base = reference - (reference & ID_MASK)
    candidates = (base - (1 << ID_BITS) + code, base + code, base + (1 << ID_BITS) + code)
    return min(candidates, key=lambda c: abs(c - reference))


# JavaScript twin of `decode` for canvas pixels (RGBA ImageData of the whole frame or of the code's bounding box).
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
  function cellSize(h) { return Math.max(8, Math.round(h / 45)); }
  function layout(h, w) {
    const c = cellSize(h);
    if (h < (ROWS + 2) * c || w < (COLS + 2) * c) return null;
    return { x0: c, y0: Math.floor((h - ROWS * c) / 2), cell: c, width: COLS * c, height: ROWS * c };
  }
  // data: RGBA bytes of a box of width `bw` whose top-left pixel is frame pixel (ox, oy).
  function decode(data, bw, lay, ox, oy) {
    const c = lay.cell, a = Math.floor(c / 4), b = c - Math.floor(c / 4);
    const levels = [];
    for (let r = 0; r < ROWS; r++) {
      const row = [];
      for (let q = 0; q < COLS; q++) {
        let s = 0, n = 0;
        for (let y = a; y < b; y++) {
          const py = lay.y0 + r * c + y - oy;
          for (let x = a; x < b; x++) {
            const i = (py * bw + (lay.x0 + q * c + x - ox)) * 4;
            s += 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2]; n++;
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
    if (Math.min(...white) - Math.max(...black) < MIN_CONTRAST) return null;
    const mean = v => v.reduce((x, y) => x + y, 0) / v.length;
    const thr = (mean(white) + mean(black)) / 2;
    const bits = [];
    for (let r = 1; r < ROWS - 1; r++) for (let q = 0; q < COLS; q++) bits.push(levels[r][q] > thr ? 1 : 0);
    let v = 0;
    for (let i = 0; i < ID_BITS; i++) v = v * 2 + bits[i];
    let crc = 0;
    for (let i = ID_BITS; i < ID_BITS + CRC_BITS; i++) crc = crc * 2 + bits[i];
    if (crc8([(v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff]) !== crc) return null;
    return v;
  }
  return { ROWS, COLS, crc8, cellSize, layout, decode };
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
    """True when the code's spot (left edge, vertically centred, with its quiet zone and one more cell of margin)
    would touch the scan region of ``image``, or the frame is too small: then the frame gets a padding band."""
    from sonomaly.stream.roi import detect_scan_region

    h, w = image.shape[:2]
    try:
        lay = layout(h, w)
    except ValueError:
        return True
    region = detect_scan_region(image)
    if region.kind == "full":
        return True
    x0, y0, x1, y1 = lay.quiet
    c = lay.cell
    spot = region.mask[max(0, y0 - c):y1 + c, max(0, x0 - c):x1 + c]
    return bool(np.count_nonzero(spot))


def pad_band(image: np.ndarray) -> np.ndarray:
    """A new image: ``image`` with a black band of :func:`band_width` px on its left."""
    h, w = image.shape[:2]
    bw = band_width(h)
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
        image = pad_band(image) if self._band else image.copy()
        meta = dict(frame.meta)
        meta["stamp"] = "band" if self._band else "inside"
        return StampedFrame(id=frame.id, t_capture_ns=frame.t_capture_ns, image=image, meta=meta,
                            stages=dict(frame.stages))

    def __repr__(self) -> str:
        return f"StampSource({self.inner!r}, placement={self.placement!r})"
