"""Soak test: one ``sonomaly serve`` for a long time at a fixed rate with several aiortc viewers; resources and latency
over time.

    python -m sonomaly.tools.soak --minutes 30 --fps 30 --viewers 4 \\
        --json benchmarks/soak.json --md benchmarks/soak.md --plot benchmarks/soak.png

The server streams ``stamp:<clip>?fps=N`` (each frame carries its id as a barcode, :mod:`sonomaly.stream.stamp`) with
the bundled model. Every ``--interval`` seconds the soak samples, from outside the server process:

* resident memory (``VmRSS``), open file descriptors (``/proc/PID/fd``) and threads (``/proc/PID/status``);
* ``/health``: frames in / out / dropped, output fps, viewers, AI state;
* server latency: capture → composed of every frame composed in the window (``/api/records``);
* viewer latency: capture → decoded in each aiortc viewer (barcode → frame id → the server's capture time; viewers
  and server share the host's monotonic clock), and each viewer's received fps.

"Flat" is judged on the last sample against the first sample taken after the warm-up: memory growth in percent, fd
and thread differences, and the p99 latency of the last quarter against the first quarter.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sonomaly.stream import stamp
from sonomaly.tools.latency import (ServerProcess, ViewerData, _aiortc_viewer, get_json, machine_info, reap, run_child,
                                    stamped)
from sonomaly.tools.machine import cpu_label

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "data" / "demo" / "lung_convex_covid_blines_01.mp4"
DEMO_MODEL = REPO / "models" / "lung"


def proc_stats(pid: int) -> dict[str, int]:
    """RSS (kB), VmHWM (kB), threads and open fds of a process, read from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key.lower() + "_kb"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def shown_in_window(carry: list[tuple[int, int]], taken: list[tuple[int, int]],
                    win_end_ns: int) -> tuple[int, list[tuple[int, int]]]:
    """One viewer's frames in a window, counted by when they were shown: ``carry`` (shown after the previous window's
    end but taken with it) and ``taken`` (``(code, t_shown_ns)`` since the last take) before ``win_end_ns`` count once
    each; those shown later are returned to carry into the next window. Whether a frame's server record has arrived
    yet does not matter here (it does for its latency, which can wait a window for the record)."""
    shown = carry + taken
    return (len({code for code, t in shown if t < win_end_ns}),
            [(code, t) for code, t in shown if t >= win_end_ns])


def longest_gap(last_ns: int | None, taken: list[tuple[int, int]]) -> tuple[float | None, int | None]:
    """The longest time between two frames one viewer showed (ms), over ``taken`` (``(code, t_shown_ns)`` since the last
    take) and the gap from ``last_ns``, its last frame before them; and the new last. What the viewer page's NOT LIVE
    banner (500 ms) would have judged: a gap over it would have shown the banner."""
    times = sorted({t for _, t in taken})
    if not times:
        return None, last_ns
    edges = ([last_ns] if last_ns is not None else []) + times
    gaps = [b - a for a, b in zip(edges, edges[1:])]
    return (round(max(gaps) / 1e6, 1) if gaps else None), times[-1]


def _p(values, q) -> float | None:
    return None if not len(values) else round(float(np.percentile(values, q)), 2)


