"""Scan-region detection (sonomaly.stream.roi) on synthetic frames, plus one sanity check on a bundled real clip."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sonomaly.stream.roi import RegionTracker, ScanRegion, detect_scan_region, mask_iou

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------- helpers
def speckle(mask: np.ndarray, rng: np.random.Generator, level: float = 90.0) -> np.ndarray:
    """Rayleigh speckle with depth attenuation and a few bright/dark structures, inside ``mask`` only."""
    h, w = mask.shape
    img = rng.rayleigh(level * 0.8, size=(h, w)).astype(np.float32)
    img *= np.linspace(1.15, 0.55, h, dtype=np.float32)[:, None]  # far field dimmer
    img = cv2.GaussianBlur(img, (3, 3), 0)
    for _ in range(3):  # anechoic cysts and bright interfaces
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(4, max(5, min(h, w) // 12))), float(rng.uniform(5, 25)), -1)
    out = np.clip(img, 0, 255).astype(np.uint8)
    out[mask == 0] = 0
    return out


def sector_mask(h, w, cx, cy, r0, r1, half_angle) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    a0, a1 = 90 - half_angle, 90 + half_angle
    cv2.ellipse(m, (cx, cy), (r1, r1), 0, a0, a1, 255, -1)
    if r0 > 0:
        cv2.ellipse(m, (cx, cy), (r0, r0), 0, 0, 360, 0, -1)
    return m


def add_ui(gray: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Burn white text into a free corner and a ruler of depth ticks into a free side; return the UI pixel mask."""
    h, w = gray.shape
    ui = np.zeros_like(gray)
    scale = max(0.35, h / 960)
    th = max(1, round(scale * 2))
    # UI sits at least ~3 % of the frame away from the image (as on scanners); nearer text can merge with it.
    gap = max(10, int(0.03 * max(h, w)))
    free = cv2.dilate(truth, np.ones((2 * gap + 1, 2 * gap + 1), np.uint8)) == 0
    placed_text = False
    for text, org in (("GE 4C-RS  L 12cm", (6, int(22 * scale * 2))), ("MI 1.1 TIS 0.4", (6, h - 8)),
                      ("PWR 100%", (w - int(150 * scale * 2), int(22 * scale * 2)))):
        t = np.zeros_like(gray)
        cv2.putText(t, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, th, cv2.LINE_AA)
        if np.all(free[t > 0]):
            ui |= t
            placed_text = True
    for x in (w - 14, 4):  # ruler: a vertical line of tick marks down one side
        t = np.zeros_like(gray)
        for y in range(h // 10, h - h // 10, max(6, h // 25)):
            cv2.line(t, (x, y), (x + 8, y), 255, 1)
        if np.all(free[t > 0]):
            ui |= t
            break
    np.maximum(gray, ui, out=gray)
    return ui, placed_text


def check_region(region: ScanRegion, truth: np.ndarray, ui: np.ndarray | None = None, min_iou: float = 0.85):
    h, w = truth.shape
    assert region.mask.shape == (h, w) and region.mask.dtype == np.uint8
    assert set(np.unique(region.mask)) <= {0, 255}
    ys, xs = np.nonzero(region.mask)
    x, y, bw, bh = region.bbox
    assert (x, y, bw, bh) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert region.crop_mask().shape == (bh, bw)
    iou = mask_iou(region.mask, truth)
    assert iou >= min_iou, iou
    if ui is not None:
        assert not np.any(region.mask[ui > 0]), "UI text/ruler pixels inside the detected region"


def make_sector(seed, h, w, dx, apex_y, r0f, r1f, half_angle):
    rng = np.random.default_rng(seed)
    cx = w // 2 + int(dx * w)
    cy = int(apex_y * h)
    r1 = int(r1f * h)
    r0 = int(r0f * r1)
    truth = sector_mask(h, w, cx, cy, r0, r1, half_angle)
    # the frame clips the fan: truth is what's visible
    gray = speckle(truth, rng)
    return gray, truth


# ------------------------------------------------------------------------------------------------------------ synthetic
def test_sector_with_text_and_ruler():
    gray, truth = make_sector(1, 480, 640, 0.0, -0.05, 0.25, 0.95, 38)
    ui, placed = add_ui(gray, truth)
    assert placed
    img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    r = detect_scan_region(img)
    assert r.kind == "sector"
    check_region(r, truth, ui)
    # gray input gives the same answer
    assert mask_iou(detect_scan_region(gray).mask, r.mask) > 0.99


def test_rectangle():
    h, w = 480, 640
    truth = np.zeros((h, w), np.uint8)
    truth[40:440, 120:520] = 255
    gray = speckle(truth, np.random.default_rng(2))
    ui, placed = add_ui(gray, truth)
    assert placed
    r = detect_scan_region(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    assert r.kind == "rectangle"
    check_region(r, truth, ui, min_iou=0.93)


@pytest.mark.parametrize("value", [0, 3, 128, 255])
def test_flat_frames_are_full(value):
    r = detect_scan_region(np.full((240, 320, 3), value, np.uint8))
    assert r.kind == "full" and r.bbox == (0, 0, 320, 240)
    assert r.mask.shape == (240, 320) and np.all(r.mask == 255)


def test_text_only_frame_is_full():
    img = np.zeros((240, 320, 3), np.uint8)
    cv2.putText(img, "NO IMAGE  12cm  MI 0.9", (10, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
    assert detect_scan_region(img).kind == "full"


def test_textured_edge_to_edge_is_full():
    rng = np.random.default_rng(3)
    img = speckle(np.full((360, 480), 255, np.uint8), rng)
    img = np.maximum(img, 20)  # no black at all
    assert detect_scan_region(img).kind == "full"


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 7, 3), (1081, 1921, 3), (0, 0, 3)])
def test_odd_sizes(shape):
    r = detect_scan_region(np.zeros(shape, np.uint8))
    assert r.mask.shape == shape[:2]


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    size=st.sampled_from([(240, 320), (480, 640), (600, 800), (720, 960)]),
    dx=st.floats(-0.12, 0.12),
    apex_y=st.floats(-0.3, 0.05),
    r0f=st.floats(0.0, 0.3),
    r1f=st.floats(0.7, 1.1),
    half_angle=st.floats(20, 45),
)
def test_sector_geometries(seed, size, dx, apex_y, r0f, r1f, half_angle):
    h, w = size
    gray, truth = make_sector(seed, h, w, dx, apex_y, r0f, r1f, half_angle)
    assume(np.count_nonzero(truth) > 0.15 * h * w)
    ui, placed = add_ui(gray, truth)
    assume(placed)
    r = detect_scan_region(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    assert r.kind in ("sector", "rectangle")
    check_region(r, truth, ui)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    size=st.sampled_from([(240, 320), (480, 640), (720, 960)]),
    fx=st.floats(0.0, 1.0), fy=st.floats(0.0, 1.0),
    fw=st.floats(0.35, 0.8), fh=st.floats(0.5, 0.9),
)
def test_rectangle_geometries(seed, size, fx, fy, fw, fh):
    h, w = size
    rw, rh = int(fw * w), int(fh * h)
    x0 = 30 + int(fx * (w - 60 - rw))
    y0 = int(fy * (h - rh))
    truth = np.zeros((h, w), np.uint8)
    truth[y0 : y0 + rh, x0 : x0 + rw] = 255
    gray = speckle(truth, np.random.default_rng(seed))
    ui, placed = add_ui(gray, truth)
    assume(placed)
    r = detect_scan_region(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    check_region(r, truth, ui, min_iou=0.9)


# -------------------------------------------------------------------------------------------------------------- tracker
def _sector_frame(seed, h=480, w=640, r1f=0.95, dx=0.0):
    gray, truth = make_sector(seed, h, w, dx, -0.05, 0.2, r1f, 38)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), truth


