"""Every detector family trains a few steps on tiny generated data, exports to ONNX (same numbers as torch), and its map
lights up more on an injected lesion than elsewhere.  No shared data needed."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from sonomaly.engines import load
from sonomaly.engines.models import build, families
from sonomaly.engines.models.synth import synthesize
from sonomaly.engines.processing import preprocess
from sonomaly.engines.train import train
from sonomaly.stream.roi import ScanRegion

SIZE = 64


def speckle(size=SIZE, seed=0, lesion=False, bright=False):
    rng = np.random.default_rng(seed)
    g = cv2.GaussianBlur(rng.rayleigh(30.0, (size, size)).astype(np.float32), (0, 0), 0.8) + 40
    g[size // 3, :] += 40
    if lesion:
        m = np.zeros((size, size), np.uint8)
        cv2.ellipse(m, (size // 2, size * 2 // 3), (size // 7, size // 9), 0, 0, 360, 255, -1)
        g[m > 0] = (g[m > 0] * 0.15 + 5) if not bright else 230
    return cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def full_region(img):
    return ScanRegion.full(*img.shape[:2])


FAST = {
    "patch_gaussian": (dict(dim=16, bands=2, widths=[8, 16, 16, 16], cov_fp16=True), None),
    "conv_ae": (dict(widths=[8, 16, 16, 16], bottleneck=8), 6),
    "ae": (dict(widths=[8, 16, 16, 16], latent=8, loss="ssim"), 6),
    "student_teacher": (dict(width=8, feat=16, teacher_epochs=2), 6),
    "draem": (dict(widths=[8, 16, 16, 16], synth="breast"), 8),
    "classifier": (dict(head_width=32, synth="breast"), 30),
}


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fam") / "normal"
    d.mkdir()
    for i in range(16):
        cv2.imwrite(str(d / f"img_{i:02d}.png"), speckle(SIZE, i))
    return d


def test_all_families_registered():
    assert set(FAST) <= set(families())


@pytest.mark.parametrize("family", sorted(FAST))
def test_family_trains_exports_and_lights_up(family, normal_dir, tmp_path):
    cfg, epochs = FAST[family]
    t0 = time.time()
    card = train(family, normal_dir, tmp_path / "m", size=SIZE, epochs=epochs, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    assert time.time() - t0 < 60
    assert card.threshold["chosen_on"]["labels"] == "normal only"
    ort, ref = load(tmp_path / "m", backend="onnxruntime"), load(tmp_path / "m", backend="torch")
    img = speckle(SIZE, 99, lesion=True)
    x = preprocess(img, full_region(img), card)
    (ma, sa), (mb, sb) = ort.infer(x), ref.infer(x)
    assert np.abs(ma - mb).max() <= 1e-3 * max(1.0, np.abs(mb).max())
    assert abs(float(sa[0]) - float(sb[0])) <= 1e-3 * max(1.0, abs(float(sb[0])))
    amap = ma[0, 0]
    h, w = amap.shape
    les = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(les, (SIZE // 2, SIZE * 2 // 3), (SIZE // 7, SIZE // 9), 0, 0, 360, 255, -1)
    les = cv2.resize(les, (w, h), interpolation=cv2.INTER_AREA) > 127
    border = np.zeros_like(les)
    border[1:-1, 1:-1] = True
    assert amap[les].mean() > amap[~les & border].mean(), f"{family}: lesion not brighter in the map"


def test_training_deterministic_for_a_seed(normal_dir, tmp_path):
    cfg, _ = FAST["draem"]
    a = train("draem", normal_dir, tmp_path / "a", size=SIZE, epochs=2, seed=3, val_fraction=0.25,
              region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    b = train("draem", normal_dir, tmp_path / "b", size=SIZE, epochs=2, seed=3, val_fraction=0.25,
              region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    assert a.threshold["pixel_raw"] == b.threshold["pixel_raw"] and a.threshold["image_raw"] == b.threshold["image_raw"]


def test_threshold_chosen_on_held_out_normals_only(normal_dir, tmp_path):
    root = tmp_path / "data"
    (root / "normal").mkdir(parents=True)
    (root / "abnormal").mkdir()
    for p in normal_dir.iterdir():
        (root / "normal" / p.name).write_bytes(p.read_bytes())
    for i in range(4):
        cv2.imwrite(str(root / "abnormal" / f"les_{i}.png"), speckle(SIZE, 50 + i, lesion=True))
    cfg, _ = FAST["classifier"]
    card = train("classifier", root, tmp_path / "m", size=SIZE, epochs=2, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    held = [d for d in card.training["data"] if d["role"].startswith("held-out")]
    assert held and all(d["label"] == "normal" for d in held)
    assert any(d["label"] == "abnormal" and d["role"] == "fit" for d in card.training["data"])
    # an unsupervised family ignores the abnormal files entirely
    card2 = train("patch_gaussian", root, tmp_path / "m2", size=SIZE, seed=0, val_fraction=0.25, region_fn=full_region,
                  family_config=FAST["patch_gaussian"][0], progress=False)
    assert all(d["label"] == "normal" for d in card2.training["data"])


@pytest.mark.parametrize("kind", ["breast", "lung", "all"])
def test_synthesis_stays_inside_the_scan_and_is_deterministic(kind):
    x = torch.zeros(6, 2, 64, 64)
    x[:, 0] = torch.randn(6, 64, 64)
    x[:, 1, :, 8:56] = 1.0
    a, ta = synthesize(x, torch.Generator().manual_seed(1), kind, p=1.0)
    b, tb = synthesize(x, torch.Generator().manual_seed(1), kind, p=1.0)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert ta.sum() > 0
    assert (ta[:, 0] * (1 - x[:, 1])).sum() == 0
    assert (a[:, 0] * (1 - x[:, 1])).abs().sum() == 0


@pytest.mark.parametrize("extra", [dict(iso_p=1.0), dict(surface_p=1.0), dict(iso_p=0.5, surface_p=0.5)])
def test_harder_synthesis_stays_inside_the_scan_and_is_deterministic(extra):
    x = torch.zeros(6, 2, 64, 64)
    x[:, 0] = torch.randn(6, 64, 64)
    x[:, 1, 4:, 8:56] = 1.0
    a, ta = synthesize(x, torch.Generator().manual_seed(1), "breast", p=1.0, **extra)
    b, tb = synthesize(x, torch.Generator().manual_seed(1), "breast", p=1.0, **extra)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert ta.sum() > 0
    assert (ta[:, 0] * (1 - x[:, 1])).sum() == 0
    assert (a[:, 0] * (1 - x[:, 1])).abs().sum() == 0
    with pytest.raises(ValueError, match="iso_p"):
        synthesize(x, torch.Generator().manual_seed(1), "breast", iso_p=1.5)


def _speckle_batch(n=24, size=96, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 2, size, size)
    x[:, 1, 10:, 6:-6] = 1.0  # the scan starts 10 rows down (its top is the skin line)
    x[:, 0] = torch.tensor(rng.standard_normal((n, size, size)), dtype=torch.float32) * x[:, 1]
    return x


def test_isoechoic_masses_sit_near_the_frames_level_and_are_larger():
    """The plain masses are clearly darker or brighter than the frame (|level| >= 0.8 sd), which is what a model
    trained on them learns to find; ``iso_p`` masses keep about the frame's level and are larger."""
    x = _speckle_batch()

    def stats(**kw):
        a, t = synthesize(x, torch.Generator().manual_seed(3), "breast", p=1.0, max_items=1, **kw)
        lv, area = [], []
        for i in range(len(x)):
            les = t[i, 0] > 0.5
            if les.sum() > 0:
                lv.append(abs(float(a[i, 0][les].mean()) - float(x[i, 0][x[i, 1] > 0.5].mean())))
                area.append(float(les.sum()))
        return np.median(lv), np.median(area)

    plain_level, plain_area = stats()
    iso_level, iso_area = stats(iso_p=1.0)
    assert plain_level > 0.7 and iso_level < 0.6
    assert iso_area > 1.5 * plain_area


