"""Golden properties of the overlay layer (sonomaly.overlay): the heatmap layer never touches pixels outside the scan
region or where the map is zero, contours follow level crossings, the compositor never mutates its input."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonomaly.overlay import (
    OverlayStyle,
    banner_rect,
    blend_heatmap,
    compose,
    draw_banner,
    draw_contours,
    draw_gauge,
    draw_hud,
    gauge_color,
    gauge_origin,
    heat_layer,
    layer_for,
    no_signal_frame,
    quantise,
)
from sonomaly.overlay.draw import DEFAULT_COLORMAP, colormap_lut
from sonomaly.stream.roi import ScanRegion

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def speckle_frame(h, w, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(20, 200, (h, w), dtype=np.uint8)
    return cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)


def sector_region(h, w) -> ScanRegion:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (w // 2, -h // 10), (int(h * 1.0), int(h * 1.0)), 0, 50, 130, 255, -1)
    ys, xs = np.nonzero(m)
    return ScanRegion((int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1), m, "sector")


def blob(h, w, cx, cy, sigma, amp):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- blend_heatmap
def test_zero_map_is_bit_exact():
    img = speckle_frame(120, 160)
    mask = np.full((120, 160), 255, np.uint8)
    out = blend_heatmap(img, np.zeros((120, 160), np.float32), mask)
    assert out is not img and np.array_equal(out, img)


def test_negative_and_nan_map_unchanged():
    img = speckle_frame(120, 160, 1)
    mask = np.full((120, 160), 255, np.uint8)
    amap = -np.abs(np.random.default_rng(0).normal(0, 2, (120, 160))).astype(np.float32)
    amap[::3, ::5] = np.nan
    amap[1, 1] = -np.inf
    assert np.array_equal(blend_heatmap(img, amap, mask, opacity=1.0), img)


def test_blend_does_not_mutate_input_and_out_param():
    img = speckle_frame(60, 80)
    keep = img.copy()
    amap = np.full((60, 80), 1.2, np.float32)
    mask = np.full((60, 80), 255, np.uint8)
    res = blend_heatmap(img, amap, mask)
    assert np.array_equal(img, keep) and not np.array_equal(res, img)
    buf = np.zeros_like(img)
    assert blend_heatmap(img, amap, mask, out=buf) is buf and np.array_equal(buf, res)
    inplace = img.copy()
    assert blend_heatmap(inplace, amap, mask, out=inplace) is inplace and np.array_equal(inplace, res)


@SETTINGS
@given(
    h=st.integers(1, 90), w=st.integers(1, 120), seed=st.integers(0, 2**16),
    shape=st.sampled_from(["sector", "rect", "circle", "random", "empty"]),
    scale=st.floats(0.0, 5.0), opacity=st.floats(0.0, 1.0),
)
def test_outside_mask_never_changes(h, w, seed, shape, scale, opacity):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    if shape == "sector":
        cv2.ellipse(mask, (w // 2, 0), (h, h), 0, 45, 135, 255, -1)
    elif shape == "rect":
        mask[h // 4 : 3 * h // 4 + 1, w // 5 : 4 * w // 5 + 1] = 255
    elif shape == "circle":
        cv2.circle(mask, (w // 2, h // 2), max(1, min(h, w) // 3), 255, -1)
    elif shape == "random":
        mask = (rng.random((h, w)) > 0.5).astype(np.uint8) * rng.integers(1, 256)
    amap = (rng.normal(0.3, 1.0, (h, w)) * scale).astype(np.float32)
    amap[rng.random((h, w)) < 0.05] = np.nan
    outside = mask == 0
    for layer in (
        blend_heatmap(img, amap, mask, opacity=opacity),
        draw_contours(img, amap, mask, level=float(rng.uniform(0.2, 1.5)), thickness=int(rng.integers(1, 5))),
    ):
        assert layer.shape == img.shape and layer.dtype == np.uint8
        assert np.array_equal(layer[outside], img[outside])
    # where the map is <= 0 (or NaN) nothing changes either
    flat = ~(amap > 0)
    assert np.array_equal(blend_heatmap(img, amap, mask, opacity=opacity)[flat], img[flat])


def test_alpha_grows_with_anomaly():
    img = np.full((10, 20, 3), 128, np.uint8)
    amap = np.zeros((10, 20), np.float32)
    amap[:, :10] = 0.3
    amap[:, 10:] = 1.2
    out = blend_heatmap(img, amap, np.full((10, 20), 255, np.uint8)).astype(int)
    d_low = np.abs(out[5, 5] - 128).sum()
    d_high = np.abs(out[5, 15] - 128).sum()
    assert 0 < d_low < d_high
    # monotone along a ramp, against a mid-grey background
    ramp = np.tile(np.linspace(0, 1.5, 64, dtype=np.float32), (4, 1))
    g = np.full((4, 64, 3), 128, np.uint8)
    diff = np.abs(blend_heatmap(g, ramp, None).astype(int) - 128).sum(axis=2)[0]
    assert diff[0] == 0 and diff[-1] > diff[len(diff) // 4] > 0


def test_quantise_levels():
    q = quantise(np.array([[np.nan, -1.0, 0.0, 0.75, 1.5, 9.0, np.inf, -np.inf]], np.float32))
    assert q.tolist() == [[0, 0, 0, 128, 255, 255, 255, 0]]


@pytest.mark.parametrize("n", [8, 64])  # below and above the size where quantise hands the cast to OpenCV
def test_quantise_levels_at_every_size(n):
    # OpenCV's saturating cast of a NaN is not defined: 255 with opencv 5.1 on an AMD EPYC VM, 0 on earlier machines
    row = np.array([np.nan, -1.0, 0.0, 0.75, 1.5, 9.0, np.inf, -np.inf], np.float32)
    a = np.tile(row, (n, n))
    q = quantise(a)
    assert q.shape == a.shape and q.dtype == np.uint8
    assert np.array_equal(q, np.tile(np.array([0, 0, 0, 128, 255, 255, 255, 0], np.uint8), (n, n)))
    out = np.full(a.shape, 7, np.uint8)
    assert quantise(a, out=out) is out and np.array_equal(out, q)


def test_map_of_model_resolution_is_resized_by_compose():
    img = speckle_frame(96, 128)
    small = np.zeros((12, 16), np.float32)
    small[4:8, 6:10] = 1.4
    out = compose(img, small, None, style=OverlayStyle(contours=False))
    changed = np.any(out != img, axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.any() and 20 < ys.mean() < 76 and 30 < xs.mean() < 98


# ------------------------------------------------------------------------------------------------------ draw_contours
def test_contours_only_on_crossing_and_inside_mask():
    h, w = 200, 260
    img = np.full((h, w, 3), 60, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[20:180, 40:220] = 255
    amap = blob(h, w, 100, 100, 25, 1.5)  # crosses 1.0 on a circle of radius ~22 around (100, 100)
    out = draw_contours(img, amap, mask, level=1.0, thickness=2)
    changed = np.any(out != img, axis=2)
    assert changed.any()
    assert not changed[mask == 0].any()
    ys, xs = np.nonzero(changed)
    r = np.hypot(xs - 100, ys - 100)
    r_level = 25 * np.sqrt(2 * np.log(1.5))
    assert np.all(np.abs(r - r_level) < 6)  # a ring at the level crossing, nothing else
    # no crossing: map entirely below or entirely above the level -> nothing drawn
    assert np.array_equal(draw_contours(img, amap * 0.5, mask, level=1.0), img)
    assert np.array_equal(draw_contours(img, np.full((h, w), 3.0, np.float32), mask, level=1.0), img)
    # a blob whose crossing lies outside the mask draws nothing
    far = blob(h, w, 10, 10, 6, 1.5)
    assert np.array_equal(draw_contours(img, far, mask, level=1.0), img)


def test_contours_frame_edge_is_not_a_crossing():
    h, w = 100, 100
    img = np.zeros((h, w, 3), np.uint8)
    amap = np.zeros((h, w), np.float32)
    amap[:, :50] = 2.0  # above the level on the whole left half, touching three frame edges
    out = draw_contours(img, amap, None, level=1.0, thickness=1, halo=False)
    changed = np.any(out != img, axis=2)
    cols = np.nonzero(changed.any(axis=0))[0]
    assert changed.any() and cols.min() >= 45 and cols.max() <= 54  # only the vertical crossing line


def test_draw_functions_are_pure_by_default():
    img = speckle_frame(120, 160)
    keep = img.copy()
    amap = blob(120, 160, 80, 60, 20, 1.5)
    draw_contours(img, amap, None)
    draw_gauge(img, 0.8)
    draw_hud(img, ["30 fps"])
    draw_banner(img, "AI DELAYED")
    assert np.array_equal(img, keep)
    same = draw_hud(img, ["30 fps"], inplace=True)
    assert same is img and not np.array_equal(img, keep)


# ----------------------------------------------------------------------------------------------- gauge, HUD, banner
def test_gauge_colours():
    assert gauge_color(0.2) == gauge_color(0.5)  # green
    g, a, r = gauge_color(0.3), gauge_color(0.85), gauge_color(1.3)
    assert g[1] > g[2] and r[2] > r[1] and a != g and a != r
    assert gauge_color(float("nan")) != r


def test_gauge_avoids_scan_region():
    h, w = 480, 640
    region = sector_region(h, w)
    x, y = gauge_origin(h, w, region.mask)
    out = draw_gauge(np.zeros((h, w, 3), np.uint8), 1.2, mask=region.mask)
    changed = np.any(out != 0, axis=2)
    assert changed.any()
    assert np.count_nonzero(changed & (region.mask > 0)) == 0  # corners of a sector frame are free
    assert (x > w / 2) and changed[:, w // 2 :].any()  # right side preferred


def test_gauge_fill_tracks_score():
    img = np.zeros((480, 640, 3), np.uint8)
    low = np.count_nonzero(np.any(draw_gauge(img, 0.3, origin=(500, 200)) != 0, axis=2))
    high = np.count_nonzero(np.any(draw_gauge(img, 1.4, origin=(500, 200)) != 0, axis=2))
    assert high > low
    draw_gauge(img, None)
    draw_gauge(img, float("nan"))


def test_banner_at_top_away_from_centre():
    h, w = 480, 640
    img = speckle_frame(h, w)
    out = draw_banner(img, "AI OFF", level="off")
    changed = np.any(out != img, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.max() < h * 0.2
    x0, y0, x1, y1 = banner_rect(h, w, "AI OFF")
    assert y1 < h * 0.2 and (x0 + x1) // 2 == pytest.approx(w // 2, abs=2)
    # the banner colour says the level: red for off, amber for warn
    red = draw_banner(np.zeros((h, w, 3), np.uint8), "AI OFF", level="off")[y0 + 2, x0 + 2]
    amber = draw_banner(np.zeros((h, w, 3), np.uint8), "AI DELAYED", level="warn")
    ax0, ay0, _, _ = banner_rect(h, w, "AI DELAYED")
    amber = amber[ay0 + 2, ax0 + 2]
    assert red[2] > 200 and red[1] < 100
    assert amber[2] > 200 and 120 < amber[1] < 220 and amber[0] < 60


@pytest.mark.parametrize("h", [240, 480, 720, 1080])
def test_text_scales_with_frame(h):
    w = h * 16 // 9
    x0, y0, x1, y1 = banner_rect(h, w, "AI DELAYED")
    assert 0.05 * h <= (y1 - y0) <= 0.16 * h  # big enough to read, never a wall
    hud = draw_hud(np.zeros((h, w, 3), np.uint8), ["30 fps  lat 41 ms", "onnx-cpu"])
    ys, xs = np.nonzero(np.any(hud != 0, axis=2))
    assert ys.size and (ys.max() - ys.min()) >= 0.035 * h and xs.max() < w / 2


# ---------------------------------------------------------------------------------------------------------- no signal
@pytest.mark.parametrize("h,w", [(480, 640), (240, 320), (1080, 1920), (1, 1), (3, 5), (0, 0)])
def test_no_signal_frame(h, w):
    f = no_signal_frame(h, w, detail="reconnecting in 2 s")
    assert f.shape == (h, w, 3) and f.dtype == np.uint8
    if h >= 100:
        assert f.std() > 1.0 and len(np.unique(f)) > 3  # text present
        assert np.median(f) < 60  # dark
        assert not np.array_equal(f, no_signal_frame(h, w))  # the detail line shows


# ------------------------------------------------------------------------------------------------------------ compose
def test_compose_does_not_mutate_input():
    h, w = 240, 320
    img = speckle_frame(h, w)
    keep = img.copy()
    region = sector_region(h, w)
    amap = blob(h, w, 160, 120, 30, 1.4)
    out = compose(img, amap, region, score=1.3, style=OverlayStyle(), hud_lines=["30 fps"], banner="AI DELAYED")
    assert np.array_equal(img, keep)
    assert out is not img and out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_compose_no_map_with_banner_leaves_scan_centre():
    h, w = 480, 640
    img = speckle_frame(h, w)
    region = sector_region(h, w)
    out = compose(img, None, region, score=None, style=OverlayStyle(), hud_lines=["30 fps", "onnx-cpu"],
                  banner="AI OFF", banner_level="off")
    changed = np.any(out != img, axis=2)
    assert changed[: h // 5].any()  # banner drawn at the top
    x, y, bw, bh = region.bbox
    cy, cx = y + bh // 2, x + bw // 2
    centre = (slice(cy - bh // 4, cy + bh // 4), slice(cx - bw // 4, cx + bw // 4))
    assert not changed[centre].any()


def test_compose_heatmap_layer_respects_region():
    h, w = 480, 640
    img = speckle_frame(h, w)
    region = sector_region(h, w)
    amap = np.random.default_rng(1).normal(0.8, 0.6, (h, w)).astype(np.float32)
    style = OverlayStyle(gauge=False, hud=False)
    out = compose(img, amap, region, score=None, style=style)
    outside = region.mask == 0
    assert np.array_equal(out[outside], img[outside])
    assert not np.array_equal(out[~outside], img[~outside])
    zero = compose(img, np.zeros((h, w), np.float32), region, score=0.2, style=style)
    assert np.array_equal(zero, img)


def test_compose_gray_input_and_full_region():
    g = np.random.default_rng(0).integers(0, 255, (120, 160), dtype=np.uint8)
    out = compose(g, np.full((120, 160), 1.2, np.float32), ScanRegion.full(120, 160), score=0.5,
                  style=OverlayStyle(), hud_lines=["x"])
    assert out.shape == (120, 160, 3)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (5, 3), (8, 8), (17, 31), (1081, 1921)])
def test_odd_sizes_do_not_crash(h, w):
    img = speckle_frame(h, w)
    amap = np.random.default_rng(0).normal(0.8, 0.8, (h, w)).astype(np.float32)
    region = ScanRegion.full(h, w)
    for banner in (None, "AI DELAYED"):
        out = compose(img, amap, region, score=1.1, style=OverlayStyle(), hud_lines=["30 fps", "cpu"], banner=banner)
        assert out.shape == (h, w, 3)
    blend_heatmap(img, amap, region.mask)
    draw_contours(img, amap, region.mask)
    draw_gauge(img, 0.5)
    draw_hud(img, ["a"])
    draw_banner(img, "AI OFF", level="off")
    no_signal_frame(h, w, detail="x")


# --------------------------------------------------------------------------------------------------------- HeatLayer
def _heat_reference(img, amap, mask, opacity):
    """The heat blend in float64, from the definition: alpha = opacity * level / 255, colour = the colormap at the
    level, level = the quantised map (stretched over the frame when smaller), 0 outside the mask."""
    h, w = img.shape[:2]
    level = quantise(amap)
    if level.shape != (h, w):
        level = cv2.resize(level, (w, h), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        level = np.where(mask > 0, level, 0).astype(np.uint8)
    alpha = (opacity * level.astype(np.float64) / 255.0)[:, :, None]
    colour = colormap_lut(DEFAULT_COLORMAP)[level, 0].astype(np.float64)
    return img.astype(np.float64) * (1.0 - alpha) + colour * alpha


@SETTINGS
@given(h=st.integers(1, 90), w=st.integers(1, 90), seed=st.integers(0, 10_000), small=st.booleans(),
       opacity=st.floats(0.0, 1.0), thickness=st.integers(1, 4))
def test_heat_layer_draws_the_blend_and_the_contours_over_it(h, w, seed, small, opacity, thickness):
    """One layer made per map, drawn on several frames: the heat is the alpha blend of its definition (within the
    layer's 8-bit rounding), the contours are stroked over the heat as ``draw_contours`` strokes them over a blended
    frame (the same pixels, within a few levels at anti-aliased edges), and nothing changes
    outside the mask; ``out=`` the frame itself gives the same pixels."""
    rng = np.random.default_rng(seed)
    mh, mw = (max(1, h // 3), max(1, w // 3)) if small else (h, w)
    amap = cv2.GaussianBlur(rng.normal(0.5, 1.0, (mh, mw)).astype(np.float32), (0, 0), 1.5)
    mask = (rng.random((h, w)) > 0.2).astype(np.uint8) * 255 if seed % 2 else None
    level = float(rng.uniform(0.2, 1.2))
    heat = heat_layer(amap, mask, (h, w), opacity=opacity)
    both = heat_layer(amap, mask, (h, w), opacity=opacity, contour_level=level, contour_thickness=thickness)
    for i in range(3):
        img = speckle_frame(h, w, seed + i)
        blended = heat.apply(img)
        assert np.abs(blended - _heat_reference(img, amap, mask, opacity)).max() <= 1.5 + 1e-9
        ref = draw_contours(blended, amap, mask, level=level, thickness=thickness)
        out = both.apply(img)
        stroked = np.any(ref != blended, axis=2)
        diff = np.abs(out.astype(int) - ref.astype(int))
        # the same strokes: a few levels apart at anti-aliased edges (the layer rounds keep and add to 8 bits, cv2
        # rounds its coverage against other values), nowhere far apart, and no bias over the strokes
        assert diff.max() <= 12
        if stroked.any():
            assert diff[stroked].mean() <= 2.0
        near = cv2.dilate(stroked.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # anti-aliasing fringe (2 px)
        assert np.array_equal(out[~near], blended[~near])
        assert np.abs(out[~stroked].astype(int) - blended[~stroked].astype(int)).max(initial=0) <= 2
        if mask is not None:
            assert np.array_equal(out[mask == 0], img[mask == 0])
        buf = img.copy()
        assert both.apply(buf, out=buf) is buf and np.array_equal(buf, out)
    with pytest.raises(ValueError, match="layer made for"):
        both.apply(speckle_frame(h + 1, w))


def test_heat_layer_strokes_match_cv2_strokes_on_the_frame():
    """Where there is no heat, the layer's strokes are the strokes cv2 draws straight onto the frame (the dark halo,
    then the line, anti-aliased): the same pixels, within the layer's 8-bit rounding."""
    from sonomaly.overlay.draw import _SHIFT, _contour_polylines

    h, w = 120, 160
    img = np.full((h, w, 3), 90, np.uint8)
    amap = blob(h, w, 80, 60, 20, 1.5)
    layer = heat_layer(amap, None, (h, w), heat=False, contour_level=1.0, contour_thickness=2)
    ref = img.copy()
    polys = _contour_polylines(amap, (h, w), (0, 0, w, h), 1.0)
    assert polys
    cv2.polylines(ref, polys, True, (0, 0, 0), 4, cv2.LINE_AA, _SHIFT)
    cv2.polylines(ref, polys, True, (255, 255, 255), 2, cv2.LINE_AA, _SHIFT)
    out = layer.apply(img)
    assert np.any(out != img)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2
    assert np.array_equal(np.any(out != img, axis=2), np.any(ref != img, axis=2))


