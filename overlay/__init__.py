"""Overlay layer: heatmap blending, contours, score gauge, HUD, status banners and the compositor.

Pure numpy/OpenCV functions on ``uint8`` BGR frames; see :mod:`sonomaly.overlay.draw` for the units of the anomaly map.
"""
from sonomaly.overlay.compose import OverlayStyle, compose, layer_for
from sonomaly.overlay.draw import (
    AMAP_MAX,
    DEFAULT_COLORMAP,
    banner_rect,
    HeatLayer,
    blend_heatmap,
    colormap_lut,
    draw_banner,
    draw_contours,
    draw_gauge,
    draw_hud,
    gauge_color,
    gauge_origin,
    heat_layer,
    no_signal_frame,
    quantise,
)

__all__ = [
    "AMAP_MAX",
    "DEFAULT_COLORMAP",
    "HeatLayer",
    "OverlayStyle",
    "banner_rect",
    "blend_heatmap",
    "colormap_lut",
    "compose",
    "draw_banner",
    "draw_contours",
    "draw_gauge",
    "draw_hud",
    "gauge_color",
    "gauge_origin",
    "heat_layer",
    "layer_for",
    "no_signal_frame",
    "quantise",
]
