"""Model card, tiny training, backends and parity (no shared data needed)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sonomaly.engines import BackendUnavailable, load
from sonomaly.engines.card import CardError, ModelCard
from sonomaly.engines.processing import postprocess, preprocess
from sonomaly.engines.train import auroc, train
from sonomaly.stream.roi import ScanRegion

REPO = Path(__file__).resolve().parents[1]
LUNG = REPO / "models" / "lung"


def speckle(size=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.rayleigh(30.0, (size, size)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), 0.8) + 30
    g[size // 3, :] += 40  # an "A-line": layered structure by depth
    return cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def full_region(img):
    return ScanRegion.full(*img.shape[:2])


# ---- card -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    data = d / "normal"
    data.mkdir()
    for i in range(16):
        cv2.imwrite(str(data / f"img_{i:02d}.png"), speckle(64, i))
    t0 = time.time()
    card = train("patch_gaussian", data, d / "model", size=64, seed=0, val_fraction=0.25, region_fn=full_region,
                 family_config=dict(dim=16, bands=2, widths=[8, 16, 16, 16]), progress=False)
    assert time.time() - t0 < 30
    return d / "model", card


def test_card_round_trip(tiny_model):
    model_dir, card = tiny_model
    loaded = ModelCard.load(model_dir)
    assert loaded.to_dict() == card.to_dict()
    d = json.loads((model_dir / "card.json").read_text())
    assert d["schema_version"] == 1 and d["input"]["normalisation"]["mode"] == "roi_zscore"
    assert d["threshold"]["pixel_raw"] == d["map_normalisation"]["high"]
    assert d["threshold"]["image_raw"] == d["score_normalisation"]["high"]
    assert all(len(f["sha256"]) == 64 for f in d["training"]["data"])
    assert {"torch", "onnx", "onnxruntime"} <= set(d["versions"])
    # held-out frames are whole files (groups), never mixed with fitting files
    roles = {f["file"]: f["role"] for f in d["training"]["data"]}
    assert sum(r.startswith("held-out") for r in roles.values()) >= 1
    assert set(d["threshold"]["chosen_on"]["files"]) == {k for k, r in roles.items() if r.startswith("held-out")}


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.pop("family"), "card.family: missing"),
    (lambda d: d["input"].update(size=[256]), "card.input.size"),
    (lambda d: d["input"]["normalisation"].update(mode="minmax"), "unknown mode 'minmax'"),
    (lambda d: d["map_normalisation"].update(high=-1.0), "card.map_normalisation: high"),
    (lambda d: d["score_normalisation"].update(low="x"), "card.score_normalisation.low"),
    (lambda d: d["threshold"].update(target_fpr=1.5), "card.threshold.target_fpr"),
    (lambda d: d["outputs"].pop("score"), "card.outputs.score: missing"),
])
def test_card_validation_errors(tiny_model, tmp_path, mutate, msg):
    d = json.loads((tiny_model[0] / "card.json").read_text())
    mutate(d)
    (tmp_path / "card.json").write_text(json.dumps(d))
    with pytest.raises(CardError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        ModelCard.load(tmp_path)


def test_card_missing_and_bad_json(tmp_path):
    with pytest.raises(CardError, match="no model card"):
        ModelCard.load(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(CardError, match="not valid JSON"):
        ModelCard.load(tmp_path)


# ---- tiny training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blob_value", [250, 0])
def test_tiny_model_lights_up_on_blob(tiny_model, blob_value):
    model_dir, card = tiny_model
    eng = load(model_dir, backend="onnxruntime")
    img = speckle(64, 999)
    cv2.circle(img, (44, 44), 6, (blob_value,) * 3, -1)
    region = full_region(img)
    x = preprocess(img, region, card)
    raw_map, raw_score = eng.infer(x)
    amap, score = postprocess(raw_map, raw_score, region, card, img.shape, smooth_sigma=1.0)
    yy, xx = np.mgrid[:64, :64]
    near = (yy - 44) ** 2 + (xx - 44) ** 2 <= 6 ** 2
    far = (yy - 44) ** 2 + (xx - 44) ** 2 >= 16 ** 2
    assert amap[near].mean() > 2.0 * np.median(amap[far]) + 0.3
    assert amap[near].max() > 1.0  # above the pixel threshold
    clean = preprocess(speckle(64, 998), region, card)
    assert raw_score[0] > eng.infer(clean)[1][0]


def test_tiny_conv_ae_trains_and_exports(tmp_path):
    data = [tmp_path / f"n{i}.png" for i in range(6)]
    for i, p in enumerate(data):
        cv2.imwrite(str(p), speckle(64, 100 + i))
    card = train("conv_ae", data, tmp_path / "ae", size=64, epochs=2, seed=0, region_fn=full_region,
                 family_config=dict(widths=[8, 8, 16, 16], bottleneck=4), batch_size=4, progress=False)
    x = preprocess(speckle(64, 5), ScanRegion.full(64, 64), card)
    a = load(tmp_path / "ae", backend="onnxruntime").infer(x)
    b = load(tmp_path / "ae", backend="torch").infer(x)
    assert a[0].shape == (1, 1, 16, 16) and a[1].shape == (1,)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)


def test_training_is_deterministic(tiny_model, tmp_path):
    model_dir, card = tiny_model
    card2 = train("patch_gaussian", model_dir.parent / "normal", tmp_path / "again", size=64, seed=0,
                  val_fraction=0.25, region_fn=full_region, family_config=dict(dim=16, bands=2, widths=[8, 16, 16, 16]),
                  progress=False)
    assert card2.map_normalisation == card.map_normalisation
    assert card2.score_normalisation == card.score_normalisation
    assert card2.sha256["onnx"] == card.sha256["onnx"]


def test_auroc():
    assert auroc([0, 1, 2], [3, 4]) == 1.0
    assert auroc([3, 4], [0, 1]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5


# ---- backends ---------------------------------------------------------------------------------------------------------
def test_tensorrt_unavailable_is_clear(tiny_model):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed \(pip install \.\[gpu\]"):
        load(tiny_model[0], backend="tensorrt")


def test_auto_falls_back_to_onnxruntime(tiny_model):
    eng = load(tiny_model[0], backend="auto")
    assert eng.backend in ("onnxruntime", "tensorrt")
    if eng.backend == "onnxruntime":
        assert "tensorrt unavailable" in eng.backend_reason and "onnxruntime" in eng.backend_reason
    assert eng.model_dir == tiny_model[0] and eng.card.family == "patch_gaussian"


def test_unknown_backend_and_bad_input(tiny_model):
    with pytest.raises(ValueError, match="unknown backend"):
        load(tiny_model[0], backend="coreml")
    eng = load(tiny_model[0], backend="onnxruntime")
    with pytest.raises(ValueError, match="input shape"):
        eng.infer(np.zeros((1, 2, 32, 32), np.float32))


# ---- the shipped lung model ---------------------------------------------------------------------------------------------
def lungish_frames(n=6, h=480, w=640):
    """Real-ish sector frames: speckle, a bright pleural line, A-lines, some with B-line-like vertical streaks."""
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, 20), (420, 420), 0, 45, 135, 255, -1)
    ys, xs = np.nonzero(mask)
    region = ScanRegion((int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)), mask, "sector")
    frames = []
    for i in range(n):
        rng = np.random.default_rng(i)
        g = cv2.GaussianBlur(rng.rayleigh(25.0, (h, w)).astype(np.float32), (0, 0), 1.5)
        g *= np.linspace(1.2, 0.5, h)[:, None]
        g[120:126] += 120
        g[240:244] += 50
        if i % 2:
            for x0 in (280, 350):
                g[126:, x0 : x0 + 10] += 100
        g[mask == 0] = 0
        frames.append(cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    return frames, region


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.skipif(not (LUNG / "card.json").exists(), reason="models/lung not built")
def test_lung_model_ort_torch_parity():
    ort_eng = load(LUNG, backend="onnxruntime")
    ref = load(LUNG, backend="torch")
    card = ort_eng.card
    frames, region = lungish_frames()
    maps_d, s_ort, s_ref = [], [], []
    for f in frames:
        x = preprocess(f, region, card)
        (ma, sa), (mb, sb) = ort_eng.infer(x), ref.infer(x)
        assert ma.shape == tuple(card.map_shape) and sa.shape == (1,)
        maps_d.append(np.abs(ma - mb).max() / max(1.0, np.abs(mb).max()))
        s_ort.append(sa[0])
        s_ref.append(sb[0])
        a, _ = postprocess(ma, sa, region, card, f.shape)
        b, _ = postprocess(mb, sb, region, card, f.shape)
        assert np.abs(a - b).max() <= 1e-4  # normalised (threshold units) display map
    assert max(maps_d) <= 1e-5, f"relative max |dmap| {max(maps_d):.2e}"
    assert np.abs(np.array(s_ort) - np.array(s_ref)).max() <= 1e-4 * max(1.0, np.abs(s_ref).max())
    assert _spearman(s_ort, s_ref) >= 0.999
    # B-line-like frames score higher than the plain ones
    assert np.mean(s_ort[1::2]) > np.mean(s_ort[0::2])


@pytest.mark.skipif(not (LUNG / "card.json").exists(), reason="models/lung not built")
def test_lung_model_card_and_size():
    card = ModelCard.load(LUNG)
    from sonomaly.engines.models import families

    assert card.family in families()
    assert (LUNG / "model.onnx").stat().st_size < 5_000_000 and (LUNG / "model.pt").stat().st_size < 5_000_000
    assert card.threshold["chosen_on"]["labels"] == "normal only"
    assert "quick_check" in card.metrics
