"""TensorRT backend.

The real-library tests run only where TensorRT, pycuda and an NVIDIA GPU are present (``tools/gpu_check.py`` runs them
on a GPU machine) and skip with the reason otherwise.  Everything around the library is tested everywhere: the engine
cache key, the INT8 calibrator's batching and cache, the error messages, the ``auto`` fallback, and the whole
build / cache / run flow against a fake ``tensorrt`` + ``pycuda`` pair that follows the TensorRT 10 API the backend
uses (the fake executes the ONNX graph with ONNX Runtime, so outputs can be checked).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sonomaly.engines import BackendUnavailable, load
from sonomaly.engines.backends import tensorrt as trt_backend
from sonomaly.engines.backends.tensorrt import (
    CalibrationBatcher, engine_cache_key, make_int8_calibrator, timing_cache_name)
from sonomaly.engines.card import ModelCard
from sonomaly.engines.export import copy_model, preprocessed

REPO = Path(__file__).resolve().parents[1]
LUNG = REPO / "models" / "lung"
NORMAL = REPO / "data" / "demo" / "lung_convex_normal_02.mp4"
TRT_OK, TRT_WHY = trt_backend.available()
needs_lung = pytest.mark.skipif(not (LUNG / "card.json").exists(), reason="bundled model missing")


# ---- pure Python: cache keys --------------------------------------------------------------------------------------
def test_engine_cache_key_covers_gpu_cc_trt_precision_model():
    sha = "ab" * 32
    k = engine_cache_key("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0", "fp16", sha)
    assert k == f"NVIDIA-H100-80GB-HBM3_sm90_trt10.3.0_fp16_{sha[:16]}"
    others = [engine_cache_key("NVIDIA A100-SXM4-40GB", (9, 0), "10.3.0", "fp16", sha),
              engine_cache_key("NVIDIA H100 80GB HBM3", (8, 9), "10.3.0", "fp16", sha),
              engine_cache_key("NVIDIA H100 80GB HBM3", (9, 0), "10.4.0", "fp16", sha),
              engine_cache_key("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0", "int8", sha),
              engine_cache_key("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0", "fp16", "cd" * 32)]
    assert len({k, *others}) == 6
    assert all("/" not in x and " " not in x for x in [k, *others])
    with pytest.raises(ValueError, match="unknown precision"):
        engine_cache_key("g", (8, 6), "10", "fp8", sha)
    assert timing_cache_name("Tesla T4", (7, 5), "10.0.1") == "timing_Tesla-T4_sm75_trt10.0.1.cache"


# ---- pure Python: the calibrator's batching ---------------------------------------------------------------------------
def test_calibration_batcher_full_batches_only():
    x = np.arange(10 * 2 * 3 * 3, dtype=np.float32).reshape(10, 2, 3, 3)
    b = CalibrationBatcher(x, 4, (2, 3, 3))
    got = [b.next_batch(), b.next_batch(), b.next_batch()]
    assert got[2] is None and b.batches_served == 2  # 10 frames -> 2 batches of 4, the short one dropped
    np.testing.assert_array_equal(np.concatenate(got[:2]), x[:8])
    assert all(g.flags.c_contiguous and g.dtype == np.float32 for g in got[:2])
    b.rewind()
    np.testing.assert_array_equal(b.next_batch(), x[:4])


def test_calibration_batcher_from_a_stream_of_chunks():
    chunks = [np.full((k, 1, 2, 2), i, np.float32) for i, k in enumerate([1, 3, 2, 1])]  # 7 frames
    b = CalibrationBatcher(iter(chunks), 3, (1, 2, 2), max_batches=5)
    b1, b2 = b.next_batch(), b.next_batch()
    assert b.next_batch() is None
    assert [float(v) for v in b1[:, 0, 0, 0]] == [0, 1, 1] and [float(v) for v in b2[:, 0, 0, 0]] == [1, 2, 2]
    lim = CalibrationBatcher(np.zeros((9, 1, 2, 2), np.float32), 2, (1, 2, 2), max_batches=2)
    assert lim.next_batch() is not None and lim.next_batch() is not None and lim.next_batch() is None
    single = CalibrationBatcher([np.zeros((1, 2, 2), np.float32)], 1, (1, 2, 2))  # [C,H,W] frames are accepted
    assert single.next_batch().shape == (1, 1, 2, 2)


def test_calibration_batcher_errors_and_cache(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationBatcher(np.zeros((2, 1, 2, 2)), 0, (1, 2, 2))
    bad = CalibrationBatcher(np.zeros((2, 1, 4, 4), np.float32), 1, (1, 2, 2))
    with pytest.raises(ValueError, match="calibration frame shape"):
        bad.next_batch()
    b = CalibrationBatcher(np.zeros((1, 1, 2, 2), np.float32), 1, (1, 2, 2), cache_path=tmp_path / "x.calib")
    assert b.read_cache() is None
    b.write_cache(memoryview(b"TRT-1000-EntropyCalibration2\n"))
    assert b.read_cache() == b"TRT-1000-EntropyCalibration2\n" and not list(tmp_path.glob("*.tmp"))
    assert CalibrationBatcher(np.zeros((1, 1, 2, 2)), 1, (1, 2, 2)).read_cache() is None  # no cache path


def test_int8_calibrator_over_a_fake_interface(tmp_path):
    fake_trt, fake_cuda = _fakes()
    x = np.random.default_rng(0).standard_normal((5, 2, 4, 4)).astype(np.float32)
    cal = make_int8_calibrator(fake_trt, fake_cuda, CalibrationBatcher(x, 2, (2, 4, 4), tmp_path / "c.calib"))
    assert isinstance(cal, fake_trt.IInt8EntropyCalibrator2) and cal.get_batch_size() == 2
    ptrs = cal.get_batch(["input"])
    assert ptrs == [int(cal.device)]
    np.testing.assert_array_equal(_DEV[ptrs[0]].view(np.float32).reshape(2, 2, 4, 4), x[:2])
    assert cal.get_batch(["input"]) is not None and cal.get_batch(["input"]) is None
    assert cal.read_calibration_cache() is None
    cal.write_calibration_cache(b"cache")
    assert cal.read_calibration_cache() == b"cache"


# ---- errors and auto fallback -----------------------------------------------------------------------------------------
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_unavailable_reason_is_clear():
    ok, why = trt_backend.available()
    assert not ok
    assert "pip install .[gpu]" in why and "GPU probe:" in why


@needs_lung
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_explicit_tensorrt_raises_and_auto_falls_back():
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed \(pip install \.\[gpu\]"):
        load(LUNG, backend="tensorrt")
    eng = load(LUNG, backend="auto", cuda_graph=True, workspace_mb=64)  # TRT-only options never break the fallback
    assert eng.backend == "onnxruntime" and eng.precision == "fp32"
    assert eng.backend_reason.startswith("auto: tensorrt unavailable: TensorRT is not installed")
    assert eng.backend_reason.endswith("using onnxruntime")


@needs_lung
def test_auto_falls_back_when_the_build_fails(monkeypatch):
    monkeypatch.setattr(trt_backend, "available", lambda: (True, "Fake GPU (sm_90), TensorRT 10.fake"))

    def boom(*a, **k):
        raise RuntimeError("TensorRT could not parse model.onnx: unsupported op")

    monkeypatch.setattr(trt_backend, "TensorRTBackend", boom)
    eng = load(LUNG)
    assert eng.backend == "onnxruntime"
    assert "tensorrt failed: TensorRT could not parse model.onnx: unsupported op" in eng.backend_reason


@needs_lung
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_build_engine_cli_error(capsys):
    from sonomaly.tools.cli import main

    assert main(["build-engine", str(LUNG), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "GPU probe" in err


# ---- the whole flow against a fake TensorRT 10 + pycuda ---------------------------------------------------------------
_DEV: dict[int, np.ndarray] = {}


def _fakes(*, graphs: bool = True):
    """Minimal stand-ins for the ``tensorrt`` 10 and ``pycuda.driver`` calls the backend makes."""
    import onnxruntime as ort

    cuda = types.ModuleType("pycuda.driver")
    counters = {"builds": 0, "calib_batches": 0, "graph_launches": 0, "parsed": []}

    class DevMem:
        def __init__(self, nbytes):
            self.buf = np.zeros(int(nbytes), np.uint8)
            _DEV[id(self)] = self.buf

        def __int__(self):
            return id(self)

        def free(self):
            _DEV.pop(id(self), None)

    class Ctx:
        def push(self): pass
        def pop(self): pass
        def detach(self): pass

    class Device:
        def __init__(self, i): self.i = i
        @staticmethod
        def count(): return 1
        def name(self): return "Fake GPU 9000"
        def compute_capability(self): return (9, 0)
        def retain_primary_context(self): return Ctx()

    class Graph:
        def __init__(self, ops): self.ops = ops
        def instance(self): return self
        def launch(self, stream=None):
            counters["graph_launches"] += 1
            for op in self.ops:
                op()

    class Stream:
        handle = 0

        def __init__(self):
            self.capturing = None

        def synchronize(self): pass

    if graphs:
        def begin_capture(self, *a): self.capturing = []
        def end_capture(self):
            ops, self.capturing = self.capturing, None
            return Graph(ops)
        Stream.begin_capture, Stream.end_capture = begin_capture, end_capture

    def htod(dev, host, stream=None):
        b = np.ascontiguousarray(host).view(np.uint8).ravel()
        _DEV[int(dev)][: b.size] = b

    def dtoh(host, dev, stream=None):
        b = host.view(np.uint8).reshape(-1)
        b[:] = _DEV[int(dev)][: b.size]

    cuda.init = lambda: None
    cuda.Device, cuda.Stream = Device, Stream
    cuda.Context = types.SimpleNamespace(synchronize=lambda: None)
    cuda.mem_alloc = DevMem
    cuda.pagelocked_empty = lambda n, dtype: np.empty(n, dtype)
    cuda.memcpy_htod_async, cuda.memcpy_dtoh_async, cuda.memcpy_htod = htod, dtoh, htod
    cuda.counters = counters

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dt: np.float32
    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})

    class Network:
        onnx = b""

        def get_input(self, i):
            import onnx

            m = onnx.load_from_string(self.onnx)
            return types.SimpleNamespace(shape=[d.dim_value for d in m.graph.input[i].type.tensor_type.shape.dim])

    class Parser:
        num_errors = 0

        def __init__(self, network, logger): self.network = network

        def parse(self, data):
            self.network.onnx = bytes(data)
            counters["parsed"].append(len(data))
            return True

    class TimingCache:
        def serialize(self): return b"timing-cache"

    class Config:
        def __init__(self): self.flags, self.int8_calibrator, self.timing = set(), None, None
        def set_memory_pool_limit(self, pool, size): self.workspace = size
        def create_timing_cache(self, blob): return TimingCache()
        def set_timing_cache(self, cache, ignore_mismatch): self.timing = cache
        def get_timing_cache(self): return self.timing
        def set_flag(self, f): self.flags.add(f)

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger): pass
        def create_network(self, flags): return Network()
        def create_builder_config(self): return Config()

        def build_serialized_network(self, network, config):
            counters["builds"] += 1
            cal = config.int8_calibrator
            if cal is not None and cal.read_calibration_cache() is None:
                while cal.get_batch(["input"]) is not None:
                    counters["calib_batches"] += 1
                cal.write_calibration_cache(b"calibration-table")
            head = json.dumps({"flags": sorted(config.flags), "calibrated": cal is not None}).encode()
            return b"FAKEPLAN\n" + head + b"\n" + network.onnx

    class Context:
        def __init__(self, engine): self.engine, self.addr = engine, {}
        def set_tensor_address(self, name, ptr): self.addr[name] = ptr

        def _run(self):
            e = self.engine
            x = _DEV[self.addr[e.inp]].view(np.float32).reshape(e.shapes[e.inp])
            outs = e.sess.run(e.outs, {e.inp: x})
            for n, o in zip(e.outs, outs):
                b = np.ascontiguousarray(o, np.float32).view(np.uint8).ravel()
                _DEV[self.addr[n]][: b.size] = b

        def execute_async_v3(self, stream_handle):
            stream = Stream._current
            if stream is not None and stream.capturing is not None:
                stream.capturing.append(self._run)
            else:
                self._run()
            return True

    Stream._current = None
    orig_init = Stream.__init__

    def stream_init(self):
        orig_init(self)
        Stream._current = self

    Stream.__init__ = stream_init

    class Engine:
        def __init__(self, plan):
            _, head, model = plan.split(b"\n", 2)
            self.meta = json.loads(head)
            self.sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.inp = self.sess.get_inputs()[0].name
            self.outs = [o.name for o in self.sess.get_outputs()]
            self.names = [self.inp, *self.outs]
            self.shapes = {i.name: tuple(i.shape) for i in [*self.sess.get_inputs(), *self.sess.get_outputs()]}
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i): return self.names[i]
        def get_tensor_shape(self, n): return self.shapes[n]
        def get_tensor_dtype(self, n): return "float32"
        def get_tensor_mode(self, n): return "INPUT" if n == self.inp else "OUTPUT"
        def create_execution_context(self): return Context(self)

    class Runtime:
        def __init__(self, logger): pass

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            return Engine(plan) if plan.startswith(b"FAKEPLAN\n") else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt, cuda


@pytest.fixture
def fake_trt(monkeypatch):
    trt, cuda = _fakes()
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return trt, cuda


@pytest.fixture
def model_copy(tmp_path):
    if not (LUNG / "card.json").exists():
        pytest.skip("bundled model missing")
    return copy_model(LUNG, tmp_path / "lung")


def _frames(card, n=3):
    return preprocessed([NORMAL], card, every=25, max_frames=n)


def test_fake_flow_fp16_build_cache_and_run(fake_trt, model_copy):
    trt, cuda = fake_trt
    eng = load(model_copy)  # auto: the fake GPU is "available"
    assert eng.backend == "tensorrt" and eng.precision == "fp16"
    assert eng.backend_reason == "auto: GPU available: Fake GPU 9000 (sm_90), TensorRT 10.0.fake"
    impl = eng.impl
    assert impl.engine_path.parent == model_copy / ".trt_cache"
    assert impl.engine_path.name.startswith("Fake-GPU-9000_sm90_trt10.0.fake_fp16_")
    assert impl.engine_path.exists() and impl.timing_cache_path.read_bytes() == b"timing-cache"
    assert impl.engine.meta["flags"] == ["FP16"] and cuda.counters["builds"] == 1
    ref = load(model_copy, backend="onnxruntime")
    for x in _frames(eng.card):
        (ma, sa), (mb, sb) = eng.infer(x[None]), ref.infer(x[None])
        np.testing.assert_allclose(ma, mb, atol=1e-6)
        np.testing.assert_allclose(sa, sb, atol=1e-6)
    eng.close()
    again = load(model_copy, backend="tensorrt")  # from the engine cache: no second build
    assert cuda.counters["builds"] == 1 and again.impl.engine_path == impl.engine_path
    fp32 = load(model_copy, backend="tensorrt", precision="fp32")
    assert cuda.counters["builds"] == 2 and fp32.impl.engine_path != impl.engine_path
    assert fp32.impl.engine.meta["flags"] == []
    (model_copy / ".trt_cache" / impl.engine_path.name).write_bytes(b"stale or foreign engine")
    load(model_copy, backend="tensorrt")  # an engine that does not deserialize is rebuilt
    assert cuda.counters["builds"] == 3


def test_fake_flow_int8_calibrates_on_normal_frames_and_caches(fake_trt, model_copy):
    trt, cuda = fake_trt
    card = ModelCard.load(model_copy)
    assert "onnx_int8" not in card.files or pytest.skip("card already has an INT8 QDQ model")
    with pytest.raises(BackendUnavailable, match="INT8 needs normal frames to calibrate"):
        load(model_copy, backend="tensorrt", precision="int8")
    frames = _frames(card, 4)
    eng = load(model_copy, backend="tensorrt", precision="int8", calib=frames)
    assert eng.precision == "int8" and eng.impl.engine.meta == {"flags": ["FP16", "INT8"], "calibrated": True}
    assert cuda.counters["calib_batches"] == 4  # batch-1 network: one frame per calibration batch
    assert eng.impl.calib_cache_path.read_bytes() == b"calibration-table"
    eng.close()
    load(model_copy, backend="tensorrt", precision="int8", rebuild=True)  # the calibration cache alone is enough
    assert cuda.counters["calib_batches"] == 4 and cuda.counters["builds"] == 2


def test_fake_flow_int8_uses_the_accepted_qdq_model(fake_trt, model_copy):
    trt, cuda = fake_trt
    card = ModelCard.load(model_copy)
    (model_copy / "model.int8.onnx").write_bytes((model_copy / "model.onnx").read_bytes())  # stands in for QDQ
    card.files["onnx_int8"] = "model.int8.onnx"
    card.save(model_copy)
    eng = load(model_copy, backend="tensorrt", precision="int8")  # explicit quantization: no calibrator needed
    assert eng.impl.engine.meta == {"flags": ["FP16", "INT8"], "calibrated": False}


def test_fake_flow_cuda_graph(fake_trt, model_copy):
    trt, cuda = fake_trt
    eng = load(model_copy, backend="tensorrt", cuda_graph=True)
    assert eng.impl.graph_reason == "captured"
    ref = load(model_copy, backend="onnxruntime")
    x = _frames(eng.card, 1)
    np.testing.assert_allclose(eng.infer(x)[0], ref.infer(x)[0], atol=1e-6)
    assert cuda.counters["graph_launches"] == 1


def test_fake_flow_cuda_graph_unsupported_falls_back(monkeypatch, model_copy):
    trt, cuda = _fakes(graphs=False)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    eng = load(model_copy, backend="tensorrt", cuda_graph=True)
    assert eng.impl.graph_reason.startswith("not captured (AttributeError")
    x = _frames(eng.card, 1)
    assert np.isfinite(eng.infer(x)[0]).all()


# ---- the real library (GPU machines) ----------------------------------------------------------------------------------
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT + pycuda + an NVIDIA GPU: {TRT_WHY}")
@pytest.mark.parametrize("precision, atol, rho", [("fp32", 1e-3, 0.999), ("fp16", 2e-2, 0.999)])
def test_real_tensorrt_parity(model_copy, precision, atol, rho):
    from sonomaly.engines.export import spearman

    eng = load(model_copy, backend="tensorrt", precision=precision)
    ref = load(model_copy, backend="torch")
    xs = preprocessed(sorted((REPO / "data" / "demo").glob("*.mp4")), eng.card, every=10, max_frames=8)
    d, s1, s2 = 0.0, [], []
    for x in xs:
        (ma, sa), (mb, sb) = eng.infer(x[None]), ref.infer(x[None])
        d = max(d, float(np.abs(ma - mb).max()))
        s1.append(sa[0])
        s2.append(sb[0])
    print(f"TensorRT {precision} vs torch: map max |d| {d:.2e}, rho {spearman(s2, s1):.5f}")
    assert d <= atol and spearman(s2, s1) >= rho


@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT + pycuda + an NVIDIA GPU: {TRT_WHY}")
def test_real_tensorrt_int8_and_cuda_graph(model_copy):
    card = ModelCard.load(model_copy)
    eng = load(model_copy, backend="tensorrt", precision="int8", calib=[NORMAL], cuda_graph=True)
    x = preprocessed([NORMAL], card, every=30, max_frames=2)
    m, s = eng.infer(x[:1])
    assert np.isfinite(m).all() and np.isfinite(s).all()
    print(f"TensorRT INT8 engine {eng.impl.engine_path.name}; CUDA graph {eng.impl.graph_reason}")
