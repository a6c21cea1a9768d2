"""Export a model directory to deployable ONNX variants, with an accuracy gate for INT8.

``export(model_dir)`` writes, next to ``card.json`` (or into ``out_dir``):

* ``model.onnx``        FP32, opset >= 17, static batch-1 shapes (kept as is when already valid, unless ``force``);
* ``model.b{N}.onnx``   FP32, static batch-N (several streams in one call);
* ``model.fp16.onnx``   FP16 weights and maths, float32 inputs/outputs (``--fp16``; for GPUs: ORT CUDA / TensorRT);
* ``model.int8.onnx``   static QDQ INT8 (``--int8 --calib DIR``): ONNX Runtime ``quantize_static`` calibrated on
  *normal* frames preprocessed exactly as the pipeline does (``stream.roi.detect_scan_region`` + ``processing.preprocess``).
  It is kept only if, on validation data against FP32, the image AUROC drops by <= 1 point, the pixel AUROC by <= 2
  points, the image scores keep their order (Spearman rho >= 0.99) and 99.9 % of the map cells move by <= half the
  card's normal-to-threshold span; otherwise the file is removed, FP32 is what runs, and the card says so.

Every file is checked with ``onnx.checker`` (full check).  Normalisation and thresholds stay in ``card.json``, never
in a graph.  The card records the variants in ``files`` (``onnx``, ``onnx_batch``, ``onnx_fp16``, ``onnx_int8``), their
sha256, and the gate in ``metrics.export``.

Validation data (``val``): labelled clips (``normal`` in the file name = normal, anything else abnormal; default: the
bundled ``data/demo`` clips).  Image AUROC = frame scores, normal vs abnormal frames.  There is no pixel ground truth
for real clips, so the pixel AUROC is measured on synthetic lesions (bright and dark discs of known position drawn
into the normal validation frames before preprocessing): map cells covered by a lesion vs the other cells inside the
scan.  Structured pruning is not done (see docs/ENGINES.md: the default models are already ~0.1 M parameters).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from .card import ModelCard

MIN_OPSET = 17
DEFAULT_BATCH = 4
INT8_MAX_IMAGE_AUROC_DROP = 0.01  # 1 point
INT8_MAX_PIXEL_AUROC_DROP = 0.02  # 2 points
INT8_MIN_SCORE_RHO = 0.99  # Spearman rho of the image scores vs FP32
INT8_MAX_MAP_P999 = 0.5  # 99.9th percentile of the map cells' |change|, in units of the card's normal-to-threshold span
REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data" / "demo"
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PRECISIONS = ("fp32", "fp16", "int8")
# ``card.files`` key of each precision's ONNX file
FILE_KEYS = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}


class ExportError(RuntimeError):
    """The export could not be done (missing files, bad calibration data...); the message says what to do."""


def _log(msg: str, on: bool) -> None:
    if on:
        print(f"[export] {msg}", file=sys.stderr, flush=True)


def sha256(path: str | Path) -> str:
    from .train import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------------------------------------------------------------
# torch -> ONNX
def rebuild_torch(model_dir: str | Path, card: ModelCard, size: int | Sequence[int] | None = None):
    """The card's torch module with its weights; ``size`` rebuilds it for another input size (conv weights carry over;
    size-dependent buffers, e.g. band weights, are recomputed).  Returns ``(module, card_for_that_size)``."""
    import torch

    from .models import build

    model_dir = Path(model_dir)
    pt = model_dir / card.files.get("torch", "model.pt")
    if not pt.exists():
        raise ExportError(f"{pt}: torch weights missing (export rebuilds the graph from model.pt)")
    cfg = dict(card.family_config)
    card = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))  # a copy
    if size is not None:
        hw = [int(size), int(size)] if isinstance(size, int) else [int(size[0]), int(size[1])]
        cfg["size"] = hw
    module = build(card.family, **cfg)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    own = module.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(keep))
    if skipped and size is None:
        raise ExportError(f"{pt}: weights do not fit family {card.family!r} {card.family_config}: {skipped}")
    module.load_state_dict(keep, strict=False)
    module.eval()
    if size is not None:
        with torch.no_grad():
            amap, _ = module(torch.zeros(1, card.input.channels, *hw))
        card.input.size = hw
        card.family_config = {**card.family_config, "size": hw}
        card.outputs = {**card.outputs, "anomaly_map": {**card.outputs["anomaly_map"], "shape": list(amap.shape)}}
    return module, card


def export_onnx(module, path: str | Path, card: ModelCard, *, batch: int = 1, opset: int = MIN_OPSET) -> Path:
    """Trace ``module`` to ONNX with static ``[batch, C, H, W]`` input and the card's tensor names; checked."""
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}")
    path = Path(path)
    h, w = card.input_size
    x = torch.zeros(batch, card.input.channels, h, w)
    x[:, 0] = torch.randn(batch, h, w, generator=torch.Generator().manual_seed(0))
    if card.input.channels >= 2:
        x[:, 1] = 1.0
    with warnings.catch_warnings():  # TorchScript exporter (needs no onnxscript); static shapes: tracer warnings moot
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=[card.input_name],
                          output_names=[card.map_output, card.score_output], opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    check_onnx(path, batch=batch, card=card)
    return path


