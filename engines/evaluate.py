"""Evaluate a model directory on a labelled folder: ``DIR/normal``, ``DIR/abnormal`` and optional ``DIR/masks``.

Images (png / jpg / bmp / tif / dcm) are scored one by one; clips (anything OpenCV reads: mp4, mov, mpeg, avi, ...;
multi-frame DICOM) per frame and per clip (clip score = mean of its frame scores).  Masks ``masks/<stem>_mask*.png``
(several per stem are united) give the pixel metrics.  The scan region (with burned-in text / calipers removed:
:func:`sonomaly.engines.regions.clean_scan_region`) is detected per image, or once per clip, before the model, and all
pixel metrics are computed inside it.  Maps are compared at frame resolution after the same ``postprocess`` the live
pipeline uses (1.0 = the card's pixel threshold), downsampled to at most ``metric_side`` pixels on the long side.

:func:`evaluate` returns the JSON dict (see ``FIELDS``); :func:`write_report` draws the PNG grid and Markdown summary.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from . import load
from .metrics import aupro, auroc, average_precision, dice, peak_hit_rate, pixel_scores
from .processing import postprocess, preprocess

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_EXT = {".dcm", ".dicom"}
VIDEO_EXT = {".mp4", ".mov", ".mpeg", ".mpg", ".avi", ".mkv", ".webm", ".m4v", ".wmv", ".ogv"}
FIELDS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "dice", "peak_hit_rate", "clip_auroc",
          "brightness_auroc", "n_normal", "n_abnormal", "ms_per_frame")


@dataclass
class Item:
    path: Path
    label: int  # 0 normal, 1 abnormal
    is_clip: bool
    mask: np.ndarray | None = None  # united lesion mask at frame resolution (bool), images only
    scores: list[float] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # small (metric-resolution) normalised maps, images only
    valid: np.ndarray | None = None  # small scan mask
    small_mask: np.ndarray | None = None
    preview: tuple | None = None  # (frame, full map) of the first / the max-score frame for the report


def find_masks(mask_dir: Path | None, stem: str) -> list[Path]:
    """``<stem>_mask.png``, ``<stem>_mask_1.png``, ... (any ``<stem>_mask*`` image)."""
    if mask_dir is None or not mask_dir.is_dir():
        return []
    return sorted(p for p in mask_dir.glob(f"{stem}_mask*") if p.suffix.lower() in IMAGE_EXT)


def united_mask(paths: list[Path], shape_hw: tuple[int, int] | None = None) -> np.ndarray | None:
    """Union of binary masks (> 127), resized (nearest) to ``shape_hw`` when given."""
    out = None
    for p in paths:
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise ValueError(f"{p}: cannot read mask")
        if shape_hw is not None and m.shape != tuple(shape_hw):
            m = cv2.resize(m, (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_NEAREST)
        out = (m > 127) if out is None else (out | (m > 127))
    return out


def list_items(data_dir: str | Path) -> tuple[list[Item], Path | None]:
    data_dir = Path(data_dir)
    items = []
    for label, sub in ((0, "normal"), (1, "abnormal")):
        d = data_dir / sub
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing (DIR must hold normal/ and abnormal/)")
        for p in sorted(d.rglob("*")):
            ext = p.suffix.lower()
            if ext in IMAGE_EXT or ext in DICOM_EXT or ext in VIDEO_EXT:
                items.append(Item(p, label, ext in VIDEO_EXT))
    masks = data_dir / "masks"
    return items, (masks if masks.is_dir() else None)


def read_any(path: Path, every: int, max_frames: int | None) -> list[np.ndarray]:
    ext = path.suffix.lower()
    if ext in DICOM_EXT:
        from sonomaly.stream.dicom import read_dicom

        clip = read_dicom(path)
        idx = list(range(0, clip.n_frames, every if clip.n_frames > 1 else 1))[: max_frames or None]
        return [clip.frame_bgr(i) for i in idx]
    from .train import read_frames

    return read_frames(path, every, max_frames)


def brightness_match(frames: list[np.ndarray], region, target_mean: float = 60.0, target_std: float = 40.0):
    from .train import brightness_match as bm

    return bm(frames, region, target_mean, target_std)


def _small(a: np.ndarray, side: int, interp=cv2.INTER_AREA) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(1.0, side / max(h, w))
    if s >= 1.0:
        return a
    return cv2.resize(a.astype(np.float32) if a.dtype == bool else a, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=interp)


def evaluate(model_dir: str | Path, data_dir: str | Path, *, backend: str = "onnxruntime", threads: int = 1,
             every: int = 4, max_frames: int | None = 150, brightness_matched: bool = False,
             region_fn: Callable | None = None, metric_side: int = 160, progress: bool = True,
             keep_items: bool = False) -> dict[str, Any]:
    """Score every image / clip frame in ``data_dir`` with the model; return the metrics dict (``FIELDS`` + extras)."""
    from .train import clip_region

    if region_fn is None:
        from .regions import clean_scan_region as region_fn
    eng = load(model_dir, backend=backend, threads=threads) if backend != "torch" else load(model_dir, backend="torch")
    card = eng.card
    items, mask_dir = list_items(data_dir)
    if not items:
        raise ValueError(f"{data_dir}: no images or clips under normal/ and abnormal/")
    h, w = card.input_size
    x = np.empty((1, card.input.channels, h, w), np.float32)
    times = []
    t0 = time.time()
    for n, it in enumerate(items):
        frames = read_any(it.path, every, max_frames)
        region = clip_region(frames, region_fn) if len(frames) > 1 else region_fn(frames[0])
        if not it.is_clip and getattr(region_fn, "__name__", "") == "clean_scan_region":
            from .regions import inpaint_marks

            frames = [inpaint_marks(f) for f in frames]  # still images: burned-in text / calipers filled in
        if brightness_matched:
            frames = brightness_match(frames, region)
        inside = region.mask > 0
        mpaths = find_masks(mask_dir, it.path.stem)
        if mpaths:
            it.mask = united_mask(mpaths, frames[0].shape[:2])
        best = -np.inf
        for f in frames:
            preprocess(f, region, card, out=x)
            t1 = time.perf_counter()
            raw_map, raw_score = eng.infer(x)
            times.append(time.perf_counter() - t1)
            amap, score = postprocess(raw_map, raw_score, region, card, f.shape)
            it.scores.append(float(score))
            it.brightness.append(float(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[inside].mean()) if inside.any() else 0.0)
            if not it.is_clip:
                it.maps.append(_small(amap, metric_side))
            if score > best:
                best = score
                it.preview = (f, amap, region)
        if not it.is_clip:
            it.valid = _small(inside.astype(np.float32), metric_side) > 0.5
            m = it.mask if it.mask is not None else np.zeros(inside.shape, bool)
            it.small_mask = _small(m.astype(np.float32), metric_side) > 0.5
        if progress:
            from .models.common import progress_bar

            progress_bar(n + 1, len(items), t0, it.path.name[:32])
    res = summarise(items, card)
    res["ms_per_frame"] = round(float(np.median(times) * 1e3), 3) if times else None
    res.update({
        "model": str(model_dir), "model_name": card.name, "family": card.family, "data": str(data_dir),
        "backend": eng.backend, "threads": threads, "input_size": list(card.input_size),
        "brightness_matched": brightness_matched, "every": every, "max_frames": max_frames,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU(s) visible",
        "seconds": round(time.time() - t0, 2),
        "definitions": {
            "scores": "normalised by the card (1.0 = image threshold); per image or per frame",
            "clip_score": "mean of the clip's frame scores",
            "pixel metrics": f"postprocessed maps (1.0 = pixel threshold) at <= {metric_side} px, inside the scan "
                             "region without overlays; normal images contribute negative pixels",
            "dice": "pooled over abnormal images with masks, map > 1.0 (the card's pixel threshold)",
            "brightness_auroc": "the same split scored by the mean gray level inside the scan region alone",
        },
    })
    if keep_items:
        res["_items"] = items
    return res


def _nan(v):
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else round(float(v), 4)


def summarise(items: list[Item], card=None) -> dict[str, Any]:
    y = np.concatenate([[it.label] * len(it.scores) for it in items]).astype(int)
    s = np.concatenate([it.scores for it in items])
    b = np.concatenate([it.brightness for it in items])
    out: dict[str, Any] = {
        "image_auroc": _nan(auroc(y, s)), "image_ap": _nan(average_precision(y, s)),
        "brightness_auroc": _nan(auroc(y, b)),
        "n_normal": int(sum(1 for it in items if it.label == 0)),
        "n_abnormal": int(sum(1 for it in items if it.label == 1)),
        "n_frames": {"normal": int((y == 0).sum()), "abnormal": int((y == 1).sum())},
        "frames_over_threshold": {"normal": _nan(np.mean(s[y == 0] > 1.0)) if (y == 0).any() else None,
                                  "abnormal": _nan(np.mean(s[y == 1] > 1.0)) if (y == 1).any() else None},
    }
    b_inv = auroc(y, -b)
    out["brightness_auroc_either_direction"] = _nan(max(auroc(y, b), b_inv))
    clips = [it for it in items if it.is_clip]
    if clips:
        cy = np.array([it.label for it in clips])
        cs = np.array([np.mean(it.scores) for it in clips])
        cb = np.array([np.mean(it.brightness) for it in clips])
        out["clip_auroc"] = _nan(auroc(cy, cs))
        out["clip_brightness_auroc"] = _nan(auroc(cy, cb))
        out["clips"] = {it.path.name: {"label": "abnormal" if it.label else "normal",
                                       "mean_score": _nan(np.mean(it.scores)), "frames": len(it.scores),
                                       "frames_over_threshold": _nan(np.mean(np.array(it.scores) > 1.0))}
                        for it in clips}
    else:
        out["clip_auroc"] = None
    imgs = [it for it in items if not it.is_clip]
    with_mask = [it for it in imgs if it.label == 1 and it.small_mask is not None and it.small_mask.any()]
    if with_mask:
        neg = [it for it in imgs if it.label == 0]
        use = with_mask + neg
        maps = [it.maps[0] for it in use]
        masks = [it.small_mask for it in use]
        valid = [it.valid for it in use]
        out.update({k: _nan(v) for k, v in pixel_scores(maps, masks, valid).items()})
        out["aupro"] = _nan(aupro(maps, masks, valid))
        d = dice([it.maps[0] for it in with_mask], [it.small_mask for it in with_mask], 1.0,
                 [it.valid for it in with_mask])
        out["dice"], out["dice_mean"] = _nan(d["dice"]), _nan(d["dice_mean"])
        out["peak_hit_rate"] = _nan(peak_hit_rate([it.maps[0] for it in with_mask], [it.small_mask for it in with_mask],
                                                  [it.valid for it in with_mask]))
        out["n_masked"] = len(with_mask)
    else:
        out.update({"pixel_auroc": None, "pixel_ap": None, "aupro": None, "dice": None, "peak_hit_rate": None,
                    "n_masked": 0})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# report
def _heat(frame: np.ndarray, amap: np.ndarray) -> np.ndarray:
    v = np.clip(amap / 2.0, 0, 1)  # 1.0 (threshold) -> mid colour
    col = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_JET)
    a = np.clip(amap, 0, 1)[..., None] * 0.6
    return (frame * (1 - a) + col * a).astype(np.uint8)


def failure_lines(abn: list[Item], nor: list[Item], n: int = 10) -> list[str]:
    """Markdown: the abnormal items that score under the image threshold (1.0) or under the highest normal one, and
    the normal items over the threshold, by name and score (``abn`` / ``nor`` sorted by score, highest first)."""
    score = lambda it: max(it.scores)
    top_normal = max(map(score, nor)) if nor else None
    missed = [it for it in abn[::-1] if score(it) <= max(1.0, top_normal if top_normal is not None else 1.0)]
    alarms = [it for it in nor if score(it) > 1.0]
    out = ["## Failures", "",
           f"Abnormal items under the image threshold (1.0) or under the highest normal score"
           f"{f' ({top_normal:.2f})' if top_normal is not None else ''}: {len(missed)} of {len(abn)}"
           f"{' — lowest first: ' if missed else ''}"
           + ", ".join(f"`{it.path.name}` {score(it):.2f}" for it in missed[:n])
           + (f", … ({len(missed) - n} more)" if len(missed) > n else "") + ".",
           "",
           f"Normal items over the image threshold: {len(alarms)} of {len(nor)}{' — highest first: ' if alarms else ''}"
           + ", ".join(f"`{it.path.name}` {score(it):.2f}" for it in alarms[:n])
           + (f", … ({len(alarms) - n} more)" if len(alarms) > n else "") + "."]
    return out


def write_report(res: dict[str, Any], items: list[Item], out_dir: str | Path, n_abnormal: int = 8,
                 n_normal: int = 4, tile: int = 192) -> dict[str, str]:
    """``grid.png`` (columns: image with the lesion outline, heatmap, map > threshold vs mask) and ``report.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    abn = sorted([it for it in items if it.label == 1], key=lambda it: -max(it.scores))
    nor = sorted([it for it in items if it.label == 0], key=lambda it: -max(it.scores))
    # the best-found lesions, then the failures an engineer must look at: the lowest-scoring abnormal items (missed
    # findings) and the highest-scoring normal ones (false alarms)
    n_top = min(n_abnormal // 2, len(abn))
    pick = abn[:n_top] + abn[max(n_top, len(abn) - (n_abnormal - n_abnormal // 2)):] + nor[:n_normal]
    rows = []
    for it in pick:
        frame, amap, region = it.preview
        x, y, w, h = region.bbox
        crop = lambda a: a[y : y + h, x : x + w]
        img = frame.copy()
        if it.mask is not None and it.mask.any() and it.mask.shape == frame.shape[:2]:
            cnts, _ = cv2.findContours(it.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, cnts, -1, (0, 255, 0), 2)
        heat = _heat(frame, amap)
        binm = np.zeros_like(frame)
        binm[..., 2] = (amap > 1.0) * 255
        if it.mask is not None and it.mask.shape == frame.shape[:2]:
            binm[..., 1] = it.mask * 255
        tiles = []
        for t in (img, heat, binm):
            t = crop(t)
            t = cv2.resize(t, (tile, int(round(tile * t.shape[0] / max(t.shape[1], 1)))))
            t = cv2.resize(t, (tile, tile))
            tiles.append(t)
        row = np.concatenate(tiles, 1)
        label = f"{'ABN' if it.label else 'NOR'} {it.path.stem[:18]} s={max(it.scores):.2f}"
        cv2.putText(row, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    grid = np.concatenate(rows, 0) if rows else np.zeros((tile, 3 * tile, 3), np.uint8)
    cv2.imwrite(str(out_dir / "grid.png"), grid)
    keys = [k for k in FIELDS if k in res]
    lines = [f"# Evaluation — {res.get('model_name')} ({res.get('family')})", "",
             f"Model `{res.get('model')}` on `{res.get('data')}` ({res.get('backend')}, input {res.get('input_size')}, "
             f"brightness-matched: {res.get('brightness_matched')}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {res[k] if res[k] is not None else 'n/a'} |" for k in keys]
    lines += ["", f"Frames over the image threshold: {res.get('frames_over_threshold')}.", "",
              "![grid](grid.png)", "",
              "Grid columns: image (green: lesion mask), heatmap (1.0 = pixel threshold), map > threshold (red) vs mask "
              "(green; yellow = overlap). Rows: the highest-scoring abnormal items, the lowest-scoring ones (the "
              "findings it misses), then the highest-scoring normal items (its false alarms)."]
    lines += ["", *failure_lines(abn, nor), "", "Definitions: " + json.dumps(res.get("definitions", {}))]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"grid": str(out_dir / "grid.png"), "report": str(out_dir / "report.md")}


def run_cli(model: str, data: str, json_out: str | None, report: str | None, **kw) -> dict[str, Any]:
    res = evaluate(model, data, keep_items=True, **kw)
    items = res.pop("_items")
    if report:
        res["report"] = write_report(res, items, report)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_cli(sys.argv[1], sys.argv[2], None, None), indent=2))