def test_tracker_caches_between_frames():
    tr = RegionTracker(redetect_every=1000)
    first = tr.update(_sector_frame(0)[0])
    for seed in range(1, 20):  # fresh speckle, same geometry
        assert tr.update(_sector_frame(seed)[0]) is first
    assert tr.detections == 1 and tr.changes == 0


def test_tracker_periodic_redetect_keeps_object():
    tr = RegionTracker(redetect_every=5)
    first = tr.update(_sector_frame(0)[0])
    for seed in range(1, 12):
        assert tr.update(_sector_frame(seed)[0]) is first
    assert tr.detections == 3 and tr.changes == 0


def test_tracker_shape_change():
    tr = RegionTracker()
    a = tr.update(_sector_frame(0)[0])
    img, truth = _sector_frame(1, h=360, w=480)
    b = tr.update(img)
    assert b is not a and b.frame_shape == (360, 480) and tr.changes == 1
    check_region(b, truth)


@pytest.mark.parametrize("kind", ["shrink", "grow", "move", "rectangle"])
def test_tracker_geometry_change(kind):
    tr = RegionTracker(redetect_every=10_000)
    a = tr.update(_sector_frame(0, r1f=0.75)[0])
    assert tr.update(_sector_frame(1, r1f=0.75)[0]) is a
    if kind == "rectangle":
        truth = np.zeros((480, 640), np.uint8)
        truth[30:450, 100:540] = 255
        img = cv2.cvtColor(speckle(truth, np.random.default_rng(5)), cv2.COLOR_GRAY2BGR)
    else:
        img, truth = _sector_frame(2, r1f={"shrink": 0.5, "grow": 1.0, "move": 0.75}[kind],
                                   dx=0.3 if kind == "move" else 0.0)
    b = tr.update(img)
    assert b is not a and tr.changes == 1
    check_region(b, truth)
    assert tr.update(img) is b and tr.changes == 1


def test_tracker_blank_frame_keeps_region():
    tr = RegionTracker()
    a = tr.update(_sector_frame(0)[0])
    assert tr.update(np.zeros((480, 640, 3), np.uint8)) is a  # freeze to black / probe lifted
    assert tr.update(_sector_frame(1)[0]) is a
    assert tr.changes == 0


def test_tracker_gray_and_tiny():
    tr = RegionTracker()
    assert tr.update(np.zeros((3, 5), np.uint8)).mask.shape == (3, 5)
    assert tr.update(np.zeros((3, 5), np.uint8)).mask.shape == (3, 5)


# ------------------------------------------------------------------------------------------------------------ real clip
@pytest.mark.skipif(not any(DEMO.glob("*.mp4")), reason="no bundled demo clip in data/demo")
def test_real_demo_clip():
    for path in sorted(DEMO.glob("*.mp4")):
        cap = cv2.VideoCapture(str(path))
        cap.set(cv2.CAP_PROP_POS_FRAMES, 10)
        ok, frame = cap.read()
        cap.release()
        assert ok, path
        r = detect_scan_region(frame)
        cover = np.count_nonzero(r.mask) / r.mask.size
        if "convex" in path.name or "phased" in path.name:
            assert r.kind == "sector", path.name
            assert 0.20 <= cover <= 0.95, (path.name, cover)
        else:  # a linear probe may fill the frame edge to edge
            assert cover >= 0.20, (path.name, cover)


def test_tracker_current():
    tr = RegionTracker()
    assert tr.current is None
    r = tr.update(_sector_frame(0)[0])
    assert tr.current is r