async def soak(args) -> dict[str, Any]:
    uri = stamped(str(args.source), args.fps)
    t_start = time.monotonic()
    server = ServerProcess("sonomaly", uri, None if args.no_model else str(args.model))
    info = machine_info()
    loop = asyncio.get_running_loop()
    samples: list[dict[str, Any]] = []
    records: dict[int, dict] = {}  # frame id -> record, pruned as windows pass
    last_id = -1
    errors: list[str] = []
    stop = asyncio.Event()
    # each viewer in a process of its own, as N viewers on N machines would be: no viewer waits for another's Python
    # (the first soak ran all receivers in one process, and their decoding, not the server, set the viewer latency)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    viewers: list[tuple[Any, Any]] = []
    for i in range(args.viewers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_viewer_process, args=(server.url, i, child, t_start), daemon=True)
        proc.start()
        viewers.append((proc, parent))

    async def ask(conn, msg, timeout: float = 30.0):
        def rpc():
            if msg is not None:
                conn.send(msg)
            if not conn.poll(timeout):
                raise RuntimeError("a soak viewer did not answer")
            return conn.recv()
        return await loop.run_in_executor(None, rpc)

    async def poll_records() -> None:
        nonlocal last_id
        while not stop.is_set():
            try:
                data = await loop.run_in_executor(
                    None, get_json, f"{server.url}/api/records?since_frame_id={last_id}&limit=10000", 10.0)
                for r in data.get("records") or []:
                    fid = r.get("frame_id")
                    if isinstance(fid, int):
                        records[fid] = r
                        last_id = max(last_id, fid)
            except OSError as exc:
                errors.append(f"records: {exc}")
            await asyncio.sleep(1.0)

    reconnects = [0] * len(viewers)
    pending: list[list[tuple[int, int]]] = [[] for _ in viewers]  # shown, their records not polled yet
    carry: list[list[tuple[int, int]]] = [[] for _ in viewers]  # shown after the window's end, taken with it
    last_shown: list[int | None] = [None] * len(viewers)  # each viewer's last frame (for the gaps between frames)
    tasks = [asyncio.ensure_future(poll_records())]
    try:
        for _, conn in viewers:
            msg = await ask(conn, None, 90.0)
            if msg != "ready":
                raise RuntimeError(f"soak viewer failed: {msg[1] if isinstance(msg, tuple) else msg}")
        t0 = time.monotonic()
        t_end = t0 + args.minutes * 60
        prev_health = await loop.run_in_executor(None, get_json, server.url + "/health", 5.0)
        prev_t = time.monotonic()
        win_start_ns = time.monotonic_ns()
        for i, (_, conn) in enumerate(viewers):  # discard what came before the first window
            msg = await ask(conn, "take")
            if msg[0] == "samples":  # shown since the window began: the first window's frames
                carry[i] = [(code, t) for code, t in msg[1] if t >= win_start_ns]
        while time.monotonic() < t_end:
            await asyncio.sleep(min(args.interval, max(0.0, t_end - time.monotonic())))
            win_end_ns = time.monotonic_ns()
            health = await loop.run_in_executor(None, get_json, server.url + "/health", 5.0)
            now = time.monotonic()
            dt = now - prev_t
            st = proc_stats(server.proc.pid)
            ep = health.get("engine_process") or {}  # the engine in a process of its own (serve's default)
            try:
                est = proc_stats(ep["pid"]) if ep.get("pid") else None
            except OSError:  # it ended between /health and here
                est = None
            by_code = {fid & stamp.ID_MASK: r for fid, r in records.items()}
            server_ms = [(r["t_composed_ns"] - r["t_capture_ns"]) / 1e6 for r in records.values()
                         if win_start_ns <= r["t_composed_ns"] < win_end_ns]
            glass: list[float] = []
            fps_v: list[float] = []
            gaps_v: list[float | None] = []
            unmatched = 0
            for i, (_, conn) in enumerate(viewers):
                msg = await ask(conn, "take")
                if msg[0] != "samples":
                    raise RuntimeError(f"soak viewer {i} failed: {msg[1]}")
                _, taken, reconnects[i], errs = msg
                errors.extend(errs)
                n_shown, carry[i] = shown_in_window(carry[i], taken, win_end_ns)
                gap, last_shown[i] = longest_gap(last_shown[i], taken)
                gaps_v.append(gap)
                # by shown time: counting the frames matched to a record instead moved the last second of a window
                # into the next whenever the record poll fell just after the window's end (27 fps, then 30.2)
                fps_v.append(round(n_shown / ((win_end_ns - win_start_ns) / 1e9), 2))
                taken, pending[i] = pending[i] + taken, []
                seen = set()
                for code, t_show in taken:
                    r = by_code.get(code)
                    if r is None:
                        if t_show >= win_start_ns:  # its record may not be polled yet: try again next window
                            pending[i].append((code, t_show))
                        else:
                            unmatched += 1
                        continue
                    if r["frame_id"] in seen:
                        continue
                    seen.add(r["frame_id"])
                    glass.append((t_show - r["t_capture_ns"]) / 1e6)
            sample = {
                "t_s": round(now - t0, 1),
                "rss_mb": round(st["vmrss_kb"] / 1024, 1),
                "hwm_mb": round(st["vmhwm_kb"] / 1024, 1),
                "fds": st["fds"],
                "threads": st["threads"],
                "engine_rss_mb": round(est["vmrss_kb"] / 1024, 1) if est else None,
                "engine_starts": ep.get("starts"),
                "frames_in": health["frames_in"],
                "fps_in": round((health["frames_in"] - prev_health["frames_in"]) / dt, 2),
                "fps_out": round((health["frames_out"] - prev_health["frames_out"]) / dt, 2),
                "dropped": health["frames_dropped"] - prev_health["frames_dropped"],
                "no_signal": health.get("no_signal_frames", 0) - prev_health.get("no_signal_frames", 0),
                "viewers": health.get("viewers"),
                "ai": health.get("ai"),
                "server_p50_ms": _p(server_ms, 50),
                "server_p99_ms": _p(server_ms, 99),
                "viewer_p50_ms": _p(glass, 50),
                "viewer_p99_ms": _p(glass, 99),
                "viewer_max_ms": _p(glass, 100),
                "viewer_fps": fps_v,
                "viewer_max_gap_ms": gaps_v,  # per viewer: the longest time between two frames it showed
                "unmatched": unmatched,
                "viewer_reconnects": sum(reconnects),
                "load1": round(os.getloadavg()[0], 2),
            }
            samples.append(sample)
            if args.json:  # partial results survive an interrupted run (--from-json rebuilds the report)
                Path(args.json).write_text(json.dumps(
                    {"config": _config(args, uri), "machine": info, "samples": samples, "errors": errors,
                     "partial": True}, indent=1) + "\n")
            if not args.quiet:
                print(json.dumps(sample), flush=True)
            prev_health, prev_t, win_start_ns = health, now, win_end_ns
            for fid in [f for f in records if f < last_id - 2000]:
                del records[fid]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc, conn in viewers:
            try:
                conn.send("stop")
            except OSError:
                pass
        reap([proc for proc, _ in viewers], 15.0)
        server_out = server.output()
        server.stop()
    return {"config": _config(args, uri), "machine": info, "samples": samples, "errors": errors,
            "summary": summarise(samples, args.warmup),
            "server_log_tail": server_out[-2000:], "wall_s": round(time.monotonic() - t_start, 1)}