def check_onnx(path: str | Path, *, batch: int = 1, card: ModelCard | None = None) -> dict[str, Any]:
    """``onnx.checker`` (full) + opset >= 17 + static input shape ``[batch, C, H, W]``; returns a summary."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ExportError(f"{path}: opset {opset} < {MIN_OPSET}")
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if any(d is None for d in dims):
        raise ExportError(f"{path}: input {inp.name} has a dynamic shape {dims}; export static shapes")
    if dims[0] != batch:
        raise ExportError(f"{path}: batch {dims[0]} != {batch}")
    if card is not None and dims[1:] != [card.input.channels, *card.input_size]:
        raise ExportError(f"{path}: input {dims} does not match the card {[card.input.channels, *card.input_size]}")
    return {"opset": int(opset), "input": dims, "bytes": Path(path).stat().st_size}


# ---------------------------------------------------------------------------------------------------------------------
# FP16
def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and activations, float32 graph inputs/outputs (casts at the edges); checked."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16" notes for tiny weights
        m16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(m16.graph)  # the converter appends the input casts at the end of the node list
    onnx.save(m16, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return Path(dst)


def _toposort(graph) -> None:
    """Sort ``graph.node`` topologically in place (stable: keeps the original order where it is already valid)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes, done = list(graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in known for i in n.input):
                done.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise ExportError(f"graph has a cycle or a dangling input at {rest[0].name}")
        nodes = rest
    del graph.node[:]
    graph.node.extend(done)


# ---------------------------------------------------------------------------------------------------------------------
# data: normal frames for calibration, labelled clips for validation, preprocessed exactly like the pipeline
def media_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Videos and images in the given files / folders (sorted, recursive for folders)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXT | IMAGE_EXT)
        elif p.exists():
            out.append(p)
        else:
            raise ExportError(f"{p}: no such file or folder")
    return out


_FRAME_CACHE: dict[tuple, tuple[list, Any]] = {}


def frames_and_region(path: Path, *, every: int, max_frames: int | None, offset: int = 0):
    """BGR frames ``offset, offset + every, ...`` (at most ``max_frames``) of one clip/image and its scan region
    (``detect_scan_region`` on the max of up to 16 frames, as in training).  The last few results are cached."""
    from sonomaly.stream.roi import detect_scan_region

    from .train import clip_region, read_frames

    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, every, max_frames, offset)
    if key in _FRAME_CACHE:
        return _FRAME_CACHE[key]
    cap = None if not max_frames else offset + every * max_frames
    frames = read_frames(path, 1, cap)
    if path.suffix.lower() not in IMAGE_EXT:  # a still image is its own single frame
        frames = frames[offset::every]
    if max_frames:
        frames = frames[:max_frames]
    if not frames:
        raise ExportError(f"{path}: no frames at offset {offset} / every {every}")
    out = (frames, clip_region(frames, detect_scan_region))
    while len(_FRAME_CACHE) >= 8:
        _FRAME_CACHE.pop(next(iter(_FRAME_CACHE)))
    _FRAME_CACHE[key] = out
    return out


