"""``sonomaly latency``: glass-to-glass latency of a live stream, measured in real receivers on the host clock.

How (details in docs/LATENCY.md):

1. The server streams a ``stamp:<uri>`` source: each frame carries its id as a barcode (:mod:`sonomaly.stream.stamp`),
   and the server records each id's capture time and stage times (``GET /api/records``, polled during the run).
2. Viewers connect like any viewer (``POST /offer``) and read the barcode of every frame they show:

   * ``chromium`` — headless Chromium (Debian's): ``requestVideoFrameCallback`` gives each frame's expected display
     time; the code is read from canvas pixels. Browser times (``performance.timeOrigin`` + metadata, corrected
     against ``Date.now()`` edges) are wall-clock; ``/api/records``' ``clock`` pair maps them onto the server's
     monotonic clock. Receive time (last packet in) splits the remainder into send+network and jitter buffer+decode+
     paint; ``getStats()`` adds jitter-buffer and decode averages;
   * ``aiortc`` — headless aiortc receivers in this process: time = ``time.monotonic_ns()`` when the decoded frame is
     handed over (the same clock as the server: same host).

3. Glass-to-glass = presentation time − capture time, per frame, per viewer, in a window after a warm-up.

Report: p50/p95/p99/max, tail (max − p95), flatness (p90 − p10), received fps, frames lost, stage breakdown, per
viewer; per-window percentiles (drift); JSON and PNG. Exit status 1 when the p99 of the server under test exceeds
``--budget-ms`` (the ``--baseline`` never sets the exit status), 3 when nothing could be measured.

    sonomaly latency --serve data/demo/lung_convex_covid_blines_01.mp4 --model models/lung --fps 30 \\
        --viewers 1,4,8 --baseline naive --json out.json --plot out.png
    sonomaly latency --url http://127.0.0.1:8080      # a server already streaming a stamp: source
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sonomaly.stream import stamp
from sonomaly.tools.machine import cpu_fields, cpu_label, memory_gib

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # several viewers = several windows: none of them may be throttled as "in the background"
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
HARNESS_PATH = "/__sonomaly_latency__"
CHROMIUM_LAYOUTS = ("contexts", "page")
VIAS = ("direct", "janus")  # how viewers get the stream: from the server, or through a local Janus SFU
SERIAL_STAGES = {
    # stages on the path of the frame from capture to the encoder, in order
    "sonomaly": ("grab", "ai_wait", "overlay"),
    "naive": ("queue", "roi", "preprocess", "infer", "postprocess", "overlay"),
}
PARALLEL_STAGES = {"sonomaly": ("roi", "preprocess", "infer", "postprocess", "layer"), "naive": ()}
STAGE_COLORS = {
    "grab": "#17becf", "queue": "#c5b0d5", "ai_wait": "#bcbd22", "roi": "#2ca02c", "preprocess": "#98df8a",
    "infer": "#d62728", "postprocess": "#ff9896", "layer": "#aec7e8", "overlay": "#1f77b4", "other server": "#c7c7c7",
    "encode": "#e377c2", "send+network": "#ff7f0e", "jitter+decode": "#9467bd", "paint": "#8c564b",
    "jitter+decode+paint": "#9467bd",
    "encode+network+decode": "#9467bd",
}


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------
def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, q) -> float | None:
    return None if len(values) == 0 else float(np.percentile(values, q))


AFTER_SERVER_STAGES = ("send_network", "jitter_decode", "paint", "jitter_decode_paint", "after_server")
"""The stages after the server's composer, which differ by viewer (``per_viewer[].stages_ms``)."""


