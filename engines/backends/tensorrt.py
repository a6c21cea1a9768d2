"""TensorRT 10 backend (NVIDIA GPUs, extra ``[gpu]``).  ``tensorrt`` and ``pycuda`` are imported lazily, inside
functions only, so this module imports (and its pure-Python parts are tested) on machines without them.

Build (``sonomaly build-engine MODEL_DIR [--fp16|--int8]``, or on first load):

* the card's ONNX file is parsed with ``trt.OnnxParser`` into an explicit-batch network (TRT 10 has no other kind);
* builder config: workspace limit; ``fp16`` sets ``BuilderFlag.FP16``; ``int8`` sets ``BuilderFlag.INT8`` (+ FP16 for
  the layers left in float) and either parses the card's accepted QDQ INT8 ONNX (explicit quantization: the scales
  come from ``sonomaly export --int8``) or, when there is none, calibrates with an ``IInt8EntropyCalibrator2`` fed
  batches of normal frames preprocessed like the pipeline, and keeps a calibration cache;
* a timing cache per GPU / TensorRT version is loaded before and saved after every build (faster rebuilds);
* the serialized engine is cached next to the model (``<model_dir>/.trt_cache/``, or ``~/.cache/sonomaly/trt`` when
  the model dir is read-only) under :func:`engine_cache_key`: GPU name, compute capability, TensorRT version,
  precision and the parsed ONNX file's sha256, so a different GPU, TRT, precision or model never reuses a stale engine.

Run: static I/O shapes; pycuda page-locked host buffers, device buffers and one CUDA stream;
``context.set_tensor_address`` once per tensor + ``execute_async_v3``; optional CUDA-graph capture of the enqueue
(``cuda_graph=True``; falls back to plain enqueue with the reason in ``graph_reason`` if capture is not possible).
Outputs are float32 whatever the precision; the card's normalisation still applies.

Not run on the CPU-only development machines (TensorRT cannot be installed there): written from NVIDIA's TensorRT 10
Python API documentation; ``tools/gpu_check.py`` runs its tests and benchmark on a GPU machine.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..card import ModelCard
from . import BackendUnavailable

INSTALL_HINT = "pip install .[gpu] on a machine with an NVIDIA GPU"
PRECISIONS = ("fp32", "fp16", "int8")
log = logging.getLogger("sonomaly.engines.tensorrt")


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


def gpu_probe() -> tuple[int, str]:
    """``(number of CUDA devices, description)`` through ``cuda-python`` (optional, in the ``[gpu]`` extra), which
    imports without a driver and reports e.g. ``cudaErrorInsufficientDriver`` cleanly; ``(0, why)`` otherwise."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
    except Exception as e:
        return 0, f"no GPU probe (cuda-python not installed: {e.__class__.__name__})"
    try:
        err, n = cudart.cudaGetDeviceCount()
        code = getattr(err, "name", str(err))
        if int(err) != 0:
            return 0, f"no usable GPU ({code})"
        if n < 1:
            return 0, "no CUDA device"
        err, prop = cudart.cudaGetDeviceProperties(0)
        name = prop.name.decode(errors="replace").strip("\x00") if int(err) == 0 else "?"
        return int(n), f"{n} CUDA device(s), #0 {name} (sm_{prop.major}{prop.minor})" if int(err) == 0 else f"{n} CUDA device(s)"
    except Exception as e:  # pragma: no cover - depends on the driver
        return 0, f"GPU probe failed: {e}"


def available() -> tuple[bool, str]:
    """``(True, gpu description)`` when TensorRT, pycuda and an NVIDIA GPU are usable, else ``(False, reason)``."""
    try:
        trt, cuda = _import()
    except BackendUnavailable as e:
        n, probe = gpu_probe()
        return False, f"{e}; GPU probe: {probe}"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no NVIDIA GPU found"
        dev = cuda.Device(0)
        return True, f"{dev.name()} (sm_{''.join(map(str, dev.compute_capability()))}), TensorRT {trt.__version__}"
    except Exception as e:  # driver missing, no device...
        return False, f"CUDA unavailable: {e}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


