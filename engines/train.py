"""Train a detector on normal data, choose normalisation/threshold on held-out normal groups, export ONNX + card.

``train(family, data, out_dir)`` is the entry point (the CLI wires ``sonomaly train`` to it); ``evaluate_quick``
measures frame/clip AUROC on labelled clips; ``train_default_lung(data_dir, out_dir)`` rebuilds ``models/lung``.
Paths are always arguments: nothing here knows where the shared data lives.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import torch

from sonomaly.stream.roi import ScanRegion

from .card import ModelCard, InputSpec, Range
from .models import build
from .processing import preprocess

VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DEFAULT_CLIP = 4.0

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "patch_gaussian": dict(widths=[16, 32, 64, 64], dim=48, bands=4, topk_frac=0.01, score_erode=2),
    "conv_ae": dict(widths=[16, 32, 48, 64], bottleneck=16, topk_frac=0.01, score_erode=2),
    "ae": dict(widths=[16, 32, 48, 64], latent=16, loss="l1", topk_frac=0.01, score_erode=2),
    "student_teacher": dict(width=32, feat=64, teacher_epochs=4, topk_frac=0.01, score_erode=2),
    "draem": dict(widths=[16, 32, 48, 64], synth="all", topk_frac=0.01, score_erode=2),
    "classifier": dict(pool="gap", synth="all"),
}
FAMILY_EPOCHS: dict[str, int] = {"patch_gaussian": 1, "conv_ae": 10, "ae": 10, "student_teacher": 8, "draem": 15,
                                 "classifier": 12}
# families that can use real abnormal images (image labels) when the data hold them
SUPERVISED = {"classifier"}
# families that can use lesion masks of real abnormal images (``masks/<stem>_mask*.png``) when asked to (``real_p`` > 0)
MASK_SUPERVISED = {"draem"}


def uses_abnormal(family: str, cfg: dict) -> bool:
    """Whether ``family`` with config ``cfg`` learns from abnormal data: the classifier from image labels, the
    segmenter (``draem``) from lesion masks when ``real_p`` > 0."""
    return family in SUPERVISED or (family in MASK_SUPERVISED and float(cfg.get("real_p", 0) or 0) > 0)
# wall-clock cap per default training (the budget: <= 15 min per default model on 2 CPU cores)
MAX_TRAIN_SECONDS = 14 * 60


# ---------------------------------------------------------------------------------------------------------------------
# data
@dataclass
class Source:
    path: Path
    group: str
    label: str = "normal"


ABNORMAL_DIRS = {"abnormal", "anomaly", "anomalous", "lesion", "benign", "malignant", "positive"}


def _label_of(path: Path, root: Path) -> str:
    parts = {p.lower() for p in path.relative_to(root).parts[:-1]}
    return "abnormal" if parts & ABNORMAL_DIRS else "normal"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def as_sources(data) -> list[Source]:
    """A folder (every image/video in it, recursively; each file its own group), a path, a list of paths, or a list
    of ``(path, group)`` / :class:`Source` -> sorted list of sources."""
    if isinstance(data, (str, Path)):
        p = Path(data)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_EXT | IMAGE_EXT
                           and "masks" not in {x.lower() for x in q.relative_to(p).parts[:-1]}
                           and "_mask" not in q.stem)
            if not files:
                raise ValueError(f"{p}: no images or videos found")
            return [Source(q, q.stem, _label_of(q, p)) for q in files]
        return [Source(p, p.stem)]
    out = []
    for item in data:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            out.extend(as_sources(item))
            continue
        if isinstance(item, Source):
            out.append(item)
        elif isinstance(item, (tuple, list)):
            out.append(Source(Path(item[0]), str(item[1]), *(item[2:3])))
        else:
            out.append(Source(Path(item), Path(item).stem))
    for s in out:
        if not s.path.exists():
            raise FileNotFoundError(s.path)
    return out


def read_frames(path: str | Path, every: int = 1, max_frames: int | None = None) -> list[np.ndarray]:
    """BGR uint8 frames of a video (every ``every``-th) or a single image."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXT:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{path}: cannot decode image")
        return [img]
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open video")
    frames, i = [], 0
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            if i % every == 0:
                frames.append(f)
                if max_frames and len(frames) >= max_frames:
                    break
            i += 1
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return frames