def summarise(values_ms) -> dict[str, Any]:
    """p50/p95/p99/max (+ min, mean, p10, p90), tail = max − p95, flatness = p90 − p10, all in ms."""
    v = np.asarray(values_ms, float)
    if v.size == 0:
        return {"n": 0}
    p = {q: float(np.percentile(v, q)) for q in (10, 50, 90, 95, 99)}
    out = {"n": int(v.size), "min": float(v.min()), "mean": float(v.mean()), "p10": p[10], "p50": p[50],
           "p90": p[90], "p95": p[95], "p99": p[99], "max": float(v.max())}
    out["tail"] = out["max"] - p[95]
    out["flatness"] = p[90] - p[10]
    return {k: (round(x, 3) if isinstance(x, float) else x) for k, x in out.items()}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), **cpu_fields(), "python": platform.python_version(),
                            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg())}
    if (mem := memory_gib()) is not None:
        info["memory_gib"] = mem
    for mod in ("aiortc", "av", "numpy", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return info


class CpuMonitor:
    """How busy the machine was during a run, and how much of that was this harness and the processes it started
    (server, Chromium...): the rest is other work on the machine, which the numbers then include (Linux /proc)."""

    def __init__(self, server_pid: int | None = None, sfu_pids: tuple[int, ...] = ()) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.server_pid = server_pid
        self.sfu_pids = tuple(sfu_pids)
        self._t0 = self._busy0 = None
        self._ours0: dict[int, tuple[int, str]] = {}

    @staticmethod
    def _machine_busy() -> int | None:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        v = [int(x) for x in f]
        return sum(v[:7]) - v[3] - v[4]  # user nice system irq softirq (not idle, iowait, the VM's steal)

    def _ours(self) -> dict[int, tuple[int, str]]:
        """CPU ticks of this process and all its descendants, by pid, with their part: "server" (the server under
        test's process tree), "sfu" (the SFU's processes, ``--via janus``), "harness" (this process) or "viewers"
        (everything else it started: Chromium...)."""
        stats: dict[int, tuple[int, int]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                txt = (d / "stat").read_text()
            except OSError:
                continue
            rest = txt[txt.rfind(")") + 2:].split()
            # ppid; utime + stime + cutime + cstime: children it reaped (Chromium renderers of closed pages) count
            stats[int(d.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int) -> set[int]:
            out, frontier = {root}, [root]
            while frontier:
                for c in children.get(frontier.pop(), []):
                    if c not in out:
                        out.add(c)
                        frontier.append(c)
            return out

        server = tree(self.server_pid) if self.server_pid in stats else set()
        sfu = set().union(*(tree(p) for p in self.sfu_pids if p in stats))
        me = os.getpid()
        return {pid: (stats[pid][1], "server" if pid in server else "sfu" if pid in sfu else
                      "harness" if pid == me else "viewers")
                for pid in tree(me) | server | sfu if pid in stats}

    def start(self) -> "CpuMonitor":
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._machine_busy(), self._ours()
        return self

    def stop(self) -> dict[str, Any]:
        busy1, ours1 = self._machine_busy(), self._ours()
        dt = time.monotonic() - self._t0
        if busy1 is None or self._busy0 is None or dt <= 0:
            return {}
        parts = {"server": 0, "viewers": 0, "harness": 0, "sfu": 0}
        for pid, (t, part) in ours1.items():
            parts[part] += t - self._ours0.get(pid, (0, part))[0]
        ours = sum(parts.values())
        total = busy1 - self._busy0
        pct = lambda ticks: round(100.0 * ticks / self._hz / dt, 1)  # noqa: E731  (100 % = one core)
        out = {"seconds": round(dt, 1), "machine_busy_pct": pct(total), "harness_and_server_pct": pct(ours),
               "other_processes_pct": max(0.0, pct(total - ours)), "cores": os.cpu_count(),
               "loadavg_end": list(os.getloadavg())}
        if self.server_pid is not None:
            out.update(server_pct=pct(parts["server"]), viewers_pct=pct(parts["viewers"]),
                       harness_pct=pct(parts["harness"]))
        if self.sfu_pids:
            out["sfu_pct"] = pct(parts["sfu"])
        return out


# ---------------------------------------------------------------------------------------------------------------------
# servers under test
# ---------------------------------------------------------------------------------------------------------------------
def stamped(uri: str, fps: float | None = None) -> str:
    if fps and "?fps=" not in uri:
        uri = f"{uri}?fps={fps:g}"
    return uri if uri.startswith(stamp.PREFIX) else stamp.PREFIX + uri


class ServerProcess:
    """``sonomaly serve`` (or the naive baseline) on a free port in a subprocess; ready when frames come in."""

    def __init__(self, kind: str, source: str, model: str | None, *, extra: list[str] | None = None,
                 ready_timeout: float = 90.0) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "sonomaly":
            cmd = [sys.executable, "-m", "sonomaly.tools", "serve", "--source", source, "--loop"]
        elif kind == "naive":
            cmd = [sys.executable, "-m", "sonomaly.tools.naive", "--source", source]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        cmd += ["--port", str(self.port), "--log-level", "warning", *(["--model", model] if model else []),
                *(extra or [])]
        self.cmd = cmd
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited early:\n{self.output()}")
            try:
                if get_json(self.url + "/health", 2.0).get("frames_in", 0) > 0:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{kind} server did not become ready in {ready_timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RecordPoller:
    """Polls ``/api/records`` in a thread, accumulating every frame record (the server keeps only recent ones)."""

    def __init__(self, url: str, interval: float = 1.0, overlap: int = 90) -> None:
        self.url = url.rstrip("/")
        self.interval = interval
        self.overlap = overlap  # re-read the last frames: stages stamped after composition (encode) arrive late
        self.records: dict[int, dict] = {}
        self.offsets_ns: list[int] = []  # unix − monotonic, from each response's clock pair
        self.errors = 0
        self._last = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-records", daemon=True)

    def start(self) -> "RecordPoller":
        self.poll()
        self._thread.start()
        return self

    def poll(self) -> None:
        since = self._last - self.overlap if self._last >= 0 else -1
        while True:
            try:
                data = get_json(f"{self.url}/api/records?since_frame_id={since}&limit=10000", 10.0)
            except OSError:
                self.errors += 1
                return
            clock = data.get("clock") or {}
            if "unix_ns" in clock and "monotonic_ns" in clock:
                self.offsets_ns.append(int(clock["unix_ns"]) - int(clock["monotonic_ns"]))
            recs = data.get("records") or []
            for r in recs:
                fid = r.get("frame_id")
                if isinstance(fid, int):
                    self.records[fid] = r  # a re-read record may have gained later stages (encode)
                    self._last = max(self._last, fid)
            if len(recs) < 10000:
                return
            since = self._last

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll()

    @property
    def offset_ns(self) -> int:
        """unix_ns − monotonic_ns on the server host (median of all clock pairs)."""
        if not self.offsets_ns:
            raise RuntimeError(f"{self.url}/api/records gave no clock pair")
        return int(np.median(self.offsets_ns))


# ---------------------------------------------------------------------------------------------------------------------
# viewers
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ViewerData:
    """What one viewer saw: ``samples`` rows ``(code, t_shown_ns, t_receive_ns, t_presented_ns, presented_count)``
    (-1: unknown; the count is Chromium's ``presentedFrames``),
    times of frames whose code could not be read, and receiver statistics. Chromium's times are unix ns until
    :func:`measure` maps them onto the server's monotonic clock; aiortc's are monotonic from the start."""

    kind: str
    index: int
    samples: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # shown without a code (NO SIGNAL frames...)
    damaged: list[int] = field(default_factory=list)  # shown with a code that does not check out
    stats: dict[str, Any] = field(default_factory=dict)
    bracket: tuple[int, int] | None = None  # (round trip ns, host monotonic − browser unix ns), a cross-check
    error: str | None = None
    # ``--screencast``: code -> browser unix ns of the first composited page (DevTools screencast) showing it
    composited: dict[int, int] = field(default_factory=dict)


HARNESS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sonomaly latency viewer</title></head>
<body style="margin:0;background:#000;display:flex;flex-wrap:wrap;align-items:flex-start">
<video id="v" autoplay muted playsinline></video>
<script>
"use strict";
const S = %(decoder)s;
// One viewer: a <video>, its RTCPeerConnection and what it saw. A page holds one (layout "contexts": a browser
// context a viewer) or several (layout "page": window.addViewer() adds one more to this page).
function makeHarness(video) {
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const h = { video, state: "new", samples: [], unreadable: [], damaged: [], callbacks: 0, error: null,
              reader: null, cross: [0, 0], crossBad: [] };
  // How the code is read. "videoframe": copy only the code's box of the luma plane out of a WebCodecs VideoFrame of
  // the shown frame (no colour conversion of the whole picture); "canvas": draw the box onto a 2D canvas and read
  // its RGBA pixels (the frame is converted to RGB first: ~1.6 ms a frame on a 2-core VM, ~5 %% of a core a viewer).
  // Every CROSS_EVERY-th frame read by "videoframe" is also read by "canvas"; h.cross = [both read, disagreed].
  const YUV8 = new Set(["I420", "I420A", "I422", "I422A", "I444", "I444A", "NV12"]), CROSS_EVERY = 30;
  let reader = "videoframe";
  let pc = null;
  function record(id, reason, shown, md) {
    if (id === null) (reason === "damaged" ? h.damaged : h.unreadable).push(shown);
    else h.samples.push([id, shown, md.receiveTime === undefined ? -1 : md.receiveTime, md.presentationTime,
                         md.presentedFrames]);
  }
  function readCanvas(lay, src) {
    if (canvas.width !== lay.width || canvas.height !== lay.height) {
      canvas.width = lay.width; canvas.height = lay.height;
    }
    ctx.drawImage(src || video, lay.x0, lay.y0, lay.width, lay.height, 0, 0, lay.width, lay.height);
    const id = S.decode(ctx.getImageData(0, 0, lay.width, lay.height).data, lay.width, lay, lay.x0, lay.y0);
    return [id, S.lastReason];
  }
  function readVideoFrame(lay, shown, md) {  // false: this frame cannot be read so (the caller falls back)
    let vf;
    try { vf = new VideoFrame(video); } catch (e) { return false; }
    if (!YUV8.has(vf.format)) { vf.close(); return false; }
    const rect = { x: lay.x0, y: lay.y0, width: lay.width, height: lay.height };
    const buf = new Uint8Array(vf.allocationSize({ rect }));
    const full = !!(vf.colorSpace && vf.colorSpace.fullRange);
    // the canvas reads the same VideoFrame (not the <video>, which may already hold the next frame when the
    // renderer is behind): a disagreement is then a misread, never a race between the two reads
    const check = h.callbacks %% CROSS_EVERY === 0 ? readCanvas(lay, vf) : null;
    vf.copyTo(buf, { rect }).then(() => {  // the Y plane comes first, lay.width bytes a row
      const id = S.decode(buf, lay.width, lay, lay.x0, lay.y0, { full });
      if (check) {
        h.cross[0]++;
        if (check[0] !== id) { h.cross[1]++; if (h.crossBad.length < 5) h.crossBad.push([id, check[0]]); }
      }
      record(id, S.lastReason, shown, md);
    }, e => { h.error = String(e); }).finally(() => vf.close());
    return true;
  }
  function onFrame(now, md) {
    h.callbacks++;
    try {
      const w = md.width || video.videoWidth, ht = md.height || video.videoHeight;
      const lay = S.layout(ht, w);
      // headless Chromium can put expectedDisplayTime a fraction of a ms before presentationTime: take the later
      const shown = Math.max(md.expectedDisplayTime, md.presentationTime || 0);
      if (!lay) record(null, "no_code", shown, md);
      else if (reader === "videoframe" && readVideoFrame(lay, shown, md)) h.reader = "videoframe";
      else {
        h.reader = "canvas";
        const [id, reason] = readCanvas(lay);
        record(id, reason, shown, md);
      }
    } catch (e) { h.error = String(e); }
    video.requestVideoFrameCallback(onFrame);
  }
  video.requestVideoFrameCallback(onFrame);
  function newPc(how) {
    if (how) reader = how;
    pc = new RTCPeerConnection({ iceServers: [] });
    pc.ontrack = ev => { video.srcObject = ev.streams[0] || new MediaStream([ev.track]); };
    pc.onconnectionstatechange = () => { h.state = pc.connectionState; };
  }
  async function gathered() {  // no trickle: the description goes out with every candidate in it
    if (pc.iceGatheringState !== "complete") {
      await new Promise(resolve => {
        const t = setTimeout(resolve, 3000);
        pc.addEventListener("icegatheringstatechange", () => {
          if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
        });
      });
    }
    return { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
  }
  // direct: this viewer offers to the server under test (POST /offer), as the viewer page does
  h.start = async (codec, how) => {
    newPc(how);
    const tr = pc.addTransceiver("video", { direction: "recvonly" });
    if (codec) {
      const all = RTCRtpReceiver.getCapabilities("video").codecs;
      const want = all.filter(c => c.mimeType.toLowerCase() === "video/" + codec.toLowerCase());
      if (!want.length) throw new Error("codec not supported by this browser: " + codec);
      tr.setCodecPreferences([...want, ...all.filter(c => !want.includes(c))]);
    }
    await pc.setLocalDescription(await pc.createOffer());
    const offer = await gathered();
    const res = await fetch("/offer", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(offer) });
    if (!res.ok) throw new Error("offer rejected: " + res.status + " " + await res.text());
    await pc.setRemoteDescription(await res.json());
    return true;
  };
  // through an SFU: the SFU offers (its codec is the publisher's), this viewer answers
  h.answer = async (offer, how) => {
    newPc(how);
    await pc.setRemoteDescription(offer);
    await pc.setLocalDescription(await pc.createAnswer());
    return await gathered();
  };
  h.take = () => { const out = { samples: h.samples, unreadable: h.unreadable, damaged: h.damaged,
                                 callbacks: h.callbacks, error: h.error, state: h.state, reader: h.reader,
                                 cross: h.cross, crossBad: h.crossBad };
                   h.samples = []; h.unreadable = []; h.damaged = []; h.cross = [0, 0]; h.crossBad = [];
                   return out; };
  // Date.now() − (timeOrigin + performance.now()), read right at Date.now() millisecond edges (median of n).
  h.calibrate = (n) => {
    const d = [];
    for (let i = 0; i < n; i++) {
      const a = Date.now(); let b, p;
      do { b = Date.now(); p = performance.now(); } while (b === a);
      d.push(b - (performance.timeOrigin + p));
    }
    d.sort((x, y) => x - y);
    return { timeOrigin: performance.timeOrigin, offset: d[Math.floor(d.length / 2)],
             spread: d[d.length - 1] - d[0] };
  };
  h.stats = async () => {
    const out = {};
    if (!pc) return out;
    const rep = await pc.getStats();
    const codecs = {};
    rep.forEach(s => { if (s.type === "codec") codecs[s.id] = s.mimeType; });
    rep.forEach(s => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        for (const k of ["framesReceived", "framesDecoded", "framesDropped", "keyFramesDecoded", "totalDecodeTime",
                         "jitterBufferDelay", "jitterBufferEmittedCount", "jitterBufferTargetDelay",
                         "totalProcessingDelay", "totalAssemblyTime", "framesAssembledFromMultiplePackets",
                         "packetsLost", "packetsReceived", "bytesReceived", "freezeCount", "totalFreezesDuration",
                         "pauseCount", "nackCount", "pliCount", "firCount", "frameWidth", "frameHeight",
                         "framesPerSecond", "decoderImplementation"]) if (s[k] !== undefined) out[k] = s[k];
        out.codec = codecs[s.codecId] || null;
      }
    });
    return out;
  };
  return h;
}
window.hs = [makeHarness(document.getElementById("v"))];
window.harness = window.hs[0];
window.addViewer = () => {
  const v = document.createElement("video");
  v.autoplay = true; v.muted = true; v.playsInline = true;
  document.body.appendChild(v);
  window.hs.push(makeHarness(v));
  return window.hs.length - 1;
};
</script></body></html>
""" % {"decoder": stamp.JS_DECODER}


def _stats_delta(a: dict, b: dict) -> dict[str, Any]:
    """Receiver statistics over the measurement window (differences of Chromium's cumulative counters)."""
    out: dict[str, Any] = {k: b.get(k) for k in ("codec", "decoderImplementation", "frameWidth", "frameHeight")
                           if b.get(k) is not None}

    def d(k):
        return (b.get(k) or 0) - (a.get(k) or 0)

    for k in ("framesReceived", "framesDecoded", "framesDropped", "packetsLost", "freezeCount", "nackCount",
              "pliCount", "keyFramesDecoded"):
        if k in b:
            out[k] = d(k)
    if d("framesDecoded") > 0:
        out["decode_ms_avg"] = round(1000 * d("totalDecodeTime") / d("framesDecoded"), 3)
        if "totalProcessingDelay" in b:
            out["processing_delay_ms_avg"] = round(1000 * d("totalProcessingDelay") / d("framesDecoded"), 3)
    if d("jitterBufferEmittedCount") > 0:
        out["jitter_buffer_ms_avg"] = round(1000 * d("jitterBufferDelay") / d("jitterBufferEmittedCount"), 3)
        if "jitterBufferTargetDelay" in b:
            out["jitter_buffer_target_ms_avg"] = round(
                1000 * d("jitterBufferTargetDelay") / d("jitterBufferEmittedCount"), 3)
    if "bytesReceived" in b:
        out["kbit_per_s"] = None  # filled in by the caller (needs the window length)
        out["_bytes"] = d("bytesReceived")
    if "totalFreezesDuration" in b:
        out["freezes_s"] = round(d("totalFreezesDuration"), 3)
    return out


class Window:
    """The measurement window on the server's monotonic clock, fixed once every viewer shows frames; it also watches
    the machine's CPU over the window (while every process it started is still alive to be counted)."""

    def __init__(self, server_pid: int | None = None, sfu_pids: tuple[int, ...] = ()) -> None:
        self.t0_ns: int | None = None
        self.t1_ns: int | None = None
        self.cpu: dict[str, Any] = {}
        self.server_pid = server_pid
        self.sfu_pids = sfu_pids
        self._monitor: CpuMonitor | None = None

    def begin(self) -> None:
        self._monitor = CpuMonitor(self.server_pid, self.sfu_pids).start()
        self.t0_ns = time.monotonic_ns()

    def end(self) -> None:
        self.t1_ns = time.monotonic_ns()
        if self._monitor is not None:
            self.cpu = self._monitor.stop()

    @property
    def seconds(self) -> float:
        return (self.t1_ns - self.t0_ns) / 1e9


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def collect_chromium(url: str, n: int, seconds: float, warmup: float, window: Window, *, codec: str | None = None,
                     quiet: bool = False, connect_timeout: float = 40.0, browser=None,
                     reader: str = "videoframe", layout: str = "contexts", sfu=None,
                     screencast: bool = False) -> list[ViewerData]:
    """Open ``n`` headless Chromium viewers on ``url``; collect ``seconds`` after ``warmup``.

    ``browser``: a Playwright ``Browser`` to use (its own contexts are opened and closed here); default: launch
    Debian's Chromium with :data:`CHROMIUM_ARGS`. ``layout``: "contexts" (default), each viewer in a browser context
    and page of its own (its own renderer process, as separate displays would be); "page", all ``n`` viewers as
    ``<video>`` elements of one page (each its own RTCPeerConnection and decoder; one renderer and compositor for
    all: a lighter instrument on a machine that also runs the server). ``sfu``: a running :class:`~sonomaly.tools.sfu.Janus`
    that the server publishes to; each viewer then subscribes through it (Janus offers, the viewer answers) instead
    of offering to ``url`` (which still serves the harness page); ``codec`` is then the publisher's.
    ``screencast``: also record the first viewer's page through the DevTools screencast (:class:`_Screencast`),
    where that page shows one video (layout "contexts", or a single viewer)."""
    if layout not in CHROMIUM_LAYOUTS:
        raise ValueError(f"unknown Chromium layout {layout!r} (one of {', '.join(CHROMIUM_LAYOUTS)})")
    if browser is not None:
        return _collect_chromium(browser, url, n, seconds, warmup, window, codec, quiet, connect_timeout, reader,
                                 layout, sfu, screencast)
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            return _collect_chromium(browser, url, n, seconds, warmup, window, codec, quiet, connect_timeout, reader,
                                     layout, sfu, screencast)
        finally:
            browser.close()


class _Screencast:
    """The composited page of one viewer, through the DevTools screencast (``Page.startScreencast``).

    rVFC's display times are not comparable across Chromium's two WebRTC render paths (docs/LATENCY.md, "Chromium's
    two render paths"): for frames without a render time (``playout-delay`` 0,0) ``expectedDisplayTime`` is one
    refresh after the compositor frame that first holds the picture, for frames with one (the naive baseline) the
    reported time is a refresh *before* it. The screencast is a third witness that treats both alike: each picture
    is a copy of a compositor frame of the page with that frame's timestamp (browser wall clock). The page must show
    the viewer's video at its top left at 1:1 (the harness page does). The browser JPEG-encodes every picture (on M10,
    one viewer: the machine 100-109 % busy with it against 74-83 % without), so it is an option for few viewers.

    Sync Playwright delivers the screencast's events only inside its own calls, and Chromium sends the next picture
    only after the last one is acknowledged: :meth:`pump` (instead of ``time.sleep``) keeps them flowing."""

    def __init__(self, page) -> None:
        self.page = page
        self.shots: list[tuple[float, str]] = []  # (browser unix s, base64 JPEG)
        self.on = True
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.on("Page.screencastFrame", self._frame)
        self.cdp.send("Page.startScreencast", {"format": "jpeg", "quality": 95, "everyNthFrame": 1})

    def _frame(self, ev) -> None:
        if self.on:
            self.shots.append((float(ev["metadata"]["timestamp"]), ev["data"]))
        try:
            self.cdp.send("Page.screencastFrameAck", {"sessionId": ev["sessionId"]})
        except Exception:  # the page is closing
            pass

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.page.wait_for_timeout(min(50.0, left * 1000.0))

    def stop(self) -> None:
        self.on = False
        try:
            self.cdp.send("Page.stopScreencast")
        except Exception:
            pass

    def first_seen(self, height: int, width: int) -> tuple[dict[int, int], int]:
        """code -> browser unix ns of the first picture showing it (the video's ``height`` x ``width`` at the top
        left), and how many pictures carried no readable code."""
        import base64

        import cv2

        out: dict[int, int] = {}
        unread = 0
        for ts, data in self.shots:
            img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
            code = (stamp.decode(img[:height, :width], "bgr")
                    if img is not None and img.shape[0] >= height and img.shape[1] >= width else None)
            if code is None:
                unread += 1
            elif code not in out:
                out[code] = int(round(ts * 1e9))
        return out, unread


def _open_page(browser, url: str, width: int, height: int, contexts: list):
    ctx = browser.new_context(viewport={"width": width, "height": height})
    contexts.append(ctx)
    page = ctx.new_page()
    page.route(url + HARNESS_PATH, lambda route: route.fulfill(status=200, content_type="text/html",
                                                              body=HARNESS_PAGE))
    page.goto(url + HARNESS_PATH)
    return page


def _collect_chromium(browser, url, n, seconds, warmup, window, codec, quiet, connect_timeout,
                      reader, layout, sfu=None, screencast=False) -> list[ViewerData]:
    url = url.rstrip("/")
    viewers = [ViewerData("chromium", i) for i in range(n)]
    contexts: list = []
    subscriptions: list = []
    try:
        handles = []  # (page, the viewer's harness object in it)
        shared = None
        if layout == "page":  # a grid of 640 × 520 cells, every <video> on screen (off-screen ones are not painted)
            cols = min(n, 4)
            shared = _open_page(browser, url, 640 * cols, 520 * -(-n // cols), contexts)
        for i in range(n):
            page = shared or _open_page(browser, url, 640, 520, contexts)
            ref = f"window.hs[{page.evaluate('window.addViewer()') if shared and i else 0}]"
            if sfu is None:
                page.evaluate(f"([codec, reader]) => {ref}.start(codec, reader)", [codec, reader])
            else:
                sub = sfu.subscribe()
                subscriptions.append(sub)
                answer = page.evaluate(f"([offer, reader]) => {ref}.answer(offer, reader)", [sub.offer, reader])
                sfu.start_subscription(sub, answer)
            handles.append((page, ref))
        deadline = time.monotonic() + connect_timeout
        while any(page.evaluate(f"{ref}.samples.length") == 0 for page, ref in handles):
            if time.monotonic() > deadline:
                states = [page.evaluate(f"[{ref}.state, {ref}.error]") for page, ref in handles]
                raise RuntimeError(f"Chromium viewers show no decodable frames after {connect_timeout:.0f} s "
                                   f"(state, error per viewer: {states})")
            time.sleep(0.2)
        _progress(f"  {n} Chromium viewer(s) showing frames; warm-up {warmup:g} s", quiet)
        time.sleep(warmup)
        cal0 = [page.evaluate(f"{ref}.calibrate(15)") for page, ref in handles]
        st0 = [page.evaluate(f"{ref}.stats()") for page, ref in handles]
        # the screencast watches the first viewer's page where that page shows its video alone
        cast = _Screencast(handles[0][0]) if screencast and (layout == "contexts" or n == 1) else None
        for page, ref in handles:
            page.evaluate(f"{ref}.take()")  # drop the warm-up
        window.begin()
        raw: list[list[dict]] = [[] for _ in handles]
        end = time.monotonic() + seconds
        last_report = time.monotonic()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            if cast is None:
                time.sleep(min(left, 5.0))
            else:
                cast.pump(min(left, 5.0))
            for i, (page, ref) in enumerate(handles):
                raw[i].append(page.evaluate(f"{ref}.take()"))
            if time.monotonic() - last_report >= 60 and not quiet:
                last_report = time.monotonic()
                _progress(f"  ... {seconds - max(0.0, end - time.monotonic()):.0f} / {seconds:g} s", quiet)
        window.end()
        if cast is not None:
            cast.stop()
            size = handles[0][0].evaluate(f"[{handles[0][1]}.video.videoHeight, {handles[0][1]}.video.videoWidth]")
        st1 = [page.evaluate(f"{ref}.stats()") for page, ref in handles]
        cal1 = [page.evaluate(f"{ref}.calibrate(15)") for page, ref in handles]
        for i, (page, ref) in enumerate(handles):
            raw[i].append(page.evaluate(f"{ref}.take()"))
            v = viewers[i]
            origin = cal0[i]["timeOrigin"]
            off_ms = (cal0[i]["offset"] + cal1[i]["offset"]) / 2.0
            v.stats = _stats_delta(st0[i], st1[i])
            v.stats["browser"] = f"{browser.browser_type.name} {browser.version}"
            v.stats["layout"] = layout
            v.stats["clock_calibration_ms"] = {"offset_start": round(cal0[i]["offset"], 4),
                                               "offset_end": round(cal1[i]["offset"], 4),
                                               "spread": round(max(cal0[i]["spread"], cal1[i]["spread"]), 4)}
            # performance-timeline ms → unix ns; the caller maps unix → server monotonic
            def unix_ns(t_ms: float) -> int:
                return int(round((origin + t_ms + off_ms) * 1e6))

            cross = [0, 0]
            bad: list = []  # (VideoFrame read, canvas read) of the first frames read differently
            for chunk in raw[i]:
                if chunk.get("reader"):
                    v.stats["reader"] = chunk["reader"]
                cross = [cross[0] + chunk["cross"][0], cross[1] + chunk["cross"][1]]
                bad.extend(chunk.get("crossBad", []))
                for code, shown, received, presented, count in chunk["samples"]:
                    v.samples.append((int(code), unix_ns(shown), unix_ns(received) if received >= 0 else -1,
                                      unix_ns(presented) if presented and presented > 0 else -1, int(count)))
                v.unreadable.extend(unix_ns(t) for t in chunk["unreadable"])
                v.damaged.extend(unix_ns(t) for t in chunk["damaged"])
                if chunk.get("error"):
                    v.error = chunk["error"]
            if v.stats.get("reader") == "videoframe":  # frames also read through a canvas, and how many disagreed
                v.stats["reader_cross_check"] = {"frames": cross[0], "disagreed": cross[1],
                                                 **({"examples": bad[:5]} if bad else {})}
            v.bracket = _bracket(page, origin + off_ms)
        if cast is not None:
            viewers[0].composited, unread = cast.first_seen(*size)
            viewers[0].stats["screencast"] = {"pictures": len(cast.shots), "unread": unread,
                                              "codes": len(viewers[0].composited)}
    finally:
        for ctx in contexts:
            ctx.close()
        for sub in subscriptions:
            sfu.destroy(sub.session)
    return viewers


def _bracket(page, base_ms: float, tries: int = 15) -> tuple[int, int]:
    """Cross-check of the clock mapping: read the browser's clock between two reads of this host's monotonic clock;
    the shortest round trip wins. Returns (round trip ns, host monotonic ns − browser unix ns)."""
    best = None
    for _ in range(tries):
        a = time.monotonic_ns()
        t = page.evaluate("performance.now()")
        b = time.monotonic_ns()
        cand = (b - a, (a + b) // 2 - int(round((base_ms + t) * 1e6)))
        if best is None or cand[0] < best[0]:
            best = cand
    return best


async def _aiortc_viewer(url: str, v: ViewerData, codec: str | None, stop: asyncio.Event,
                         first: asyncio.Event) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from sonomaly.tools.client import _post_json

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tr = pc.addTransceiver("video", direction="recvonly")
    if codec:
        caps = RTCRtpReceiver.getCapabilities("video").codecs
        want = [c for c in caps if c.mimeType.lower() == f"video/{codec.lower()}"]
        if not want:
            raise RuntimeError(f"aiortc does not support codec {codec}")
        tr.setCodecPreferences(want + [c for c in caps if c not in want])
    done = asyncio.Event()

    async def consume(track) -> None:
        try:
            while not stop.is_set():
                try:
                    frame = await asyncio.wait_for(track.recv(), 5.0)
                except (MediaStreamError, asyncio.TimeoutError):
                    break
                t = time.monotonic_ns()
                gray = frame.to_ndarray(format="gray")
                code, why = stamp.decode_detail(gray)
                if code is None:
                    (v.damaged if why == "damaged" else v.unreadable).append(t)
                else:
                    v.samples.append((code, t, -1, -1, -1))
                    first.set()
        finally:
            done.set()

    @pc.on("track")
    def _track(track) -> None:
        asyncio.ensure_future(consume(track))

    await pc.setLocalDescription(await pc.createOffer())
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(None, _post_json, url + "/offer",
                                        {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    try:
        await done.wait()
    finally:
        await pc.close()


def run_child(main, conn) -> bool:
    """Run the coroutine function ``main`` in a viewer process of its own: ``True`` when it ended normally; an
    exception is sent to the parent as ``("error", text)``."""
    try:
        asyncio.run(main())
        return True
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:  # the parent is gone
            pass
        return False


def reap(procs, timeout: float = 10.0) -> None:
    """Join viewer processes, terminating any that do not end within ``timeout``."""
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def _aiortc_process(url: str, codec: str | None, conn, connect_timeout: float) -> None:
    """One aiortc viewer in a process of its own: says "ready" at its first decodable frame, collects until told
    "stop", then sends back what it saw."""
    import logging

    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    v = ViewerData("aiortc", 0)

    async def main() -> None:
        stop, first = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(_aiortc_viewer(url, v, codec, stop, first))
        try:
            await asyncio.wait_for(first.wait(), connect_timeout)
            conn.send("ready")
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

    if run_child(main, conn):
        conn.send(("data", v.samples, v.unreadable, v.damaged))


async def _janus_load_session(client, sub):
    """An aiortc session that answers Janus's subscriber offer (``sub``, a :class:`~sonomaly.tools.sfu.Subscription`)."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sub.offer["sdp"], type=sub.offer["type"]))
    await pc.setLocalDescription(await pc.createAnswer())
    answer = {"type": "answer", "sdp": pc.localDescription.sdp}
    await asyncio.get_running_loop().run_in_executor(None, client.start_subscription, sub, answer)
    return pc


def _load_process(url: str, n: int, conn, connect_timeout: float, janus_api: str | None = None) -> None:
    """``n`` load sessions in one process: real aiortc peer connections that receive the stream (ICE, DTLS, SRTP,
    RTCP, the jitter buffer) but do not decode it (``bench_viewers``'s stub decoder notes when each complete frame
    leaves the jitter buffer). Says "ready" once every session has a frame; on "stop" sends each one's arrival
    times (host monotonic ns). ``janus_api``: the sessions subscribe through that Janus instead of offering to
    ``url``."""
    import logging

    from sonomaly.tools import bench_viewers as bv

    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bv._install_stub_decoder()

    client = None
    if janus_api:
        from sonomaly.tools.sfu import JanusAPI

        client = JanusAPI(janus_api)
        client.keep_alive()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if client is None:
            pcs = [await bv._viewer(url, None) for _ in range(n)]
        else:
            pcs = [await _janus_load_session(client, await loop.run_in_executor(None, client.subscribe))
                   for _ in range(n)]
        try:
            deadline = time.monotonic() + connect_timeout
            while len(bv._Arrivals.registry) < n or not all(a.items for a in bv._Arrivals.registry):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n} load sessions: not all receive frames after {connect_timeout:.0f} s")
                await asyncio.sleep(0.1)
            conn.send("ready")
            await loop.run_in_executor(None, conn.recv)  # "stop"
            conn.send(("data", [[t for t, _ in a.items] for a in bv._Arrivals.registry]))
        finally:
            await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            if client is not None:
                client.close()

    run_child(main, conn)


class LoadViewers:
    """``n`` extra sessions on the server under test while the measured viewers run (``--load-viewers``), in one
    process of the harness's: they make the server serve ``n`` more viewers (packetising, SRTP, sending, RTCP) at a
    small fraction of the CPU that decoding and painting viewers take on the same machine. What they receive is
    counted (``summary``), so a session that got nothing cannot pass for load. ``janus_api``: the sessions subscribe
    through that Janus (``--via janus``), so they load the SFU, not the server."""

    def __init__(self, url: str, n: int, connect_timeout: float = 40.0, janus_api: str | None = None) -> None:
        self.url, self.n, self.connect_timeout = url.rstrip("/"), n, connect_timeout
        self.janus_api = janus_api
        self._proc = self._conn = None
        self.arrivals: list[list[int]] = []

    def __enter__(self) -> "LoadViewers":
        if self.n <= 0:
            return self
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_load_process, args=(self.url, self.n, child, self.connect_timeout,
                                                             self.janus_api), daemon=True)
        self._proc.start()
        if not self._conn.poll(self.connect_timeout + 30):
            self.__exit__()
            raise RuntimeError(f"{self.n} load sessions did not start in {self.connect_timeout + 30:.0f} s")
        msg = self._conn.recv()
        if msg != "ready":
            self.__exit__()
            raise RuntimeError(f"load sessions failed: {msg[1] if isinstance(msg, tuple) else msg}")
        return self

    def stop(self) -> None:
        """Collect what the sessions received (call after the measurement window)."""
        if self._proc is None or not self._proc.is_alive():
            return
        try:
            self._conn.send("stop")
            if self._conn.poll(30):
                msg = self._conn.recv()
                if isinstance(msg, tuple) and msg[0] == "data":
                    self.arrivals = msg[1]
        except (OSError, EOFError):
            pass

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self.stop()
            reap([self._proc])
            self._proc = None

    def summary(self, window: "Window") -> dict[str, Any]:
        """Frames each load session received inside the measurement window, as a rate."""
        secs = window.seconds
        fps = [sum(1 for t in a if window.t0_ns <= t <= window.t1_ns) / secs for a in self.arrivals] if secs else []
        return {"n": self.n, "received": len(self.arrivals), **({"via": "janus"} if self.janus_api else {}),
                "fps_min": round(min(fps), 2) if fps else None, "fps_mean": round(float(np.mean(fps)), 2) if fps else None}


def collect_aiortc(url: str, n: int, seconds: float, warmup: float, window: Window, *, codec: str | None = None,
                   quiet: bool = False, connect_timeout: float = 40.0) -> list[ViewerData]:
    """``n`` aiortc receivers, each in a process of its own (as N viewers on N machines would be: no viewer waits for
    another's Python). Times are ``time.monotonic_ns()``: the server's clock, on the same host."""
    import multiprocessing

    url = url.rstrip("/")
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_aiortc_process, args=(url, codec, child, connect_timeout), daemon=True)
            proc.start()
            procs.append((proc, parent))
        deadline = time.monotonic() + connect_timeout + 30
        for proc, conn in procs:
            if not conn.poll(max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"aiortc viewers show no decodable frames after {connect_timeout:.0f} s")
            msg = conn.recv()
            if msg != "ready":
                raise RuntimeError(f"aiortc viewer failed: {msg[1] if isinstance(msg, tuple) else msg}")
        _progress(f"  {n} aiortc viewer(s) showing frames; warm-up {warmup:g} s", quiet)
        time.sleep(warmup)
        window.begin()
        time.sleep(seconds)
        window.end()
        viewers = []
        for i, (proc, conn) in enumerate(procs):
            conn.send("stop")
            if not conn.poll(30):
                raise RuntimeError("an aiortc viewer did not report back")
            msg = conn.recv()
            if msg[0] != "data":
                raise RuntimeError(f"aiortc viewer failed: {msg[1]}")
            v = ViewerData("aiortc", i)
            # keep only the window (the viewers collected from their first frame)
            v.samples = [tuple(x) for x in msg[1] if window.t0_ns <= x[1] <= window.t1_ns]
            v.unreadable = [t for t in msg[2] if window.t0_ns <= t <= window.t1_ns]
            v.damaged = [t for t in msg[3] if window.t0_ns <= t <= window.t1_ns]
            viewers.append(v)
        return viewers
    finally:
        reap([proc for proc, _ in procs])


# ---------------------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------------------
def _stage_table(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] is not None and math.isfinite(r[k])]
        if vals:
            out[k] = {"mean": round(float(np.mean(vals)), 3), "p50": round(pct(vals, 50), 3),
                      "p95": round(pct(vals, 95), 3), "p99": round(pct(vals, 99), 3)}
    return out


def analyse(server: str, viewers: list[ViewerData], records: dict[int, dict], window: Window, *,
            budget_ms: float, window_s: float | None = None) -> dict[str, Any]:
    """Match what the viewers showed with the server's records; percentiles overall, per viewer and per window."""
    by_code: dict[int, dict] = {}
    for fid, r in records.items():
        by_code[fid & stamp.ID_MASK] = r  # ids are unique within 2**24 frames (6 days at 30 fps)
    t0, t1 = window.t0_ns, window.t1_ns
    seconds = (t1 - t0) / 1e9
    serial = SERIAL_STAGES.get(server, ())
    parallel = PARALLEL_STAGES.get(server, ())
    pooled_g2g: list[float] = []
    pooled_rows: list[dict[str, float]] = []
    pooled_parallel: list[dict[str, float]] = []
    timeline: list[tuple[float, float, int]] = []
    parts: list[tuple[float, float, float, float]] = []  # per timed frame, for the per-window stage medians
    per_viewer = []
    pooled_comp: list[float] = []  # --screencast: capture -> the first composited page showing the frame
    pooled_gap: list[float] = []  # that page's time minus the time the harness calls shown
    totals = {"frames": 0, "lost": 0, "lost_at_server": 0, "lost_after_server": 0, "no_code": 0, "damaged_code": 0,
              "unmatched": 0, "repeated_reads": 0,
              "shown_not_timed": 0, "shown_before_composed": 0}
    for v in viewers:
        seen: set[int] = set()
        g2g: list[float] = []
        comp: list[float] = []
        own_rows: list[dict[str, float]] = []  # this viewer's stage rows, for its after-server medians
        ids: list[int] = []
        unmatched = 0
        causality = 0
        repeats = 0
        missed_callbacks = 0  # frames Chromium presented without a requestVideoFrameCallback for them
        last_count = None
        inwin = [smp for smp in v.samples if t0 <= smp[1] <= t1]
        # A code read in two callbacks: the earlier read raced ahead (the video element already held the next
        # frame when the callback ran, so its time belongs to the frame before); the last read is the frame's own.
        last_of: dict[int, int] = {}
        for k, smp in enumerate(inwin):
            last_of[smp[0]] = k
        for k, (code, t_show, t_recv, t_pres, count) in enumerate(inwin):
            if count >= 0:
                if last_count is not None and count > last_count + 1:
                    missed_callbacks += count - last_count - 1
                last_count = count
            if last_of[code] != k:
                repeats += 1
                continue
            rec = by_code.get(code)
            if rec is None:
                unmatched += 1
                continue
            fid = rec["frame_id"]
            if fid in seen:
                continue
            seen.add(fid)
            ids.append(fid)
            lat = (t_show - rec["t_capture_ns"]) / 1e6
            if t_show < rec["t_composed_ns"]:
                causality += 1  # shown before it was composed: the clock mapping is wrong
            server_ms = (rec["t_composed_ns"] - rec["t_capture_ns"]) / 1e6
            stages = rec.get("stages_ms") or {}
            row = {k: float(stages[k]) for k in serial if k in stages}
            row["server_total"] = server_ms
            row["server_other"] = server_ms - sum(row.get(k, 0.0) for k in serial)
            row["after_server"] = lat - server_ms
            encode = stages.get("encode")  # the shared encoder stamps its time on the record
            if encode is not None:
                row["encode"] = float(encode)
            for k in ("send_wait", "send"):  # the one-pass fan-out: encoded -> pass start -> its last packet out
                if stages.get(k) is not None:
                    row[k] = float(stages[k])
            if t_recv > 0:
                row["send_network"] = (t_recv - rec["t_composed_ns"]) / 1e6 - (encode or 0.0)
                if t_pres > 0:
                    row["jitter_decode"] = (t_pres - t_recv) / 1e6
                    row["paint"] = (t_show - t_pres) / 1e6
                else:
                    row["jitter_decode_paint"] = (t_show - t_recv) / 1e6
            pooled_rows.append(row)
            own_rows.append(row)
            par = {k: float(stages[k]) for k in parallel if k in stages}
            if par:
                pooled_parallel.append(par)
            g2g.append(lat)
            if code in v.composited:
                comp.append((v.composited[code] - rec["t_capture_ns"]) / 1e6)
                pooled_gap.append((v.composited[code] - t_show) / 1e6)
            timeline.append(((t_show - t0) / 1e9, lat, v.index))
            parts.append((row["server_total"], row["after_server"], row.get("send_network", math.nan),
                          row.get("jitter_decode", row.get("jitter_decode_paint", math.nan)),
                          lat - row["paint"] if "paint" in row else math.nan))
        lost_server = lost_after = 0
        if ids:
            lo, hi = min(ids), max(ids)
            for fid in range(lo, hi + 1):
                if fid not in seen:
                    if fid in records:
                        lost_after += 1
                    else:
                        lost_server += 1
        unreadable = sum(1 for t in v.unreadable if t0 <= t <= t1)
        damaged = sum(1 for t in v.damaged if t0 <= t <= t1)
        missing = lost_server + lost_after
        # Chromium presented some frames without a callback for them (its frame counter jumped): shown, not timed
        missed = min(missed_callbacks, lost_after)
        lost = missing - missed
        entry = {"viewer": v.index, "kind": v.kind, "glass_to_glass_ms": summarise(g2g),
                 "received_fps": round((len(g2g) + missed) / seconds, 2) if seconds > 0 else None,
                 "frames": len(g2g), "frames_lost": lost, "lost_at_server": lost_server,
                 "lost_after_server": lost_after - missed, "shown_not_timed": missed, "no_code": unreadable,
                 "damaged_code": damaged,
                 "unmatched": unmatched, "shown_before_composed": causality, "repeated_reads": repeats,
                 "lost_pct": round(100.0 * lost / max(1, missing + len(g2g)), 3)}
        # after the server the path is per viewer (its send turn, its socket, its decoder)
        entry["stages_ms"] = {k: v for k, v in _stage_table(own_rows).items() if k in AFTER_SERVER_STAGES}
        if comp:
            entry["to_composited_ms"] = summarise(comp)
            pooled_comp.extend(comp)
        if v.stats:
            stats = dict(v.stats)
            if "_bytes" in stats:
                stats["kbit_per_s"] = round(8 * stats.pop("_bytes") / 1000 / seconds, 1) if seconds > 0 else None
            entry["receiver"] = stats
        if v.error:
            entry["error"] = v.error
        per_viewer.append(entry)
        pooled_g2g.extend(g2g)
        totals["frames"] += len(g2g)
        totals["lost"] += lost
        totals["lost_at_server"] += lost_server
        totals["lost_after_server"] += lost_after - missed
        totals["shown_not_timed"] += missed
        totals["shown_before_composed"] += causality
        totals["repeated_reads"] += repeats
        totals["no_code"] += unreadable
        totals["damaged_code"] += damaged
        totals["unmatched"] += unmatched
    overall = summarise(pooled_g2g)
    # capture -> the browser's presentationTime: glass to glass without the wait for the display's next refresh, whose
    # phase against the 30 fps source moves a 1-viewer p99 by up to a refresh period from run to run
    to_comp = [p[4] for p in parts if math.isfinite(p[4])]
    fps = [e["received_fps"] for e in per_viewer if e["received_fps"] is not None]
    result: dict[str, Any] = {
        "server": server,
        "viewer": viewers[0].kind if viewers else None,
        "viewers": len(viewers),
        "seconds": round(seconds, 3),
        "glass_to_glass_ms": overall,
        "received_fps": round(float(np.mean(fps)), 2) if fps else None,
        "received_fps_min": round(float(np.min(fps)), 2) if fps else None,
        "frames": totals["frames"],
        "frames_lost": totals["lost"],
        "lost_at_server": totals["lost_at_server"],
        "lost_after_server": totals["lost_after_server"],
        "no_code": totals["no_code"],
        "damaged_code": totals["damaged_code"],
        "unmatched": totals["unmatched"],
        "shown_not_timed": totals["shown_not_timed"],
        "shown_before_composed": totals["shown_before_composed"],
        "repeated_reads": totals["repeated_reads"],
        "lost_pct": round(100.0 * totals["lost"] / max(1, totals["lost"] + totals["shown_not_timed"]
                                                       + totals["frames"]), 3),
        "stages_ms": _stage_table(pooled_rows),
        "serial_stages": list(serial),
        "parallel_stages_ms": _stage_table(pooled_parallel),
        "budget_ms": budget_ms,
        "pass": bool(overall.get("n")) and overall["p99"] <= budget_ms,
        "per_viewer": per_viewer,
    }
    if to_comp:
        result["to_compositor_ms"] = summarise(to_comp)
    if pooled_comp:  # the same definition on every render path (see _Screencast)
        result["to_composited_ms"] = summarise(pooled_comp)
        result["composited_minus_shown_ms"] = {f"p{q}": round(pct(pooled_gap, q), 3) for q in (10, 50, 90)}
    receivers = [e["receiver"] for e in per_viewer if "receiver" in e]
    for key in ("jitter_buffer_ms_avg", "decode_ms_avg", "processing_delay_ms_avg"):
        vals = [r[key] for r in receivers if r.get(key) is not None]
        if vals:
            result.setdefault("receiver", {})[key] = round(float(np.mean(vals)), 3)
    # per-window percentiles: drift over long runs
    ws = window_s or (60.0 if seconds >= 180 else max(1.0, seconds / 5))
    windows = []
    if timeline:
        arr = np.array(timeline, float)
        prt = np.array(parts, float)
        k = 0
        while k * ws < seconds - 1e-9:
            inwin = (arr[:, 0] >= k * ws) & (arr[:, 0] < (k + 1) * ws)
            sel = arr[inwin, 1]
            if sel.size and seconds - k * ws >= 0.05 * ws:  # not the sliver left after the last full window
                length = min(ws, seconds - k * ws)
                w = {"t_s": round(k * ws, 3), "length_s": round(length, 3), "n": int(sel.size),
                     "fps": round(sel.size / len(viewers) / length, 2) if viewers else None,
                     "p50": round(pct(sel, 50), 3), "p95": round(pct(sel, 95), 3), "p99": round(pct(sel, 99), 3),
                     "max": round(float(sel.max()), 3)}
                # the medians place a trend in the server or the receiver; to_compositor (up to a browser's
                # presentationTime) is the latency without the wait for the display's next refresh, whose phase
                # against the source's frame clock wanders
                for j, key in enumerate(("server_total_p50", "after_server_p50", "send_network_p50",
                                         "jitter_decode_p50", "to_compositor_p99")):
                    col = prt[inwin, j]
                    col = col[np.isfinite(col)]
                    if col.size:
                        w[key] = round(pct(col, int(key[-2:])), 3)
                windows.append(w)
            k += 1
    result["window_s"] = ws
    result["windows"] = windows
    drift = drift_summary(windows, ws)
    if drift is not None:
        result["drift"] = drift
    result["_timeline"] = timeline  # for plots; dropped from the JSON unless --samples
    return result


def drift_summary(windows: list[dict[str, Any]], ws: float) -> dict[str, Any] | None:
    """Drift over the full windows of a long run: the issue's criterion (last window's p99 against the first's) and,
    since two points of a periodic wander can fall anywhere on it, the trend too: the least-squares slope of the
    per-window p99 (ms per minute), its range, and the range of the server's own per-window median. ``None`` for
    fewer than two full windows or windows shorter than 10 s (that would only be noise)."""
    full = [w for w in windows if w["length_s"] >= 0.99 * ws]
    if len(full) < 2 or ws < 10:
        return None
    t = np.array([w["t_s"] for w in full], float) / 60.0
    p = np.array([w["p99"] for w in full], float)
    slope = float(np.polyfit(t, p, 1)[0]) if len(full) >= 3 else (p[-1] - p[0]) / max(t[-1] - t[0], 1e-9)
    server = [w["server_total_p50"] for w in full if w.get("server_total_p50") is not None]

    def first_last(key: str) -> dict[str, Any]:
        a, b = full[0][key], full[-1][key]
        return {"first_window_p99": a, "last_window_p99": b, "last_over_first": round(b / a, 4) if a else None,
                "within_10_pct": bool(a) and abs(b - a) <= 0.10 * a}

    out = {**first_last("p99"),
           "p99_slope_ms_per_min": round(slope, 3),
           "p99_min": round(float(p.min()), 3), "p99_max": round(float(p.max()), 3),
           "server_p50_range_ms": [round(min(server), 3), round(max(server), 3)] if server else None}
    # the same criterion without the display's refresh wait (browsers only: they report when a frame was handed to
    # the compositor): what the system itself adds, free of the source-clock / refresh-clock phase
    if all("to_compositor_p99" in w for w in (full[0], full[-1])):
        out["to_compositor"] = first_last("to_compositor_p99")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# one measurement, a whole session
# ---------------------------------------------------------------------------------------------------------------------
def measure(url: str, server: str, *, viewer: str = "chromium", viewers: int = 1, seconds: float = 10.0,
            warmup: float = 3.0, codec: str | None = None, budget_ms: float = 200.0, window_s: float | None = None,
            quiet: bool = False, browser=None, server_pid: int | None = None,
            reader: str = "videoframe", load_viewers: int = 0, layout: str = "contexts", sfu=None,
            screencast: bool = False) -> dict[str, Any]:
    """Measure one running server with ``viewers`` receivers of kind ``viewer``; returns the analysed run.

    ``server`` names the kind of server ("sonomaly" or "naive": which stages are on the frame's path); ``browser``
    an already launched Playwright browser for the Chromium viewers (default: launch one); ``server_pid`` the
    server's process, to split the CPU use into server, viewers and harness; ``reader`` how Chromium viewers read
    the frame-id code ("videoframe": the luma of the code's box from a WebCodecs VideoFrame, falling back to
    "canvas" where a frame cannot be read so; "canvas": RGBA pixels of a 2D canvas, the earlier way);
    ``load_viewers`` extra sessions that receive the stream without decoding it (:class:`LoadViewers`), connected
    before the measured viewers and held until their window ends; ``layout`` where the Chromium viewers live (a
    browser context each, or all in one page: :func:`collect_chromium`); ``sfu`` a running
    :class:`~sonomaly.tools.sfu.Janus` the server publishes to, through which the Chromium viewers subscribe;
    ``screencast``: the first Chromium viewer's composited page is recorded too, which gives ``to_composited_ms``
    (:class:`_Screencast`)."""
    url = url.rstrip("/")
    if sfu is not None and viewer != "chromium":
        raise ValueError("viewers through an SFU are Chromium viewers only")
    health0 = get_json(url + "/health")
    poller = RecordPoller(url).start()
    window = Window(server_pid, tuple(p.pid for p in sfu.procs) if sfu is not None else ())
    load = LoadViewers(url, load_viewers, janus_api=sfu.api if sfu is not None else None)
    try:
        if load_viewers:
            _progress(f"  {load_viewers} load session(s) connecting", quiet)
        load.__enter__()
        if viewer == "chromium":
            data = collect_chromium(url, viewers, seconds, warmup, window, codec=codec, quiet=quiet, browser=browser,
                                    reader=reader, layout=layout, sfu=sfu, screencast=screencast)
        elif viewer == "aiortc":
            data = collect_aiortc(url, viewers, seconds, warmup, window, codec=codec, quiet=quiet)
        else:
            raise ValueError(f"unknown viewer {viewer!r} (chromium or aiortc)")
    finally:
        load.__exit__()
        poller.stop()
    health1 = get_json(url + "/health")
    offset = poller.offset_ns
    if viewer == "chromium":  # browser times are unix ns: map them onto the server's monotonic clock
        for v in data:
            v.samples = [(c, t - offset, (r - offset) if r > 0 else -1, (q - offset) if q > 0 else -1, k)
                         for c, t, r, q, k in v.samples]
            v.unreadable = [t - offset for t in v.unreadable]
            v.damaged = [t - offset for t in v.damaged]
            v.composited = {c: t - offset for c, t in v.composited.items()}
            if v.bracket is not None:  # direct reading vs the wall-clock route: how far apart they are
                rt, direct = v.bracket
                v.stats.setdefault("clock_calibration_ms", {}).update(
                    cross_check=round((direct + offset) / 1e6, 3), cross_check_bound=round(rt / 2e6, 3))
    result = analyse(server, data, poller.records, window, budget_ms=budget_ms, window_s=window_s)
    result["url"] = url
    if load_viewers:
        result["load_viewers"] = load.summary(window)
    if viewer == "chromium":  # how the viewers read the code (their own CPU use depends on it)
        readers = sorted({v.stats["reader"] for v in data if v.stats.get("reader")})
        result["reader"] = "+".join(readers) or None
        checks = [v.stats["reader_cross_check"] for v in data if "reader_cross_check" in v.stats]
        if checks:
            result["reader_cross_check"] = {k: sum(c[k] for c in checks) for k in ("frames", "disagreed")}
        result["chromium_layout"] = layout
    if sfu is not None:
        result["via"] = "janus"
        result["sfu"] = {"kind": "janus", "version": sfu.version(), "threads": sfu.threads}
    result["cpu"] = window.cpu
    result["codec"] = codec or "default (offer order)"
    result["health"] = {k: health1.get(k) for k in ("model", "backend", "frames_in", "frames_out", "frames_dropped",
                                                    "fps_out", "ai", "ai_frames", "overflow_drops", "viewers",
                                                    "encode", "fanout", "whip")
                        if k in health1}
    if "frames_dropped" in health0 and "frames_dropped" in health1:
        result["health"]["frames_dropped_during_run"] = health1["frames_dropped"] - health0["frames_dropped"]
    offs = poller.offsets_ns
    result["clock"] = {"server_unix_minus_monotonic_ns": offset,
                       "server_offset_spread_us": round((max(offs) - min(offs)) / 1e3, 1) if offs else None}
    problem = clock_problem(result["clock"], [v.stats.get("clock_calibration_ms") for v in data])
    if problem:  # the numbers are not latencies: say so, and never let such a run pass
        result["clock"]["problem"] = problem
        result["pass"] = False
        print(f"sonomaly latency: INVALID RUN: {problem}", file=sys.stderr)
    return result


CLOCK_STEP_MS = 2.0
"""How far the wall clock may move against the monotonic clock during a run before its latencies are void."""


def clock_problem(clock: dict[str, Any], calibrations: list[dict | None]) -> str | None:
    """Why a run's browser-to-server clock mapping cannot be trusted, or ``None``. Browser times are unix ns mapped
    onto the server's monotonic clock through one offset; a wall clock that steps during the run (NTP, a VM paused
    and resumed) shifts every later latency by the step. Seen on a VM: an 8-s spread of the server's offset and
    ~450 ms added to every frame of a 10-minute run."""
    spread = clock.get("server_offset_spread_us")
    if spread is not None and spread / 1e3 > CLOCK_STEP_MS:
        return (f"the server's wall clock moved {spread / 1e3:.1f} ms against its monotonic clock during the run "
                f"(more than {CLOCK_STEP_MS:g} ms): the latencies are shifted by it")
    for i, cal in enumerate(c for c in calibrations if c):
        cc, bound = cal.get("cross_check"), cal.get("cross_check_bound")
        if cc is not None and bound is not None and abs(cc) > bound + CLOCK_STEP_MS:
            return (f"viewer {i}: the direct clock reading and the wall-clock route disagree by {cc:.1f} ms "
                    f"(bound {bound:.1f} ms): a clock stepped during the run")
        a, b = cal.get("offset_start"), cal.get("offset_end")
        if a is not None and b is not None and abs(b - a) > CLOCK_STEP_MS + (cal.get("spread") or 0.0):
            return (f"viewer {i}: the browser's clock offset moved {b - a:.1f} ms between the run's start and end")
    return None


def _fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(runs: list[dict]) -> str:
    w = max([9, *(len(r.get("label") or r["server"]) for r in runs)])  # labels ("sonomaly via janus") set the column
    head = (f"{'server':{w}} {'viewer':8} {'N':>2} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'tail':>6} "
            f"{'flat':>6} {'fps':>5} {'lost':>5} {'server':>7} {'after':>7}  budget")
    lines = [head, "-" * len(head)]
    for r in runs:
        g = r["glass_to_glass_ms"]
        st = r.get("stages_ms", {})
        lines.append(
            f"{r.get('label') or r['server']:{w}} {r['viewer']:8} {_viewers_cell(r):>2} {_fmt(g.get('p50')):>7} "
            f"{_fmt(g.get('p95')):>7} "
            f"{_fmt(g.get('p99')):>7} {_fmt(g.get('max')):>7} {_fmt(g.get('tail')):>6} {_fmt(g.get('flatness')):>6} "
            f"{_fmt(r.get('received_fps')):>5} {r.get('frames_lost', 0):>5} "
            f"{_fmt(st.get('server_total', {}).get('p50')):>7} {_fmt(st.get('after_server', {}).get('p50')):>7}  "
            f"{'ok' if r['pass'] else 'OVER'} ({r['budget_ms']:g} ms)")
    return "\n".join(lines)


def _comparison_group(r: dict) -> tuple:
    """Which runs may be compared with each other: the same receiver, run length (to 10 s), serve arguments, with or
    without a model, how Chromium read the code (``reader``: it sets the viewers' share of the CPU) and where its
    viewers lived (``chromium_layout``: a context each, or one page for all; runs before the field: contexts). A report
    merged from several sessions (``--from-json``) holds runs of every kind; a naive run is paired with the Sonomaly
    run of its own command, never with an aiortc, no-model or 120-s run."""
    label = str(r.get("label") or r["server"])
    label = re.sub(r"\s*\((chromium|aiortc), [\d.]+ s\)$", "", label)
    if label.split(" ", 1)[0] == r["server"]:
        label = label[len(r["server"]):].strip()
    health = r.get("health")
    has_model = r["server"] == "naive" or not isinstance(health, dict) or health.get("model") is not None
    reader = r.get("reader") or ("canvas" if r["viewer"] == "chromium" else None)  # runs before `reader`: canvas
    layout = r.get("chromium_layout") or ("contexts" if r["viewer"] == "chromium" else None)
    return r["viewer"], round(float(r.get("seconds") or 0) / 10), label, has_model, reader, layout


_VIA_SFU = re.compile(r"(^|\s+)via janus$")  # how a run label says its viewers came through the SFU


def _via_sfu(label: str) -> bool:
    return bool(_VIA_SFU.search(label))


def _load(r: dict) -> int:
    """Load sessions beside the measured viewers in a run (``--load-viewers``), 0 for runs without (or before)."""
    return int((r.get("load_viewers") or {}).get("n", 0))


def _viewers_cell(r: dict) -> str:
    return f"{r['viewers']}+{_load(r)} load" if _load(r) else str(r["viewers"])


def comparisons(runs: list[dict]) -> dict[str, Any]:
    """Ratios within each group of comparable runs (:func:`_comparison_group`): naive / Sonomaly per viewer count,
    and N-viewer / 1-viewer for each server (a run with M load sessions beside its N measured viewers is named
    ``N+Mload``, e.g. ``sonomaly_1+7load_over_1_viewer_p99``, and divided by the run with 1 viewer and no load).
    The first run's group has the plain names
    (``naive_over_sonomaly_1_viewers``); every other group's names start with what sets it apart
    (e.g. ``aiortc_20s_``, ``chromium_30s_nomodel_``, ``chromium_30s_videoframe_``,
    ``chromium_30s_videoframe_onepage_``). Runs through an SFU (label ``… via janus``) always carry ``via-janus`` in
    their names (``via-janus_`` when theirs is the first group) and are also divided by the 1-viewer run of their
    direct twin group (``…via-janus_sonomaly_8_over_direct_1_viewer_p99``): N viewers through the SFU against one
    viewer straight from the server."""
    out: dict[str, Any] = {}
    groups: dict[tuple, dict[tuple, dict]] = {}
    for r in runs:
        if r["glass_to_glass_ms"].get("n"):
            groups.setdefault(_comparison_group(r), {}).setdefault((r["server"], r["viewers"], _load(r)), r)
    prefixes: dict[tuple, str] = {}
    for i, (group, by) in enumerate(groups.items()):
        viewer, tens, label, has_model, reader, layout = group
        prefix = prefixes[group] = ("via-janus_" if _via_sfu(label) else "") if i == 0 else "_".join(
            [viewer, f"{tens * 10}s", *([] if has_model else ["nomodel"]),
             *([reader] if reader not in (None, "canvas") else []),
             *(["onepage"] if layout == "page" else []),
             *([re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")] if label else [])]) + "_"
        for (server, n, m), r in sorted(by.items()):
            nm = f"{n}+{m}load" if m else f"{n}"  # measured viewers + load sessions
            if server == "naive" and ("sonomaly", n, m) in by:
                s = by[("sonomaly", n, m)]["glass_to_glass_ms"]
                g = r["glass_to_glass_ms"]
                out[f"{prefix}naive_over_sonomaly_{nm}_viewers"] = {"p50": round(g["p50"] / s["p50"], 3),
                                                                    "p99": round(g["p99"] / s["p99"], 3)}
                sc, gc = (x.get("to_composited_ms") or {} for x in (by[("sonomaly", n, m)], r))
                if sc.get("p99") and gc.get("p99"):  # --screencast: one definition for both render paths
                    out[f"{prefix}naive_over_sonomaly_{nm}_viewers"].update(
                        p50_composited=round(gc["p50"] / sc["p50"], 3), p99_composited=round(gc["p99"] / sc["p99"], 3))
            if (n > 1 or m) and (server, 1, 0) in by:
                _p99_ratios(out, f"{prefix}{server}_{nm}_over_1_viewer", r, by[(server, 1, 0)])
    for group, by in groups.items():  # through the SFU against one viewer straight from the server
        viewer, tens, label, has_model, reader, layout = group
        if not _via_sfu(label):
            continue
        twin = (viewer, tens, _VIA_SFU.sub("", label), has_model, reader, layout)
        one = groups.get(twin, {}).get(("sonomaly", 1, 0))
        if one is None:
            continue
        for (server, n, m), r in sorted(by.items()):
            if server == "sonomaly":
                _p99_ratios(out, f"{prefixes[group]}sonomaly_{f'{n}+{m}load' if m else n}_over_direct_1_viewer", r,
                            one)
    return out


def _p99_ratios(out: dict[str, Any], key: str, r: dict, base: dict) -> None:
    """``{key}_p99``: run ``r``'s glass-to-glass p99 over ``base``'s; where both have it, ``{key}_to_compositor_p99``,
    the same without the display's refresh phase, ``{key}_to_composited_p99`` where both were screencast, and
    ``{key}_paint_p50_ms``, the two runs' median wait from the compositor to the expected display (``base``'s first):
    Chromium times a lone video and a page of several unlike (docs/LATENCY.md, "Chromium's two render paths"), and a
    gap there says the glass-to-glass ratio compares unlike waits."""
    out[f"{key}_p99"] = round(r["glass_to_glass_ms"]["p99"] / base["glass_to_glass_ms"]["p99"], 3)
    tc, tc1 = (x.get("to_compositor_ms") or {} for x in (r, base))
    if tc.get("p99") and tc1.get("p99"):
        out[f"{key}_to_compositor_p99"] = round(tc["p99"] / tc1["p99"], 3)
    tk, tk1 = (x.get("to_composited_ms") or {} for x in (r, base))
    if tk.get("p99") and tk1.get("p99"):
        out[f"{key}_to_composited_p99"] = round(tk["p99"] / tk1["p99"], 3)
    paint = [((x.get("stages_ms") or {}).get("paint") or {}).get("p50") for x in (base, r)]
    if None not in paint:
        out[f"{key}_paint_p50_ms"] = [round(float(v), 1) for v in paint]


def _name(r: dict) -> str:
    name = r.get("label") or r["server"]
    return f"{name} ({r['viewer']}, {r['seconds']:.0f} s)" if r.get("set") else name


def _cpu_cell(c: dict) -> str:
    if not c:
        return "–"
    if "server_pct" in c:
        return (f"{_fmt(c['server_pct'], 0)} / {_fmt(c['viewers_pct'] + c['harness_pct'], 0)} / "
                f"{_fmt(c.get('other_processes_pct'), 0)}")
    return f"– / {_fmt(c.get('harness_and_server_pct'), 0)} / {_fmt(c.get('other_processes_pct'), 0)}"


def markdown(report: dict) -> str:
    """The report's tables in Markdown (machine, results, stages, viewers, comparisons)."""
    m = report.get("machine", {})
    c = report.get("config", {})
    out: list[str] = [f"Machine: {m.get('nproc')} × {cpu_label(m)}, {m.get('memory_gib', '?')} GiB; Python "
                      f"{m.get('python')}, aiortc {m.get('aiortc')}, PyAV {m.get('av')}, ONNX Runtime "
                      f"{m.get('onnxruntime')}."]
    if c:
        out.append(f"Run: `{c.get('source_uri') or c.get('url')}`, model `{c.get('model')}`, viewer "
                   f"{c.get('viewer')}, {c.get('seconds'):g} s per run after {c.get('warmup'):g} s warm-up, codec "
                   f"{c.get('codec') or 'default'}, {report.get('created')}; load average at start "
                   f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}.")
    for st in report.get("sets", []):  # a merged report
        sc = st.get("config", {})
        out.append(f"- `{st.get('file')}`: {st.get('description')} — `{sc.get('source_uri')}`, model "
                   f"`{sc.get('model')}`, warm-up {sc.get('warmup'):g} s, {st.get('created')}, load average at start "
                   f"{', '.join(f'{x:.2f}' for x in st.get('loadavg_at_start') or [])}")
    out += ["", "CPU: % of one core during the window, by the server under test / by the viewers (Chromium or aiortc "
            "processes) and the harness / by other processes on the machine.", "",
           "| server | viewers | p50 | p95 | p99 | max | tail | flatness | fps (min) | lost | frames "
           "| p99 ≤ budget | CPU % server / viewers+harness / others |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in report["runs"]:
        g = r["glass_to_glass_ms"]
        out.append(f"| {_name(r)} | {_viewers_cell(r)} | {_fmt(g.get('p50'))} | {_fmt(g.get('p95'))} | "
                   f"{_fmt(g.get('p99'))} | {_fmt(g.get('max'))} | {_fmt(g.get('tail'))} | "
                   f"{_fmt(g.get('flatness'))} | {_fmt(r.get('received_fps'))} ({_fmt(r.get('received_fps_min'))}) | "
                   f"{r.get('frames_lost')} ({r.get('lost_pct')} %) | {r.get('frames')} | "
                   f"{'yes' if r['pass'] else 'no'} ({r['budget_ms']:g} ms) | "
                   f"{_cpu_cell(r.get('cpu', {}))} |")
    for r in report["runs"]:
        if r.get("load_viewers"):
            lv = r["load_viewers"]
            out.append(f"\n{_name(r)}, {_viewers_cell(r)}: {lv['n']} load sessions (aiortc, receive without decoding, "
                       f"one process; their CPU is in the viewers' share) received {lv['fps_min']} fps at the least, "
                       f"{lv['fps_mean']} on average.")
    out += ["", "Median (p95) per stage, ms, along the frame's path:", ""]
    order = ["grab", "queue", "roi", "preprocess", "infer", "postprocess", "ai_wait", "overlay", "server_other",
             "server_total", "encode", "send_network", "jitter_decode", "paint", "jitter_decode_paint",
             "after_server"]
    names = [k for k in order if any(k in r["stages_ms"] for r in report["runs"])]
    out.append("| server | viewers | " + " | ".join(names) + " |")
    out.append("|---|---:|" + "---:|" * len(names))
    for r in report["runs"]:
        st = r["stages_ms"]
        cells = [f"{st[k]['p50']:.1f} ({st[k]['p95']:.1f})" if k in st else "–" for k in names]
        out.append(f"| {_name(r)} | {_viewers_cell(r)} | " + " | ".join(cells) + " |")
    par = [r for r in report["runs"] if r.get("parallel_stages_ms")]
    if par:
        out += ["", "Sonomaly's AI worker, beside the path (median (p95), ms):", ""]
        keys = list(par[0]["parallel_stages_ms"])
        out.append("| server | viewers | " + " | ".join(keys) + " |")
        out.append("|---|---:|" + "---:|" * len(keys))
        for r in par:
            ps = r["parallel_stages_ms"]
            out.append(f"| {_name(r)} | {_viewers_cell(r)} | " + " | ".join(f"{ps[k]['p50']:.1f} ({ps[k]['p95']:.1f})" if k in ps
                                                          else "–" for k in keys) + " |")
    out += ["", "Receivers (Chromium `getStats()` over the window, mean over viewers):", "",
            "| server | viewers | codec | size | kbit/s | jitter buffer ms | decode ms | freezes | code read by "
            "(cross-checked: disagreed) | per-viewer p99 | per-viewer send+network median |",
            "|---|---:|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in report["runs"]:
        rx = [v.get("receiver", {}) for v in r["per_viewer"]]
        if not any(rx):
            continue
        mean = lambda k: _fmt(float(np.mean([x[k] for x in rx if x.get(k) is not None]))  # noqa: E731
                             if any(x.get(k) is not None for x in rx) else None)
        p99s = ", ".join(_fmt(v["glass_to_glass_ms"].get("p99"), 0) for v in r["per_viewer"])
        sends = ", ".join(_fmt(v.get("stages_ms", {}).get("send_network", {}).get("p50"), 1) for v in r["per_viewer"])
        cc = r.get("reader_cross_check")
        read = (r.get("reader") or "canvas") + (f" ({cc['frames']}: {cc['disagreed']})" if cc else "") + (
            ", one page" if r.get("chromium_layout") == "page" else "")
        out.append(f"| {_name(r)} | {_viewers_cell(r)} | {rx[0].get('codec')} | {rx[0].get('frameWidth')}×"
                   f"{rx[0].get('frameHeight')} | {mean('kbit_per_s')} | {mean('jitter_buffer_ms_avg')} | "
                   f"{mean('decode_ms_avg')} | {sum(x.get('freezeCount', 0) for x in rx)} | {read} | {p99s} | {sends} |")
    if report.get("comparisons") and not report.get("sets"):
        out += ["", "Ratios: " + "; ".join(f"{k} = {v}" for k, v in report["comparisons"].items())]
    if report.get("sets"):
        out.append("")
    for st in report.get("sets", []):
        if st.get("comparisons"):
            out.append(f"- ratios in `{st['file']}`: " + "; ".join(f"{k} = {v}" for k, v in st["comparisons"].items()))
    for r in report["runs"]:
        if r.get("drift"):
            d = r["drift"]
            out.append(f"\nDrift ({_name(r)}, {r['viewers']} viewer(s)): first {r['window_s']:g}-s window p99 "
                       f"{d['first_window_p99']:.1f} ms, last {d['last_window_p99']:.1f} ms "
                       f"(× {d['last_over_first']}, within 10 %: {'yes' if d['within_10_pct'] else 'no'})"
                       + (f"; trend of the per-window p99 {d['p99_slope_ms_per_min']:+.2f} ms/min, range "
                          f"{d['p99_min']:.1f}–{d['p99_max']:.1f} ms" if "p99_slope_ms_per_min" in d else "")
                       + (f"; server's per-window median {d['server_p50_range_ms'][0]:.1f}–"
                          f"{d['server_p50_range_ms'][1]:.1f} ms" if d.get("server_p50_range_ms") else "")
                       + (f"; up to the compositor (without the refresh wait) first {d['to_compositor']['first_window_p99']:.1f}"
                          f" ms, last {d['to_compositor']['last_window_p99']:.1f} ms (× {d['to_compositor']['last_over_first']}, "
                          f"within 10 %: {'yes' if d['to_compositor']['within_10_pct'] else 'no'})"
                          if d.get("to_compositor") else "") + ".")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def plot(report: dict, path: str | Path) -> None:
    """Histogram, timeline and stage breakdown of every run in ``report`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r.get("_timeline")]
    if not runs:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 12))
    allv = np.concatenate([np.array(r["_timeline"])[:, 1] for r in runs])
    logx = allv.max() / max(allv.min(), 1e-3) > 20
    ax = axes[0]
    bins = (np.geomspace(max(allv.min(), 1.0) * 0.9, allv.max() * 1.1, 80) if logx
            else np.linspace(0, allv.max() * 1.05, 80))
    for i, r in enumerate(runs):
        v = np.array(r["_timeline"])[:, 1]
        g = r["glass_to_glass_ms"]
        ax.hist(v, bins=bins, histtype="step", lw=1.6, color=colors[i % len(colors)],
                weights=np.full(v.size, 1.0 / v.size),
                label=f"{_name(r)} · {_viewers_cell(r)} viewer(s): p50 {g['p50']:.0f} / p99 {g['p99']:.0f} ms")
    if logx:
        ax.set_xscale("log")
    budget = runs[0]["budget_ms"]
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} ms")
    ax.set_xlabel("glass-to-glass latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("Glass-to-glass latency, per frame")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, r in enumerate(runs):
        a = np.array(r["_timeline"])
        ax.plot(a[:, 0], a[:, 1], ".", ms=2, color=colors[i % len(colors)], alpha=0.6,
                label=f"{_name(r)} · {_viewers_cell(r)}")
        if r.get("windows") and len(r["windows"]) > 2:
            w = r["windows"]
            ax.plot([x["t_s"] + x["length_s"] / 2 for x in w], [x["p99"] for x in w], "-",
                    color=colors[i % len(colors)], lw=1.5)
    if logx:
        ax.set_yscale("log")
    ax.axhline(budget, color="k", ls="--", lw=1)
    ax.set_xlabel("time in measurement window (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Timeline (dots: frames of all viewers; line: per-window p99)")
    ax.legend(fontsize=8, markerscale=4, ncol=2)
    ax = axes[2]
    labels = []
    for i, r in enumerate(runs):
        st = r["stages_ms"]
        parts = [(k, st[k]["p50"]) for k in r["serial_stages"] if k in st]
        parts.append(("other server", max(0.0, st.get("server_other", {}).get("p50", 0.0))))
        if "encode" in st:
            parts.append(("encode", st["encode"]["p50"]))
        if "jitter_decode" in st:
            parts += [("send+network", st["send_network"]["p50"]), ("jitter+decode", st["jitter_decode"]["p50"]),
                      ("paint", st["paint"]["p50"])]
        elif "send_network" in st:
            parts += [("send+network", st["send_network"]["p50"]),
                      ("jitter+decode+paint", st["jitter_decode_paint"]["p50"])]
        elif "after_server" in st:
            parts.append(("encode+network+decode", st["after_server"]["p50"]))
        left = 0.0
        for j, (name, val) in enumerate(parts):
            val = max(0.0, val)
            ax.barh(i, val, left=left, color=STAGE_COLORS.get(name, "#999999"), edgecolor="white",
                    label=name if name not in ax.get_legend_handles_labels()[1] else None)
            left += val
        labels.append(f"{_name(r)} · {_viewers_cell(r)}")
    ax.set_yticks(range(len(runs)), labels)
    if logx:
        ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("median time per stage (ms), along the frame's path")
    ax.set_title("Where the time goes (medians; Sonomaly's AI runs beside this path)")
    ax.legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    m = report.get("machine", {})
    fig.suptitle(f"sonomaly latency — {m.get('nproc')}× {m.get('cpu')} · viewer {runs[0]['viewer']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("latency", help="measure glass-to-glass latency in real viewers (barcode frame ids)",
                              description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--url", help="a running server that streams a stamp: source (sonomaly serve --source stamp:...)")
    g.add_argument("--serve", metavar="SOURCE",
                   help="start `sonomaly serve` on SOURCE (wrapped in stamp:) on a free port for the measurement")
    g.add_argument("--from-json", nargs="+", metavar="REPORT",
                   help="measure nothing: merge saved reports (--json) and write --json/--plot/--md from them "
                        "(plots need reports saved with --samples)")
    p.add_argument("--model", help="model directory for --serve (default: video only)")
    p.add_argument("--fps", type=float, default=None, help="pace a --serve file source at this rate (e.g. 30)")
    p.add_argument("--viewer", choices=["chromium", "aiortc"], default="chromium")
    p.add_argument("--viewers", default="1", help="number of viewers, or a list to sweep (e.g. 1,4,8)")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds discarded after the viewers connect")
    p.add_argument("--codec", choices=["vp8", "h264"], default=None,
                   help="codec the viewers ask for (with --serve also the server's --codec)")
    p.add_argument("--reader", choices=["videoframe", "canvas"], default="videoframe",
                   help="how Chromium viewers read the frame-id code: the luma of its box from a WebCodecs "
                        "VideoFrame (default; ~5 %% of a core less a viewer), or a 2D canvas's RGBA pixels")
    p.add_argument("--chromium-layout", choices=list(CHROMIUM_LAYOUTS), default="contexts",
                   help="contexts (default): each Chromium viewer in a browser context of its own (a renderer "
                        "process each, as separate displays); page: all viewers as <video> elements of one page "
                        "(a decoder each, one renderer and compositor: a lighter instrument beside the server)")
    p.add_argument("--screencast", action="store_true",
                   help="Chromium: also record the first viewer's composited page (DevTools screencast) and report "
                        "to_composited_ms, capture to the first compositor frame showing each frame: one definition "
                        "for every render path, so naive and Sonomaly compare like for like (runs with a page of "
                        "its own for that viewer: layout contexts, or 1 viewer)")
    p.add_argument("--load-viewers", type=int, default=0, metavar="M",
                   help="M more sessions during each run that receive the stream but do not decode it (aiortc, one "
                        "process): the server serves viewers + M while only the measured viewers decode and paint")
    p.add_argument("--via", default="direct", metavar="direct|janus[,…]",
                   help="how the Chromium viewers get the stream (with --serve): direct (default; each viewer "
                        "connects to the server) or janus (the server publishes once over WHIP to a local Janus SFU, "
                        "`make janus`, and every viewer subscribes through it); a list such as direct,janus measures "
                        "both for every viewer count, one after the other")
    p.add_argument("--janus-threads", type=int, default=0, metavar="N",
                   help="relay helper threads of the Janus room (its `threads` option; default 0: the publisher's "
                        "own thread forwards to every subscriber)")
    p.add_argument("--budget-ms", type=float, default=200.0, help="p99 budget; exit status 1 when exceeded")
    p.add_argument("--baseline", choices=["naive"], default=None,
                   help="also measure the naive aiortc integration (tools/naive.py) on the same source and model "
                        "(needs --serve)")
    p.add_argument("--window-s", type=float, default=None,
                   help="length of the per-window percentiles (default 60 s for runs of 3 min or more)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write histogram, timeline and stage plots")
    p.add_argument("--md", metavar="OUT.md", help="write the report's tables as Markdown")
    p.add_argument("--samples", action="store_true", help="keep every frame's (t, latency, viewer) in the JSON")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `sonomaly serve` (repeatable, e.g. --serve-arg=--no-hud)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--viewers: expected a number or a list like 1,4,8, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit("--viewers: at least one viewer")
    return counts


def merge_reports(reports: list[dict]) -> dict:
    """One report from several (runs concatenated, comparisons recomputed; machine and config of the first)."""
    out = {**reports[0], "runs": [r for rep in reports for r in rep["runs"]]}
    if len(reports) > 1:
        out["merged_from"] = [{"created": rep.get("created"), "config": rep.get("config"),
                               "loadavg_at_start": rep.get("machine", {}).get("loadavg_at_start")} for rep in reports]
    out["comparisons"] = comparisons(out["runs"])
    return out


def _write(report: dict, args) -> None:
    if args.plot:
        for r in report["runs"]:
            if "_timeline" not in r and r.get("samples"):
                r["_timeline"] = [tuple(x) for x in r["samples"]]
        plot(report, args.plot)
    for r in report["runs"]:
        tl = r.pop("_timeline", [])
        if args.samples and tl and "samples" not in r:
            r["samples"] = [[round(t, 4), round(lat, 3), vi] for t, lat, vi in tl]
        elif not args.samples:
            r.pop("samples", None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.md:
        Path(args.md).write_text(markdown(report))


def run(args) -> int:
    import logging

    for name in ("aioice", "aiortc"):  # their INFO lines (ICE checks...) drown the report
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.from_json:
        report = merge_reports([json.loads(Path(f).read_text()) for f in args.from_json])
        print(table(report["runs"]))
        _write(report, args)
        return 0
    counts = _counts(args.viewers)
    if args.load_viewers < 0:
        print("sonomaly latency: --load-viewers must be 0 or more", file=sys.stderr)
        return 2
    if args.baseline and not args.serve:
        print("sonomaly latency: --baseline needs --serve (the baseline runs on the same source and model)",
              file=sys.stderr)
        return 2
    vias = [v.strip() for v in str(args.via).split(",") if v.strip()]
    if not vias or any(v not in VIAS for v in vias) or len(set(vias)) != len(vias):
        print(f"sonomaly latency: --via: a list of {', '.join(VIAS)}, not {args.via!r}", file=sys.stderr)
        return 2
    if args.janus_threads < 0:
        print("sonomaly latency: --janus-threads must be 0 or more", file=sys.stderr)
        return 2
    if args.screencast and args.viewer != "chromium":
        print("sonomaly latency: --screencast records a Chromium viewer's page (--viewer chromium)", file=sys.stderr)
        return 2
    if "janus" in vias:
        from sonomaly.tools import sfu as sfu_mod

        why = ("it starts the server with --whip" if not args.serve else
               "only Chromium viewers subscribe through Janus" if args.viewer != "chromium" else
               "the naive baseline has no WHIP publisher" if args.baseline else sfu_mod.missing())
        if why:
            print(f"sonomaly latency: --via janus needs --serve, Chromium viewers and no --baseline: {why}",
                  file=sys.stderr)
            return 2
    report: dict[str, Any] = {"tool": "sonomaly latency", "format": 1,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                              "config": {k: getattr(args, k) for k in ("url", "serve", "model", "fps", "viewer",
                                                                       "viewers", "seconds", "warmup", "codec",
                                                                       "budget_ms", "baseline", "serve_arg",
                                                                       "window_s", "reader", "load_viewers",
                                                                       "chromium_layout", "via", "janus_threads")},
                              "runs": []}
    servers = [("sonomaly", via) for via in vias] + ([(args.baseline, "direct")] if args.baseline else [])
    source = stamped(args.serve, args.fps) if args.serve else None
    if source:
        report["config"]["source_uri"] = source
    failed = False
    for n in counts:
        for server, via in servers:
            load = f" + {args.load_viewers} load session(s)" if args.load_viewers else ""
            through = " through Janus" if via == "janus" else ""
            _progress(f"{server}: {n} {args.viewer} viewer(s){through}{load}, {args.seconds:g} s", args.quiet)
            try:
                if args.url:
                    run_ = measure(args.url, server, viewer=args.viewer, viewers=n, seconds=args.seconds,
                                   warmup=args.warmup, codec=args.codec, budget_ms=args.budget_ms,
                                   window_s=args.window_s, quiet=args.quiet, reader=args.reader,
                                   load_viewers=args.load_viewers, layout=args.chromium_layout,
                                   screencast=args.screencast)
                else:
                    extra = list(args.serve_arg) if server == "sonomaly" else []
                    if server == "sonomaly" and args.codec and "--codec" not in " ".join(extra):
                        extra += ["--codec", args.codec]  # the server's shared encoder decides the codec
                    with contextlib.ExitStack() as stack:
                        sfu = None
                        if via == "janus":
                            from sonomaly.tools.sfu import Janus

                            sfu = stack.enter_context(Janus(threads=args.janus_threads))
                            extra += ["--whip", sfu.whip_url, "--whip-token", sfu.token]
                        srv = stack.enter_context(ServerProcess(server, source, args.model, extra=extra))
                        run_ = measure(srv.url, server, viewer=args.viewer, viewers=n, seconds=args.seconds,
                                       warmup=args.warmup, codec=args.codec, budget_ms=args.budget_ms,
                                       window_s=args.window_s, quiet=args.quiet, server_pid=srv.proc.pid,
                                       reader=args.reader, load_viewers=args.load_viewers,
                                       layout=args.chromium_layout, sfu=sfu, screencast=args.screencast)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other runs
                print(f"sonomaly latency: {server} with {n} viewer(s) failed: {exc}", file=sys.stderr)
                failed = True
                continue
            run_["label"] = " ".join([server, *(args.serve_arg if server == "sonomaly" else []),
                                      *(["via janus"] if via == "janus" else [])])
            report["runs"].append(run_)
            if not args.quiet:
                g = run_["glass_to_glass_ms"]
                _progress(f"  p50 {_fmt(g.get('p50'))}  p99 {_fmt(g.get('p99'))}  max {_fmt(g.get('max'))} ms, "
                          f"{run_['received_fps']} fps, {run_['frames_lost']} lost", args.quiet)
    report["comparisons"] = comparisons(report["runs"])
    print(table(report["runs"]))
    if report["comparisons"]:
        print(json.dumps(report["comparisons"], indent=1))
    _write(report, args)
    main_runs = [r for r in report["runs"] if r["server"] == "sonomaly"]
    if not main_runs or any(not r["glass_to_glass_ms"].get("n") for r in main_runs):
        return 3
    if failed:
        return 3
    return 0 if all(r["pass"] for r in main_runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sonomaly")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["latency", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