def test_surface_masses_lie_just_under_the_top_of_the_scan():
    x = _speckle_batch()
    _, t = synthesize(x, torch.Generator().manual_seed(4), "breast", p=1.0, max_items=1, surface_p=1.0)
    _, t0 = synthesize(x, torch.Generator().manual_seed(4), "breast", p=1.0, max_items=1)
    size, top = x.shape[-1], 10

    def depth(t):  # each lesion's centroid row below the top of the scan, as a share of the scan's depth
        ys = [float(torch.nonzero(t[i, 0] > 0.5)[:, 0].float().mean()) for i in range(len(t)) if t[i, 0].sum() > 0]
        return (np.array(ys) - top) / (size - top)

    d, d0 = depth(t), depth(t0)
    assert len(d) >= len(t) // 2 and np.all(d < 0.3) and np.median(d) < 0.2
    assert np.median(d0) > 0.3  # the plain draw lands anywhere in the scan


def test_patch_gaussian_fp16_halves_memory():
    a = build("patch_gaussian", size=[64, 64], dim=16, bands=2, widths=[8, 8, 8, 8])
    b = build("patch_gaussian", size=[64, 64], dim=16, bands=2, widths=[8, 8, 8, 8], cov_fp16=True)
    assert b.w_maha.dtype == torch.float16 and b.w_maha.nbytes * 2 == a.w_maha.nbytes