def _viewer_process(url: str, index: int, conn, t_start: float) -> None:
    """One soak viewer in a process of its own. Like the viewer page, a session that ends (no frame for 5 s, ICE
    failure) is counted and started again. Answers "take" with ``("samples", [(code, t_ns)], reconnects, errors)``
    (what it decoded since the last "take") and ends at "stop"; a failure reaches the parent as ``("error", text)``."""
    import logging

    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    v = ViewerData("aiortc", index)

    async def main() -> None:
        stop, first = asyncio.Event(), asyncio.Event()
        reconnects = 0
        errors: list[str] = []

        async def run() -> None:
            nonlocal reconnects
            while not stop.is_set():
                v.error = None
                try:
                    await _aiortc_viewer(url, v, None, stop, first)
                except Exception as exc:  # noqa: BLE001 - a viewer failing is a result, not a crash of the soak
                    v.error = f"{type(exc).__name__}: {exc}"
                if stop.is_set():
                    break
                reconnects += 1
                errors.append(f"viewer {index} session ended at {time.monotonic() - t_start:.0f} s "
                              f"({v.error or 'no frame for 5 s'}); reconnecting")
                await asyncio.sleep(1.0)

        task = asyncio.ensure_future(run())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(first.wait(), 60)
            conn.send("ready")
            while True:
                msg = await loop.run_in_executor(None, conn.recv)
                if msg != "take":
                    break
                taken, v.samples = v.samples, []
                errs, errors[:] = list(errors), []
                conn.send(("samples", [(c, t) for c, t, *_ in taken], reconnects, errs))
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

    run_child(main, conn)


