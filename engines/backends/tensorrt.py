"""TensorRT 10 backend (NVIDIA GPUs).  ``tensorrt`` and ``pycuda`` are imported lazily, inside functions only.

Build: the card's ONNX file is parsed with ``trt.OnnxParser`` and built with the FP16 flag (when the GPU has fast
FP16 and ``fp16=True``).  The serialized engine is cached next to the model (``<model_dir>/.trt_cache/``, or
``~/.cache/sonomaly/trt`` when the model dir is read-only) under a key made of the GPU name, compute capability,
TensorRT version, precision and the ONNX file's sha256, so a different GPU, TRT or model never reuses a stale engine.
Run: static I/O shapes, page-locked host buffers, ``context.set_tensor_address`` + ``execute_async_v3`` on a pycuda
stream.  FP16 changes the raw numbers slightly; the card's normalisation still applies (outputs are float32).

Not testable on the CPU-only development machines: it is written from the TensorRT 10 Python API documentation.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..card import ModelCard
from . import BackendUnavailable

INSTALL_HINT = "pip install .[gpu] on a machine with an NVIDIA GPU"


def _import():
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on missing libs
        raise BackendUnavailable(f"TensorRT is not installed ({INSTALL_HINT}): {e}") from e
    try:
        import pycuda.driver as cuda  # noqa: F401
    except Exception as e:
        raise BackendUnavailable(f"pycuda is not installed, TensorRT needs it here ({INSTALL_HINT}): {e}") from e
    return trt, cuda


def available() -> tuple[bool, str]:
    """``(True, gpu description)`` when TensorRT, pycuda and an NVIDIA GPU are usable, else ``(False, reason)``."""
    try:
        trt, cuda = _import()
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no NVIDIA GPU found"
        dev = cuda.Device(0)
        return True, f"{dev.name()} (sm_{''.join(map(str, dev.compute_capability()))}), TensorRT {trt.__version__}"
    except BackendUnavailable as e:
        return False, str(e)
    except Exception as e:  # driver missing, no device...
        return False, f"CUDA unavailable: {e}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _cache_dir(model_dir: Path) -> Path:
    d = model_dir / ".trt_cache"
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sonomaly" / "trt"
    d.mkdir(parents=True, exist_ok=True)
    return d


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model_dir: str | Path, card: ModelCard, *, fp16: bool = True, device: int = 0,
                 workspace_mb: int = 512, rebuild: bool = False, **_):
        trt, cuda = _import()
        try:
            cuda.init()
            if cuda.Device.count() <= device:
                raise BackendUnavailable(f"TensorRT: no NVIDIA GPU #{device} found")
            self._dev = cuda.Device(device)
            self._ctx = self._dev.retain_primary_context()
        except BackendUnavailable:
            raise
        except Exception as e:
            raise BackendUnavailable(f"TensorRT: CUDA initialisation failed: {e}") from e
        self._ctx.push()
        try:
            self._setup(trt, cuda, Path(model_dir), card, fp16, workspace_mb, rebuild)
        finally:
            self._ctx.pop()

    def _setup(self, trt, cuda, model_dir: Path, card: ModelCard, fp16: bool, workspace_mb: int, rebuild: bool):
        self.card = card
        self._trt, self._cuda = trt, cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        onnx_path = model_dir / card.files.get("onnx", "model.onnx")
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path}: ONNX model missing")
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self._dev.name()).strip("-")
        cc = "".join(map(str, self._dev.compute_capability()))
        prec = "fp16" if fp16 else "fp32"
        key = f"{gpu}_sm{cc}_trt{trt.__version__}_{prec}_{_sha256(onnx_path)[:16]}"
        self.engine_path = _cache_dir(model_dir) / f"{key}.engine"
        self.fp16 = fp16

        runtime = trt.Runtime(self._logger)
        engine = None
        if self.engine_path.exists() and not rebuild:
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())  # None if incompatible
        if engine is None:
            plan = self._build(trt, onnx_path, fp16, workspace_mb)
            tmp = self.engine_path.with_suffix(".tmp")
            tmp.write_bytes(plan)
            os.replace(tmp, self.engine_path)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeError("TensorRT: could not deserialize the engine it just built")
        self._runtime, self.engine = runtime, engine
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self._host, self._device, self._shapes = {}, {}, {}
        self.input_name = None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"TensorRT: tensor {name} has a dynamic shape {shape}; the model must be static")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(int(np.prod(shape)), dtype)
            dev = cuda.mem_alloc(host.nbytes)
            self.context.set_tensor_address(name, int(dev))
            self._host[name], self._device[name], self._shapes[name] = host, dev, shape
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_name = name
        if self.input_name is None:
            raise RuntimeError("TensorRT: the engine has no input tensor")
        self.output_names = [card.map_output, card.score_output]
        for n in self.output_names:
            if n not in self._host:
                raise RuntimeError(f"TensorRT: engine has no output {n!r} (has {sorted(self._host)})")

    def _build(self, trt, onnx_path: Path, fp16: bool, workspace_mb: int) -> bytes:
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TRT 10: networks are always explicit-batch
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_path.read_bytes()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        if fp16 and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
        return bytes(plan)

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cuda = self._cuda
        name = self.input_name
        x = np.asarray(x, dtype=self._host[name].dtype)
        if x.shape != self._shapes[name]:
            raise ValueError(f"TensorRT: input shape {x.shape} != engine shape {self._shapes[name]}")
        self._ctx.push()
        try:
            np.copyto(self._host[name].reshape(self._shapes[name]), x)
            cuda.memcpy_htod_async(self._device[name], self._host[name], self.stream)
            if not self.context.execute_async_v3(stream_handle=self.stream.handle):
                raise RuntimeError("TensorRT: execute_async_v3 failed")
            for n in self.output_names:
                cuda.memcpy_dtoh_async(self._host[n], self._device[n], self.stream)
            self.stream.synchronize()
        finally:
            self._ctx.pop()
        return tuple(self._host[n].reshape(self._shapes[n]).astype(np.float32, copy=True) for n in self.output_names)

    def close(self) -> None:
        try:
            self._ctx.push()
            for d in self._device.values():
                d.free()
            self._device.clear()
            self.context = self.engine = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