def clip_region(frames: Sequence[np.ndarray], region_fn: Callable[[np.ndarray], ScanRegion]) -> ScanRegion:
    """One scan region per clip, detected on the per-pixel max of up to 16 frames (robust to dark frames)."""
    pick = frames[:: max(1, len(frames) // 16)][:16]
    return region_fn(np.max(np.stack(pick), axis=0))


def _default_region_fn():
    """Scan region with burned-in text / calipers removed (:mod:`sonomaly.engines.regions`)."""
    from .regions import clean_scan_region

    return clean_scan_region


def make_input_card(size: int | Sequence[int], channels: int = 2, clip: float = DEFAULT_CLIP) -> ModelCard:
    """A placeholder card carrying only the input spec (for preprocessing before the real card exists)."""
    hw = [int(size), int(size)] if isinstance(size, int) else [int(size[0]), int(size[1])]
    return ModelCard(
        name="_input", family="_", input=InputSpec(hw, channels, {"mode": "roi_zscore", "clip": clip},
                                                    channel_names=["zscore_gray", "roi_mask"][:channels]),
        outputs={"anomaly_map": {"name": "anomaly_map", "shape": [1, 1, 1, 1]}, "score": {"name": "score", "shape": [1]}},
        map_normalisation=Range(0.0, 1.0), score_normalisation=Range(0.0, 1.0),
        threshold={"method": "-", "target_fpr": 0.01, "pixel_raw": 1.0, "image_raw": 1.0, "chosen_on": "-"},
    )


def load_tensors(source: Source, card: ModelCard, *, every: int, max_frames: int | None,
                 region_fn: Callable[[np.ndarray], ScanRegion], transform: Callable | None = None) -> np.ndarray:
    frames = read_frames(source.path, every, max_frames)
    if transform is not None:
        frames = transform(frames)
    region = clip_region(frames, region_fn)
    if getattr(region_fn, "__name__", "") == "clean_scan_region" and len(frames) == 1:
        from .regions import inpaint_marks

        frames = [inpaint_marks(f) for f in frames]  # still images: burned-in text / calipers filled in
    h, w = card.input_size
    out = np.empty((len(frames), card.input.channels, h, w), np.float32)
    for i, f in enumerate(frames):
        preprocess(f, region, card, out=out[i : i + 1])
    return out


def lesion_mask_paths(path: Path) -> list[Path]:
    """The lesion masks of an abnormal image: ``<stem>_mask*.png`` in a ``masks/`` folder beside the image or beside
    its folder (``DIR/abnormal/x.png`` -> ``DIR/masks/x_mask.png``, the layout ``sonomaly evaluate`` reads)."""
    from .evaluate import find_masks

    for d in (path.parent / "masks", path.parent.parent / "masks"):
        found = find_masks(d, path.stem)
        if found:
            return found
    return []


def load_lesion_mask(source: Source, card: ModelCard, *, region_fn: Callable[[np.ndarray], ScanRegion]) -> np.ndarray | None:
    """The united lesion mask of an abnormal still image at the model input's geometry (bbox crop, resize; 0 outside
    the scan region): float32 ``[1, 1, H, W]`` of 0/1, or ``None`` when the image has no mask."""
    from .evaluate import united_mask

    paths = lesion_mask_paths(source.path)
    if not paths or source.path.suffix.lower() not in IMAGE_EXT:
        return None
    frame = read_frames(source.path)[0]
    region = clip_region([frame], region_fn)
    m = united_mask(paths, frame.shape[:2]).astype(np.uint8) * 255
    h, w = card.input_size
    small = cv2.resize(region.crop(m), (w, h), interpolation=cv2.INTER_AREA) > 127
    inside = cv2.resize(region.crop_mask(), (w, h), interpolation=cv2.INTER_AREA) > 127
    return (small & inside).astype(np.float32)[None, None]


def _progress(msg: str, on: bool) -> None:
    if on:
        print(msg, file=sys.stderr, flush=True)


def _batches(arr: np.ndarray, bs: int, shuffle_seed: int | None = None, labels: np.ndarray | None = None):
    """Re-iterable batch generator (``x`` tensors, or ``(x, y)`` when ``labels`` are given), reshuffled per epoch."""
    def gen():
        idx = np.arange(len(arr))
        if shuffle_seed is not None:
            np.random.default_rng(shuffle_seed + gen.calls).shuffle(idx)
            gen.calls += 1
        for i in range(0, len(idx), bs):
            j = np.sort(idx[i : i + bs]) if shuffle_seed is None else idx[i : i + bs]
            x = torch.from_numpy(arr[j])
            yield x if labels is None else (x, torch.from_numpy(labels[j]))

    gen.calls = 0
    return gen


@torch.no_grad()
def run_model(model: torch.nn.Module, arr: np.ndarray, bs: int = 16) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(arr), bs):
        m, s = model(torch.from_numpy(arr[i : i + bs]))
        maps.append(m.numpy())
        scores.append(s.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def _map_mask(arr: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    """The in-graph map-resolution mask (cell inside if > half inside) for inputs ``arr`` -> bool ``[N, h, w]``."""
    m = arr[:, 1] if arr.shape[1] >= 2 else (arr[:, 0] != 0).astype(np.float32)
    n, H, W = m.shape
    h, w = map_hw
    return m.reshape(n, h, H // h, w, W // w).mean((2, 4)) > 0.5


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__, "python": platform.python_version()}


def export_onnx(model: torch.nn.Module, path: str | Path, size_hw: tuple[int, int], channels: int) -> None:
    import onnx

    import warnings

    x = torch.zeros(1, channels, *size_hw)
    x[:, 0] = torch.randn(1, *size_hw, generator=torch.Generator().manual_seed(0))
    if channels >= 2:
        x[:, 1] = 1.0
    model.eval()
    with warnings.catch_warnings():
        # the TorchScript exporter is the one that needs no onnxscript; shapes are static, so tracer warnings are moot
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["anomaly_map", "score"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def set_determinism(seed: int, threads: int | None = None) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# train
def split_groups(sources: list[Source], frames_per_source: dict[str, int], val_fraction: float,
                 val_groups: Sequence[str] | None) -> tuple[list[Source], list[Source]]:
    groups = sorted({s.group for s in sources})
    if val_groups is not None:
        missing = set(val_groups) - set(groups)
        if missing:
            raise ValueError(f"val_groups not in data: {sorted(missing)}")
        held = set(val_groups)
    else:
        if len(groups) < 2:
            raise ValueError("need at least two groups (files/patients) to hold one out for the threshold; "
                             "pass more data or explicit val_groups")
        total = sum(frames_per_source.values())
        per_group = {g: sum(frames_per_source[str(s.path)] for s in sources if s.group == g) for g in groups}
        # hold out the smallest groups first (keeps the most data for fitting) until val_fraction of frames
        held, n = set(), 0
        for g in sorted(groups, key=lambda g: (per_group[g], g)):
            if n >= val_fraction * total or len(held) == len(groups) - 1:
                break
            held.add(g)
            n += per_group[g]
    fit = [s for s in sources if s.group not in held]
    val = [s for s in sources if s.group in held]
    if not fit or not val:
        raise ValueError("group split left no fitting or no held-out data")
    return fit, val


def train(
    family: str,
    data,
    out_dir: str | Path,
    *,
    size: int = 256,
    epochs: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    val_groups: Sequence[str] | None = None,
    target_fpr: float = 0.01,
    every: int = 4,
    max_frames_per_file: int | None = 150,
    name: str | None = None,
    region_fn: Callable[[np.ndarray], ScanRegion] | None = None,
    family_config: dict[str, Any] | None = None,
    batch_size: int = 16,
    threads: int | None = 1,
    max_seconds: float | None = None,
    progress: bool = True,
    description: str = "",
) -> ModelCard:
    """Fit ``family`` on normal ``data``, calibrate on held-out normal groups, write model.onnx/model.pt/card.json."""
    t_start = time.time()
    set_determinism(seed, threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    region_fn = region_fn or _default_region_fn()
    sources = as_sources(data)
    cfg = {**FAMILY_DEFAULTS.get(family, {}), **(family_config or {}), "size": [size, size], "seed": seed}
    channels = int(cfg.get("in_channels", 2))
    cfg["in_channels"] = channels
    icard = make_input_card(size, channels)

    normals = [x for x in sources if x.label == "normal"]
    abnormals = [x for x in sources if x.label != "normal"]
    if not normals:
        raise ValueError("no normal images/clips in the data (thresholds are chosen on held-out normal data only)")
    use_abn = family in SUPERVISED and bool(abnormals)
    use_masks = family in MASK_SUPERVISED and uses_abnormal(family, cfg) and bool(abnormals)
    if abnormals and not (use_abn or use_masks):
        _progress(f"[train] {family} trains on normal data only: ignoring {len(abnormals)} abnormal file(s)", progress)
    todo = normals + (abnormals if use_abn or use_masks else [])
    _progress(f"[train] {family}: decoding {len(todo)} file(s) (every {every}th frame)", progress)
    tensors: dict[str, np.ndarray] = {}
    t_dec = time.time()
    for i, s in enumerate(todo):
        tensors[str(s.path)] = load_tensors(s, icard, every=every, max_frames=max_frames_per_file, region_fn=region_fn)
        if progress:
            from .models.common import progress_bar

            progress_bar(i + 1, len(todo), t_dec, f"decoded {s.path.name}")
    fit_src, val_src = split_groups(normals, {str(k.path): len(tensors[str(k.path)]) for k in normals}, val_fraction,
                                    val_groups)
    val_groups_set = {s.group for s in val_src}
    abn_fit = [s for s in abnormals if s.group not in val_groups_set] if use_abn else []
    lesion_fit: list[Source] = []
    if use_masks:  # real lesions (masks) for the synthetic-anomaly segmenter: a bank beside the normal batches
        bank_x, bank_m = [], []
        for s in abnormals:
            if s.group in val_groups_set:
                continue
            m = load_lesion_mask(s, icard, region_fn=region_fn)
            if m is None or not m.any():
                continue
            bank_x.append(tensors[str(s.path)][:1])
            bank_m.append(m)
            lesion_fit.append(s)
        if not lesion_fit:
            raise ValueError(f"{family}: real_p > 0 but none of the {len(abnormals)} abnormal file(s) has a lesion mask "
                             f"(masks/<stem>_mask*.png beside the images or their folder)")
        _progress(f"[train] real lesions: {len(lesion_fit)} abnormal image(s) with masks", progress)
    fit_arr = np.concatenate([tensors[str(s.path)] for s in fit_src + abn_fit])
    fit_lab = np.concatenate([np.full(len(tensors[str(s.path)]), float(s.label != "normal"), np.float32)
                              for s in fit_src + abn_fit])
    val_arr = np.concatenate([tensors[str(s.path)] for s in val_src])
    _progress(f"[train] fit on {len(fit_arr)} frames ({len(fit_src)} normal + {len(abn_fit)} abnormal files), hold out "
              f"{len(val_arr)} normal frames (groups {sorted(val_groups_set)})", progress)

    model = build(family, **cfg)
    if lesion_fit:
        model.set_lesion_bank(torch.from_numpy(np.concatenate(bank_x)), torch.from_numpy(np.concatenate(bank_m)))
    epochs = epochs if epochs is not None else FAMILY_EPOCHS.get(family)
    fit_kwargs = {"epochs": epochs} if epochs is not None else {}
    t_fit = time.time()
    fit_info = model.fit(_batches(fit_arr, batch_size, shuffle_seed=seed, labels=fit_lab if use_abn else None),
                         progress=progress, max_seconds=max_seconds if max_seconds is not None else MAX_TRAIN_SECONDS,
                         **fit_kwargs)
    fit_seconds = time.time() - t_fit
    model.eval()

    # ---- calibration on held-out normal frames only -------------------------------------------------------------
    maps, scores = run_model(model, val_arr, batch_size)
    inside = _map_mask(val_arr, maps.shape[-2:])
    pix = maps[:, 0][inside]
    pix = pix[np.isfinite(pix)]
    if pix.size == 0:
        raise ValueError("no held-out pixels inside the scan region")
    q = 1.0 - target_fpr
    p_low, p_high = float(np.median(pix)), float(np.quantile(pix, q))
    floor = getattr(model, "prob_floor", None)
    if floor is not None and p_high < floor:
        p_high = float(floor)
    s_low, s_high = float(np.median(scores)), float(np.quantile(scores, q))
    if not p_high > p_low:
        p_high = p_low + max(1e-6, abs(p_low) * 1e-3)
    if not s_high > s_low:
        s_high = s_low + max(1e-6, abs(s_low) * 1e-3)

    # ---- export -------------------------------------------------------------------------------------------------
    onnx_path, pt_path = out_dir / "model.onnx", out_dir / "model.pt"
    torch.save(model.state_dict(), pt_path)
    export_onnx(model, onnx_path, (size, size), channels)
    map_shape = [1, 1, *maps.shape[-2:]]
    all_files = sorted(todo, key=lambda s: str(s.path))
    card = ModelCard(
        name=name or f"{family}-{size}",
        family=family,
        description=description,
        input=InputSpec([size, size], channels, {"mode": "roi_zscore", "clip": icard.input.clip},
                        channel_names=["zscore_gray", "roi_mask"][:channels]),
        outputs={"input_name": "input", "anomaly_map": {"name": "anomaly_map", "shape": map_shape},
                 "score": {"name": "score", "shape": [1],
                           "definition": f"mean of the top {getattr(model, 'k', '?')} map values inside the scan "
                                         f"mask eroded by {cfg.get('score_erode', 0)} map cells (in-graph)"}},
        map_normalisation=Range(p_low, p_high),
        score_normalisation=Range(s_low, s_high),
        threshold={
            "method": "quantile of held-out normal values" + (
                f" (pixel threshold floored at probability {floor})" if floor is not None else ""),
            "target_fpr": target_fpr,
            "pixel_raw": p_high,
            "image_raw": s_high,
            "pixel_low": "median of held-out normal map values inside the scan (map resolution, before smoothing)",
            "image_low": "median of held-out normal frame scores",
            "chosen_on": {"frames": int(len(val_arr)), "pixels": int(pix.size),
                          "groups": sorted({s.group for s in val_src}),
                          "files": [s.path.name for s in val_src], "labels": "normal only"},
        },
        files={"onnx": "model.onnx", "torch": "model.pt"},
        family_config=model.config() if hasattr(model, "config") else cfg,
        training={
            "data": [{"file": s.path.name, "group": s.group, "sha256": sha256_file(s.path),
                      "frames_used": int(len(tensors[str(s.path)])),
                      "label": s.label,
                      "role": ("fit" if s in fit_src or s in abn_fit else
                               "fit (real lesion + mask)" if s in lesion_fit else
                               "held-out (normalisation/threshold)" if s in val_src else "unused")}
                     for s in all_files],
            "frames": {"fit": int(len(fit_arr)), "held_out": int(len(val_arr))},
            "sampling": {"every": every, "max_frames_per_file": max_frames_per_file},
            "region": getattr(region_fn, "__module__", "?") + "." + getattr(region_fn, "__name__", "?"),
            "seed": seed,
            "epochs": fit_info.get("epochs", epochs),
            "fit": fit_info,
            "seconds": {"fit": round(fit_seconds, 2), "total": None},
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(),
        },
        metrics={},
        versions=_versions(),
        sha256={"onnx": sha256_file(onnx_path), "torch": sha256_file(pt_path)},
    )
    card.metrics["heldout_normal"] = {
        "measured_on": "held-out normal frames (same frames the threshold was chosen on, so by construction)",
        "pixel_fpr_at_threshold": float(np.mean(pix > p_high)),
        "frame_ids": "held-out normal groups " + ", ".join(sorted(val_groups_set)),
        "frame_fpr_at_threshold": float(np.mean(scores > s_high)),
    }
    card.training["seconds"]["total"] = round(time.time() - t_start, 2)
    card.save(out_dir)
    _progress(f"[train] wrote {out_dir} in {time.time() - t_start:.1f}s", progress)
    return card


# ---------------------------------------------------------------------------------------------------------------------
# quick evaluation
def auroc(neg: Iterable[float], pos: Iterable[float]) -> float:
    """Mann-Whitney AUROC (ties count half): P(score(pos) > score(neg))."""
    neg = np.asarray(list(neg), np.float64)
    pos = np.asarray(list(pos), np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks for ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    rp = ranks[len(neg):].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def brightness_match(frames: list[np.ndarray], region: ScanRegion, target_mean: float = 60.0,
                     target_std: float = 40.0) -> list[np.ndarray]:
    """Rescale a whole clip (one gain/offset for all its frames) so the grayscale pixels inside its scan region have a
    common mean/std; removes the clip-level brightness cue that alone separates the normal and abnormal clips here."""
    inside = region.mask > 0
    g = np.concatenate([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[inside] for f in frames]).astype(np.float32)
    m, s = float(g.mean()), float(g.std()) or 1.0
    gain, off = target_std / s, target_mean - m * target_std / s
    return [np.clip(f.astype(np.float32) * gain + off, 0, 255).astype(np.uint8) for f in frames]


def evaluate_quick(
    model_dir: str | Path,
    clips: Sequence[tuple[str | Path, str]] | Sequence[Source],
    *,
    every: int = 4,
    max_frames_per_file: int | None = 150,
    region_fn: Callable[[np.ndarray], ScanRegion] | None = None,
    backend: str = "onnxruntime",
    progress: bool = True,
    exclude_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Frame- and clip-level AUROC on labelled clips (``(path, label)`` with label "normal"/"abnormal", or Sources),
    as-is and brightness-matched, plus the brightness-only baseline (mean gray inside the scan region).  Clip score =
    mean frame score.  Clips named in ``exclude_files`` (e.g. the fitting data) are skipped."""
    from . import load

    region_fn = region_fn or _default_region_fn()
    eng = load(model_dir, backend=backend)
    card = eng.card
    srcs = [c if isinstance(c, Source) else Source(Path(c[0]), Path(c[0]).stem, c[1]) for c in clips]
    srcs = [s for s in srcs if s.path.name not in set(exclude_files)]
    out: dict[str, Any] = {"backend": eng.backend}
    per: dict[str, dict[str, dict[str, Any]]] = {"as_is": {}, "brightness_matched": {}}
    h, w = card.input_size
    x = np.empty((1, card.input.channels, h, w), np.float32)
    for s in srcs:
        raw = read_frames(s.path, every, max_frames_per_file)
        region = clip_region(raw, region_fn)
        inside = region.mask > 0
        for variant in per:
            frames = raw if variant == "as_is" else brightness_match(raw, region)
            sc, br = [], []
            for f in frames:
                preprocess(f, region, card, out=x)
                sc.append(float(eng.infer(x)[1][0]))
                br.append(float(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[inside].mean()))
            per[variant][s.path.name] = {"label": s.label, "scores": card.score_normalisation.apply(np.array(sc)),
                                         "brightness": np.array(br)}
        if progress:
            print(f"  [eval] {s.path.name} ({s.label}): mean score {per['as_is'][s.path.name]['scores'].mean():.2f}",
                  file=sys.stderr, flush=True)
    for variant, per_clip in per.items():
        neg = [c for c in per_clip.values() if c["label"] == "normal"]
        pos = [c for c in per_clip.values() if c["label"] != "normal"]
        out[variant] = {
            "frame_auroc": auroc(np.concatenate([c["scores"] for c in neg]), np.concatenate([c["scores"] for c in pos])),
            "clip_auroc": auroc([c["scores"].mean() for c in neg], [c["scores"].mean() for c in pos]),
            "brightness_frame_auroc": auroc(np.concatenate([c["brightness"] for c in neg]),
                                            np.concatenate([c["brightness"] for c in pos])),
            "brightness_clip_auroc": auroc([c["brightness"].mean() for c in neg], [c["brightness"].mean() for c in pos]),
            "frames_over_threshold": {k: round(float((c["scores"] > 1.0).mean()), 3) for k, c in per_clip.items()},
            "mean_score": {k: round(float(c["scores"].mean()), 3) for k, c in per_clip.items()},
        }
    out["clips"] = {s.path.name: {"label": s.label, "group": s.group} for s in srcs}
    out["measured_on"] = (f"{len(srcs)} clips (every {every}th frame, <= {max_frames_per_file} frames per clip, "
                          f"backend {eng.backend}); clip score = mean frame score; scores normalised by the card "
                          "(1.0 = image threshold); brightness = mean gray inside the scan region; brightness-matched = "
                          "each clip rescaled (one gain/offset per clip) to in-region mean 60 / std 40")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the default lung model
def read_manifest(data_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(data_dir) / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def measure_latency(model_dir: str | Path, backend: str = "onnxruntime", n: int = 200, **opts) -> dict[str, Any]:
    """Median / p95 ms per ``Engine.infer`` call on a realistic input (batch 1)."""
    from . import load

    eng = load(model_dir, backend=backend, **opts)
    h, w = eng.card.input_size
    x = np.zeros((1, eng.card.input.channels, h, w), np.float32)
    x[0, 0] = np.random.default_rng(0).standard_normal((h, w))
    if eng.card.input.channels > 1:
        x[0, 1] = 1.0
    for _ in range(10):
        eng.infer(x)
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        eng.infer(x)
        t.append(time.perf_counter() - t0)
    t = np.array(t) * 1e3
    return {"backend": eng.backend, "ms_median": round(float(np.median(t)), 2),
            "ms_p95": round(float(np.percentile(t, 95)), 2), "calls": n, "opts": {k: str(v) for k, v in opts.items()},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s) visible, shared"}


def clip_summary(model_dir: str | Path, sources: Sequence[Source], *, every: int = 4, max_frames_per_file: int | None = 150,
                 region_fn: Callable[[np.ndarray], ScanRegion] | None = None) -> dict[str, Any]:
    """Per clip: mean normalised score and the fraction of frames over the image threshold (ONNX Runtime)."""
    from . import load

    region_fn = region_fn or _default_region_fn()
    eng = load(model_dir, backend="onnxruntime")
    out = {}
    for s in sources:
        arr = load_tensors(s, eng.card, every=every, max_frames=max_frames_per_file, region_fn=region_fn)
        sc = eng.card.score_normalisation.apply(np.array([eng.infer(arr[i : i + 1])[1][0] for i in range(len(arr))]))
        out[s.path.name] = {"label": s.label, "mean_score": round(float(sc.mean()), 3),
                            "frames_over_threshold": round(float((sc > 1.0).mean()), 3), "frames": int(len(sc))}
    return out


def train_default_lung(data_dir: str | Path, out_dir: str | Path, *, family: str = "conv_ae",
                       holdout_group: str = "pocus_src14_patient4",
                       cross_check_groups: Sequence[str] = ("pocus_src30_patient118",),
                       seed: int = 0, progress: bool = True, evaluate: bool = True, **kw) -> ModelCard:
    """Rebuild the default lung model from the ultrasound data folder (the one holding ``MANIFEST.csv`` and
    ``videos/``): fit on the normal lung clips except ``holdout_group`` (one patient), choose normalisation and threshold
    on that held-out patient, then quick-check AUROC on the held-out normal + the abnormal clips.

    ``cross_check_groups``: for each, a throw-away model is trained holding out *that* normal group instead and
    evaluated the same way (a leave-one-patient/source-out check; the shipped model is not changed)."""
    import shutil
    import tempfile

    data_dir = Path(data_dir)
    rows = [r for r in read_manifest(data_dir) if r["organ"] == "lung" and r["kind"] == "video"]
    normal = [Source(data_dir / r["path"], r["group"], "normal") for r in rows if r["label"] == "normal"]
    abnormal = [Source(data_dir / r["path"], r["group"], "abnormal") for r in rows if r["label"] != "normal"]
    name = kw.pop("name", "lung-default")
    description = kw.pop("description", "Default lung ultrasound anomaly model (trained on normal clips only).")
    card = train(family, normal, out_dir, seed=seed, val_groups=[holdout_group], progress=progress, name=name,
                 description=description, **kw)
    if not evaluate:
        return card
    region_fn = kw.get("region_fn")

    def check(model_dir, group):
        t0 = time.time()
        ev = evaluate_quick(model_dir, [s for s in normal if s.group == group] + abnormal, progress=progress,
                            region_fn=region_fn)
        ev["seconds"] = round(time.time() - t0, 1)
        return ev

    ev = check(out_dir, holdout_group)
    ev["note"] = ("normal side = the held-out normal patient only (never fitted; it is also the patient the threshold "
                  "was chosen on) vs all 5 abnormal clips. Tiny sample (1 normal vs 5 abnormal clips): clip AUROC is "
                  "coarse, and the abnormal clips come from other sources/machines than most normal clips, so part of "
                  "the separation can be domain shift; see cross_check.")
    card.metrics["quick_check"] = _jsonable(ev)
    card.metrics["fitted_normal_clips"] = {
        "what": "the normal clips the model was fitted on (NOT held out: optimistic), scored with the shipped threshold",
        "clips": clip_summary(out_dir, [s for s in normal if s.group != holdout_group], region_fn=region_fn)}
    card.metrics["cross_check"] = {}
    for g in cross_check_groups:
        tmp = Path(tempfile.mkdtemp(prefix="sonomaly_xcheck_"))
        try:
            train(family, normal, tmp, seed=seed, val_groups=[g], progress=False, name=name, **kw)
            xe = check(tmp, g)
            card.metrics["cross_check"][g] = _jsonable({
                "what": f"throw-away model: same recipe, holding out normal group {g} instead "
                        "(threshold chosen on it, evaluated on it vs the 5 abnormal clips)",
                **{k: xe[k] for k in ("as_is", "brightness_matched", "measured_on")}})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    card.metrics["latency"] = {"onnxruntime_2_threads": measure_latency(out_dir, "onnxruntime", threads=2),
                               "onnxruntime_1_thread": measure_latency(out_dir, "onnxruntime", threads=1),
                               "torch": measure_latency(out_dir, "torch", n=50)}
    card.save(out_dir)
    return card


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return None
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else round(float(o), 4)
    if isinstance(o, np.integer):
        return int(o)
    return o


# ---------------------------------------------------------------------------------------------------------------------
# the shipped defaults (models/lung, models/breast), chosen from the detector benchmark
def label_size(bench: dict, label: str) -> int:
    """The input size benchmark ``label`` was trained and evaluated at (``settings.sizes`` of
    ``benchmarks/detectors.json``; files from before per-label sizes: ``settings.size``)."""
    st = bench.get("settings", {})
    return int(st.get("sizes", {}).get(label) or st.get("size") or 128)


def pick_best(bench: dict, dataset: str, max_ms: float = 10.0, size: int | None = None, tie: float = 0.01) -> str:
    """Best family label for ``dataset`` in ``benchmarks/detectors.json`` within the latency budget (ORT, 1 or 2
    threads) at the size the default will ship at: by default each label's own benchmark size (where its accuracy was
    measured; ``settings.sizes``), or one ``size`` for every label (the 256² numbers, or the ``at_size`` ones).

    breast: mean of image AUROC, pixel AUROC, Dice and peak hit rate; lung: mean of the brightness-matched frame and clip
    AUROC (the as-is numbers can be inflated by the brightness shortcut).  Candidates within ``tie`` of the best value
    count as equal (the split-to-split sd is far larger) and the fastest of them on one thread wins."""
    cands = []
    for key, r in bench.get("summary", {}).items():
        if r["dataset"] != dataset:
            continue
        if dataset == "lung" and r["variant"] != "brightness_matched":
            continue
        lat = bench.get("latency", {}).get(r["family"], bench.get("latency", {}).get(r["family"].split("+")[0], {}))
        at = size or label_size(bench, r["family"])
        if at != 256:
            if lat.get("at_size", {}).get("size") != at:
                continue  # not timed at that size: cannot say it fits
            lat = lat["at_size"]
        if min(lat.get("ms_1t", 0), lat.get("ms_2t", 0)) > max_ms:
            continue
        a = r["agg"]
        ks = ("image_auroc", "pixel_auroc", "dice", "peak_hit_rate") if dataset == "busi" else ("image_auroc", "clip_auroc")
        vals = [a[k]["mean"] for k in ks if a.get(k)]
        cands.append((float(np.mean(vals)) if vals else -1.0, float(lat.get("ms_1t", 0)), r["family"]))
    if not cands:
        raise ValueError(f"no benchmark results for {dataset}")
    best_v = max(c[0] for c in cands)
    return min((c for c in cands if c[0] >= best_v - tie), key=lambda c: (c[1], -c[0]))[2]


def _write_model_readme(out_dir: Path, card: ModelCard, organ: str, bench_rows: dict, notes: list[str]) -> None:
    t = card.threshold
    m = card.metrics
    lat = m.get("latency", {})
    fmt = lambda a: "—" if not a else f"{a['mean']:.3f} ± {a['sd']:.3f} (n={a['n']})"
    lines = [
        f"# Model card — `{card.name}` (Sonomaly default {organ} ultrasound anomaly model)", "",
        "**Not a medical device. A research/demo model trained on a few public images/clips; do not use it for diagnosis.**",
        "Machine-readable card: `card.json` (schema_version 1) — every number below is in it.", "",
        "## What it is",
        f"- **Family:** `{card.family}` (`sonomaly.engines.models`), config `{json.dumps(card.family_config)}`.",
        f"- {card.description}",
        f"- **Input:** `input` float32 `[1, {card.input.channels}, {card.input.size[0]}, {card.input.size[1]}]` — "
        "ch0 = grayscale crop of the scan-region bbox, z-scored per frame *inside the scan mask only* (0 outside, clipped "
        "to ±4); ch1 = the scan mask. Built by `sonomaly.engines.processing.preprocess` from this card.",
        f"- **Outputs:** `anomaly_map` `{card.map_shape}` and `score` `[1]`, raw; the card maps them so that 1.0 = threshold "
        f"(map low {card.map_normalisation.low:.4g} / high {card.map_normalisation.high:.4g}; score low "
        f"{card.score_normalisation.low:.4g} / high {card.score_normalisation.high:.4g}).",
        f"- **Files:** `model.onnx` ({(out_dir / 'model.onnx').stat().st_size / 1e6:.2f} MB, opset 17, static shapes), "
        f"`model.pt` ({(out_dir / 'model.pt').stat().st_size / 1e6:.2f} MB).", "",
        "## Threshold",
        f"{t['method']}, target FPR {t['target_fpr']}, chosen on held-out **normal** data only: "
        f"{t['chosen_on']['frames']} frames of groups {', '.join(t['chosen_on']['groups'])} (never fitted).", "",
        "## Training data",
        f"{card.training['frames']['fit']} fit frames / {card.training['frames']['held_out']} held-out normal frames "
        f"from {len(card.training['data'])} files (sha256 of each in `card.json` → `training.data`)"
        + (f"; lesions: {card.training['fit']['lesions']}" if card.training["fit"].get("lesions") else "") + "; seed "
        f"{card.training['seed']}, {card.training['fit'].get('steps')} steps, {card.training['seconds']['total']} s on "
        f"{card.training['threads']} thread(s). Licences and citations: `LICENSES.md` of the project's ultrasound data folder "
        "(lung: POCUS dataset, CC BY 4.0 / 2.0 per clip; breast: BUSI, Al-Dhabyani et al. 2020, licence caveat there).", "",
        "## Measured (benchmark, group-aware splits, mean ± sd over seeds; `benchmarks/detectors.md`)",
        f"The benchmark retrains this family per split at {m.get('benchmark', {}).get('size', '?')}² and evaluates on "
        "groups never fitted nor used for the threshold; the shipped model itself was fitted at "
        f"{card.input.size[0]}² on all the training groups, so these numbers describe the recipe, not this exact file. "
        "Targets of issue 3 for the best family: BUSI image AUROC ≥ 0.92, pixel AUROC ≥ 0.85, Dice ≥ 0.40, peak hit "
        "≥ 70 %; lung (brightness-matched) clip AUROC 1.0, frame AUROC ≥ 0.90 — **not reached** where the table is "
        "below them.", "",
        "| split | image/frame AUROC | image AP | clip AUROC | pixel AUROC | AUPRO | Dice | peak hit | brightness AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, a in bench_rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt(a.get(k)) for k in (
            "image_auroc", "image_ap", "clip_auroc", "pixel_auroc", "aupro", "dice", "peak_hit_rate", "brightness_auroc")) + " |")
    qc = m.get("quick_check")
    if qc:
        a, b = qc.get("as_is", {}), qc.get("brightness_matched", {})
        lines += ["", "Quick check of *this file* (held-out normal patient `pocus_src14_patient4` — also the threshold "
                  "patient — vs the 5 abnormal clips; optimistic, tiny): frame / clip AUROC as is "
                  f"{a.get('frame_auroc')} / {a.get('clip_auroc')}, brightness-matched {b.get('frame_auroc')} / "
                  f"{b.get('clip_auroc')} (brightness-only frame AUROC {a.get('brightness_frame_auroc')} → "
                  f"{b.get('brightness_frame_auroc')} after matching)."]
    if lat:
        where = m.get("latency_cpu") or "this shared 2-core CPU"  # the machine it was trained and timed on
        lines += ["", f"Latency (`Engine.infer`, batch 1, {where}): " + "; ".join(
            f"{k}: {v['ms_median']} ms median (p95 {v['ms_p95']})" for k, v in lat.items()) + "."]
    lines += ["", "## Limitations"] + [f"- {n}" for n in notes]
    lines += ["", "## Evaluate", "```sh",
              f".venv/bin/sonomaly evaluate --model models/{organ} --data DIR --json out.json --report out_dir"
              "   # DIR: normal/ abnormal/ [masks/]", "```"]
    lines += ["", "## Rebuild", "```sh",
              "flock /tmp/sonomaly-cpu.lock .venv/bin/sonomaly bench detectors --data $DATA "
              "--json benchmarks/detectors.json",
              ".venv/bin/python -c \"from sonomaly.engines.train import train_defaults; "
              f"train_defaults('$DATA', 'benchmarks/detectors.json', organs=('{organ}',))\"   # DATA: the ultrasound "
              "data folder", "```"]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def train_defaults(data_dir: str | Path, bench_json: str | Path, *, repo: str | Path | None = None,
                   organs: Sequence[str] = ("breast", "lung"), size: int | None = None, seed: int = 0,
                   progress: bool = True, max_seconds: float = 840.0) -> dict[str, str]:
    """Train the benchmark's best family per organ on all training data and write ``models/<organ>``.

    ``size``: one input size for every organ; by default each default ships at the size its benchmark label was
    trained and evaluated at (its accuracy was measured there), and the label is the best one that fits the latency
    budget at that size (:func:`pick_best`)."""
    import math
    import shutil
    import tempfile

    data_dir = Path(data_dir)
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    bench = json.loads(Path(bench_json).read_text())
    from sonomaly.tools.bench_detectors import STEPS, family_config

    rows = read_manifest(data_dir)
    chosen = {}
    fixed_size = size
    for organ in organs:
        ds = "busi" if organ == "breast" else "lung"
        label = pick_best(bench, ds, size=fixed_size)
        size = fixed_size or label_size(bench, label)
        fam = label.split("+")[0]
        # the configuration the benchmark ran under this label (a tagged variant may override the family's defaults)
        cfg = bench.get("settings", {}).get("configs", {}).get(label, {}).get(ds) or family_config(fam, ds)
        if organ == "breast":
            imgs = [r for r in rows if r["organ"] == "breast" and r["kind"] == "image"]
            groups = sorted({r["group"] for r in imgs if r["label"] == "normal"})
            rng = np.random.default_rng(seed)
            rng.shuffle(groups)
            val = groups[: max(1, round(0.15 * len(groups)))]
            data = [Source(data_dir / r["path"], r["group"], "normal" if r["label"] == "normal" else "abnormal")
                    for r in imgs if r["label"] == "normal" or uses_abnormal(fam, cfg)]
            every, maxf, n_est = 1, None, len([d for d in data if d.label == "normal"])
        else:
            vids = [r for r in rows if r["organ"] == "lung" and r["kind"] == "video" and r["label"] == "normal"]
            data = [Source(data_dir / r["path"], r["group"]) for r in vids]
            val = ["pocus_src14_patient4"]
            every, maxf, n_est = 4, 150, 300
        steps = bench.get("settings", {}).get("steps", {}).get(label, STEPS.get(fam, 100))
        epochs = None if steps == 0 else max(1, math.ceil(steps / max(1, math.ceil(n_est / 16))))
        tmp = Path(tempfile.mkdtemp(prefix=f"sonomaly_{organ}_"))
        desc = (f"Default {organ} ultrasound anomaly model: family {fam} (benchmark label {label}), the best of the "
                f"detector benchmark for "
                f"{'BUSI breast images' if organ == 'breast' else 'lung clips (brightness-matched)'}.")
        card = train(fam, data, tmp, size=size, epochs=epochs, seed=seed, val_groups=val, every=every,
                     max_frames_per_file=maxf, family_config=cfg, progress=progress, name=f"{organ}-default",
                     description=desc, max_seconds=max_seconds)
        summ = bench.get("summary", {})
        bench_rows = {}
        for key, r in summ.items():
            if r["dataset"] == ds and r["family"] == label:
                bench_rows[r["dataset_label"]] = r["agg"]
        card.metrics["benchmark"] = {"what": "benchmarks/detectors.json summary for this family (retrained per split)",
                                     "size": label_size(bench, label), "rows": bench_rows}
        if organ == "lung":
            normal = [Source(data_dir / r["path"], r["group"], "normal") for r in rows
                      if r["organ"] == "lung" and r["kind"] == "video" and r["label"] == "normal"]
            abnormal = [Source(data_dir / r["path"], r["group"], "abnormal") for r in rows
                        if r["organ"] == "lung" and r["kind"] == "video" and r["label"] != "normal"]
            ev = evaluate_quick(tmp, [s for s in normal if s.group in val] + abnormal, progress=False,
                                region_fn=_default_region_fn())
            ev["note"] = ("held-out normal patient (also the threshold patient) vs the 5 abnormal clips; tiny sample; "
                          "the family was chosen on the benchmark, which uses these clips")
            card.metrics["quick_check"] = _jsonable(ev)
            card.metrics["fitted_normal_clips"] = {
                "what": "normal clips the model was fitted on (NOT held out: optimistic), with the shipped threshold",
                "clips": clip_summary(tmp, [s for s in normal if s.group not in val], region_fn=_default_region_fn())}
        card.metrics["latency"] = {"onnxruntime_2_threads": measure_latency(tmp, "onnxruntime", threads=2, n=100),
                                   "onnxruntime_1_thread": measure_latency(tmp, "onnxruntime", threads=1, n=100)}
        from sonomaly.tools.machine import cpu_fields, cpu_label

        card.metrics["latency_cpu"] = f"{cpu_label(cpu_fields())}, {os.cpu_count()} cores"
        card.save(tmp)
        notes = _default_notes(card, organ, fam)
        dest = repo / "models" / organ
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("model.onnx", "model.pt", "card.json"):
            shutil.copy2(tmp / f, dest / f)
        _write_model_readme(dest, card, organ, bench_rows, notes)
        shutil.rmtree(tmp, ignore_errors=True)
        chosen[organ] = label
        _progress(f"[defaults] {organ}: {fam} -> {dest}", progress)
    return chosen


def _default_notes(card: ModelCard, organ: str, fam: str) -> list[str]:
    notes = ["Trained from scratch on a small public set; the benchmark's sd shows how much results move between "
             "splits. Abnormal test data come partly from other sources/machines than the normals (domain shift).",
             "The scan region used in training/evaluation removes burned-in text and calipers and inpaints them on still "
             "images (`engines.regions`); the live pipeline uses `stream.roi` only, so burned-in marks can still draw "
             "some heat live."]
    if organ == "lung" and "fitted_normal_clips" in card.metrics:
        fo = card.metrics["fitted_normal_clips"]["clips"]
        notes.append("Threshold chosen on one convex patient (`pocus_src14_patient4`); frames over it on the *fitted* "
                     "normal clips: " + ", ".join(f"{k} {v['frames_over_threshold']:.0%}" for k, v in fo.items()) +
                     ". Linear-probe normals score over the threshold: treat linear-probe scores as uncalibrated "
                     "(no held-out linear normal patient exists to calibrate on).")
        notes.append("In the benchmark, the split whose test normal patient includes the linear-probe clips "
                     "(`pocus_src14_patient10`) fails for every family (frame AUROC ~0.5 or below): the fit data hold no "
                     "linear normals then. The map follows bright near-field speckle as much as B-lines.")
    if fam in SUPERVISED and organ == "breast":
        notes.append("Supervised on BUSI image labels (all abnormal images of the data); its benchmark numbers come "
                     "from group-disjoint halves.")
    if fam == "draem" and (int(card.family_config.get("members", 1)) > 1 or card.family_config.get("tta_flip")):
        n = int(card.family_config.get("members", 1))
        views = 2 if card.family_config.get("tta_flip") else 1
        notes.append(f"An ensemble: {n} U-Net(s), each trained from its own initialisation, whose lesion probabilities "
                     f"are averaged{' over the frame and its mirror image' if views == 2 else ''} ({n * views} passes "
                     f"per frame). At {card.input_size[0]}² input the map has {card.map_shape[-2]}×{card.map_shape[-1]} "
                     "cells, upsampled and smoothed for display: outlines are coarse.")
    if fam == "draem" and card.family_config.get("context"):
        where = "the scan's" if card.family_config.get("context_pool") == "scan" else "the frame's"
        notes.append(f"Frame context: each U-Net adds {where} mean bottleneck feature to every cell, so a cell's "
                     "value also depends on the rest of the scan; the heat on a finding can shift a little when the "
                     "rest of the frame changes (probe moved, depth or gain changed) although the finding did not.")
    if fam == "draem":
        harder = (float(card.family_config.get("synth_iso", 0) or 0) > 0
                  or float(card.family_config.get("synth_surface", 0) or 0) > 0)
        notes.append("The map is the probability of a synthetic-style lesion: it localises dark, well-defined masses "
                     "best and misses large isoechoic or heterogeneous masses and small lesions at the skin line "
                     + ("(benchmarks/detectors.md, failure analysis; its synthetic lesions include such masses, "
                        f"shares synth_iso {card.family_config.get('synth_iso', 0)} / synth_surface "
                        f"{card.family_config.get('synth_surface', 0)}; the benchmark says how much they help); " if harder else "(benchmarks/detectors.md, failure analysis); ")
                     + "the threshold is floored at probability 0.5 "
                     "(held-out normal maps rarely reach it), so it flags few normal frames and misses many findings: "
                     "read a cold map as \"no dark mass found\", not as \"normal\".")
    for label, a in card.metrics.get("benchmark", {}).get("rows", {}).items():
        sens, fpr = a.get("sens_at_threshold"), a.get("fpr_at_threshold")
        if sens and fpr:
            notes.append(f"At its threshold, on the benchmark ({label}, {sens['n']} splits, `benchmarks/detectors.md`, "
                         f"column *at the threshold*), the recipe flagged {sens['mean']:.0%} of the abnormal test "
                         f"{'images' if organ == 'breast' else 'frames'} and {fpr['mean']:.0%} of the normal ones.")
    if fam == "draem":
        if float(card.family_config.get("real_p", 0) or 0) > 0:
            notes.append("Besides synthetic lesions it learned from the lesion masks of the BUSI abnormal images it was "
                         "given (as they are, and pasted onto normal frames): it is no longer trained on normal data "
                         "only, so its benchmark numbers come from abnormal groups disjoint from the fitted ones, and "
                         "lesions unlike BUSI's (other organs, other machines) are covered by the synthesis alone. The "
                         "threshold is still chosen on held-out normal images only.")
    return notes


def rewrite_readme(organ: str, bench_json: str | Path, repo: str | Path | None = None) -> Path:
    """Regenerate ``models/<organ>/README.md`` from its card (and the benchmark rows stored in it)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    d = repo / "models" / organ
    card = ModelCard.load(d)
    rows = card.metrics.get("benchmark", {}).get("rows", {})
    _write_model_readme(d, card, organ, rows, _default_notes(card, organ, card.family))
    return d / "README.md"
