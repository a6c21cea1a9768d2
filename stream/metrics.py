"""Prometheus ``/metrics`` in the text exposition format (version 0.0.4), written by hand (no extra dependency).

Stage latency histograms are fed from the pipeline's per-frame records: each scrape takes the records composed since
the last one (older than ``settle_ms``, so the encoder has stamped its stage), so nothing is counted twice and the
pipeline threads do no metrics work at all.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any

from sonomaly.stream.frame import now_ns

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


def _fmt(v: float) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class Histogram:
    def __init__(self, buckets=BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.count += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    def __init__(self, pipeline, webrtc=None, guard=None, recorder=None, *, settle_ms: float = 300.0) -> None:
        self.pipeline = pipeline
        self.webrtc = webrtc
        self.guard = guard
        self.recorder = recorder
        self.whip = None  # the WHIP publisher, once the app has started it
        self.settle_ns = int(settle_ms * 1e6)
        self.stages: dict[str, Histogram] = {}
        self.latency = Histogram()
        self._last_composed_ns = 0
        self._lock = threading.Lock()
        self.extra: dict[str, float] = {}

    def _ingest(self) -> None:
        horizon = now_ns() - self.settle_ns
        for r in list(self.pipeline.records):
            t = r.get("t_composed_ns", 0)
            if t <= self._last_composed_ns or t > horizon:
                continue
            self._last_composed_ns = t
            if r.get("frame_id") is None:
                continue
            self.latency.observe((t - r["t_capture_ns"]) / 1e9)
            for stage, ms in (r.get("stages_ms") or {}).items():
                self.stages.setdefault(stage, Histogram()).observe(ms / 1e3)

    def render(self) -> str:
        with self._lock:
            self._ingest()
            return self._render()

    def _render(self) -> str:
        p = self.pipeline
        st = p.stats()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]] | float) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            if not isinstance(samples, list):
                samples = [({}, samples)]
            for labels, v in samples:
                lines.append(f"{name}{_labels(labels)} {_fmt(v)}")

        def histogram(name: str, help_: str, hists: list[tuple[dict, Histogram]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for labels, h in hists:
                for b, c in zip(h.buckets, h.counts):
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': _fmt(float(b))})} {c}")
                lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
                lines.append(f"{name}_sum{_labels(labels)} {_fmt(float(h.sum))}")
                lines.append(f"{name}_count{_labels(labels)} {h.count}")

        metric("sonomaly_frames_in_total", "counter", "Frames read from the source.", st["frames_in"])
        metric("sonomaly_frames_out_total", "counter", "Frames composed and published to the outputs.",
               st["frames_out"])
        metric("sonomaly_frames_dropped_total", "counter", "Raw frames replaced before the composer saw them.",
               st["frames_dropped"])
        metric("sonomaly_no_signal_frames_total", "counter", "NO SIGNAL frames emitted.", st["no_signal_frames"])
        metric("sonomaly_fps", "gauge", "Output frame rate over the last 64 frames.", float(st["fps_out"]))
        metric("sonomaly_signal", "gauge", "1 while the source delivers frames.", int(bool(p.signal)))
        metric("sonomaly_ai_state", "gauge", "AI state (1 for the current one).",
               [({"state": s}, int(st["ai"] == s)) for s in ("ok", "delayed", "off")])
        metric("sonomaly_ai_frames_total", "counter", "Frames the AI worker finished.", st["ai_frames"])
        metric("sonomaly_ai_errors_total", "counter", "AI worker failures.", st["ai_errors"])
        histogram("sonomaly_capture_to_composed_seconds", "Capture to composed frame, per frame.",
                  [({}, self.latency)])
        histogram("sonomaly_stage_seconds", "Time of each pipeline stage, per frame.",
                  [({"stage": k}, h) for k, h in sorted(self.stages.items())])
        if self.webrtc is not None:
            ws = self.webrtc.stats()
            metric("sonomaly_viewers", "gauge", "Connected WebRTC viewers.",
                   [({"encode": self.webrtc.encode_mode}, ws["viewers"])])
            metric("sonomaly_viewer_sessions_total", "counter", "Viewer sessions since start.", ws["viewers_total"])
            metric("sonomaly_viewers_dropped_total", "counter",
                   "Viewers dropped by the watchdog (never connected, or no RTCP: gone without a goodbye).",
                   ws["viewers_dropped_by_watchdog"])
            metric("sonomaly_viewer_stalls_total", "counter",
                   "Times a viewer page reported its picture NOT LIVE (no new frame on its screen for its limit).",
                   ws["viewer_stalls"])
            metric("sonomaly_viewer_stalled_seconds_total", "counter",
                   "Total NOT LIVE time the viewer pages reported, as each stall ended.", float(ws["viewer_stalled_s"]))
            metric("sonomaly_viewers_not_live", "gauge", "Viewer pages whose picture is NOT LIVE now.",
                   ws["viewers_not_live"])
            enc = getattr(self.webrtc, "encoder", None)
            if enc is not None:
                metric("sonomaly_encoder_frames_total", "counter", "Frames encoded by the shared encoder.",
                       enc.frames_encoded)
                metric("sonomaly_encoder_keyframes_total", "counter", "Keyframes encoded.", enc.keyframes)
                metric("sonomaly_encoder_bytes_total", "counter", "Encoded bytes.", enc.bytes_out)
                metric("sonomaly_encoder_bitrate_bps", "gauge", "Configured bitrate.", enc.bitrate)
        if self.whip is not None:
            w = self.whip.stats()
            metric("sonomaly_whip_state", "gauge", "WHIP publisher state (1 for the current one).",
                   [({"state": s}, int(w["state"] == s)) for s in ("connecting", "publishing", "reconnecting")])
            metric("sonomaly_whip_sessions_total", "counter", "WHIP sessions established.", w["sessions"])
            metric("sonomaly_whip_silences_total", "counter",
                   "WHIP sessions ended because the ingest sent no RTCP for longer than the limit.", w["silences"])
            metric("sonomaly_whip_rtcp_age_seconds", "gauge", "Seconds since the ingest's last RTCP (NaN before any).",
                   None if w["rtcp_age_s"] is None else float(w["rtcp_age_s"]))
        if self.guard is not None:
            metric("sonomaly_auth_denied_total", "counter", "Requests denied for a missing or wrong token.",
                   self.guard.denied)
            metric("sonomaly_rate_limited_total", "counter", "Signalling requests refused by the rate limit.",
                   self.guard.limited)
        if self.recorder is not None:
            metric("sonomaly_recording", "gauge", "1 while a recording runs.", int(self.recorder.active))
            metric("sonomaly_event_clips_total", "counter", "Event clips written.", self.recorder.event_clips)
        metric("sonomaly_scrape_timestamp_seconds", "gauge", "Wall clock of this scrape.", time.time())
        return "\n".join(lines) + "\n"