def _config(args, uri: str) -> dict[str, Any]:
    return {"source": uri, "model": None if args.no_model else str(args.model), "fps": args.fps,
            "viewers": args.viewers, "minutes": args.minutes, "interval_s": args.interval, "warmup_s": args.warmup}


def summarise(samples: list[dict[str, Any]], warmup_s: float = 60.0) -> dict[str, Any]:
    """Flatness is judged from the first sample after ``warmup_s`` (allocator, codec and JIT warm-up) to the last."""
    samples = [s for s in samples if s["t_s"] >= warmup_s] or samples
    if len(samples) < 2:
        return {"samples": len(samples)}
    first, last = samples[0], samples[-1]
    q = max(1, len(samples) // 4)
    head, tail = samples[:q], samples[-q:]

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(float(np.mean(vals)), 2) if vals else None

    return {
        "samples": len(samples),
        "duration_s": last["t_s"],
        "baseline_t_s": first["t_s"],
        "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"], "rss_mb_max": max(s["rss_mb"] for s in samples),
        "rss_growth_pct": round(100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"], 2),
        "fds_first": first["fds"], "fds_last": last["fds"], "fds_max": max(s["fds"] for s in samples),
        "threads_first": first["threads"], "threads_last": last["threads"],
        "threads_max": max(s["threads"] for s in samples),
        **_engine_summary(first, last, samples),
        "server_p99_ms_first_quarter": mean(head, "server_p99_ms"),
        "server_p99_ms_last_quarter": mean(tail, "server_p99_ms"),
        "viewer_p99_ms_first_quarter": mean(head, "viewer_p99_ms"),
        "viewer_p99_ms_last_quarter": mean(tail, "viewer_p99_ms"),
        "viewer_p99_ms_worst_window": max((s["viewer_p99_ms"] for s in samples if s["viewer_p99_ms"] is not None),
                                          default=None),
        "fps_out_mean": mean(samples, "fps_out"), "fps_out_min": min(s["fps_out"] for s in samples),
        "viewer_fps_mean": round(float(np.mean([np.mean(s["viewer_fps"]) for s in samples])), 2),
        # the longest time any viewer went without a new frame, and in how many windows one went over the viewer
        # page's NOT LIVE limit (500 ms)
        "viewer_max_gap_ms": max((g for s in samples for g in s.get("viewer_max_gap_ms", []) if g is not None),
                                 default=None),
        "windows_with_gap_over_500ms": sum(any(g is not None and g > 500 for g in s.get("viewer_max_gap_ms", []))
                                           for s in samples),
        "dropped_total": sum(s["dropped"] for s in samples),
        "no_signal_total": sum(s["no_signal"] for s in samples),
        "viewers_min": min((s["viewers"] or 0) for s in samples),
        "viewer_reconnects": samples[-1].get("viewer_reconnects", 0),
        "load1_mean": mean(samples, "load1"),
    }


def _engine_summary(first: dict, last: dict, samples: list[dict]) -> dict[str, Any]:
    """The engine process's memory over the run (absent in reports without one)."""
    if not first.get("engine_rss_mb") or not last.get("engine_rss_mb"):
        return {}
    return {"engine_rss_mb_first": first["engine_rss_mb"], "engine_rss_mb_last": last["engine_rss_mb"],
            "engine_rss_mb_max": max(s.get("engine_rss_mb") or 0 for s in samples),
            "engine_rss_growth_pct": round(100 * (last["engine_rss_mb"] - first["engine_rss_mb"])
                                           / first["engine_rss_mb"], 2),
            "engine_restarts": (last.get("engine_starts") or 1) - (first.get("engine_starts") or 1)}


def markdown(report: dict[str, Any]) -> str:
    c, m, s = report["config"], report["machine"], report["summary"]
    lines = [
        "# Soak: resources and latency over time",
        "",
        f"`python -m sonomaly.tools.soak --minutes {c['minutes']:g} --fps {c['fps']:g} --viewers {c['viewers']}` "
        "(run under `flock /tmp/sonomaly-cpu.lock`). Source `" + c["source"] + "`, model `" + str(c["model"]) + "`, "
        f"{c['viewers']} headless aiortc viewers, each in a process of its own, a sample every {c['interval_s']:g} s. "
        "Generated by `tools/soak.py` from `benchmarks/soak.json`.",
        "",
        f"Machine: {cpu_label(m)}, {m.get('nproc')} cores, "
        f"{m.get('memory_gib')} GiB, Python {m.get('python')}, aiortc {m.get('aiortc')}, PyAV {m.get('av')}, "
        f"onnxruntime {m.get('onnxruntime')}; load average at start {m.get('loadavg_at_start')}, "
        f"mean 1-min load during the run {s.get('load1_mean')}.",
        "",
    ]
    if s.get("samples", 0) < 2:
        return "\n".join(lines + ["Too few samples.", ""])
    lines += [
        "| measure | first sample | last sample | max / worst | verdict |",
        "|---|---|---|---|---|",
        f"| server RSS (MB) | {s['rss_mb_first']} | {s['rss_mb_last']} | {s['rss_mb_max']} | growth "
        f"{s['rss_growth_pct']:+.1f} % |",
        *([f"| engine process RSS (MB) | {s['engine_rss_mb_first']} | {s['engine_rss_mb_last']} | "
           f"{s['engine_rss_mb_max']} | growth {s['engine_rss_growth_pct']:+.1f} %, restarts "
           f"{s['engine_restarts']} |"] if s.get("engine_rss_mb_first") else []),
        f"| open fds | {s['fds_first']} | {s['fds_last']} | {s['fds_max']} | {s['fds_last'] - s['fds_first']:+d} |",
        f"| threads | {s['threads_first']} | {s['threads_last']} | {s['threads_max']} | "
        f"{s['threads_last'] - s['threads_first']:+d} |",
        f"| server p99 capture→composed (ms), mean of first / last quarter | {s['server_p99_ms_first_quarter']} | "
        f"{s['server_p99_ms_last_quarter']} | | |",
        f"| viewer p99 capture→decoded (ms), mean of first / last quarter | {s['viewer_p99_ms_first_quarter']} | "
        f"{s['viewer_p99_ms_last_quarter']} | {s['viewer_p99_ms_worst_window']} (worst window) | |",
        f"| output fps (mean / min window) | {s['fps_out_mean']} | | {s['fps_out_min']} | |",
        f"| fps received per viewer (mean) | {s['viewer_fps_mean']} | | | |",
        *([f"| longest time a viewer went without a new frame (ms) / windows with one over 500 ms (the viewer "
           f"page's NOT LIVE limit) | | | {s['viewer_max_gap_ms']} / {s['windows_with_gap_over_500ms']} | |"]
          if s.get("viewer_max_gap_ms") is not None else []),
        f"| raw frames dropped / NO SIGNAL frames | {s['dropped_total']} / {s['no_signal_total']} | | | |",
        f"| viewers connected (min over samples) / viewer sessions restarted | {s['viewers_min']} / "
        f"{s.get('viewer_reconnects', 0)} | | | |",
        "",
        f"Duration measured: {s['duration_s']:.0f} s after the viewers' first frames; 'first sample' is the one at "
        f"{s['baseline_t_s']:.0f} s (after the warm-up), {s['samples']} samples from there."
        + (" **Partial run** (stopped before the planned duration)." if report.get("partial") else "")
        + " Viewer sessions restarted: " + (_errors_summary(report["errors"]) if report["errors"] else "none") + ".",
        "",
    ]
    if report.get("note"):
        lines += [report["note"], ""]
    if report.get("plot"):
        lines += [f"![soak over time]({report['plot']})", ""]
    lines += ["## Samples", "", "| t (s) | RSS MB | fds | threads | fps out | server p99 ms | viewer p50 / p99 ms | "
              "viewer fps | longest gap ms (worst viewer) | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    step = max(1, len(report["samples"]) // 30)
    for r in report["samples"][::step]:
        gap = max((g for g in r.get("viewer_max_gap_ms", []) if g is not None), default=None)
        lines.append(f"| {r['t_s']:.0f} | {r['rss_mb']} | {r['fds']} | {r['threads']} | {r['fps_out']} | "
                     f"{r['server_p99_ms']} | {r['viewer_p50_ms']} / {r['viewer_p99_ms']} | "
                     f"{', '.join(str(x) for x in r['viewer_fps'])} | {gap if gap is not None else '–'} | "
                     f"{r['load1']} |")
    return "\n".join(lines) + "\n"


def _errors_summary(errors: list[str]) -> str:
    import re

    times = [int(m.group(1)) for e in errors if (m := re.search(r"at (\d+) s", e))]
    reasons = sorted({e.split("(", 1)[-1].split(")")[0] for e in errors})
    if not times:
        return "; ".join(errors[:5])
    return (f"{len(errors)} ({', '.join(reasons)}), first at {times[0]} s, last at {times[-1]} s, "
            f"{sum(1 for t in times if t < 700)} of them in the first 700 s")


def plot(report: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["samples"]
    t = [r["t_s"] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [r["rss_mb"] for r in rows], label="server")
    if any(r.get("engine_rss_mb") for r in rows):
        ax[0].plot(t, [r.get("engine_rss_mb") or np.nan for r in rows], label="engine process")
        ax[0].legend()
    ax[0].set_ylabel("RSS (MB)")
    ax[1].plot(t, [r["fds"] for r in rows], label="fds")
    ax[1].plot(t, [r["threads"] for r in rows], label="threads")
    ax[1].legend()
    ax[2].plot(t, [r["server_p99_ms"] for r in rows], label="server p99 capture→composed")
    ax[2].plot(t, [r["viewer_p99_ms"] for r in rows], label="viewer p99 capture→decoded")
    ax[2].plot(t, [r["viewer_p50_ms"] for r in rows], label="viewer p50", alpha=0.6)
    ax[2].set_ylabel("ms")
    ax[2].legend()
    ax[3].plot(t, [r["fps_out"] for r in rows], label="server output")
    ax[3].plot(t, [float(np.mean(r["viewer_fps"])) for r in rows], label="per viewer (mean)")
    ax[3].set_ylabel("fps")
    ax[3].set_xlabel("minutes")
    ax[3].legend()
    fig.suptitle(f"Sonomaly soak: {report['config']['viewers']} viewers, {report['config']['fps']:g} fps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(DEMO_CLIP))
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--viewers", type=int, default=4)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds after which the baseline sample for 'flat' is taken (default 60)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--from-json", default=None, help="rebuild the report (md, plot) from a (partial) JSON")
    p.add_argument("--note", default=None, help="a paragraph added to the markdown (how to read this run)")
    args = p.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["summary"] = summarise(report["samples"], report["config"].get("warmup_s", args.warmup))
    else:
        report = asyncio.run(soak(args))
    if args.note:
        report["note"] = args.note
    if args.plot and plot(report, args.plot):
        report["plot"] = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.md or args.plot)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