def _lesion_mask(size=SIZE):
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, (size // 2, size * 2 // 3), (size // 7, size // 9), 0, 0, 360, 255, -1)
    return m


def test_real_lesion_copy_paste_moves_lesion_pixels_inside_the_scan():
    """The real-lesion mix of the synthetic segmenter: pasted pixels come from the lesion, the target follows them,
    nothing lands outside the scan mask, and it is deterministic for a generator."""
    model = build("draem", size=[SIZE, SIZE], widths=[8, 16, 16, 16], real_p=1.0)
    bank_x = torch.zeros(2, 2, SIZE, SIZE)
    bank_x[:, 0] = -3.0  # a very dark "lesion image"
    bank_x[:, 1] = 1.0
    bank_m = torch.zeros(2, 1, SIZE, SIZE)
    bank_m[:, 0] = torch.from_numpy(_lesion_mask() > 0).float()
    bank_m[1] = 0  # an item without lesion pixels is dropped from the bank
    model.set_lesion_bank(bank_x, bank_m)
    assert model._bank[0].shape[0] == 1
    x = torch.zeros(8, 2, SIZE, SIZE)
    x[:, 0] = 1.0
    x[:, 1, :, 4 : SIZE - 4] = 1.0
    tgt = torch.zeros(8, 1, SIZE, SIZE)
    a, ta = model._real_mix(x, tgt, torch.Generator().manual_seed(0))
    b, tb = model._real_mix(x, tgt, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert torch.equal(x[:, 0], torch.ones(8, SIZE, SIZE)), "the input batch must not be modified in place"
    for i in range(8):
        assert ta[i].sum() > 0, "every item got a real lesion (real_p = 1)"
        les = ta[i, 0] > 0.5
        assert float(a[i, 0][les].mean()) < -1.0, "the target marks the dark lesion pixels"
        if torch.equal(a[i, 1], x[i, 1]):  # pasted (not replaced): nothing outside the frame's own scan mask
            assert (ta[i, 0] * (1 - x[i, 1])).sum() == 0
            assert (a[i, 0] * (1 - x[i, 1])).abs().sum() == 0


def test_draem_learns_from_real_lesion_masks(tmp_path):
    """``real_p`` > 0: abnormal images with ``masks/<stem>_mask.png`` enter the fit as a lesion bank; the card says
    so, the threshold is still chosen on normals only, and without masks it is a clear error."""
    root = tmp_path / "data"
    for sub in ("normal", "abnormal", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(12):
        cv2.imwrite(str(root / "normal" / f"n_{i:02d}.png"), speckle(SIZE, i))
    for i in range(4):
        cv2.imwrite(str(root / "abnormal" / f"les_{i}.png"), speckle(SIZE, 50 + i, lesion=True))
        cv2.imwrite(str(root / "masks" / f"les_{i}_mask.png"), _lesion_mask())
    cfg = {**FAST["draem"][0], "real_p": 0.5}
    card = train("draem", root, tmp_path / "m", size=SIZE, epochs=8, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    roles = {d["file"]: d["role"] for d in card.training["data"]}
    assert all(roles[f"les_{i}.png"] == "fit (real lesion + mask)" for i in range(4))
    held = [d for d in card.training["data"] if d["role"].startswith("held-out")]
    assert held and all(d["label"] == "normal" for d in held)
    assert card.training["fit"]["lesions"].startswith("synthetic + real (masks of 4")
    assert card.family_config["real_p"] == 0.5
    eng = load(tmp_path / "m", backend="onnxruntime")
    img = speckle(SIZE, 99, lesion=True)
    amap = eng.infer(preprocess(img, full_region(img), card))[0][0, 0]
    les = cv2.resize(_lesion_mask(), amap.shape[::-1], interpolation=cv2.INTER_AREA) > 127
    assert amap[les].mean() > amap[~les].mean()
    for p in (root / "masks").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="lesion mask"):
        train("draem", root, tmp_path / "m2", size=SIZE, epochs=1, seed=0, val_fraction=0.25, region_fn=full_region,
              family_config=cfg, progress=False, batch_size=8)


def test_photo_aug_keeps_the_input_contract_and_moves_masks_with_the_image():
    """``aug="photo"`` of the synthetic segmenter: after a random gamma, zoom and shift the image channel is again a
    z-score inside the (moved) scan mask and 0 outside, a lesion mask follows the image, gamma alone keeps the order
    of the intensities, and it is deterministic for a generator."""
    from sonomaly.engines.models.common import photo_aug

    rng = np.random.default_rng(0)
    x = torch.zeros(6, 2, SIZE, SIZE)
    x[:, 1, 6 : SIZE - 6, 10 : SIZE - 10] = 1.0
    x[:, 0] = torch.from_numpy(rng.standard_normal((6, SIZE, SIZE)).astype(np.float32)) * x[:, 1]
    les = torch.zeros(6, 1, SIZE, SIZE)
    les[:, :, 20:34, 24:40] = 1.0
    x[:, 0][les[:, 0] > 0] = -3.0  # a dark lesion where the mask says
    a, la = photo_aug(x, torch.Generator().manual_seed(1), les, p=1.0)
    b, lb = photo_aug(x, torch.Generator().manual_seed(1), les, p=1.0)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert x[0, 0, 20, 24] == -3.0, "the batch must not be modified in place"
    for i in range(6):
        inside = a[i, 1] > 0.5
        assert not torch.equal(a[i], x[i])
        assert float(a[i, 0][~inside].abs().max()) == 0.0
        assert abs(float(a[i, 0][inside].mean())) < 1e-3 and abs(float(a[i, 0][inside].std()) - 1.0) < 0.02
        moved = la[i, 0] > 0.5
        assert moved.sum() > 0 and float(a[i, 0][moved & inside].mean()) < float(a[i, 0][inside & ~moved].mean()) - 1.0
    g, _ = photo_aug(x, torch.Generator().manual_seed(2), p=1.0, zoom=(1.0, 1.0), shift=0.0)
    inside = x[0, 1] > 0.5
    order_out = torch.argsort(g[0, 0][inside])
    assert float((x[0, 0][inside][order_out].diff() >= -1e-6).float().mean()) > 0.99  # monotone: same order
    assert torch.equal(photo_aug(x, torch.Generator().manual_seed(3), p=0.0)[0], x)
    with pytest.raises(ValueError, match="aug"):
        build("draem", size=[SIZE, SIZE], aug="bogus")


def test_draem_ensemble_averages_members_and_flip_and_exports(normal_dir, tmp_path):
    """``members`` > 1 and ``tta_flip``: each member trains from its own initialisation, the map is the mean of the
    members' probabilities over the frame and its mirror image (checked by hand), ONNX gives the same numbers, and a
    one-member model keeps the state-dict keys that shipped models have."""
    cfg = {**FAST["draem"][0], "members": 2, "tta_flip": True, "aug": "photo", "score_erode": 0}
    card = train("draem", normal_dir, tmp_path / "m", size=SIZE, epochs=4, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    fit = card.training["fit"]
    assert len(fit["members"]) == 2 and fit["steps"] == sum(m["steps"] for m in fit["members"])
    ort, ref = load(tmp_path / "m", backend="onnxruntime"), load(tmp_path / "m", backend="torch")
    img = speckle(SIZE, 99, lesion=True)
    x = preprocess(img, full_region(img), card)
    (ma, sa), (mb, sb) = ort.infer(x), ref.infer(x)
    assert np.abs(ma - mb).max() <= 1e-4 and abs(float(sa[0]) - float(sb[0])) <= 1e-4
    from sonomaly.engines.models.common import mask_at
    from sonomaly.engines.models.draem import _unet_logits

    model = ref.impl.model
    with torch.no_grad():
        img = torch.from_numpy(x)[:, :1]
        per = [[torch.sigmoid(_unet_logits(model.member(i), img)),
                torch.sigmoid(_unet_logits(model.member(i), img.flip(-1))).flip(-1)] for i in range(2)]
        by_hand = (sum(p for pair in per for p in pair) / 4 * mask_at(torch.from_numpy(x)[:, 1:2], 4)).numpy()
    assert not torch.allclose(per[0][0], per[1][0]), "the two members must differ"
    assert not torch.allclose(per[0][0], per[0][1]), "the mirrored view must differ"
    assert np.abs(by_hand - mb).max() < 1e-5
    assert not any(k.startswith("more.") for k in build("draem", size=[SIZE, SIZE]).state_dict())
    with pytest.raises(ValueError, match="members"):
        build("draem", size=[SIZE, SIZE], members=0)



def test_pick_best_respects_the_latency_budget_at_the_shipping_size():
    """The default is the best family that fits ≤ 10 ms at the size it ships at: a family timed too slow at 256²
    but fast at the benchmark size wins only when the default ships at that size; one not timed there is skipped."""
    from sonomaly.engines.train import pick_best
    from sonomaly.tools.bench_detectors import onnx_latency

    agg = lambda v: {k: {"mean": v, "sd": 0.0, "n": 3} for k in ("image_auroc", "pixel_auroc", "dice", "peak_hit_rate")}
    bench = {"summary": {
        "a": {"dataset": "busi", "family": "draem+ens", "variant": "as_is", "agg": agg(0.9)},
        "b": {"dataset": "busi", "family": "draem", "variant": "as_is", "agg": agg(0.7)},
        "c": {"dataset": "busi", "family": "classifier", "variant": "as_is", "agg": agg(0.8)}},
        "latency": {"draem+ens": {"ms_1t": 21.0, "ms_2t": 14.0, "at_size": {"size": 128, "ms_1t": 5.2, "ms_2t": 4.0}},
                    "draem": {"ms_1t": 5.0, "ms_2t": 3.5, "at_size": {"size": 128, "ms_1t": 1.3, "ms_2t": 1.1}},
                    "classifier": {"ms_1t": 12.0, "ms_2t": 11.0}}}
    assert pick_best(bench, "busi", size=256) == "draem"
    assert pick_best(bench, "busi", size=128) == "draem+ens"
    # by default each label is judged at its own benchmark size (settings.sizes; else settings.size)
    bench["settings"] = {"size": 128}
    assert pick_best(bench, "busi") == "draem+ens"
    bench["settings"]["sizes"] = {"draem+ens": 160}  # benchmarked at 160², timed only at 128²: cannot ship
    assert pick_best(bench, "busi") == "draem"  # classifier has no 128² timing
    bench["latency"]["draem+ens"]["at_size"] = {"size": 160, "ms_1t": 8.5, "ms_2t": 9.5}
    assert pick_best(bench, "busi") == "draem+ens"
    del bench["settings"]
    bench["latency"]["draem+ens"]["at_size"] = {"size": 128, "ms_1t": 5.2, "ms_2t": 4.0}
    bench["latency"]["draem+ens"]["at_size"]["ms_1t"] = 10.5
    bench["latency"]["draem+ens"]["at_size"]["ms_2t"] = 11.0
    assert pick_best(bench, "busi", size=128) == "draem"
    # within the tie margin the faster wins; beyond it the better one does
    bench["latency"]["draem+ens"]["at_size"].update(ms_1t=9.0, ms_2t=7.0)
    bench["summary"]["b"]["agg"] = agg(0.895)
    assert pick_best(bench, "busi", size=128) == "draem"
    assert pick_best(bench, "busi", size=128, tie=0.001) == "draem+ens"
    lat = onnx_latency("draem", dict(FAST["draem"][0], members=2), size=SIZE, n=3)
    assert lat["params"] == 2 * onnx_latency("draem", FAST["draem"][0], size=SIZE, n=3)["params"]
    assert lat["ms_1t"] > 0 and lat["ms_2t"] > 0


def test_bench_latency_only_times_every_label_at_the_size_with_its_own_config(tmp_path, capsys):
    """``bench detectors --latency-only`` trains nothing: each label of the file gets an ``at_size`` timing of its
    own configuration (a two-member label twice the parameters of the plain family) at the size it was benchmarked
    at, the runs stay as they were."""
    import json

    from sonomaly.tools.cli import main
    from sonomaly.tools.machine import cpu_model

    runs = {"lung/draem/0": {"as_is": {}}, "lung/draem+ens2/0": {"as_is": {}}, "busi/classifier/0": {"as_is": {}}}
    cfg = {"draem+ens2": {"lung": dict(FAST["draem"][0], members=2)}, "draem": {"lung": FAST["draem"][0]},
           "classifier": {"lung": FAST["classifier"][0]}}
    p = tmp_path / "d.json"
    settings = {"configs": cfg, "size": SIZE, "sizes": {"classifier": 2 * SIZE}}
    p.write_text(json.dumps({"runs": runs, "latency": {"draem": {"ms_1t": 5.0}}, "settings": settings}))
    assert main(["bench", "detectors", "--latency-only", "--json", str(p)]) == 0
    r = json.loads(p.read_text())
    assert r["runs"] == runs and r["latency"]["draem"]["ms_1t"] == 5.0  # the 256² number is left alone
    at = {k: v["at_size"] for k, v in r["latency"].items()}
    assert set(at) == {"draem", "draem+ens2", "classifier"}
    assert at["draem"]["size"] == at["draem+ens2"]["size"] == SIZE and at["classifier"]["size"] == 2 * SIZE
    assert at["draem+ens2"]["params"] == 2 * at["draem"]["params"]
    assert all(a["ms_1t"] > 0 and a["ms_2t"] > 0 for a in at.values())
    assert all(a["machine"].startswith(cpu_model()) for a in at.values())  # where each timing was made
    assert main(["bench", "detectors", "--latency-only", "--json", str(tmp_path / "none.json")]) == 2
    # --latency-table: every label at 256² and at its own size on this one machine, into its own file
    from sonomaly.tools.bench_detectors import latency_md

    before = p.read_text()
    out = tmp_path / "lat" / "t.json"
    assert main(["bench", "detectors", "--latency-only", "--latency-table", str(out), "--json", str(p)]) == 0
    assert p.read_text() == before  # the benchmark file is left as it is
    t = json.loads(out.read_text())
    assert set(t["latency"]) == {"draem", "draem+ens2", "classifier"} and t["source"] == "d.json"
    assert t["machine"]["cpu"] == cpu_model() and t["machine"]["nproc"] >= 1 and t["utc"][:2] == "20"
    assert all(v["ms_1t"] > 0 and v["at_size"]["ms_2t"] > 0 for v in t["latency"].values())
    assert t["latency"]["classifier"]["at_size"]["size"] == 2 * SIZE
    assert t["latency"]["draem+ens2"]["params"] == 2 * t["latency"]["draem"]["params"]  # its own config at 256²
    md = latency_md(t)
    assert md.count("\n| ") == 1 + 3 and f"| draem+ens2 | {t['latency']['draem+ens2']['params']} |" in md


def test_draem_image_loss_charges_the_hottest_cells_of_lesion_free_frames():
    """``img_loss`` (hard negatives): the BCE towards 0 of each lesion-free item's top-k mean logit. Hot cells on a
    lesion-free frame raise it, items with a lesion are not charged, cells outside the scan count for nothing, the
    gradient reaches only the top-k cells; the option is stored in the config and rejects a negative weight."""
    from sonomaly.engines.models.draem import _topk_image_loss

    n, h, w, k = 2, 16, 16, 4
    mm = torch.zeros(n, 1, h, w)
    mm[:, :, 2:14, 2:14] = 1.0
    cold = torch.full((n, 1, h, w), -4.0)
    hot = cold.clone()
    hot[:, :, 5:7, 5:7] = 4.0  # 4 hot cells = k
    none, lesion = torch.zeros(n, 1, h, w), torch.zeros(n, 1, h, w)
    lesion[:, :, 5:7, 5:7] = 1.0
    assert float(_topk_image_loss(hot, mm, none, k)) > float(_topk_image_loss(cold, mm, none, k)) + 3.0
    assert float(_topk_image_loss(hot, mm, lesion, k)) == 0.0
    mixed = torch.cat([none[:1], lesion[:1]])  # item 0 lesion-free, item 1 with a lesion: only item 0 counts
    assert torch.isclose(_topk_image_loss(hot, mm, mixed, k), _topk_image_loss(hot[:1], mm[:1], none[:1], k))
    outside = cold.clone()
    outside[:, :, 0:2, 0:2] = 9.0  # hot, but outside the scan mask
    assert torch.isclose(_topk_image_loss(outside, mm, none, k), _topk_image_loss(cold, mm, none, k))
    hot.requires_grad_(True)
    _topk_image_loss(hot, mm, none, k).backward()
    assert float(hot.grad[:, :, 5:7, 5:7].sum()) > 0 and float(hot.grad[:, :, 10:12, 10:12].abs().sum()) == 0
    assert build("draem", size=[SIZE, SIZE], img_loss=0.5).config()["img_loss"] == 0.5
    with pytest.raises(ValueError, match="img_loss"):
        build("draem", size=[SIZE, SIZE], img_loss=-1)


def test_draem_fine_map_is_at_half_resolution_and_exports(normal_dir, tmp_path):
    """``fine``: one more decoder stage, so the map (and the top-k of the score) is at 1/2 of the input instead of
    1/4; the card's map shape says so, ONNX Runtime matches PyTorch, and without it the state-dict keys stay as
    shipped models have them."""
    cfg = {**FAST["draem"][0], "fine": True}
    card = train("draem", normal_dir, tmp_path / "m", size=SIZE, epochs=2, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    assert list(card.map_shape)[-2:] == [SIZE // 2, SIZE // 2]
    ort, ref = load(tmp_path / "m", backend="onnxruntime"), load(tmp_path / "m", backend="torch")
    img = speckle(SIZE, 7, lesion=True)
    x = preprocess(img, full_region(img), card)
    (ma, sa), (mb, sb) = ort.infer(x), ref.infer(x)
    assert ma.shape[-2:] == (SIZE // 2, SIZE // 2)
    assert np.abs(ma - mb).max() <= 1e-4 and abs(float(sa[0]) - float(sb[0])) <= 1e-4
    model = build("draem", size=[SIZE, SIZE], fine=True)
    assert model.k == max(1, round(0.01 * (SIZE // 2) ** 2)) and any(k.startswith("d0.") for k in model.state_dict())
    assert not any(k.startswith("d0.") for k in build("draem", size=[SIZE, SIZE]).state_dict())


def test_draem_context_sees_the_rest_of_the_frame_and_exports(normal_dir, tmp_path):
    """``context``: the frame's mean bottleneck feature is added to every cell, so a cell's logit depends on what lies
    far outside its own receptive field (without it, a change in a far corner leaves the cell untouched); every
    ensemble member has it, ONNX Runtime matches PyTorch, and without it the state-dict keys stay as shipped."""
    from sonomaly.engines.models.draem import _unet_logits

    big = 128  # the top-left cell's receptive field (~110 px) ends well before the far corner
    x = torch.zeros(1, 2, big, big)
    x[0, 1] = 1.0
    far = x.clone()
    far[0, 0, 72:, :] = far[0, 0, :, 72:] = 3.0  # bright beyond 72 px down or right: outside that field
    for context, moves in ((True, True), (False, False)):
        model = build("draem", size=[big, big], context=context, members=2).eval()
        for i in range(2):
            with torch.no_grad():
                a, b = (_unet_logits(model.member(i), v[:, :1]) for v in (x, far))
            assert bool((a[..., 0, 0] - b[..., 0, 0]).abs().max() > 0) == moves  # the top-left cell: exactly 0 without
        assert any(".ctx." in k or k.startswith("ctx.") for k in model.state_dict()) == context
        assert sum(k.startswith("more.0.ctx.") for k in model.state_dict()) == (2 if context else 0)
    cfg = {**FAST["draem"][0], "context": True}
    card = train("draem", normal_dir, tmp_path / "m", size=SIZE, epochs=2, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    assert card.family_config["context"] is True
    ort, ref = load(tmp_path / "m", backend="onnxruntime"), load(tmp_path / "m", backend="torch")
    img = speckle(SIZE, 7, lesion=True)
    xi = preprocess(img, full_region(img), card)
    (ma, sa), (mb, sb) = ort.infer(xi), ref.infer(xi)
    assert np.abs(ma - mb).max() <= 1e-4 and abs(float(sa[0]) - float(sb[0])) <= 1e-4


def test_draem_context_pool_scan_ignores_what_lies_outside_the_scan(normal_dir, tmp_path):
    """``context_pool="scan"``: the context's mean is taken over the scan's cells only, so the share of dark
    background (which varies from frame to frame) does not move it: content outside the mask leaves the in-scan logits
    of a ``scan`` model alone where a ``frame`` model's move; in-scan content still moves them; ONNX Runtime matches."""
    big = 128
    x = torch.rand(1, 2, big, big, generator=torch.Generator().manual_seed(3))
    x[0, 1] = 0.0
    x[0, 1, :, :32] = 1.0  # the scan: the left quarter (bottleneck cells' receptive fields reach ~45 px each side)
    x[0, 0] *= x[0, 1]
    outside = x.clone()
    outside[0, 0, :, 96:] = 3.0  # bright far right, outside the scan (the mask still says 0 there) and its fields
    inside = x.clone()
    inside[0, 0, 100:, :32] = 3.0  # bright far down inside the scan, outside the top-left cell's receptive field
    with pytest.raises(ValueError, match="context_pool"):
        build("draem", size=[big, big], context=True, context_pool="fan")
    moved = {}
    for pool in ("frame", "scan"):
        model = build("draem", size=[big, big], context=True, context_pool=pool).eval()
        assert model.config()["context_pool"] == pool
        with torch.no_grad():
            a, b, c = (model.logits(v[:, :1], v[:, 1:2]) for v in (x, outside, inside))
        moved[pool] = (float((a[..., 0, 0] - b[..., 0, 0]).abs().max()), float((a[..., 0, 0] - c[..., 0, 0]).abs().max()))
    assert moved["frame"][0] > 0 and moved["scan"][0] == 0.0  # the top-left cell sees only 0..~110 px, not 96+
    assert moved["scan"][1] > 0
    cfg = {**FAST["draem"][0], "context": True, "context_pool": "scan", "members": 2, "tta_flip": True}
    card = train("draem", normal_dir, tmp_path / "m", size=SIZE, epochs=2, seed=0, val_fraction=0.25,
                 region_fn=full_region, family_config=cfg, progress=False, batch_size=8)
    assert card.family_config["context_pool"] == "scan"
    ort, ref = load(tmp_path / "m", backend="onnxruntime"), load(tmp_path / "m", backend="torch")
    img = speckle(SIZE, 7, lesion=True)
    xi = preprocess(img, full_region(img), card)
    (ma, sa), (mb, sb) = ort.infer(xi), ref.infer(xi)
    assert np.abs(ma - mb).max() <= 1e-4 and abs(float(sa[0]) - float(sb[0])) <= 1e-4


def test_bench_table_reports_the_operating_point():
    """The benchmark table gives, beside the AUROCs, the shares of abnormal and normal images over the card's image
    threshold (what ships), averaged over the runs; runs without ``frames_over_threshold`` leave it blank."""
    from sonomaly.tools.bench_detectors import aggregate, table

    runs = [{"as_is": {"image_auroc": 0.9, "frames_over_threshold": {"normal": 0.0, "abnormal": 0.6}}},
            {"as_is": {"image_auroc": 0.8, "frames_over_threshold": {"normal": 0.1, "abnormal": 0.4}}}]
    agg = aggregate(runs, "as_is")
    assert agg["sens_at_threshold"]["mean"] == 0.5 and agg["fpr_at_threshold"]["mean"] == 0.05
    row = {"dataset_label": "BUSI", "family": "draem", "agg": agg}
    assert "| 50 / 5 % |" in table({"summary": {"k": row}, "latency": {}})
    bare = aggregate([{"as_is": {"image_auroc": 0.9}}], "as_is")
    assert bare["sens_at_threshold"] is None
    assert "| — |" in table({"summary": {"k": {**row, "agg": bare}}, "latency": {}})


def test_draem_harder_synthesis_options_are_checked_and_kept_in_the_config():
    with pytest.raises(ValueError, match="synth_iso"):
        build("draem", size=[32, 32], synth_iso=1.5)
    with pytest.raises(ValueError, match="synth_surface"):
        build("draem", size=[32, 32], synth_surface=-0.1)
    cfg = build("draem", size=[32, 32], synth_iso=0.3, synth_surface=0.15).config()
    assert cfg["synth_iso"] == 0.3 and cfg["synth_surface"] == 0.15
    assert build("draem", **cfg).config() == cfg


def test_model_card_notes_give_the_operating_point_and_the_synthesis():
    """The generated limitations of a default's README state the benchmark's operating point (abnormal / normal
    share over the threshold) from the card's stored benchmark rows, and say when the synthesis had hard masses."""
    import copy
    from pathlib import Path

    from sonomaly.engines.card import ModelCard
    from sonomaly.engines.train import _default_notes

    card = ModelCard.load(Path(__file__).resolve().parents[1] / "models" / "breast")
    card.metrics["benchmark"] = {"rows": {"BUSI breast images": {
        "sens_at_threshold": {"mean": 0.4, "sd": 0.1, "n": 3}, "fpr_at_threshold": {"mean": 0.05, "sd": 0.0, "n": 3}}}}
    card.family_config = {**card.family_config, "synth_iso": 0.3, "synth_surface": 0.0}
    notes = _default_notes(card, "breast", "draem")
    assert any("flagged 40% of the abnormal test images and 5% of the normal" in n for n in notes)
    assert any("synth_iso 0.3" in n for n in notes)
    plain = copy.deepcopy(card)
    plain.metrics["benchmark"] = {"rows": {"BUSI breast images": {}}}
    plain.family_config = {**card.family_config, "synth_iso": 0.0, "synth_surface": 0.0}
    notes = _default_notes(plain, "breast", "draem")
    assert not any("flagged" in n for n in notes) and not any("synth_iso" in n for n in notes)
