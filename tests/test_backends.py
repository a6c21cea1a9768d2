"""Backends agree: ONNX Runtime FP32 vs the PyTorch reference on real frames of the bundled clips, ORT options,
precision selection and its fallbacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sonomaly.engines import BackendUnavailable, load
from sonomaly.engines.backends.onnxruntime import resolve_providers
from sonomaly.engines.export import preprocessed, spearman

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LUNG_MODEL = REPO / "models" / "lung"

CLIPS = sorted(DEMO.glob("*.mp4"))
pytestmark = pytest.mark.skipif(not (LUNG_MODEL / "card.json").exists() or len(CLIPS) < 3,
                                reason="bundled model or clips missing")

# Stated tolerances (raw anomaly-map units; the shipped lung map's threshold is ~0.6 raw).
FP32_MAP_ATOL = 1e-4
FP32_RANK_MIN = 0.999


@pytest.fixture(scope="module")
def real_frames():
    """Every 8th frame (<= 12 per clip) of each bundled clip, preprocessed like the pipeline (ROI + z-score)."""
    from sonomaly.engines.card import ModelCard

    card = ModelCard.load(LUNG_MODEL)
    return preprocessed(CLIPS, card, every=8, max_frames=12, offset=3)


@pytest.fixture(scope="module")
def ref_outputs(real_frames):
    ref = load(LUNG_MODEL, backend="torch")
    return [ref.infer(x[None]) for x in real_frames]


def test_ort_fp32_matches_torch_on_real_frames(real_frames, ref_outputs):
    eng = load(LUNG_MODEL, backend="onnxruntime")
    assert eng.precision == "fp32" and eng.impl.path.name == eng.card.files["onnx"]
    d_map, s_ort, s_ref = 0.0, [], []
    for x, (mr, sr) in zip(real_frames, ref_outputs):
        mo, so = eng.infer(x[None])
        assert mo.shape == tuple(eng.card.map_shape) and mo.dtype == np.float32 and so.shape == (1,)
        d_map = max(d_map, float(np.abs(mo - mr).max()))
        s_ort.append(so[0])
        s_ref.append(sr[0])
    rho = spearman(s_ref, s_ort)
    print(f"ORT FP32 vs torch on {len(real_frames)} real frames: map max |d| {d_map:.2e}, score rho {rho:.6f}")
    assert d_map <= FP32_MAP_ATOL
    assert rho >= FP32_RANK_MIN
    # the abnormal clips score higher than the normal one on both
    assert len(set(np.round(s_ref, 6))) > len(s_ref) // 2  # not a degenerate constant score


@pytest.mark.parametrize("opt", ["disable", "basic", "extended", "all"])
def test_graph_optimisation_levels_agree(real_frames, ref_outputs, opt):
    eng = load(LUNG_MODEL, backend="onnxruntime", graph_optimization=opt, threads=1, spin=False)
    assert eng.impl.options["graph_optimization"] == opt and eng.impl.options["threads"] == 1
    for x, (mr, _) in list(zip(real_frames, ref_outputs))[:4]:
        np.testing.assert_allclose(eng.infer(x[None])[0], mr, atol=FP32_MAP_ATOL)


def test_bad_graph_optimisation_is_clear():
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        load(LUNG_MODEL, backend="onnxruntime", graph_optimization="max")


def test_provider_resolution():
    cpu = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", cpu) == cpu
    assert resolve_providers("auto", gpu) == gpu  # GPU providers first, when this onnxruntime build has them
    assert resolve_providers(("cuda",), gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(("cpu",), gpu) == cpu
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        resolve_providers(("cuda",), cpu)


def test_cpu_provider_on_this_machine():
    eng = load(LUNG_MODEL, backend="onnxruntime", providers=("cpu",))
    assert eng.impl.providers == ["CPUExecutionProvider"]


def test_missing_precision_variant_falls_back_to_fp32_and_says_so(tmp_path):
    from sonomaly.engines.export import copy_model

    d = copy_model(LUNG_MODEL, tmp_path / "m")
    for name in ("onnx_fp16", "onnx_int8"):  # whatever the shipped card has, test the case where it has none
        import json

        c = json.loads((d / "card.json").read_text())
        c["files"].pop(name, None)
        (d / "card.json").write_text(json.dumps(c))
    for backend in ("onnxruntime", "auto"):
        eng = load(d, backend=backend, precision="int8")
        assert eng.backend == "onnxruntime" and eng.precision == "fp32"
        assert "int8 unavailable" in eng.backend_reason and "sonomaly export" in eng.backend_reason
    eng = load(d, backend="torch", precision="fp16")
    assert eng.precision == "fp32" and "FP32 reference" in eng.backend_reason


def test_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision"):
        load(LUNG_MODEL, precision="fp8")


def test_explicit_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model missing"):
        load(LUNG_MODEL, backend="onnxruntime", file="nope.onnx")
