"""ONNX Runtime backend (CPU by default; CUDA / TensorRT execution providers only when asked and available)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..card import ModelCard
from . import BackendUnavailable

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_dir: str | Path, card: ModelCard, *, threads: int = 2, inter_op_threads: int = 1,
                 providers: Sequence[str] = ("cpu",), **_):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a core dependency
            raise BackendUnavailable(f"onnxruntime is not installed ({e})") from e
        self.card = card
        path = Path(model_dir) / card.files.get("onnx", "model.onnx")
        if not path.exists():
            raise FileNotFoundError(f"{path}: ONNX model missing")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = int(inter_op_threads)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        available = set(ort.get_available_providers())
        wanted = []
        for p in providers:
            full = _PROVIDER_NAMES.get(p.lower(), p)
            if full not in available:
                if full == "CPUExecutionProvider":
                    raise BackendUnavailable("onnxruntime has no CPUExecutionProvider")
                raise BackendUnavailable(f"onnxruntime execution provider {full} is not available here "
                                         f"(available: {', '.join(sorted(available))})")
            wanted.append(full)
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        self.providers = wanted
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [card.map_output, card.score_output]

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        amap, score = self.session.run(self.output_names, {self.input_name: x})
        return amap, score
