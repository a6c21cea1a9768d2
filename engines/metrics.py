"""Detection and localisation metrics (numpy only; checked against scikit-learn in ``tests/test_metrics.py``).

* :func:`auroc` — Mann-Whitney AUROC, ties count half (same as ``sklearn.metrics.roc_auc_score``).
* :func:`average_precision` — step-wise AP (same as ``sklearn.metrics.average_precision_score``).
* :func:`pixel_scores` — pixel AUROC / AP over many maps + masks (optionally subsampled, deterministic).
* :func:`aupro` — area under the per-region-overlap curve up to a false-positive rate (0.3 by default), normalised to
  [0, 1] (MVTec AD's AUPRO).
* :func:`dice` — Dice of binarised maps vs masks (pooled over all abnormal images, and the mean per image).
* :func:`peak_hit_rate` — share of abnormal images whose map maximum lies inside the lesion mask.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def _labels_scores(y_true, y_score):
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.shape} labels vs {s.shape} scores")
    return y, s


def auroc(y_true, y_score) -> float:
    """P(score(pos) > score(neg)) + 0.5 P(tie); NaN when a class is missing."""
    y, s = _labels_scores(y_true, y_score)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    # average ranks of ties
    _, first, counts = np.unique(ss, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def average_precision(y_true, y_score) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn's definition); NaN without positives."""
    y, s = _labels_scores(y_true, y_score)
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]  # last index of each distinct threshold
    tp, fp = tp[last], fp[last]
    prec = tp / (tp + fp)
    rec = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def _subsample(maps: np.ndarray, masks: np.ndarray, max_pixels: int | None, seed: int = 0):
    m = np.asarray(maps, np.float32).ravel()
    g = np.asarray(masks).astype(bool).ravel()
    if max_pixels and m.size > max_pixels:
        idx = np.random.default_rng(seed).choice(m.size, max_pixels, replace=False)
        m, g = m[idx], g[idx]
    return m, g


def pixel_scores(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], valid: Sequence[np.ndarray] | None = None,
                 max_pixels: int | None = 2_000_000) -> dict[str, float]:
    """Pixel AUROC and AP over all images (normal images contribute negative pixels only).  ``valid`` (optional, per
    image) restricts to pixels inside the scan region."""
    vals, labs = [], []
    for i, (a, m) in enumerate(zip(maps, masks)):
        a = np.asarray(a, np.float32)
        m = np.asarray(m).astype(bool)
        if valid is not None:
            v = np.asarray(valid[i]).astype(bool)
            a, m = a[v], m[v]
        vals.append(a.ravel())
        labs.append(m.ravel())
    if not vals:
        return {"pixel_auroc": float("nan"), "pixel_ap": float("nan")}
    s, y = _subsample(np.concatenate(vals), np.concatenate(labs), max_pixels)
    return {"pixel_auroc": auroc(y, s), "pixel_ap": average_precision(y, s)}


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], valid: Sequence[np.ndarray] | None = None,
          fpr_limit: float = 0.3, n_thresholds: int = 200) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit].  PRO = mean over every connected lesion region of the
    fraction of it above the threshold; FPR over all lesion-free (valid) pixels of all images."""
    maps = [np.asarray(a, np.float32) for a in maps]
    masks = [np.asarray(m).astype(bool) for m in masks]
    if valid is None:
        valid = [np.ones_like(m) for m in masks]
    valid = [np.asarray(v).astype(bool) for v in valid]
    neg = np.concatenate([a[v & ~m] for a, m, v in zip(maps, masks, valid)])
    regions = []
    for a, m in zip(maps, masks):
        if m.any():
            n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            for k in range(1, n):
                regions.append(a[lab == k])
    if not regions or neg.size == 0:
        return float("nan")
    # thresholds spanning FPR 0 .. fpr_limit (quantiles of negative pixels) plus the max
    qs = np.linspace(1.0, 1.0 - fpr_limit, n_thresholds)
    ths = np.quantile(neg, qs)
    neg_sorted = np.sort(neg)
    fprs, pros = [], []
    for t in ths:
        fpr = 1.0 - np.searchsorted(neg_sorted, t, side="right") / neg.size
        pro = float(np.mean([np.mean(r > t) for r in regions]))
        fprs.append(fpr)
        pros.append(pro)
    fprs, pros = np.array(fprs), np.array(pros)
    order = np.argsort(fprs, kind="mergesort")
    fprs, pros = fprs[order], pros[order]
    # clip the curve to [0, fpr_limit] (interpolate the end point)
    fprs = np.r_[0.0, fprs]
    pros = np.r_[pros[0] if len(pros) else 0.0, pros]
    keep = fprs <= fpr_limit
    f, p = fprs[keep], pros[keep]
    if f[-1] < fpr_limit:
        if keep.sum() < len(fprs):  # interpolate to the limit
            j = int(np.argmax(~keep))
            w = (fpr_limit - fprs[j - 1]) / max(fprs[j] - fprs[j - 1], 1e-12)
            end = pros[j - 1] + w * (pros[j] - pros[j - 1])
        else:  # every threshold is already below the limit (e.g. a perfect map): PRO stays at its last value
            end = p[-1]
        f = np.r_[f, fpr_limit]
        p = np.r_[p, end]
    return float(np.trapezoid(p, f) / fpr_limit)


def dice(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float,
         valid: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """Dice of ``map > threshold`` vs the mask: ``dice`` pooled over all given images, ``dice_mean`` per image."""
    inter = tot = 0.0
    per = []
    for i, (a, m) in enumerate(zip(maps, masks)):
        p = np.asarray(a) > threshold
        g = np.asarray(m).astype(bool)
        if valid is not None:
            p = p & np.asarray(valid[i]).astype(bool)
        it, s = float((p & g).sum()), float(p.sum() + g.sum())
        inter += it
        tot += s
        per.append(2 * it / s if s > 0 else 1.0)
    return {"dice": 2 * inter / tot if tot > 0 else float("nan"),
            "dice_mean": float(np.mean(per)) if per else float("nan")}


def peak_hit_rate(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  valid: Sequence[np.ndarray] | None = None) -> float:
    """Share of images (with a non-empty mask) whose map maximum (inside ``valid``) lies inside the mask."""
    hits, n = 0, 0
    for i, (a, m) in enumerate(zip(maps, masks)):
        g = np.asarray(m).astype(bool)
        if not g.any():
            continue
        a = np.asarray(a, np.float32)
        if valid is not None:
            a = np.where(np.asarray(valid[i]).astype(bool), a, -np.inf)
        n += 1
        hits += bool(g.flat[int(np.argmax(a))])
    return hits / n if n else float("nan")
