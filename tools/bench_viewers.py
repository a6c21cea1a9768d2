"""Viewers: server CPU and per-viewer latency at 1..16 viewers, encode once (shared) vs one encoder per viewer.

For each mode and viewer count, a fresh `sonomaly serve` runs the bundled clip (no model: the streaming cost alone)
and N aiortc viewers connect from this process. The viewers do not decode (a stub decoder notes when each complete
frame leaves aiortc's jitter buffer), so the client's own CPU stays small and the numbers are the server's. Latency is
capture → complete frame at the viewer, on the one monotonic clock of the machine: each frame's RTP timestamp is
matched to its capture time from ``/api/records`` (pts follow capture time on the 90 kHz clock). Server CPU is
utime+stime of the server process over the measured window (100 % = one core).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from sonomaly.tools.machine import cpu_fields, cpu_label, process_cpu_s

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "data" / "demo" / "lung_convex_covid_blines_01.mp4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--viewers", default="1,2,4,8,16", help="viewer counts (default 1,2,4,8,16)")
    p.add_argument("--modes", default="shared,per-viewer", help="encode modes (default shared,per-viewer)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per point (default 6)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds after all viewers are up (default 2)")
    p.add_argument("--source", default=str(DEMO_CLIP))
    p.add_argument("--codec", default="vp8", choices=["vp8", "h264"])
    p.add_argument("--bitrate", default="2M", help="bitrate in both modes (default 2M)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "viewers.json"))
    p.add_argument("--md", default=str(REPO / "benchmarks" / "viewers.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON, measure nothing")


# ---------------------------------------------------------------------------------------------------- receivers
class _Arrivals:
    """A stand-in for aiortc's decoder: records (arrival ns, RTP timestamp) of each complete frame."""

    registry: list["_Arrivals"] = []
    lock = threading.Lock()

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []
        with _Arrivals.lock:
            _Arrivals.registry.append(self)

    def decode(self, encoded_frame) -> list:
        self.items.append((time.monotonic_ns(), encoded_frame.timestamp))
        return []


def _install_stub_decoder() -> None:
    import aiortc.rtcrtpreceiver as rx

    rx.get_decoder = lambda codec: _Arrivals()


