"""Pre/post-processing and temporal smoothing (no shared data needed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from sonomaly.engines.card import InputSpec, ModelCard, Range
from sonomaly.engines.processing import TemporalSmoother, postprocess, preprocess, preprocess_batch
from sonomaly.stream.roi import ScanRegion


def make_card(size=256, channels=2, low=2.0, high=6.0, map_hw=64) -> ModelCard:
    return ModelCard(
        name="t", family="patch_gaussian",
        input=InputSpec([size, size], channels, {"mode": "roi_zscore", "clip": 4.0},
                        channel_names=["zscore_gray", "roi_mask"][:channels]),
        outputs={"anomaly_map": {"name": "anomaly_map", "shape": [1, 1, map_hw, map_hw]},
                 "score": {"name": "score", "shape": [1]}},
        map_normalisation=Range(low, high), score_normalisation=Range(10.0, 12.0),
        threshold={"method": "q", "target_fpr": 0.01, "pixel_raw": high, "image_raw": 12.0, "chosen_on": "test"},
    )


def sector_region(h=480, w=640) -> ScanRegion:
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, 40), (380, 380), 0, 50, 130, 255, -1)
    cv2.rectangle(mask, (0, 0), (w, 60), 0, -1)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return ScanRegion((int(x0), int(y0), int(x1 - x0), int(y1 - y0)), mask, "sector")


def speckle_frame(region: ScanRegion, seed=0, gain=1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = region.mask.shape
    g = rng.rayleigh(30.0, (h, w)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), 1.2) * gain + 20
    g[region.mask == 0] = 0
    g[10:30, 20:200] = 250  # UI text outside the scan
    return cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def test_preprocess_shape_mask_and_zscore():
    card = make_card()
    region = sector_region()
    x = preprocess(speckle_frame(region), region, card)
    assert x.shape == (1, 2, 256, 256) and x.dtype == np.float32
    inside = x[0, 1] > 0.5
    assert 0.3 < inside.mean() < 0.95
    assert np.all(x[0, 0][~inside] == 0.0), "pixels outside the scan mask must be 0"
    z = x[0, 0][inside]
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.05
    assert np.abs(x[0, 0]).max() <= 4.0


def test_preprocess_intensity_invariant_and_batch():
    card = make_card()
    region = sector_region()
    a = preprocess(speckle_frame(region, gain=1.0), region, card)
    b = preprocess(speckle_frame(region, gain=2.0), region, card)
    # a brighter clip gives (nearly) the same model input: brightness cannot leak into the model
    assert np.abs(a - b).mean() < 0.05
    xb = preprocess_batch([speckle_frame(region, s) for s in range(3)], region, card)
    assert xb.shape == (3, 2, 256, 256)
    np.testing.assert_array_equal(xb[0:1], preprocess(speckle_frame(region, 0), region, card))


def test_preprocess_flat_frame_no_nan():
    card = make_card(channels=1)
    region = ScanRegion.full(100, 120)
    x = preprocess(np.full((100, 120, 3), 77, np.uint8), region, card)
    assert x.shape == (1, 1, 256, 256) and np.isfinite(x).all() and np.all(x == 0)


def test_postprocess_threshold_mapping_and_mask():
    card = make_card(low=2.0, high=6.0)
    region = sector_region()
    raw = np.full((1, 1, 64, 64), 6.0, np.float32)  # exactly the pixel threshold
    amap, score = postprocess(raw, np.array([12.0], np.float32), region, card, (480, 640, 3))
    assert amap.shape == (480, 640) and amap.dtype == np.float32
    inside = region.mask > 0
    np.testing.assert_allclose(amap[inside], 1.0, atol=1e-5)
    assert np.all(amap[~inside] == 0.0)
    assert score == pytest.approx(1.0)
    amap2, score2 = postprocess(np.full((1, 1, 64, 64), 2.0, np.float32), np.array([10.0]), region, card, (480, 640))
    assert np.abs(amap2).max() < 1e-6 and score2 == pytest.approx(0.0)


def test_postprocess_nan_safe():
    card = make_card()
    region = sector_region()
    raw = np.full((1, 1, 64, 64), 4.0, np.float32)
    raw[0, 0, 10:20, 10:20] = np.nan
    raw[0, 0, 30, 30] = np.inf
    res = postprocess(raw, np.array([np.nan], np.float32), region, card, (480, 640))
    amap, score = res
    assert np.isfinite(amap).all() and np.isfinite(score)
    assert res.nonfinite == 102
    assert score == 0.0


def test_postprocess_reuses_buffer_and_blob_location():
    card = make_card()
    region = ScanRegion((100, 50, 400, 400), np.pad(np.full((400, 400), 255, np.uint8), ((50, 30), (100, 140))), "rectangle")
    raw = np.full((1, 1, 64, 64), 2.0, np.float32)
    raw[0, 0, 0:16, 48:64] = 10.0  # top-right quarter of the model map
    buf = np.empty((480, 640), np.float32)
    amap, _ = postprocess(raw, [11.0], region, card, (480, 640), out=buf)
    assert amap is buf
    assert amap[50 + 50, 100 + 350] > 1.5 and amap[50 + 350, 100 + 50] < 0.01


def test_temporal_smoother_rises_at_once_and_damps_flicker():
    rng = np.random.default_rng(0)
    sm = TemporalSmoother(alpha=0.5)
    region = ScanRegion.full(60, 80)
    base = np.full((60, 80), 0.2, np.float32)
    outs, ins = [], []
    for i in range(20):
        m = base + rng.uniform(-0.15, 0.15, base.shape).astype(np.float32)  # low-level flicker
        ins.append(m)
        outs.append(sm.update(m, region))
    assert np.std(np.stack(outs[5:]), axis=0).mean() < 0.7 * np.std(np.stack(ins[5:]), axis=0).mean()
    # a new finding appears: shown at full strength on its first frame
    m = base.copy()
    m[20:30, 30:40] = 2.0
    out = sm.update(m, region)
    np.testing.assert_allclose(out[20:30, 30:40], 2.0)
    # and fades (not vanishes) when it goes
    out = sm.update(base, region)
    assert 0.9 < out[25, 35] < 2.0
    # dropouts of an existing finding are damped rather than blinking off
    # region change resets the state
    other = ScanRegion((5, 5, 50, 40), np.pad(np.full((40, 50), 255, np.uint8), ((5, 15), (5, 25))), "rectangle")
    out = sm.update(base, other)
    np.testing.assert_allclose(out, base)


def test_temporal_smoother_nan_and_shape_change():
    sm = TemporalSmoother(alpha=0.3)
    a = np.ones((10, 10), np.float32)
    a[0, 0] = np.nan
    out = sm.update(a)
    assert np.isfinite(out).all()
    out = sm.update(np.zeros((5, 5), np.float32))
    assert out.shape == (5, 5)
    with pytest.raises(ValueError):
        TemporalSmoother(alpha=0.0)


def test_postprocess_work_side_gives_the_same_map_at_a_lower_resolution():
    """``work_side``: the map of a 1080p frame is made at the frame scaled to that longer side, frame-aligned (the
    blob lands at the same relative place, 0 outside the scaled scan mask) and, stretched back over the frame as the
    compositor does, it agrees with the full-size map; frames already small enough are untouched."""
    import cv2

    card = make_card()
    fh, fw = 1080, 1920
    mask = np.zeros((fh, fw), np.uint8)
    mask[90:1010, 400:1500] = 255
    region = ScanRegion((400, 90, 1100, 920), mask, "rectangle")
    raw = np.full((1, 1, 64, 64), 2.0, np.float32)
    raw[0, 0, 8:24, 40:56] = 10.0
    full, s_full = postprocess(raw, [11.0], region, card, (fh, fw))
    small, s_small = postprocess(raw, [11.0], region, card, (fh, fw), work_side=320)
    assert small.shape == (180, 320) and s_small == s_full
    assert np.all(small[cv2.resize(mask, (320, 180), interpolation=cv2.INTER_AREA) <= 127] == 0)
    back = cv2.resize(small, (fw, fh), interpolation=cv2.INTER_LINEAR)
    inner = cv2.erode(mask, np.ones((41, 41), np.uint8)) > 0  # away from the mask edge (resampling differs there)
    diff = np.abs(back[inner] - full[inner])
    assert diff.mean() < 0.005 * full.max() and np.percentile(diff, 99) < 0.1 * full.max()  # only the blob's edge
    assert diff.max() < 0.25 * full.max()
    ys, xs = np.unravel_index(np.argmax(small), small.shape)
    yf, xf = np.unravel_index(np.argmax(full), full.shape)
    assert abs(ys / 180 - yf / fh) < 0.02 and abs(xs / 320 - xf / fw) < 0.02
    same, _ = postprocess(raw, [11.0], sector_region(), card, (480, 640), work_side=640)
    assert same.shape == (480, 640)