def engine_cache_key(gpu_name: str, compute_capability: tuple[int, int] | str, trt_version: str, precision: str,
                     model_sha256: str) -> str:
    """File-name-safe key of a serialized engine: every input that makes an engine unusable elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if len(model_sha256) < 16:
        raise ValueError("model_sha256 must be a hex digest")
    cc = compute_capability if isinstance(compute_capability, str) else "".join(map(str, compute_capability))
    return f"{_slug(gpu_name)}_sm{cc}_trt{_slug(trt_version)}_{precision}_{model_sha256[:16]}"


def timing_cache_name(gpu_name: str, compute_capability, trt_version: str) -> str:
    cc = compute_capability if isinstance(compute_capability, str) else "".join(map(str, compute_capability))
    return f"timing_{_slug(gpu_name)}_sm{cc}_trt{_slug(trt_version)}.cache"


def cache_dir(model_dir: Path) -> Path:
    d = Path(model_dir) / ".trt_cache"
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sonomaly" / "trt"
    d.mkdir(parents=True, exist_ok=True)
    return d


_cache_dir = cache_dir  # older name


class CalibrationBatcher:
    """The TensorRT-free half of the INT8 calibrator: hands out contiguous float32 batches ``[B, C, H, W]`` of
    preprocessed normal frames (the last short batch is dropped: TensorRT calibrates on full batches), and reads /
    writes the calibration cache.  ``frames``: an array ``[N, C, H, W]`` or an iterable of ``[1|k, C, H, W]`` arrays."""

    def __init__(self, frames: np.ndarray | Iterable[np.ndarray], batch_size: int, input_shape: tuple[int, ...],
                 cache_path: str | Path | None = None, max_batches: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(s) for s in input_shape)  # (C, H, W)
        self.cache_path = Path(cache_path) if cache_path else None
        self.max_batches = max_batches
        self._frames = frames
        self._it = None
        self.batches_served = 0
        self.rewind()

    def rewind(self) -> None:
        src = self._frames
        self._it = iter(src if not isinstance(src, np.ndarray) else [src])
        self._pending = np.empty((0, *self.input_shape), np.float32)
        self.batches_served = 0

    def _pull(self) -> bool:
        try:
            a = np.asarray(next(self._it), np.float32)
        except StopIteration:
            return False
        if a.ndim == 3:
            a = a[None]
        if a.shape[1:] != self.input_shape:
            raise ValueError(f"calibration frame shape {a.shape[1:]} != engine input {self.input_shape}")
        self._pending = np.concatenate([self._pending, a]) if len(self._pending) else a
        return True

    def next_batch(self) -> np.ndarray | None:
        """The next full batch, or ``None`` when the data (or ``max_batches``) is exhausted."""
        if self.max_batches is not None and self.batches_served >= self.max_batches:
            return None
        while len(self._pending) < self.batch_size:
            if not self._pull():
                return None
        b, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size:]
        self.batches_served += 1
        return np.ascontiguousarray(b, np.float32)

    def read_cache(self) -> bytes | None:
        if self.cache_path is not None and self.cache_path.exists():
            data = self.cache_path.read_bytes()
            return data or None
        return None

    def write_cache(self, data) -> None:
        if self.cache_path is None:
            return
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, self.cache_path)


def make_int8_calibrator(trt, cuda, batcher: CalibrationBatcher):
    """An ``IInt8EntropyCalibrator2`` around ``batcher``: one device buffer, filled from each batch."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batcher = batcher
            nbytes = batcher.batch_size * int(np.prod(batcher.input_shape)) * 4
            self.device = cuda.mem_alloc(nbytes)

        def get_batch_size(self):
            return self.batcher.batch_size

        def get_batch(self, names):
            b = self.batcher.next_batch()
            if b is None:
                return None
            cuda.memcpy_htod(self.device, b)
            return [int(self.device)]

        def read_calibration_cache(self):
            return self.batcher.read_cache()

        def write_calibration_cache(self, cache):
            self.batcher.write_cache(cache)

    return _Calibrator()


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model_dir: str | Path, card: ModelCard, *, precision: str | None = None, fp16: bool | None = None,
                 device: int = 0, workspace_mb: int = 512, rebuild: bool = False, calib=None,
                 calib_batches: int = 64, cuda_graph: bool = False, **_):
        if precision is None:
            precision = "fp16" if fp16 in (None, True) else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
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
        self.precision = precision
        self.graph_reason = "off"
        self._graph = None
        self._ctx.push()
        try:
            self._setup(trt, cuda, Path(model_dir), card, workspace_mb, rebuild, calib, calib_batches)
            if cuda_graph:
                self._capture_graph()
        finally:
            self._ctx.pop()

    # ---- build -------------------------------------------------------------------------------------------------------
    def _onnx_for(self, model_dir: Path, card: ModelCard) -> tuple[Path, bool]:
        """(ONNX file to parse, explicit-quantization?)"""
        if self.precision == "int8" and card.files.get("onnx_int8"):
            p = model_dir / card.files["onnx_int8"]
            if p.exists():
                return p, True
        return model_dir / card.files.get("onnx", "model.onnx"), False

    def _setup(self, trt, cuda, model_dir: Path, card: ModelCard, workspace_mb: int, rebuild: bool, calib,
               calib_batches: int):
        self.card = card
        self._trt, self._cuda = trt, cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        onnx_path, explicit = self._onnx_for(model_dir, card)
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path}: ONNX model missing")
        gpu, cc = self._dev.name(), self._dev.compute_capability()
        self.cache_key = engine_cache_key(gpu, cc, trt.__version__, self.precision, _sha256(onnx_path))
        cdir = cache_dir(model_dir)
        self.engine_path = cdir / f"{self.cache_key}.engine"
        self.timing_cache_path = cdir / timing_cache_name(gpu, cc, trt.__version__)
        self.calib_cache_path = cdir / f"{self.cache_key}.calib"

        runtime = trt.Runtime(self._logger)
        engine = None
        if self.engine_path.exists() and not rebuild:
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())  # None if incompatible
        if engine is None:
            plan = self._build(trt, cuda, onnx_path, card, workspace_mb, explicit, calib, calib_batches)
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

    def _calibration_frames(self, card: ModelCard, calib) -> np.ndarray:
        if calib is None:
            raise BackendUnavailable(
                "TensorRT INT8 needs normal frames to calibrate on (calib=DIR / build-engine --int8 --calib DIR), "
                "or an accepted INT8 QDQ model in the card (sonomaly export MODEL_DIR --int8 --calib DIR)")
        if isinstance(calib, np.ndarray):
            return calib
        from ..export import preprocessed

        return preprocessed(calib, card, every=2, max_frames=None, offset=1)

    def _build(self, trt, cuda, onnx_path: Path, card: ModelCard, workspace_mb: int, explicit: bool, calib,
               calib_batches: int) -> bytes:
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TRT 10: networks are always explicit-batch
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_path.read_bytes()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        # timing cache: reuse kernel timings across builds on the same GPU / TRT
        blob = self.timing_cache_path.read_bytes() if self.timing_cache_path.exists() else b""
        timing = config.create_timing_cache(blob)
        config.set_timing_cache(timing, ignore_mismatch=True)
        fast16 = getattr(builder, "platform_has_fast_fp16", True)  # deprecated in later TRT 10 releases
        if self.precision in ("fp16", "int8") and fast16:
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not explicit:  # implicit quantization: calibrate on normal frames
                if calib is None and self.calib_cache_path.exists():  # the cache alone is enough
                    frames = np.empty((0, card.input.channels, *card.input_size), np.float32)
                else:
                    frames = self._calibration_frames(card, calib)
                # explicit-batch network with static shapes: each calibration batch is exactly the network's input
                # (batch 1 for model.onnx), so the batch size comes from the graph, not from an option
                batch = max(1, int(network.get_input(0).shape[0]))
                batcher = CalibrationBatcher(frames, batch, (card.input.channels, *card.input_size),
                                             self.calib_cache_path, max_batches=max(1, calib_batches))
                calibrator = make_int8_calibrator(trt, cuda, batcher)
                config.int8_calibrator = calibrator
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} ({self.precision})")
        try:
            tmp = self.timing_cache_path.with_suffix(".tmp")
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            os.replace(tmp, self.timing_cache_path)
        except Exception as e:  # a cache is an optimisation: never fail a build on it
            log.warning("could not save the TensorRT timing cache: %s", e)
        return bytes(plan)

    # ---- run ---------------------------------------------------------------------------------------------------------
    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(stream_handle=self.stream.handle):
            raise RuntimeError("TensorRT: execute_async_v3 failed")

    def _capture_graph(self) -> None:
        """Capture the enqueue of the engine into a CUDA graph (after one warm-up run, which lets TensorRT do its
        deferred allocations outside the capture)."""
        cuda = self._cuda
        capturing = False
        try:
            self._enqueue()
            self.stream.synchronize()
            self.stream.begin_capture()  # pycuda >= 2021.1
            capturing = True
            self._enqueue()
            graph = self.stream.end_capture()
            capturing = False
            self._graph = graph.instance()
            self.graph_reason = "captured"
        except Exception as e:
            if capturing:  # never leave the stream in capture mode
                try:
                    self.stream.end_capture()
                except Exception:
                    pass
            self._graph = None
            self.graph_reason = f"not captured ({e.__class__.__name__}: {e}); plain execute_async_v3"
            log.warning("CUDA graph %s", self.graph_reason)
            try:  # leave the stream usable
                cuda.Context.synchronize()
            except Exception:
                pass

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
            if self._graph is not None:
                self._graph.launch(self.stream)
            else:
                self._enqueue()
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
            self._graph = None
            self.context = self.engine = None
        finally:
            self._ctx.pop()
            self._ctx.detach()


def build_engine(model_dir: str | Path, *, precision: str = "fp16", calib=None, rebuild: bool = True,
                 **opts: Any) -> TensorRTBackend:
    """Build (or rebuild) and cache the engine of ``model_dir``; returns the loaded backend."""
    card = ModelCard.load(model_dir)
    return TensorRTBackend(model_dir, card, precision=precision, calib=calib, rebuild=rebuild, **opts)
