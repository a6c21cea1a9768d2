"""`sonomaly evaluate` on a tiny folder of images (with masks, several per stem) and a tiny folder of clips."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sonomaly.engines.evaluate import FIELDS, find_masks, united_mask
from sonomaly.engines.train import train
from sonomaly.stream.roi import ScanRegion
from sonomaly.tools.cli import main

SIZE = 64


def frame(seed, lesion=None, gain=1.0):
    rng = np.random.default_rng(seed)
    g = cv2.GaussianBlur(rng.rayleigh(30.0, (96, 128)).astype(np.float32), (0, 0), 0.8) + 40
    g[30, :] += 40
    if lesion is not None:
        g[lesion] = 5
    g = np.clip(g * gain, 0, 255).astype(np.uint8)
    return cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)


def full_region(img):
    return ScanRegion.full(*img.shape[:2])


def test_mask_union(tmp_path):
    a = np.zeros((20, 30), np.uint8); a[2:5, 2:5] = 255
    b = np.zeros((20, 30), np.uint8); b[10:12, 20:25] = 255
    cv2.imwrite(str(tmp_path / "x_1_mask.png"), a)
    cv2.imwrite(str(tmp_path / "x_1_mask_1.png"), b)
    cv2.imwrite(str(tmp_path / "x_10_mask.png"), b)  # another stem: never matched to x_1
    cv2.imwrite(str(tmp_path / "x_1.png"), b)  # not a mask
    ms = find_masks(tmp_path, "x_1")
    assert [p.name for p in ms] == ["x_1_mask.png", "x_1_mask_1.png"]
    u = united_mask(ms)
    assert u.sum() == 9 + 10
    assert united_mask(ms, (40, 60)).shape == (40, 60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalm")
    (d / "n").mkdir()
    for i in range(12):
        cv2.imwrite(str(d / "n" / f"n{i}.png"), frame(i))
    train("patch_gaussian", d / "n", d / "model", size=SIZE, seed=0, val_fraction=0.25, progress=False,
          family_config=dict(dim=16, bands=2, widths=[8, 16, 16, 16]))
    return d / "model"


def test_evaluate_images(model_dir, tmp_path):
    data = tmp_path / "data"
    for s in ("normal", "abnormal", "masks"):
        (data / s).mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(data / "normal" / f"n{i}.png"), frame(100 + i))
    for i in range(5):
        les = np.zeros((96, 128), bool)
        les[50:70, 40 + 10 * i : 70 + 10 * i] = True
        cv2.imwrite(str(data / "abnormal" / f"a{i}.png"), frame(200 + i, les))
        half = les.copy(); half[:, 55 + 10 * i:] = False
        cv2.imwrite(str(data / "masks" / f"a{i}_mask.png"), half.astype(np.uint8) * 255)
        rest = les & ~half
        cv2.imwrite(str(data / "masks" / f"a{i}_mask_1.png"), rest.astype(np.uint8) * 255)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--json", str(out),
                 "--report", str(tmp_path / "rep"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    for k in FIELDS:
        assert k in r
    assert r["n_normal"] == 5 and r["n_abnormal"] == 5 and r["n_masked"] == 5
    assert r["image_auroc"] >= 0.8 and r["pixel_auroc"] > 0.7
    assert r["clip_auroc"] is None and 0 <= r["brightness_auroc"] <= 1 and r["ms_per_frame"] > 0
    assert (tmp_path / "rep" / "grid.png").exists() and "image_auroc" in (tmp_path / "rep" / "report.md").read_text()


def _clip(path, seeds, lesion=False, gain=1.0):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    for s in seeds:
        les = None
        if lesion:
            les = np.zeros((96, 128), bool)
            les[50:75, 50:80] = True
        vw.write(frame(s, les, gain))
    vw.release()


def test_evaluate_clips_and_brightness(model_dir, tmp_path):
    data = tmp_path / "clips"
    (data / "normal").mkdir(parents=True)
    (data / "abnormal").mkdir()
    for i in range(2):
        _clip(data / "normal" / f"n{i}.avi", range(300 + 10 * i, 308 + 10 * i), gain=0.7)
        _clip(data / "abnormal" / f"a{i}.avi", range(400 + 10 * i, 408 + 10 * i), lesion=True, gain=1.3)
    out = tmp_path / "c.json"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--json", str(out), "--every", "2",
                 "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["clip_auroc"] == 1.0 and r["n_frames"]["normal"] == 8
    assert r["brightness_auroc"] == 1.0  # the shortcut baseline sees the gain difference
    assert r["pixel_auroc"] is None
    out2 = tmp_path / "cb.json"
    main(["evaluate", "--model", str(model_dir), "--data", str(data), "--json", str(out2), "--every", "2",
          "--brightness-matched", "--quiet"])
    r2 = json.loads(out2.read_text())
    assert r2["brightness_matched"] is True and r2["clip_auroc"] == 1.0  # the lesion, not the gain, separates them


def test_overlay_text_and_calipers_are_removed_from_the_region():
    from sonomaly.engines.regions import clean_scan_region, overlay_marks

    img = frame(7)
    img = cv2.resize(img, (320, 240))
    img[:20] = 0
    img[-20:] = 0
    cv2.putText(img, "LEFT BREAST", (100, 200), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    cv2.drawMarker(img, (80, 100), (255, 255, 255), cv2.MARKER_CROSS, 10, 1)
    marks = overlay_marks(img)
    assert marks[195:200, 100:200].any() and marks[100, 75:86].any()
    assert marks.mean() < 0.05  # speckle itself is not a mark
    r = clean_scan_region(img)
    assert r.mask[100, 80] == 0 and r.mask[120, 250] == 255


@pytest.mark.shared
def test_shipped_breast_model_on_a_busi_sample(shared_data, tmp_path):
    """The shipped breast default loads on both backends and evaluates on a few real BUSI images (masks united)."""
    import csv

    from sonomaly.engines import load
    from sonomaly.engines.evaluate import evaluate

    model = Path(__file__).resolve().parents[1] / "models" / "breast"
    if not (model / "card.json").exists():
        pytest.skip("models/breast not built")
    load(model, backend="torch")
    rows = list(csv.DictReader(open(shared_data / "MANIFEST.csv")))
    data = tmp_path / "busi"
    for sub in ("normal", "abnormal", "masks"):
        (data / sub).mkdir(parents=True)
    nor = [r for r in rows if r["organ"] == "breast" and r["kind"] == "image" and r["label"] == "normal"][:4]
    abn = [r for r in rows if r["organ"] == "breast" and r["kind"] == "image" and r["label"] != "normal"][:4]
    stems = {Path(r["path"]).stem for r in abn}
    for r in nor + abn:
        (data / ("normal" if r in nor else "abnormal") / Path(r["path"]).name).symlink_to(shared_data / r["path"])
    for r in rows:
        if r["kind"] == "mask" and Path(r["path"]).name.split("_mask")[0] in stems:
            (data / "masks" / Path(r["path"]).name).symlink_to(shared_data / r["path"])
    res = evaluate(model, data, progress=False)
    assert res["n_normal"] == 4 and res["n_abnormal"] == 4 and res["n_masked"] == 4
    for k in FIELDS:
        assert k in res
    assert 0.0 <= res["pixel_auroc"] <= 1.0 and 0.0 <= res["peak_hit_rate"] <= 1.0


def test_report_names_the_missed_findings_and_the_false_alarms(tmp_path):
    """The report lists the abnormal items under the image threshold or under the highest normal score (lowest
    first) and the normal items over the threshold (highest first); the grid shows the lowest abnormal items."""
    from sonomaly.engines.evaluate import Item, failure_lines

    abn = [Item(Path(f"a{i}.png"), 1, False, scores=[s]) for i, s in enumerate((3.0, 1.6, 1.2, 0.4))]
    nor = [Item(Path(f"n{i}.png"), 0, False, scores=[s]) for i, s in enumerate((1.3, 0.9, 0.2))]
    text = "\n".join(failure_lines(abn, nor))
    assert "2 of 4 — lowest first: `a3.png` 0.40, `a2.png` 1.20." in text  # 1.2 <= the top normal 1.3
    assert "Normal items over the image threshold: 1 of 3 — highest first: `n0.png` 1.30." in text
    clean = "\n".join(failure_lines(abn[:2], nor[1:]))
    assert "0 of 2." in clean and "0 of 2." in clean.split("Normal items")[1]