def preprocessed(paths, card: ModelCard, *, every: int = 4, max_frames: int | None = 60, offset: int = 0,
                 max_total: int | None = None) -> np.ndarray:
    """``[N, C, H, W]`` float32 inputs of the frames in ``paths``, preprocessed like the pipeline."""
    from .processing import preprocess

    files = media_files(paths)
    if not files:
        raise ExportError(f"no videos or images in {paths}")
    arrs = []
    for f in files:
        frames, region = frames_and_region(f, every=every, max_frames=max_frames, offset=offset)
        a = np.empty((len(frames), card.input.channels, *card.input_size), np.float32)
        for i, fr in enumerate(frames):
            preprocess(fr, region, card, out=a[i : i + 1])
        arrs.append(a)
    out = np.concatenate(arrs)
    return out[:max_total] if max_total else out


class FrameCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over preprocessed normal frames, one batch-1 input per ``get_next``."""

    def __init__(self, tensors: np.ndarray, input_name: str = "input"):
        if tensors.ndim != 4 or len(tensors) == 0:
            raise ExportError(f"calibration tensors must be [N,C,H,W] with N > 0, got {tensors.shape}")
        self.tensors = np.ascontiguousarray(tensors, np.float32)
        self.input_name = input_name
        self._i = 0

    def get_next(self):
        if self._i >= len(self.tensors):
            return None
        x = self.tensors[self._i : self._i + 1]
        self._i += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.tensors)


def ort_calibration_reader(tensors: np.ndarray, input_name: str = "input") -> FrameCalibrationReader:
    """:class:`FrameCalibrationReader` that is also an ``onnxruntime.quantization.CalibrationDataReader``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FrameCalibrationReader, CalibrationDataReader):
        pass

    return _Reader(tensors, input_name)


