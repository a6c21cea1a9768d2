"""ONNX Runtime backend.

Providers: ``providers="auto"`` (the default) uses TensorRT and CUDA execution providers when this onnxruntime build
has them (``onnxruntime-gpu``), then the CPU provider; ``("cpu",)`` forces the CPU.  CPU settings are tuned for small
shared machines and configurable: ``threads`` (intra-op, default 2), ``inter_op_threads`` (1, sequential execution),
``graph_optimization`` (``"all"`` | ``"extended"`` | ``"basic"`` | ``"disable"``), ``spin`` (busy-wait of idle
intra-op threads: ``None`` keeps ORT's default; ``False`` frees the cores for the grabber/encoder between frames at
a small latency cost).  ``precision`` picks the card's variant file (``fp32`` ``model.onnx``, ``fp16``, ``int8``:
see ``engines.export``); ``file`` overrides it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..card import ModelCard
from . import BackendUnavailable

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GRAPH_OPT = ("all", "extended", "basic", "disable")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def resolve_providers(providers: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Full provider names in priority order, CPU last. ``"auto"``: the GPU providers this build has, then CPU.
    An explicitly named provider that is not available raises :class:`BackendUnavailable`."""
    available = set(available)
    if isinstance(providers, str):
        providers = [providers]
    wanted: list[str] = []
    for p in providers:
        if p == "auto":
            wanted += [g for g in GPU_PROVIDERS if g in available and g not in wanted]
            continue
        full = _PROVIDER_NAMES.get(p.lower(), p)
        if full not in available:
            if full == "CPUExecutionProvider":
                raise BackendUnavailable("onnxruntime has no CPUExecutionProvider")
            raise BackendUnavailable(f"onnxruntime execution provider {full} is not available here "
                                     f"(available: {', '.join(sorted(available))}; GPU providers need the "
                                     f"onnxruntime-gpu build)")
        if full not in wanted:
            wanted.append(full)
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def model_file(model_dir: Path, card: ModelCard, precision: str = "fp32", file: str | None = None) -> Path:
    if file:
        return Path(model_dir) / file
    from ..export import precision_file

    name, why = precision_file(card, precision)
    if name is None:
        raise BackendUnavailable(f"onnxruntime: {why}")
    return Path(model_dir) / name


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_dir: str | Path, card: ModelCard, *, threads: int = 2, inter_op_threads: int = 1,
                 providers: str | Sequence[str] = "auto", graph_optimization: str = "all", spin: bool | None = None,
                 precision: str = "fp32", file: str | None = None, device: int = 0, **_):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a core dependency
            raise BackendUnavailable(f"onnxruntime is not installed ({e})") from e
        self.card = card
        self.precision = precision
        path = model_file(Path(model_dir), card, precision, file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: ONNX model missing")
        self.path = path
        if graph_optimization not in GRAPH_OPT:
            raise ValueError(f"graph_optimization must be one of {', '.join(GRAPH_OPT)}, got {graph_optimization!r}")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[graph_optimization]
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = int(inter_op_threads)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if spin is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        wanted = resolve_providers(providers, ort.get_available_providers())
        opts = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                cache = Path(model_dir) / ".trt_cache"
                opts.append({"device_id": device, "trt_fp16_enable": precision == "fp16",
                             "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)})
            elif p == "CUDAExecutionProvider":
                opts.append({"device_id": device})
            else:
                opts.append({})
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=wanted, provider_options=opts)
        self.providers = list(self.session.get_providers())  # what ORT actually enabled
        self.options = {"threads": int(threads), "inter_op_threads": int(inter_op_threads),
                        "graph_optimization": graph_optimization, "spin": spin, "providers": self.providers,
                        "file": path.name}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else 1
        self.output_names = [card.map_output, card.score_output]

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        amap, score = self.session.run(self.output_names, {self.input_name: x})
        return amap, score
