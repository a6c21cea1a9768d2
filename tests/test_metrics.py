"""engines.metrics against scikit-learn and hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from sonomaly.engines import metrics as M

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y * rng.uniform(0, 2)
    s = np.round(s, 1)  # ties
    assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_hand_made_cases():
    assert M.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert M.auroc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(M.auroc([1, 1], [0.1, 0.2]))
    assert M.average_precision([0, 1, 1], [0.1, 0.2, 0.3]) == 1.0


def test_pixel_scores_match_sklearn_and_respect_valid():
    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)) for _ in range(3)]
    masks = [np.zeros((16, 16), bool) for _ in range(3)]
    masks[0][4:8, 4:8] = True
    maps[0][4:8, 4:8] += 0.5
    valid = [np.ones((16, 16), bool) for _ in range(3)]
    valid[1][:, :8] = False
    r = M.pixel_scores(maps, masks, valid)
    y = np.concatenate([m[v] for m, v in zip(masks, valid)])
    s = np.concatenate([a[v] for a, v in zip(maps, valid)])
    assert r["pixel_auroc"] == pytest.approx(sk.roc_auc_score(y, s))
    assert r["pixel_ap"] == pytest.approx(sk.average_precision_score(y, s))


def test_dice_and_peak_hit():
    a = np.zeros((10, 10)); a[2:6, 2:6] = 2.0
    g = np.zeros((10, 10), bool); g[2:6, 2:4] = True
    d = M.dice([a], [g], 1.0)
    assert d["dice"] == pytest.approx(2 * 8 / (16 + 8))
    assert M.peak_hit_rate([a], [g]) == 1.0  # argmax (first max) is (2,2), inside
    b = np.zeros((10, 10)); b[9, 9] = 5
    assert M.peak_hit_rate([a, b], [g, g]) == 0.5
    # a maximum outside the valid region does not count
    assert M.peak_hit_rate([b], [g], [np.pad(np.ones((9, 9), bool), ((0, 1), (0, 1)))]) in (0.0, 1.0)


def test_aupro_perfect_random_and_bounds():
    g = np.zeros((32, 32), bool); g[5:10, 5:10] = True; g[20:24, 20:28] = True
    perfect = g.astype(float) + 0.0
    assert M.aupro([perfect], [g]) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    vals = [M.aupro([rng.random((32, 32))], [g]) for _ in range(5)]
    # random maps: PRO ~ FPR, so normalised area up to 0.3 is ~0.15
    assert 0.05 < float(np.mean(vals)) < 0.25
    inv = 1.0 - perfect
    assert M.aupro([inv], [g]) == pytest.approx(0.0, abs=1e-6)