def quantize_int8(src: str | Path, dst: str | Path, calib: np.ndarray, *, input_name: str = "input",
                  per_channel: bool = True, op_types: Sequence[str] | None = ("Conv",),
                  keep_edges_fp32: bool = True, method: str = "minmax") -> Path:
    """Static QDQ INT8 (weights int8 per channel, activations uint8), calibrated on ``calib`` ``[N,C,H,W]``.
    Only ``op_types`` are quantized (default: convolutions; the top-k/mask tail stays FP32), and with
    ``keep_edges_fp32`` the first and the last convolution stay FP32: the first sees the raw z-scored image and the
    last produces what the map is computed from (a reconstruction, a distance), and ranges calibrated on normal frames
    clip exactly the abnormal values the map is about (measured on the lung model: map max |d| vs FP32 1.62 -> 0.50,
    p99.9 1.28 -> 0.10 raw).  Dynamic INT8 is never used (measured ~10x slower on convolutions here)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
            exclude = sorted({convs[0], convs[-1]}) if keep_edges_fp32 and len(convs) > 2 else []
            quantize_static(str(pre), str(dst), ort_calibration_reader(calib, input_name),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel,
                            op_types_to_quantize=list(op_types) if op_types else None,
                            nodes_to_exclude=exclude, calibrate_method=methods[method],
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    import onnx

    onnx.checker.check_model(str(dst), full_check=True)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# validation: image AUROC on labelled clips, pixel AUROC on synthetic lesions
def fast_auroc(neg, pos) -> float:
    """Mann-Whitney AUROC with ties counted half (vectorised; same definition as ``train.auroc``)."""
    neg = np.asarray(neg, np.float64).ravel()
    pos = np.asarray(pos, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each unique value
    rp = avg_rank[inv[len(neg):]].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def label_of(path: Path) -> int:
    """0 = normal (``normal`` in the file name), 1 = abnormal."""
    return 0 if "normal" in path.name.lower() else 1


@dataclass
class ValidationSet:
    """Preprocessed validation inputs: ``x`` with frame ``labels`` (image AUROC), and ``lesion_x`` (normal frames with
    synthetic discs) with ``lesion_masks`` (bool, map resolution) and ``cell_masks`` (map cells inside the scan)."""

    x: np.ndarray
    labels: np.ndarray
    lesion_x: np.ndarray
    lesion_masks: np.ndarray
    cell_masks: np.ndarray
    files: list[str]

    def summary(self) -> dict[str, Any]:
        return {"files": self.files, "frames": int(len(self.x)), "normal_frames": int((self.labels == 0).sum()),
                "abnormal_frames": int((self.labels == 1).sum()), "lesion_frames": int(len(self.lesion_x)),
                "image_labels": "file name contains 'normal' -> normal, else abnormal",
                "pixel_labels": "synthetic bright/dark discs (r = 4-7 % of the scan width) drawn into normal frames"}


def _map_hw(card: ModelCard) -> tuple[int, int]:
    return int(card.map_shape[-2]), int(card.map_shape[-1])


def _cells_inside(x: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    m = x[:, 1] if x.shape[1] >= 2 else (x[:, 0] != 0).astype(np.float32)
    n, H, W = m.shape
    h, w = map_hw
    return m.reshape(n, h, H // h, w, W // w).mean((2, 4)) > 0.5


def validation_set(card: ModelCard, clips=None, *, every: int = 4, max_frames: int = 40, offset: int = 2,
                   lesions_per_frame: int = 2, seed: int = 0) -> ValidationSet:
    from .processing import preprocess

    clips = media_files(clips if clips is not None else DEMO_DIR)
    if not clips:
        raise ExportError("no validation clips")
    labels_present = {label_of(c) for c in clips}
    if labels_present != {0, 1}:
        raise ExportError(f"validation needs normal and abnormal clips ('normal' in the file name = normal): {clips}")
    rng = np.random.default_rng(seed)
    map_hw = _map_hw(card)
    xs, labels, lx, lm = [], [], [], []
    for c in clips:
        frames, region = frames_and_region(c, every=every, max_frames=max_frames, offset=offset)
        for f in frames:
            xs.append(preprocess(f, region, card))
            labels.append(label_of(c))
        if label_of(c):
            continue
        bx, by, bw, bh = region.bbox
        ys, xs_in = np.nonzero(region.mask)
        for f in frames:
            img = f.copy()
            lesion = np.zeros(region.mask.shape, np.uint8)
            for _ in range(lesions_per_frame):
                j = rng.integers(len(ys))
                r = int(max(3, rng.uniform(0.04, 0.07) * bw))
                val = 235 if rng.random() < 0.5 else 5
                cv2.circle(img, (int(xs_in[j]), int(ys[j])), r, (val, val, val), -1)
                cv2.circle(lesion, (int(xs_in[j]), int(ys[j])), r, 255, -1)
            lesion &= region.mask
            xl = preprocess(img, region, card)
            small = cv2.resize(region.crop(lesion).astype(np.float32) / 255.0, (map_hw[1], map_hw[0]),
                               interpolation=cv2.INTER_AREA) > 0.5
            lx.append(xl)
            lm.append(small)
    x = np.concatenate(xs)
    lesion_x = np.concatenate(lx)
    return ValidationSet(x, np.array(labels), lesion_x, np.stack(lm), _cells_inside(lesion_x, map_hw),
                         [c.name for c in clips])


def run_all(infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray):
    """Batch-1 inference over ``x`` -> (maps ``[N,h,w]``, scores ``[N]``)."""
    maps, scores = [], []
    for i in range(len(x)):
        m, s = infer(x[i : i + 1])
        maps.append(np.asarray(m, np.float32).reshape(np.shape(m)[-2:]))
        scores.append(float(np.asarray(s).reshape(-1)[0]))
    return np.stack(maps), np.array(scores)


def evaluate(infer, val: ValidationSet) -> dict[str, Any]:
    """Image AUROC (real clips), pixel AUROC (synthetic lesions) and the raw outputs (for comparisons)."""
    maps, scores = run_all(infer, val.x)
    lmaps, _ = run_all(infer, val.lesion_x)
    inside = val.cell_masks
    pos = lmaps[inside & val.lesion_masks]
    neg = lmaps[inside & ~val.lesion_masks]
    return {"image_auroc": fast_auroc(scores[val.labels == 0], scores[val.labels == 1]),
            "pixel_auroc": fast_auroc(neg, pos), "maps": maps, "scores": scores, "lesion_maps": lmaps}


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(np.asarray(a), kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b), kind="stable"), kind="stable").astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """Accuracy change of ``other`` vs ``ref`` (both from :func:`evaluate`)."""
    d = np.abs(other["maps"] - ref["maps"])
    return {"map_max_abs_diff": float(d.max()), "map_p999_abs_diff": float(np.quantile(d, 0.999)), "map_max_rel_diff": float(d.max() / max(1e-12, np.abs(ref["maps"]).max())),
            "score_max_abs_diff": float(np.abs(other["scores"] - ref["scores"]).max()),
            "score_spearman": spearman(ref["scores"], other["scores"]),
            "image_auroc": other["image_auroc"], "pixel_auroc": other["pixel_auroc"],
            "image_auroc_change": other["image_auroc"] - ref["image_auroc"],
            "pixel_auroc_change": other["pixel_auroc"] - ref["pixel_auroc"]}


def int8_gate(ref: dict[str, Any], q: dict[str, Any], *, max_image_drop: float = INT8_MAX_IMAGE_AUROC_DROP,
              max_pixel_drop: float = INT8_MAX_PIXEL_AUROC_DROP, min_score_rho: float = INT8_MIN_SCORE_RHO,
              max_map_p999: float = INT8_MAX_MAP_P999, map_span: float | None = None,
              comparison: dict[str, float] | None = None) -> dict[str, Any]:
    """Keep INT8 only if image AUROC drops <= ``max_image_drop`` and pixel AUROC <= ``max_pixel_drop`` (fractions)
    and, where both sides carry their maps and scores (:func:`evaluate`), the maps and the ranking stay put: the
    scores' Spearman rho >= ``min_score_rho`` and the 99.9th percentile of the map cells' |change| <=
    ``max_map_p999`` of ``map_span`` (the card's normal-median-to-threshold span, raw units; 1 if not given).  An
    AUROC alone can pass while the heatmap moves by most of the threshold on the frames that matter.  ``comparison``:
    :func:`compare` of the two, where the caller already has it."""
    di = ref["image_auroc"] - q["image_auroc"]
    dp = ref["pixel_auroc"] - q["pixel_auroc"]
    ok = bool(np.isfinite(di) and np.isfinite(dp) and di <= max_image_drop + 1e-12 and dp <= max_pixel_drop + 1e-12)
    why = (f"image AUROC {ref['image_auroc']:.4f} -> {q['image_auroc']:.4f} (drop {100 * di:.2f} pt, max "
           f"{100 * max_image_drop:.0f}), pixel AUROC {ref['pixel_auroc']:.4f} -> {q['pixel_auroc']:.4f} "
           f"(drop {100 * dp:.2f} pt, max {100 * max_pixel_drop:.0f})")
    out: dict[str, Any] = {}
    if all(k in d for d in (ref, q) for k in ("maps", "scores")):
        c = comparison or compare(ref, q)
        span = float(map_span) if map_span and map_span > 0 else 1.0
        rel = c["map_p999_abs_diff"] / span
        rho = c["score_spearman"]
        ok = ok and bool(np.isfinite(rho) and rho >= min_score_rho and np.isfinite(rel) and rel <= max_map_p999)
        why += (f", score rho {rho:.4f} (min {min_score_rho}), map p99.9 |change| {rel:.2f} of the threshold span "
                f"(max {max_map_p999})")
        out = {"score_rho": rho, "map_p999_of_span": rel, "map_span": span, "min_score_rho": min_score_rho,
               "max_map_p999": max_map_p999}
    return {"accepted": ok, "reason": ("accepted: " if ok else "rejected, FP32 is used instead: ") + why,
            "fp32": {"image_auroc": ref["image_auroc"], "pixel_auroc": ref["pixel_auroc"]},
            "int8": {"image_auroc": q["image_auroc"], "pixel_auroc": q["pixel_auroc"]},
            "max_image_drop": max_image_drop, "max_pixel_drop": max_pixel_drop, **out}


def ort_infer(path: str | Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    return lambda x: tuple(sess.run(outs, {name: np.ascontiguousarray(x, np.float32)}))


# ---------------------------------------------------------------------------------------------------------------------
# the whole export
def export(model_dir: str | Path, out_dir: str | Path | None = None, *, fp16: bool = False, int8: bool = False,
           calib=None, val=None, batch: int = DEFAULT_BATCH, size: int | Sequence[int] | None = None,
           force: bool = False, opset: int = MIN_OPSET, calib_frames: int = 64,
           max_image_drop: float = INT8_MAX_IMAGE_AUROC_DROP, max_pixel_drop: float = INT8_MAX_PIXEL_AUROC_DROP,
           keep_rejected: bool = False, val_frames: int = 40, progress: bool = True) -> dict[str, Any]:
    """Export ``model_dir`` (see the module doc). ``size`` re-exports at another input size (``out_dir`` required).
    ``keep_rejected`` keeps an INT8 file that failed the gate as ``model.int8.rejected.onnx`` (for benchmarks; the
    card never points at it).  Returns the report that is also stored in the card under ``metrics.export``."""
    t0 = time.time()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    card = ModelCard.load(model_dir)
    if size is not None and out_dir.resolve() == model_dir.resolve():
        raise ExportError("exporting at another size needs --out (the card's size would change)")
    if int8 and calib is None:
        raise ExportError("--int8 needs --calib DIR (normal clips or images to calibrate on)")
    out_dir.mkdir(parents=True, exist_ok=True)
    module, card = rebuild_torch(model_dir, card, size)
    same = out_dir.resolve() == model_dir.resolve()
    if not same:
        import torch

        torch.save(module.state_dict(), out_dir / "model.pt")
        card.files = {"onnx": "model.onnx", "torch": "model.pt"}
    report: dict[str, Any] = {"opset": opset, "batch_n": batch, "variants": {}}

    # FP32 batch-1
    f32 = out_dir / card.files.get("onnx", "model.onnx")
    reuse = same and f32.exists() and not force
    if reuse:
        try:
            info = check_onnx(f32, batch=1, card=card)
            _log(f"{f32.name}: kept (valid, opset {info['opset']}, static {info['input']})", progress)
        except Exception as e:
            _log(f"{f32.name}: re-exporting ({e})", progress)
            reuse = False
    if not reuse:
        export_onnx(module, f32, card, batch=1, opset=opset)
        info = check_onnx(f32, batch=1, card=card)
        _log(f"{f32.name}: exported (opset {info['opset']}, static {info['input']})", progress)
    report["variants"]["fp32"] = {"file": f32.name, **info}
    if not reuse:  # variants derived from an older model.onnx are stale unless rebuilt below
        for key, wanted in (("onnx_fp16", fp16), ("onnx_int8", int8)):
            if not wanted and card.files.pop(key, None):
                _log(f"dropped the stale {key} entry (model.onnx was re-exported)", progress)
    # FP32 batch-N
    if batch and batch > 1:
        fb = out_dir / f"model.b{batch}.onnx"
        export_onnx(module, fb, card, batch=batch, opset=opset)
        report["variants"][f"fp32_b{batch}"] = {"file": fb.name, **check_onnx(fb, batch=batch, card=card)}
        card.files["onnx_batch"] = fb.name
        _log(f"{fb.name}: exported (static batch {batch})", progress)
    val_set = ref = None

    def _val():
        nonlocal val_set, ref
        if val_set is None:
            val_set = validation_set(card, val, max_frames=val_frames)
            ref = evaluate(ort_infer(f32), val_set)
            report["validation"] = {**val_set.summary(), "fp32": {"image_auroc": ref["image_auroc"],
                                                                  "pixel_auroc": ref["pixel_auroc"]}}
        return val_set, ref

    if fp16:
        p16 = out_dir / VARIANT_FILES["fp16"]
        to_fp16(f32, p16)
        vs, r = _val()
        cmp16 = compare(r, evaluate(ort_infer(p16), vs))
        report["variants"]["fp16"] = {"file": p16.name, **check_onnx(p16, card=card), "vs_fp32": cmp16}
        card.files["onnx_fp16"] = p16.name
        _log(f"{p16.name}: map max |d| {cmp16['map_max_abs_diff']:.2e}, score rho {cmp16['score_spearman']:.4f}",
             progress)
    if int8:
        p8 = out_dir / VARIANT_FILES["int8"]
        n_files = max(1, len(media_files(calib)))
        # frames 0, 4, 8...: disjoint from the validation frames (2, 6, 10...) when a clip is in both
        ctens = preprocessed(calib, card, every=4, max_frames=-(-2 * calib_frames // n_files), offset=0)
        if len(ctens) > calib_frames:  # spread over all clips
            ctens = ctens[np.linspace(0, len(ctens) - 1, calib_frames).round().astype(int)]
        _log(f"calibrating INT8 on {len(ctens)} normal frames from {calib}", progress)
        quantize_int8(f32, p8, ctens, input_name=card.input_name)
        vs, r = _val()
        q = evaluate(ort_infer(p8), vs)
        span = card.map_normalisation.high - card.map_normalisation.low
        vs_fp32 = compare(r, q)
        gate = int8_gate(r, q, max_image_drop=max_image_drop, max_pixel_drop=max_pixel_drop, map_span=span,
                         comparison=vs_fp32)
        entry = {"file": p8.name if gate["accepted"] else None, "gate": gate, "vs_fp32": vs_fp32,
                 "calibration": {"source": [Path(p).name for p in media_files(calib)], "frames": int(len(ctens)),
                                 "method": "minmax, QDQ, per-channel int8 weights, uint8 activations, Conv only, first and last Conv FP32"}}
        if gate["accepted"]:
            card.files["onnx_int8"] = p8.name
        else:
            if keep_rejected:
                os.replace(p8, out_dir / "model.int8.rejected.onnx")
                entry["rejected_file"] = "model.int8.rejected.onnx"
            p8.unlink(missing_ok=True)
            card.files.pop("onnx_int8", None)
            entry["fallback"] = "fp32"
        report["variants"]["int8"] = entry
        _log(f"INT8 {gate['reason']}", progress)
    report["seconds"] = round(time.time() - t0, 1)
    _finish_card(card, out_dir, report)
    return report


def _finish_card(card: ModelCard, out_dir: Path, report: dict[str, Any]) -> None:
    card.sha256 = {k: sha256(out_dir / v) for k, v in card.files.items() if (out_dir / v).exists()}
    prev = card.metrics.get("export", {}) if isinstance(card.metrics.get("export"), dict) else {}
    variants = {**prev.get("variants", {}), **report["variants"]}
    card.metrics = {**card.metrics, "export": {**prev, **_jsonable(report), "variants": _jsonable(variants),
                                               "precisions": {p: card.files.get(FILE_KEYS[p]) for p in PRECISIONS}}}
    card.save(out_dir)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items() if k not in ("maps", "scores", "lesion_maps")}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(f"{float(o):.6g}")
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def precision_file(card: ModelCard, precision: str) -> tuple[str | None, str]:
    """The ONNX file for ``precision`` per the card, or ``(None, why not)``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    f = card.files.get(FILE_KEYS[precision])
    if f:
        return f, ""
    exp = card.metrics.get("export", {}) if isinstance(card.metrics.get("export"), dict) else {}
    v = exp.get("variants", {}).get(precision)
    if precision == "int8" and v and not v.get("gate", {}).get("accepted", True):
        return None, f"int8 was rejected by the accuracy gate at export ({v['gate'].get('reason', '')})"
    return None, f"no {precision} variant in the card (run: sonomaly export MODEL_DIR --{precision}" + (
        " --calib DIR)" if precision == "int8" else ")")


def copy_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a model directory (card + files) - handy for exporting variants without touching the original."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".trt_cache"))
    return dst