def test_heat_layer_owns_its_arrays_unless_scratch():
    """A default layer can be handed to another thread: making the next one does not change it."""
    img = speckle_frame(64, 80)
    a1, a2 = blob(64, 80, 20, 30, 8, 1.4), blob(64, 80, 60, 20, 8, 1.4)
    first = heat_layer(a1, None, (64, 80), contour_level=1.0)
    before = first.apply(img)
    heat_layer(a2, None, (64, 80), contour_level=1.0)
    heat_layer(a2, None, (64, 80), contour_level=1.0, scratch=True)
    assert np.array_equal(first.apply(img), before)
    assert heat_layer(np.zeros((64, 80), np.float32), None, (64, 80), contour_level=1.0).empty
    assert not first.empty


def test_heat_layer_recycles_the_arrays_of_freed_layers_only():
    """A freed layer's arrays go to the next layer of its size (no fresh frame-sized memory per AI result); a layer
    still held keeps its own, and the recycled layer draws exactly what a fresh one does."""
    import gc

    from sonomaly.overlay import draw

    draw._POOL.clear()
    img = speckle_frame(64, 80)
    a1, a2, a3 = (blob(64, 80, cx, 30, 12, 1.4) + 0.2 for cx in (20, 40, 60))  # heat over the whole frame
    held = heat_layer(a1, None, (64, 80), contour_level=1.0)
    held_pixels = held.apply(img)
    freed = heat_layer(a2, None, (64, 80), contour_level=1.0)
    freed_ids = {id(freed.mult), id(freed.add)}
    del freed
    gc.collect()
    reused = heat_layer(a3, None, (64, 80), contour_level=1.0)
    assert {id(reused.mult), id(reused.add)} == freed_ids
    assert {id(reused.mult), id(reused.add)}.isdisjoint({id(held.mult), id(held.add)})
    assert np.array_equal(held.apply(img), held_pixels)
    draw._POOL.clear()
    assert np.array_equal(reused.apply(img), heat_layer(a3, None, (64, 80), contour_level=1.0).apply(img))


def test_compose_uses_a_layer_only_for_its_frame_size_and_style():
    region = sector_region(120, 160)
    img = speckle_frame(120, 160)
    amap = blob(120, 160, 80, 60, 15, 1.5)
    style = OverlayStyle()
    layer = layer_for(amap, region, (120, 160), style)
    assert np.array_equal(compose(img, amap, region, style=style, layer=layer), compose(img, amap, region, style=style))
    # a stale layer (another map) is used as it is while the style matches: that is what it is for
    other = layer_for(blob(120, 160, 40, 90, 10, 1.5), region, (120, 160), style)
    assert np.array_equal(compose(img, amap, region, style=style, layer=other),
                          compose(img, blob(120, 160, 40, 90, 10, 1.5), region, style=style))
    # after a style change (opacity, threshold) or for another frame size the layer is not used
    changed = OverlayStyle(opacity=0.3, threshold=0.8)
    assert np.array_equal(compose(img, amap, region, style=changed, layer=layer),
                          compose(img, amap, region, style=changed))
    big = speckle_frame(240, 320)
    assert np.array_equal(compose(big, amap, None, style=style, layer=layer), compose(big, amap, None, style=style))