def _post(url: str, body: bytes, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


async def _viewer(url: str, connected: asyncio.Event | None):
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")

    @pc.on("connectionstatechange")
    def _s() -> None:
        if pc.connectionState == "connected" and connected is not None:
            connected.set()

    await pc.setLocalDescription(await pc.createOffer())
    ans = await asyncio.get_running_loop().run_in_executor(
        None, _post, url + "/offer", json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode())
    await pc.setRemoteDescription(RTCSessionDescription(**ans))
    return pc


# ---------------------------------------------------------------------------------------------------- one point
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latencies(arrivals: list[tuple[int, int]], captures: list[int]) -> np.ndarray:
    """Match RTP timestamps (random origin) to capture times: the offset is the mode of the differences."""
    if not arrivals or not captures:
        return np.array([])
    ticks = np.array([c * 90_000 // 1_000_000_000 for c in captures], dtype=np.int64)
    cap = np.array(captures, dtype=np.int64)
    diffs = Counter()
    for _, ts in arrivals[:40]:
        for t in ticks:
            diffs[(ts - int(t)) % (1 << 32)] += 1
    # rounding may split the true offset over two neighbours: merge them
    best, _ = max(diffs.items(), key=lambda kv: kv[1] + diffs.get(kv[0] - 1, 0) + diffs.get(kv[0] + 1, 0))
    out = []
    for t_arr, ts in arrivals:
        want = (ts - best) % (1 << 32)
        # unwrap against the capture ticks' range
        base = int(ticks[0]) - (int(ticks[0]) % (1 << 32))
        want += base
        if want < ticks[0] - (1 << 31):
            want += 1 << 32
        i = int(np.searchsorted(ticks, want))
        for j in (i - 1, i, i + 1):
            if 0 <= j < len(ticks) and abs(int(ticks[j]) - want) <= 2:
                out.append((t_arr - int(cap[j])) / 1e6)
                break
    return np.array(out)


def run_point(mode: str, n: int, args) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sonomaly.tools", "serve", "--source", args.source, "--loop", "--port", str(port),
           "--log-level", "warning", "--encode", mode, "--codec", args.codec, "--bitrate", args.bitrate,
           "--no-hud", "--signalling-rate", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(url + "/health")["frames_out"] > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        _Arrivals.registry.clear()

        async def main():
            events = [asyncio.Event() for _ in range(n)]
            pcs = await asyncio.gather(*(_viewer(url, e) for e in events))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            await asyncio.sleep(args.warmup)
            loop = asyncio.get_running_loop()
            h0 = await loop.run_in_executor(None, _get, url + "/health")
            marks = [len(a.items) for a in _Arrivals.registry]
            cpu0, t0, t0_ns = process_cpu_s(proc.pid), time.monotonic(), time.monotonic_ns()
            c0 = time.process_time()
            await asyncio.sleep(args.seconds)
            cpu1, t1 = process_cpu_s(proc.pid), time.monotonic()
            c1 = time.process_time()
            h1 = await loop.run_in_executor(None, _get, url + "/health")
            recs = await loop.run_in_executor(None, _get, url + "/api/records?limit=10000")
            snaps = [list(a.items[m:]) for a, m in zip(list(_Arrivals.registry), marks)]
            await asyncio.gather(*(pc.close() for pc in pcs))
            return h0, h1, cpu1 - cpu0, t1 - t0, c1 - c0, recs, snaps, t0_ns

        h0, h1, cpu, wall, client_cpu, recs, snaps, t0_ns = asyncio.run(main())
        captures = sorted(r["t_capture_ns"] for r in recs["records"] if r["t_capture_ns"] >= t0_ns - 2_000_000_000)
        composed_fps = (h1["frames_out"] - h0["frames_out"]) / wall
        per_viewer = []
        for items in snaps:
            lat = _latencies(items, captures)
            per_viewer.append({"frames": len(items), "fps": round(len(items) / wall, 2),
                               "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                               "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
                               "matched": int(lat.size)})
        p99s = [v["p99_ms"] for v in per_viewer if v["p99_ms"] is not None]
        fps = [v["fps"] for v in per_viewer]
        enc = h1.get("encoder") or {}
        return {
            "mode": mode, "viewers": n, "connected": len(snaps), "seconds": round(wall, 2),
            "server_cpu_pct": round(100 * cpu / wall, 1), "client_cpu_pct": round(100 * client_cpu / wall, 1),
            "composed_fps": round(composed_fps, 2),
            "viewer_fps_min": min(fps) if fps else None, "viewer_fps_mean": round(float(np.mean(fps)), 2) if fps else None,
            "p99_ms_median": round(float(np.median(p99s)), 1) if p99s else None,
            "p99_ms_max": round(float(max(p99s)), 1) if p99s else None,
            "p50_ms_median": round(float(np.median([v["p50_ms"] for v in per_viewer if v["p50_ms"] is not None])), 1)
            if p99s else None,
            "encode_ms_mean": enc.get("encode_ms_mean"), "per_viewer": per_viewer,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------------- report
def _table(points: list[dict]) -> str:
    rows = ["| viewers | encode | server CPU (% of a core) | viewer fps (min / mean) | per-viewer p99 ms (median / worst)"
            " | p50 ms | composed fps |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        rows.append(f"| {p['viewers']} | {p['mode']} | {p['server_cpu_pct']} | {p['viewer_fps_min']} / "
                    f"{p['viewer_fps_mean']} | {p['p99_ms_median']} / {p['p99_ms_max']} | {p['p50_ms_median']} | "
                    f"{p['composed_fps']} |")
    return "\n".join(rows)


def _machine() -> dict:
    import aiortc
    import av

    return {**cpu_fields(), "cores": os.cpu_count(), "python": platform.python_version(),
            "aiortc": aiortc.__version__, "av": av.__version__, "load_avg_at_start": os.getloadavg()}


def _slopes(points: list[dict]) -> dict[str, float]:
    """Server CPU (% of a core) added per viewer, least squares over the viewer counts, per mode."""
    out = {}
    for mode in sorted({p["mode"] for p in points}):
        xs = np.array([p["viewers"] for p in points if p["mode"] == mode], float)
        ys = np.array([p["server_cpu_pct"] for p in points if p["mode"] == mode], float)
        if len(xs) >= 2:
            out[mode] = round(float(np.polyfit(xs, ys, 1)[0]), 2)
    return out


def write_md(result: dict, path: str) -> str:
    points, machine = result["points"], result["machine"]
    table = _table(points)
    slopes = _slopes(points)
    most = max(p["viewers"] for p in points)
    at = {p["mode"]: p for p in points if p["viewers"] == most}
    md = [
        "# Viewers: encode once vs one encoder per viewer",
        "",
        f"`sonomaly bench viewers` — {result['codec'].upper()} at {result['bitrate']}bit/s in both modes, the bundled "
        f"clip ({result['source']}, 450×450, ~39 fps) without a model, {result['seconds']:g} s measured per point "
        f"after the warm-up; aiortc viewers in one process on the same machine (they do not decode; their process "
        f"used at most {max(p['client_cpu_pct'] for p in points):.0f} % of a core).",
        "",
        f"Machine: {cpu_label(machine)}, {machine['cores']} cores, shared with other engineers' work (run under the "
        f"shared benchmark lock; load average at start {machine['load_avg_at_start'][0]:.1f}, at end "
        f"{result['load_avg_at_end'][0]:.1f}); Python {machine['python']}, aiortc {machine['aiortc']}, "
        f"PyAV {machine['av']}.",
        "",
        table,
        "",
        "Server CPU: the `sonomaly serve` process (grabber, composer, encoder(s), aiortc; the bench viewers open no data channel), "
        "100 % = one core. Latency: capture → complete frame at the viewer (out of aiortc's jitter buffer, before "
        "decoding), per viewer, on the machine's one monotonic clock.",
        "",
    ]
    if {"shared", "per-viewer"} <= set(slopes) and {"shared", "per-viewer"} <= set(at):
        md += [
            "## Reading",
            "",
            f"- Each added viewer costs about **{slopes['shared']:.1f} %** of a core with one shared encoder "
            f"(packetising and sending only) and about **{slopes['per-viewer']:.1f} %** with one encoder per viewer.",
            f"- At {most} viewers: {at['shared']['server_cpu_pct']:.0f} % vs {at['per-viewer']['server_cpu_pct']:.0f} "
            f"% of a core; per-viewer p99 {at['shared']['p99_ms_median']:.0f} ms vs "
            f"{at['per-viewer']['p99_ms_median']:.0f} ms (worst viewer {at['shared']['p99_ms_max']:.0f} vs "
            f"{at['per-viewer']['p99_ms_max']:.0f} ms); slowest viewer {at['shared']['viewer_fps_min']:.1f} vs "
            f"{at['per-viewer']['viewer_fps_min']:.1f} fps.",
            "- With one encoder per viewer, the encoders compete for the two cores, so latency and frame rate "
            "degrade with the viewer count. With the shared encoder, the encode cost is paid once per frame "
            "(`encode_ms_mean` in the JSON) and latency stays flat.",
            "",
        ]
    md += ["Raw data: [viewers.json](viewers.json).", ""]
    Path(path).write_text("\n".join(md))
    return table


def run(args) -> int:
    if args.report_only:
        print(write_md(json.loads(Path(args.json).read_text()), args.md))
        return 0
    import logging

    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _install_stub_decoder()
    counts = [int(x) for x in str(args.viewers).split(",") if x]
    modes = [m for m in str(args.modes).split(",") if m]
    machine = _machine()
    points = []
    for n in counts:
        for mode in modes:
            p = run_point(mode, n, args)
            points.append(p)
            print(f"{mode:10s} {n:2d} viewers: server CPU {p['server_cpu_pct']:5.1f} %  viewer fps min "
                  f"{p['viewer_fps_min']}  p99 {p['p99_ms_median']} / {p['p99_ms_max']} ms", flush=True)
    result = {"machine": machine, "codec": args.codec, "bitrate": args.bitrate, "source": Path(args.source).name,
              "seconds": args.seconds, "warmup": args.warmup, "load_avg_at_end": os.getloadavg(), "points": points}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(write_md(result, args.md))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
