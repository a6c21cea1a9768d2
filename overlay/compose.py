"""The compositor: one call turns a raw frame, its anomaly map and scan region into the frame the OR display shows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sonomaly.overlay.draw import (
    DEFAULT_COLORMAP,
    HeatLayer,
    _amap,
    _as_bgr,
    draw_banner,
    draw_gauge,
    draw_hud,
    heat_layer,
)
from sonomaly.stream.roi import ScanRegion


@dataclass
class OverlayStyle:
    """What the compositor draws.  ``colormap`` is an OpenCV colormap id; ``threshold`` is the score/map level that
    the gauge tick and the contours mark (1.0 in card-normalised units)."""

    opacity: float = 0.6
    contours: bool = True
    gauge: bool = True
    hud: bool = True
    colormap: int = DEFAULT_COLORMAP
    threshold: float = 1.0
    contour_thickness: int | None = None  # None: scales with the frame (2 px at 720p)
    contour_color: tuple[int, int, int] = (255, 255, 255)
    hud_corner: str = "bottom_left"


def _style_key(style: OverlayStyle, h: int) -> tuple:
    th = style.contour_thickness or max(1, int(round(2 * h / 720)))
    return (float(style.opacity), int(style.colormap), bool(style.contours), float(style.threshold),
            tuple(int(c) for c in style.contour_color), int(th))


def layer_for(amap: np.ndarray, region: ScanRegion | None, shape: tuple[int, int], style: OverlayStyle | None = None,
              *, scratch: bool = False) -> HeatLayer:
    """The heatmap and contours that :func:`compose` draws for ``amap`` on frames of ``shape``, as one
    :class:`~sonomaly.overlay.draw.HeatLayer` (made once per map, blended over every frame that shows it)."""
    style = style or OverlayStyle()
    h, w = int(shape[0]), int(shape[1])
    mask = region.mask if region is not None and region.frame_shape == (h, w) else None
    key = _style_key(style, h)
    layer = heat_layer(_amap(amap), mask, (h, w), opacity=key[0], colormap=key[1],
                       contour_level=key[3] if key[2] else None, contour_color=key[4], contour_thickness=key[5],
                       scratch=scratch)
    layer.key = key
    return layer


def compose(image: np.ndarray, amap: np.ndarray | None, region: ScanRegion | None, *, score: float | None = None,
            style: OverlayStyle | None = None, hud_lines: Sequence[str] = (), banner: str | None = None,
            banner_level: str = "warn", layer: HeatLayer | None = None) -> np.ndarray:
    """Return a NEW display frame (``image`` is never modified).

    ``amap=None`` means no heatmap this frame (raw image plus gauge/HUD/banner).  ``region`` limits the heatmap and
    contours to the scan (``None``: whole frame) and tells the gauge which corner is free.  A map of a different size
    than the frame (e.g. the pipeline's ``map_side`` maps) is stretched over it.  ``layer``: the map's
    :func:`layer_for` made beforehand (the live pipeline makes it once per AI result); used when it was made for
    this frame size and the current ``style`` (it may have changed since), else the layer is made here from ``amap``.
    """
    style = style or OverlayStyle()
    src = _as_bgr(image)
    out = src.copy()
    h, w = out.shape[:2]
    if h == 0 or w == 0:
        return out
    mask = None
    if region is not None:
        mask = region.mask if region.frame_shape == (h, w) else None
    a = None if amap is None else _amap(amap)
    if a is not None and a.size:
        if layer is None or layer.shape != (h, w) or layer.key != _style_key(style, h):
            layer = layer_for(a, region, (h, w), style, scratch=True)
        layer.apply(out, out=out)
    if style.gauge and score is not None:
        draw_gauge(out, score, threshold=style.threshold, mask=mask, inplace=True)
    if style.hud and hud_lines:
        draw_hud(out, list(hud_lines), corner=style.hud_corner, inplace=True)
    if banner:
        draw_banner(out, banner, level=banner_level, inplace=True)
    return out
