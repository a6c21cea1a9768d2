"""The engine in a process of its own against the engine in the caller's process: ms per inference and CPU per call.

``sonomaly serve`` runs its engine in a process of its own (``--engine-process on``, engines/isolated.py) so that a
crash or hang in the inference library cannot end the video. Each call then carries the preprocessed tensor to the
engine process and the map back over a socket. This times ``Engine.infer`` both ways for each shipped model at its
own input size, on ONNX Runtime with the live options (one thread, no spinning), the two engines called in turn
(rounds of ``--iters`` calls each, so other load hits both alike); CPU per call is the process time of the caller
plus, for the engine process, its own (``/proc/<pid>/stat``).
``sonomaly bench process [--models DIR ...] [--iters 200] [--rounds 3] [--json OUT] [--md OUT]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sonomaly.tools.machine import cpu_fields, cpu_label, memory_gib, process_cpu_s

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None, help="model dirs (default: models/*/ with a card.json)")
    p.add_argument("--iters", type=int, default=200, help="calls per engine per round (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the two engines in turn (default 3)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="also write a Markdown table here")


def bench_model(model_dir: Path, iters: int, rounds: int) -> dict:
    from sonomaly import engines

    live = dict(engines.LIVE_OPTIONS)
    local = engines.load(model_dir, backend="onnxruntime", **live)
    remote = engines.load(model_dir, backend="onnxruntime", process=True, **live)
    try:
        card = local.card
        x = np.random.default_rng(0).random((1, card.input.channels, *card.input_size), dtype=np.float32)
        same = all(np.array_equal(a, b) for a, b in zip(local.infer(x), remote.infer(x)))
        times: dict[str, list[float]] = {"in_process": [], "own_process": []}
        cpu: dict[str, float] = {"in_process": 0.0, "own_process": 0.0}
        for _ in range(rounds):
            for name, eng in (("in_process", local), ("own_process", remote)):
                pid = getattr(eng.impl, "pid", None)
                c0 = time.process_time() + (process_cpu_s(pid) if pid else 0.0)
                for _ in range(iters):
                    t = time.perf_counter()
                    eng.infer(x)
                    times[name].append((time.perf_counter() - t) * 1e3)
                cpu[name] += time.process_time() + (process_cpu_s(pid) if pid else 0.0) - c0
        out = {"model": card.name, "dir": str(model_dir), "input": [1, card.input.channels, *card.input_size],
               "input_kib": round(x.nbytes / 1024, 1), "identical_outputs": same}
        for name, ts in times.items():
            out[name] = {"ms_p50": round(float(np.median(ts)), 3), "ms_p99": round(float(np.percentile(ts, 99)), 3),
                         "cpu_ms_per_call": round(cpu[name] * 1e3 / len(ts), 3), "calls": len(ts)}
        out["added_ms_p50"] = round(out["own_process"]["ms_p50"] - out["in_process"]["ms_p50"], 3)
        return out
    finally:
        remote.close()


def markdown(result: dict) -> str:
    lines = [f"Machine: {cpu_label(result['machine'])}, {result['machine']['cores']} cores; "
             f"{result['date']}; `{result['command']}`", "",
             "| model | input | in process p50 / p99 ms | own process p50 / p99 ms | added p50 ms | CPU ms a call, in / "
             "own process (both processes) | outputs identical |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["results"]:
        a, b = r["in_process"], r["own_process"]
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input']))} ({r['input_kib']} KiB) | {a['ms_p50']} / "
                     f"{a['ms_p99']} | {b['ms_p50']} / {b['ms_p99']} | {r['added_ms_p50']} | {a['cpu_ms_per_call']} / "
                     f"{b['cpu_ms_per_call']} | {'yes' if r['identical_outputs'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import onnxruntime

    models = [Path(m) for m in args.models] if args.models else sorted(
        p.parent for p in (REPO / "models").glob("*/card.json"))
    results = []
    for m in models:
        r = bench_model(m, args.iters, args.rounds)
        results.append(r)
        print(f"{r['model']:10s} in process {r['in_process']['ms_p50']:7.3f} ms   own process "
              f"{r['own_process']['ms_p50']:7.3f} ms   added {r['added_ms_p50']:6.3f} ms   identical "
              f"{r['identical_outputs']}", flush=True)
    result = {"benchmark": "engine_process", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "sonomaly bench process " + " ".join(
                  f"--{k} {v}" for k, v in (("iters", args.iters), ("rounds", args.rounds))),
              "machine": {**cpu_fields(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
                          "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                          "platform": platform.platform()},
              "results": results}
    md = markdown(result)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(md)
    return 0 if all(r["identical_outputs"] for r in results) else 1
