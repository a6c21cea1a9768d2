"""Model card: the versioned metadata that travels beside a model (``card.json``).

"One model, many backends, same numbers": the ONNX graph only maps a preprocessed float32 tensor to a *raw* anomaly map
and a *raw* image score.  Everything needed to make those numbers mean the same thing everywhere -- input size and
normalisation, the map/score normalisation (``0`` = typical normal, ``1.0`` = threshold), how the threshold was chosen,
what the model was trained on and what it measured -- lives here, in plain JSON, versioned by ``schema_version``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CARD_FILE = "card.json"
NORMALISATION_MODES = ("roi_zscore",)


class CardError(ValueError):
    """``card.json`` is missing, malformed or inconsistent; the message names the offending field."""


def _req(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise CardError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise CardError(f"{where}.{key}: missing required field")
    return d[key]


def _num(v: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CardError(f"{where}: expected a finite number, got {v!r}")
    if positive and v <= 0:
        raise CardError(f"{where}: must be > 0, got {v!r}")
    return float(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise CardError(f"{where}: expected a non-empty string, got {v!r}")
    return v


@dataclass
class Range:
    """Linear normalisation ``(raw - low) / (high - low)``: ``low`` -> 0 (typical normal), ``high`` -> 1.0 (threshold)."""

    low: float
    high: float

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Range":
        low = _num(_req(d, "low", where), f"{where}.low")
        high = _num(_req(d, "high", where), f"{where}.high")
        if not high > low:
            raise CardError(f"{where}: high ({high}) must be greater than low ({low})")
        return cls(low, high)

    def apply(self, raw):
        return (raw - self.low) / (self.high - self.low)


@dataclass
class InputSpec:
    size: list[int]  # [H, W]
    channels: int
    normalisation: dict[str, Any]  # {"mode": "roi_zscore", "clip": float}
    layout: str = "NCHW"
    dtype: str = "float32"
    # what each channel holds, e.g. ["zscore_gray", "roi_mask"]
    channel_names: list[str] = field(default_factory=lambda: ["zscore_gray"])

    @classmethod
    def from_dict(cls, d: Any, where: str = "input") -> "InputSpec":
        size = _req(d, "size", where)
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise CardError(f"{where}.size: expected [H, W] positive integers, got {size!r}")
        ch = _req(d, "channels", where)
        if not isinstance(ch, int) or isinstance(ch, bool) or ch < 1:
            raise CardError(f"{where}.channels: expected a positive integer, got {ch!r}")
        norm = _req(d, "normalisation", where)
        mode = _req(norm, "mode", f"{where}.normalisation")
        if mode not in NORMALISATION_MODES:
            raise CardError(f"{where}.normalisation.mode: unknown mode {mode!r} (known: {', '.join(NORMALISATION_MODES)})")
        _num(_req(norm, "clip", f"{where}.normalisation"), f"{where}.normalisation.clip", positive=True)
        names = d.get("channel_names", ["zscore_gray", "roi_mask"][:ch])
        if not isinstance(names, list) or len(names) != ch:
            raise CardError(f"{where}.channel_names: expected {ch} names, got {names!r}")
        layout = d.get("layout", "NCHW")
        if layout != "NCHW":
            raise CardError(f"{where}.layout: only NCHW is supported, got {layout!r}")
        dtype = d.get("dtype", "float32")
        if dtype != "float32":
            raise CardError(f"{where}.dtype: only float32 is supported, got {dtype!r}")
        return cls(list(size), ch, dict(norm), layout, dtype, list(names))

    @property
    def clip(self) -> float:
        return float(self.normalisation["clip"])


@dataclass
class ModelCard:
    name: str
    family: str
    input: InputSpec
    outputs: dict[str, Any]  # {"anomaly_map": {"name", "shape"}, "score": {"name", "shape"}}
    map_normalisation: Range
    score_normalisation: Range
    threshold: dict[str, Any]  # {method, target_fpr, pixel_raw, image_raw, chosen_on}
    files: dict[str, str] = field(default_factory=lambda: {"onnx": "model.onnx", "torch": "model.pt"})
    family_config: dict[str, Any] = field(default_factory=dict)  # kwargs to rebuild the torch module
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # of the files in ``files``
    description: str = ""
    schema_version: int = SCHEMA_VERSION

    # ---- convenience -------------------------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input.size[0]), int(self.input.size[1])

    @property
    def map_shape(self) -> tuple[int, ...]:
        return tuple(self.outputs["anomaly_map"]["shape"])

    @property
    def map_output(self) -> str:
        return self.outputs["anomaly_map"]["name"]

    @property
    def score_output(self) -> str:
        return self.outputs["score"]["name"]

    @property
    def input_name(self) -> str:
        return self.outputs.get("input_name", "input")

    # ---- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["schema_version", "name", "family", "description"]
        return {**{k: d[k] for k in order}, **{k: v for k, v in d.items() if k not in order}}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelCard":
        if not isinstance(d, dict):
            raise CardError(f"card: expected a JSON object, got {type(d).__name__}")
        sv = _req(d, "schema_version", "card")
        if sv != SCHEMA_VERSION:
            raise CardError(f"card.schema_version: unsupported version {sv!r} (this build reads {SCHEMA_VERSION})")
        name = _str(_req(d, "name", "card"), "card.name")
        family = _str(_req(d, "family", "card"), "card.family")
        inp = InputSpec.from_dict(_req(d, "input", "card"), "card.input")
        outputs = _req(d, "outputs", "card")
        for key in ("anomaly_map", "score"):
            o = _req(outputs, key, "card.outputs")
            _str(_req(o, "name", f"card.outputs.{key}"), f"card.outputs.{key}.name")
        shape = _req(outputs["anomaly_map"], "shape", "card.outputs.anomaly_map")
        if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise CardError(f"card.outputs.anomaly_map.shape: expected [N, 1, h, w] positive integers, got {shape!r}")
        mapn = Range.from_dict(_req(d, "map_normalisation", "card"), "card.map_normalisation")
        scoren = Range.from_dict(_req(d, "score_normalisation", "card"), "card.score_normalisation")
        thr = _req(d, "threshold", "card")
        _str(_req(thr, "method", "card.threshold"), "card.threshold.method")
        fpr = _num(_req(thr, "target_fpr", "card.threshold"), "card.threshold.target_fpr", positive=True)
        if fpr >= 1:
            raise CardError(f"card.threshold.target_fpr: must be in (0, 1), got {fpr}")
        for k in ("pixel_raw", "image_raw"):
            _num(_req(thr, k, "card.threshold"), f"card.threshold.{k}")
        _req(thr, "chosen_on", "card.threshold")
        files = d.get("files", {"onnx": "model.onnx", "torch": "model.pt"})
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise CardError(f"card.files: expected an object of file names, got {files!r}")
        for k in ("family_config", "training", "metrics", "versions", "sha256"):
            if k in d and not isinstance(d[k], dict):
                raise CardError(f"card.{k}: expected an object, got {type(d[k]).__name__}")
        return cls(
            name=name, family=family, input=inp, outputs=dict(outputs), map_normalisation=mapn,
            score_normalisation=scoren, threshold=dict(thr), files=dict(files),
            family_config=dict(d.get("family_config", {})), training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})), versions=dict(d.get("versions", {})), sha256=dict(d.get("sha256", {})),
            description=str(d.get("description", "")), schema_version=sv,
        )

    def validate(self) -> "ModelCard":
        """Re-check a card built in code (the same checks as loading)."""
        return ModelCard.from_dict(json.loads(json.dumps(self.to_dict())))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        self.validate()
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        if not path.exists():
            raise CardError(f"{path}: no model card (card.json) found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CardError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except CardError as e:
            raise CardError(f"{path}: {e}") from None
