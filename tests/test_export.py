"""``sonomaly export``: static ONNX variants, FP16 and INT8 within stated tolerances, the INT8 accuracy gate (accept
and fall back), and what the card records. Uses the shipped lung model and the bundled clips (a copy: the shipped
model directory is never written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from sonomaly.engines import load
from sonomaly.engines.card import ModelCard
from sonomaly.engines.export import (
    ExportError, FrameCalibrationReader, check_onnx, copy_model, export, fast_auroc, int8_gate, ort_infer, precision_file,
    preprocessed, spearman)
from sonomaly.engines.train import auroc

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LUNG = REPO / "models" / "lung"
NORMAL = DEMO / "lung_convex_normal_02.mp4"
pytestmark = pytest.mark.skipif(not (LUNG / "card.json").exists() or not NORMAL.exists(),
                                reason="bundled model or clips missing")

# Stated tolerances vs FP32 on the bundled clips (raw map units; the lung pixel threshold is ~0.6 raw).
FP16_MAP_ATOL = 2e-2
FP16_RANK_MIN = 0.999
INT8_RANK_MIN = 0.99
INT8_MAP_P999_ATOL = 0.3  # 99.9th percentile of |d| over map cells, raw units


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = copy_model(LUNG, tmp_path_factory.mktemp("exp") / "lung")
    before = (d / "model.onnx").read_bytes()
    rep = export(d, fp16=True, int8=True, calib=[NORMAL], batch=3, val_frames=16, calib_frames=32, progress=False)
    return d, rep, before


def test_variants_are_static_checked_and_opset17(exported):
    d, rep, before = exported
    card = ModelCard.load(d)
    assert (d / "model.onnx").read_bytes() == before  # a valid shipped model.onnx is kept as is
    for key, batch in (("onnx", 1), ("onnx_batch", 3), ("onnx_fp16", 1)):
        info = check_onnx(d / card.files[key], batch=batch, card=card)
        assert info["opset"] >= 17 and info["input"] == [batch, 2, *card.input_size]
    m = onnx.load(str(d / card.files["onnx"]))
    # normalisation / threshold live in the card, never in the graph
    assert not any("threshold" in n.name.lower() for n in m.graph.node)
    assert card.files["onnx_batch"] == "model.b3.onnx"


def test_batch_n_equals_batch_1(exported):
    d, _, _ = exported
    card = ModelCard.load(d)
    x = preprocessed([NORMAL], card, every=20, max_frames=3)
    one = ort_infer(d / card.files["onnx"])
    many = ort_infer(d / card.files["onnx_batch"])
    mb, sb = many(x)
    for i in range(3):
        m1, s1 = one(x[i : i + 1])
        np.testing.assert_allclose(mb[i : i + 1], m1, atol=1e-5)
        np.testing.assert_allclose(sb[i], s1[0], atol=1e-5)


def test_fp16_and_int8_within_tolerance(exported):
    d, rep, _ = exported
    f16 = rep["variants"]["fp16"]["vs_fp32"]
    assert f16["map_max_abs_diff"] <= FP16_MAP_ATOL and f16["score_spearman"] >= FP16_RANK_MIN
    q = rep["variants"]["int8"]
    assert q["vs_fp32"]["score_spearman"] >= INT8_RANK_MIN
    assert q["vs_fp32"]["map_p999_abs_diff"] <= INT8_MAP_P999_ATOL
    gate = q["gate"]
    # the gate's rule, whatever it decided
    ok = (gate["fp32"]["image_auroc"] - gate["int8"]["image_auroc"] <= 0.01 + 1e-12
          and gate["fp32"]["pixel_auroc"] - gate["int8"]["pixel_auroc"] <= 0.02 + 1e-12)
    assert gate["accepted"] == ok


def test_card_records_variants_and_gate(exported):
    d, rep, _ = exported
    card = ModelCard.load(d)
    exp = card.metrics["export"]
    assert exp["opset"] >= 17 and exp["batch_n"] == 3
    assert exp["precisions"]["fp32"] == "model.onnx" and exp["precisions"]["fp16"] == "model.fp16.onnx"
    assert set(card.sha256) >= {"onnx", "onnx_batch", "onnx_fp16", "torch"}
    assert "validation" in exp and exp["validation"]["normal_frames"] > 0 and exp["validation"]["abnormal_frames"] > 0
    gate = exp["variants"]["int8"]["gate"]
    if gate["accepted"]:
        assert card.files["onnx_int8"] == "model.int8.onnx" and (d / "model.int8.onnx").exists()
        assert exp["precisions"]["int8"] == "model.int8.onnx"
        eng = load(d, backend="onnxruntime", precision="int8")
        assert eng.precision == "int8" and eng.impl.path.name == "model.int8.onnx"
    json.dumps(card.to_dict())  # plain JSON


def test_int8_gate_rejects_and_falls_back(tmp_path):
    """Make the gate impossible to pass (a negative allowed drop): the INT8 file is removed, the card says FP32."""
    d = copy_model(LUNG, tmp_path / "lung")
    rep = export(d, int8=True, calib=[NORMAL], batch=0, max_image_drop=-1.0, val_frames=16, calib_frames=32,
                 progress=False)
    q = rep["variants"]["int8"]
    assert not q["gate"]["accepted"] and q["fallback"] == "fp32" and q["file"] is None
    assert q["gate"]["reason"].startswith("rejected, FP32 is used instead")
    assert not (d / "model.int8.onnx").exists()
    card = ModelCard.load(d)
    assert "onnx_int8" not in card.files and card.metrics["export"]["precisions"]["int8"] is None
    name, why = precision_file(card, "int8")
    assert name is None and "rejected by the accuracy gate" in why
    eng = load(d, backend="onnxruntime", precision="int8")
    assert eng.precision == "fp32" and "rejected by the accuracy gate" in eng.backend_reason


def test_gate_rule():
    ref = {"image_auroc": 0.95, "pixel_auroc": 0.90}
    assert int8_gate(ref, {"image_auroc": 0.94, "pixel_auroc": 0.88})["accepted"]  # exactly 1 and 2 points
    assert not int8_gate(ref, {"image_auroc": 0.935, "pixel_auroc": 0.90})["accepted"]
    assert not int8_gate(ref, {"image_auroc": 0.95, "pixel_auroc": 0.875})["accepted"]
    assert not int8_gate(ref, {"image_auroc": float("nan"), "pixel_auroc": 0.9})["accepted"]


def test_gate_rule_also_bounds_the_maps_and_the_ranking():
    """With maps and scores on both sides, an INT8 whose AUROCs pass is still rejected when its image scores change
    order (rho < 0.99) or its map cells move by more than half the normal-to-threshold span in over 0.1 % of them."""
    rng = np.random.default_rng(0)
    maps = rng.random((20, 1, 1, 16, 16)).astype(np.float32)
    scores = np.arange(20, dtype=np.float64)
    ref = {"image_auroc": 0.95, "pixel_auroc": 0.90, "maps": maps, "scores": scores}
    same = {**ref, "maps": maps + 0.01}
    g = int8_gate(ref, same, map_span=0.5)
    assert g["accepted"] and g["score_rho"] == pytest.approx(1.0) and g["map_p999_of_span"] == pytest.approx(0.02, abs=1e-5)
    shuffled = {**same, "scores": scores[::-1].copy()}  # AUROCs as FP32's, ranking reversed
    g = int8_gate(ref, shuffled, map_span=0.5)
    assert not g["accepted"] and "score rho -1.0000" in g["reason"]
    swapped = scores.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # one neighbour pair out of order: rho 0.9992, still accepted
    assert int8_gate(ref, {**same, "scores": swapped}, map_span=0.5)["accepted"]
    moved = maps.copy()
    moved[:2] += 0.3  # 10 % of the cells move by 0.6 of a 0.5 span
    g = int8_gate(ref, {**ref, "maps": moved}, map_span=0.5)
    assert not g["accepted"] and g["map_p999_of_span"] == pytest.approx(0.6, abs=1e-5)
    assert int8_gate(ref, {**ref, "maps": moved}, map_span=1.0)["accepted"]  # 0.3 of a wider span passes
    assert not int8_gate(ref, {**ref, "maps": moved + np.nan}, map_span=1.0)["accepted"]


def test_export_errors(tmp_path):
    with pytest.raises(ExportError, match="--int8 needs --calib"):
        export(LUNG, tmp_path / "x", int8=True, progress=False)
    with pytest.raises(ExportError, match="needs --out"):
        export(LUNG, size=128, progress=False)
    with pytest.raises(ExportError, match="no such file"):
        export(LUNG, tmp_path / "y", int8=True, calib=[tmp_path / "missing"], batch=0, progress=False)


def test_export_at_another_size(tmp_path):
    rep = export(LUNG, tmp_path / "s128", size=128, batch=0, progress=False)
    card = ModelCard.load(tmp_path / "s128")
    assert card.input_size == (128, 128) and card.map_shape[-2:] == (32, 32)
    assert rep["variants"]["fp32"]["input"] == [1, 2, 128, 128]
    a = load(tmp_path / "s128", backend="onnxruntime")
    b = load(tmp_path / "s128", backend="torch")
    x = preprocessed([NORMAL], card, every=50, max_frames=2)
    for i in range(len(x)):
        np.testing.assert_allclose(a.infer(x[i : i + 1])[0], b.infer(x[i : i + 1])[0], atol=1e-4)


def test_calibration_reader_feeds_batch1_frames():
    x = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)
    r = FrameCalibrationReader(x, "input")
    got = []
    while (b := r.get_next()) is not None:
        got.append(b["input"])
    assert len(got) == 3 and all(g.shape == (1, 2, 4, 4) for g in got)
    np.testing.assert_array_equal(np.concatenate(got), x)
    r.rewind()
    assert r.get_next()["input"].shape == (1, 2, 4, 4)
    with pytest.raises(ExportError):
        FrameCalibrationReader(np.zeros((0, 2, 4, 4), np.float32))


def test_calibration_frames_are_preprocessed_like_the_pipeline():
    """Same ROI detection + preprocess as the live worker: the mask channel is the scan region, z-score inside it."""
    card = ModelCard.load(LUNG)
    x = preprocessed([NORMAL], card, every=30, max_frames=2)
    assert x.shape[1:] == (2, *card.input_size) and x.dtype == np.float32
    inside = x[:, 1] > 0.5
    assert 0.2 < inside.mean() < 0.95  # a real sector, not the whole frame
    assert np.all(x[:, 0][~inside] == 0)
    assert abs(float(x[0, 0][inside[0]].mean())) < 0.2 and np.abs(x[:, 0]).max() <= card.input.clip


def test_fast_auroc_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        neg = rng.integers(0, 20, 50).astype(float)
        pos = rng.integers(5, 25, 40).astype(float)
        assert fast_auroc(neg, pos) == pytest.approx(auroc(neg, pos), abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


def test_cli_registers_export_and_build_engine():
    from sonomaly.tools.cli import build_parser

    p = build_parser()
    a = p.parse_args(["export", str(LUNG), "--fp16", "--int8", "--calib", str(NORMAL)])
    assert a.fp16 and a.int8 and a.calib == [str(NORMAL)]
    a = p.parse_args(["build-engine", str(LUNG), "--int8"])
    assert a.int8
    a = p.parse_args(["bench", "engines", "--json", "x.json"])
    assert a.json == "x.json"


def test_bench_engines_markdown_keeps_notes(tmp_path):
    from sonomaly.tools import bench_engines as be

    md = tmp_path / "engines.md"
    md.write_text(f"# title\n\nintro\n\n{be.BEGIN}\nold table\n{be.END}\n\n## Notes\nkept\n")
    row = {"model": "m", "size": 256, "backend": "onnxruntime", "precision": "int8", "status": "ok", "ms_p50": 1.0,
           "ms_p99": 2.0, "fps": 1000.0, "peak_rss_delta_mb": 20.0, "map_max_abs_diff": 0.1, "map_p999_abs_diff": 0.05,
           "score_spearman": 0.999, "image_auroc": 1.0, "image_auroc_change": 0.0, "pixel_auroc": 0.7,
           "pixel_auroc_change": -0.004, "int8_gate": "accepted", "note": "", "validation_files": ["a.mp4"],
           "calibration_files": ["b.mp4"]}
    skipped = {"model": "m", "size": 256, "backend": "tensorrt", "precision": "fp16", "status": "skipped",
               "note": "TensorRT: not installed"}
    machine = {k: "x" for k in ("nproc", "cpu_model", "memory_gb", "os", "python", "torch", "onnx", "onnxruntime",
                                "numpy", "opencv", "gpu", "tensorrt", "shared_machine")}
    machine["ort_providers"] = ["CPUExecutionProvider"]
    body = be.markdown({"started": "t", "seconds": 1.0, "command": "c", "machine": machine, "threads": 2,
                        "rows": [row, skipped]})
    be.write_md(md, body)
    text = md.read_text()
    assert text.startswith("# title\n\nintro") and text.endswith("## Notes\nkept\n") and "old table" not in text
    assert "| m | 256² | onnxruntime | int8 | 1.00 | 2.00 | 1000 | 20.0 |" in text and "gate: accepted" in text
    assert "skipped: TensorRT unavailable here" in text and "validation a.mp4; INT8 calibration b.mp4" in text
