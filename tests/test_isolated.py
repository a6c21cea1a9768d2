"""The engine in a process of its own (engines/isolated.py): the same numbers as in-process, and a crash, a hang or
an error inside it costs a call, never the caller (the pipeline-level scenarios are in stream/faults.py:
engine.process_crash, engine.process_hang)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sonomaly import engines
from sonomaly.engines.isolated import EngineCrashed, IsolatedBackend

LIVE = {"threads": 1, "spin": False}


def _x(card, seed=0):
    return np.random.default_rng(seed).random((1, card.input.channels, *card.input_size), dtype=np.float32)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def isolated(lung_model):
    eng = engines.load(lung_model, backend="onnxruntime", process={"timeout_s": 1.0, "restart_backoff_s": 0.2}, **LIVE)
    yield eng
    eng.close()


def test_same_numbers_as_in_process_and_a_clean_close(isolated, lung_model):
    local = engines.load(lung_model, backend="onnxruntime", **LIVE)
    assert isolated.backend == "onnxruntime" and isolated.backend_reason.endswith("in a process of its own")
    assert isolated.precision == local.precision and isolated.card.name == local.card.name
    pid = isolated.impl.pid
    assert pid and pid != os.getpid()
    for seed in range(3):
        x = _x(local.card, seed)
        (m1, s1), (m2, s2) = isolated.infer(x), local.infer(x)
        assert m1.shape == m2.shape == local.card.map_shape and m1.dtype == np.float32
        np.testing.assert_array_equal(m1, m2)  # the same backend, the same options: bit for bit
        np.testing.assert_array_equal(s1, s2)
    isolated.close()
    assert _gone(pid)
    with pytest.raises(EngineCrashed):
        isolated.infer(_x(local.card))


def test_a_crash_is_an_error_then_a_fresh_process_after_the_back_off(isolated):
    x = _x(isolated.card)
    good = isolated.infer(x)
    pid = isolated.impl.pid
    os.kill(pid, signal.SIGSEGV)  # what a native crash in the inference library does to the process
    with pytest.raises(EngineCrashed, match="SIGSEGV"):
        isolated.infer(x)
    assert _gone(pid)
    with pytest.raises(EngineCrashed, match="next start in"):  # within the back-off: no restart loop
        isolated.infer(x)
    time.sleep(0.25)
    again = isolated.infer(x)  # a new process, the same numbers
    np.testing.assert_array_equal(again[0], good[0])
    st = isolated.impl.stats()
    assert st["pid"] not in (None, pid) and st["starts"] == 2 and st["crashes"] == 1


def test_a_hang_is_killed_after_the_timeout(isolated):
    x = _x(isolated.card)
    isolated.infer(x)
    pid = isolated.impl.pid
    os.kill(pid, signal.SIGSTOP)  # frozen, as in a call that never returns
    t0 = time.monotonic()
    with pytest.raises(EngineCrashed, match="did not answer within 1 s"):
        isolated.infer(x)
    assert 0.9 <= time.monotonic() - t0 < 5.0
    assert _gone(pid) and isolated.impl.stats()["timeouts"] == 1
    time.sleep(0.25)
    isolated.infer(x)
    assert isolated.impl.pid != pid


def test_back_off_doubles_while_failures_go_on_and_resets_after_a_good_answer(isolated):
    impl = isolated.impl
    x = _x(isolated.card)
    os.kill(impl.pid, signal.SIGKILL)
    with pytest.raises(EngineCrashed, match="SIGKILL"):
        isolated.infer(x)
    w1 = impl._restart_at - time.monotonic()
    impl._failed("a second failure before any good answer")  # e.g. the new process dies while loading
    w2 = impl._restart_at - time.monotonic()
    assert 0.1 < w1 <= 0.2 and 1.8 * w1 < w2 <= 0.4, (w1, w2)
    time.sleep(w2 + 0.05)
    isolated.infer(x)  # a fresh process answers: the back-off starts over
    os.kill(impl.pid, signal.SIGKILL)
    with pytest.raises(EngineCrashed):
        isolated.infer(x)
    assert 0.1 < impl._restart_at - time.monotonic() <= 0.2


def test_an_engine_error_comes_back_as_an_error_and_the_process_lives(isolated):
    impl = isolated.impl
    pid = impl.pid
    with pytest.raises(RuntimeError, match="ValueError"):
        impl.infer(np.zeros((1, 7, 5, 5), np.float32))  # the engine itself refuses the shape
    assert impl.pid == pid and impl.stats()["crashes"] == 0
    isolated.infer(_x(isolated.card))


def test_the_engine_process_ends_when_its_server_is_killed(lung_model):
    # a server that dies without closing anything (SIGKILL): the engine process sees its socket close and exits
    code = ("import sys; from sonomaly import engines; "
            f"e = engines.load({str(lung_model)!r}, backend='onnxruntime', process=True, threads=1, spin=False); "
            "print(e.impl.pid, flush=True); sys.stdin.read()")
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert not _gone(child)
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 5.0
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child) or open(f"/proc/{child}/stat").read().split(")")[1].split()[0] == "Z"
    finally:
        if server.poll() is None:
            server.kill()


def test_the_engine_process_takes_the_ai_nice_value(lung_model):
    eng = engines.load(lung_model, backend="onnxruntime", process={"nice": 7}, **LIVE)
    try:
        stat = open(f"/proc/{eng.impl.pid}/stat").read().rsplit(")", 1)[1].split()
        assert int(stat[16]) == os.nice(0) + 7  # field 19 of stat: the nice value (relative to ours)
    finally:
        eng.close()


def test_a_model_that_cannot_load_fails_at_load_with_the_reason(lung_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lung_model, broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(onnx.read_bytes()[:200])  # truncated
    with pytest.raises(engines.BackendUnavailable) as err:
        engines.load(broken, backend="onnxruntime", process=True, **LIVE)
    assert "onnx" in str(err.value).lower() or "protobuf" in str(err.value).lower(), err.value
    with pytest.raises(ValueError):
        IsolatedBackend(lung_model, "onnxruntime", timeout_s=0)


def test_serve_survives_its_engine_process_crashing(serve, demo_clip, lung_model):
    server = serve("--source", str(demo_clip), "--model", str(lung_model), "--loop")
    h = server.health()
    pid = h["engine_process"]["pid"]
    assert h["ai"] in ("ok", "delayed") and pid
    f0 = h["frames_out"]
    os.kill(pid, signal.SIGSEGV)
    seen_off, deadline = None, time.monotonic() + 10.0
    while time.monotonic() < deadline:
        h = server.health()
        if h["ai"] == "off" and seen_off is None:
            seen_off = h["ai_reason"]
        if seen_off and h["ai"] == "ok" and h["engine_process"]["pid"] not in (None, pid):
            break
        time.sleep(0.05)
    assert seen_off and "SIGSEGV" in seen_off, seen_off
    assert h["ai"] == "ok" and h["engine_process"]["starts"] == 2 and h["engine_process"]["crashes"] == 1
    assert h["frames_out"] - f0 > 20  # the video went on
    assert _gone(pid)


def test_serve_engine_process_off_keeps_the_engine_in_the_server(serve, demo_clip, lung_model):
    server = serve("--source", str(demo_clip), "--model", str(lung_model), "--loop", "--engine-process", "off")
    h = server.health()
    assert h["engine_process"] is None and "process of its own" not in h["backend_reason"]


def test_bench_process_times_both_ways_and_checks_the_outputs(tmp_path, lung_model):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "sonomaly.tools", "bench", "process", "--models", str(lung_model),
                        "--iters", "5", "--rounds", "2", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["identical_outputs"] is True and row["in_process"]["calls"] == row["own_process"]["calls"] == 10
    for way in ("in_process", "own_process"):
        assert 0 < row[way]["ms_p50"] <= row[way]["ms_p99"] and row[way]["cpu_ms_per_call"] > 0
    assert "| lung-default |" in r.stdout
