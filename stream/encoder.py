"""Encode once, fan out: one shared video encoder per stream, whose packets every viewer's track returns.

aiortc's default is one encoder per peer connection (its ``RTCRtpSender`` encodes every frame a track returns), so the
server's CPU grows linearly with the number of viewers. The sender also accepts an :class:`av.Packet` instead of a
frame and only *packetises* it (``Encoder.pack``). So:

* :class:`SharedEncoder` runs on its own thread, off the event loop. It takes the newest composed frame from the
  pipeline's :class:`~sonomaly.stream.pipeline.OutputHub` (whose I420 ``yuv`` is made once per frame), encodes it with
  PyAV (VP8 by default, H.264 as an option) at a bitrate set for a hospital LAN, and hands the packet to every
  subscriber. Presentation timestamps come from the capture time on the 90 kHz RTP clock.
* Encoded video cannot skip frames the way raw frames can (a P-frame needs the one before it), so each subscriber
  has a small bounded queue; a subscriber that falls behind is cut back to the next keyframe (and asks for one)
  instead of queueing without bound or slowing the others.
* A keyframe request from any viewer (RTCP PLI/FIR, routed here by :func:`hook_keyframe_requests`) and every new
  subscriber make the encoder emit a keyframe on its next frame (requests are coalesced).
* The encoder idles while nobody subscribes.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import av

from sonomaly.stream.frame import now_ns

log = logging.getLogger("sonomaly.encoder")

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
CODECS = ("vp8", "h264")
DEFAULT_BITRATE = 4_000_000
#: libvpx's VP8 realtime speed (``cpu-used`` = minus this: a fixed speed, not one adapted to the frame time); 0..16,
#: higher is faster. 12 is what WebRTC's VP8 encoder uses on mobile ARM CPUs of up to 3 cores; against 6 it encodes
#: the composed demo stream in ~0.75x the time for 0.33 dB less luma PSNR at 4 Mbit/s (``sonomaly bench encoder``,
#: benchmarks/encoder.md).
DEFAULT_VP8_SPEED = 12


def parse_bitrate(text: str | int) -> int:
    """``"4M"`` → 4_000_000, ``"800k"`` → 800_000, ``"2500000"`` → 2_500_000."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().removesuffix("bps").removesuffix("bit/s").removesuffix("b")
    mult = 1
    if s and s[-1] in "kmg":
        mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[s[-1]]
        s = s[:-1]
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise ValueError(f"not a bitrate: {text!r} (e.g. 4M, 800k)") from None
    if not 50_000 <= value <= 100_000_000:
        raise ValueError(f"bitrate {value} bit/s is out of range (50k..100M)")
    return value


def codec_mime(codec: str) -> str:
    return {"vp8": "video/VP8", "h264": "video/H264"}[codec]


def codec_preferences(codec: str) -> list:
    """aiortc codec capabilities that match the shared encoder's output (plus RTX), for ``setCodecPreferences``.

    H.264: constrained baseline (``42e01f``), ``packetization-mode=1`` — what libx264's Baseline profile makes and
    aiortc's packer (STAP-A / FU-A) needs.
    """
    from aiortc import RTCRtpSender

    caps = RTCRtpSender.getCapabilities("video").codecs
    mime = codec_mime(codec).lower()
    chosen = []
    for c in caps:
        m = c.mimeType.lower()
        if m == mime and (codec != "h264" or (c.parameters.get("packetization-mode") == "1"
                                                and c.parameters.get("profile-level-id", "").lower() == "42e01f")):
            chosen.append(c)
    chosen += [c for c in caps if c.mimeType.lower() == "video/rtx"]
    return chosen


@dataclass
class EncodedPacket:
    seq: int
    frame_id: int
    t_capture_ns: int
    t_encoded_ns: int
    packet: av.Packet
    keyframe: bool
    size: int
    record: dict | None = None
    """The frame's record in ``Pipeline.records`` (the fan-out adds its ``send_wait`` and ``send`` times to it)."""


class Subscription:
    """One consumer's bounded packet queue on its own event loop (a viewer track, a WHIP publisher)."""

    def __init__(self, encoder: "SharedEncoder", max_queue: int) -> None:
        self.encoder = encoder
        self.loop = asyncio.get_running_loop()
        self._queue: deque[EncodedPacket] = deque()
        self._event = asyncio.Event()
        self.max_queue = max_queue
        self.need_keyframe = True
        self.packets = 0
        self.resyncs = 0
        self.closed = False

    # called on the event loop (scheduled from the encoder thread)
    def _push(self, pkt: EncodedPacket) -> None:
        if self.closed:
            return
        if self.need_keyframe and not pkt.keyframe:
            return  # a decoder cannot start (or resume) on a P-frame
        if pkt.keyframe:
            self.need_keyframe = False
        if len(self._queue) >= self.max_queue:  # fell behind: cut back to the next keyframe
            self._queue.clear()
            self.need_keyframe = True
            self.resyncs += 1
            self.encoder.request_keyframe("subscriber behind")
            if not pkt.keyframe:
                return
            self.need_keyframe = False
        self._queue.append(pkt)
        self._event.set()

    async def next(self, timeout: float | None = None) -> EncodedPacket | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            if self.closed:
                return None
            self._event.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        self.packets += 1
        return self._queue.popleft()

    def close(self) -> None:
        self.closed = True
        self._event.set()
        self.encoder.unsubscribe(self)


def open_encoder(codec: str, width: int, height: int, bitrate: int, *, speed: int = DEFAULT_VP8_SPEED,
                 threads: int = 1) -> av.CodecContext:
    """The shared encoder's codec context (what :class:`SharedEncoder` encodes with; ``sonomaly bench encoder`` too):
    VP8 in libvpx's realtime mode at the fixed ``speed``, or H.264 constrained baseline (x264 zerolatency), constant
    bitrate, keyframes only when asked for (never by frame count)."""
    if codec == "vp8":
        ctx = av.CodecContext.create("libvpx", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.bit_rate = bitrate
        ctx.time_base = VIDEO_TIME_BASE
        ctx.gop_size = 100_000  # keyframes on request and every keyframe_interval_s, not by count
        ctx.qmin, ctx.qmax = 2, 56
        ctx.options = {
            "bufsize": str(bitrate), "cpu-used": str(-speed), "deadline": "realtime", "lag-in-frames": "0",
            "minrate": str(bitrate), "maxrate": str(bitrate), "noise-sensitivity": "0",
            "overshoot-pct": "15", "partitions": "0", "static-thresh": "1", "undershoot-pct": "100",
            "error-resilient": "1",
        }
    else:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.bit_rate = bitrate
        # x264's rate control budgets bits per frame from the frame rate (the 90 kHz time base alone reads as
        # 90 000 fps: a few bytes per frame); the pts still carry the real capture times
        ctx.framerate = fractions.Fraction(30, 1)
        ctx.time_base = VIDEO_TIME_BASE
        ctx.gop_size = 100_000
        ctx.profile = "Baseline"
        ctx.options = {"level": "31", "tune": "zerolatency", "preset": "veryfast", "forced-idr": "1",
                       "maxrate": str(bitrate), "bufsize": str(bitrate),
                       "x264-params": "repeat-headers=1:scenecut=0"}
    ctx.thread_count = threads
    ctx.open()
    return ctx


class SharedEncoder:
    """One encoder for all viewers of a stream (see the module docstring)."""

    def __init__(self, hub, t0_ns: int, *, codec: str = "vp8", bitrate: int = DEFAULT_BITRATE,
                 keyframe_interval_s: float = 10.0, min_keyframe_gap_s: float = 0.1, threads: int = 1,
                 on_encoded: Callable[[Any, int, int], None] | None = None, max_queue: int = 30,
                 speed: int = DEFAULT_VP8_SPEED) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, not {codec!r}")
        if not 0 <= int(speed) <= 16:
            raise ValueError(f"VP8 speed must be 0..16, not {speed!r}")
        self.speed = int(speed)
        self.hub = hub
        self.t0_ns = t0_ns
        self.codec_name = codec
        self.bitrate = int(bitrate)
        self.keyframe_interval_s = keyframe_interval_s
        self.min_keyframe_gap_s = min_keyframe_gap_s
        self.threads = threads
        self.on_encoded = on_encoded
        self.max_queue = max_queue
        self._ctx: av.CodecContext | None = None
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._keyframe_wanted = True
        self._last_keyframe = 0.0
        self._last_pts = -1
        self._seq = 0
        self._thread: threading.Thread | None = None
        # statistics (/metrics, benchmarks)
        self.frames_encoded = 0
        self.keyframes = 0
        self.keyframe_requests = 0
        self.bytes_out = 0
        self.encode_ms_last = 0.0
        self.encode_ms_total = 0.0
        self.errors = 0

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "SharedEncoder":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sonomaly-encoder", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------ subscribers
    def subscribe(self) -> Subscription:
        """A new consumer (call on its event loop): it gets a keyframe first, at once."""
        sub = Subscription(self, self.max_queue)
        with self._lock:
            self._subs.add(sub)
        self.request_keyframe("new subscriber", urgent=True)
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def request_keyframe(self, reason: str = "pli", urgent: bool = False) -> None:
        """Make the next encoded frame a keyframe (coalesced: at most one per ``min_keyframe_gap_s`` unless urgent)."""
        self.keyframe_requests += 1
        if urgent or time.monotonic() - self._last_keyframe >= self.min_keyframe_gap_s:
            self._keyframe_wanted = True
        log.debug("keyframe requested: %s", reason)

    # ------------------------------------------------------------------------------------------------ encoding
    def _open(self, width: int, height: int) -> av.CodecContext:
        return open_encoder(self.codec_name, width, height, self.bitrate, speed=self.speed, threads=self.threads)

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            if not self.subscribers:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            seq, out = self.hub.slot.get_newer(seq, timeout=0.2, take=False)
            if out is None or self._stop.is_set() or out.seq <= 0:
                continue
            try:
                self._encode(out)
            except Exception as exc:  # an encoder failure must not end the stream: start a fresh one
                self.errors += 1
                log.warning("encoder failed (%s: %s); reopening", type(exc).__name__, exc)
                self._ctx = None
                self._keyframe_wanted = True

    def _encode(self, out) -> None:
        t0 = now_ns()
        h3, w = out.yuv.shape[:2]
        h = h3 * 2 // 3
        if self._ctx is None or self._ctx.width != w or self._ctx.height != h:
            self._ctx = self._open(w, h)
            self._keyframe_wanted = True
        frame = av.VideoFrame.from_ndarray(out.yuv, format="yuv420p")
        pts = (out.t_capture_ns - self.t0_ns) * VIDEO_CLOCK_RATE // 1_000_000_000
        if pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        now = time.monotonic()
        key = self._keyframe_wanted or now - self._last_keyframe >= self.keyframe_interval_s
        if key:
            self._keyframe_wanted = False
            self._last_keyframe = now
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in self._ctx.encode(frame))
        t1 = now_ns()
        if not data:
            return
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = VIDEO_TIME_BASE
        is_key = key or self._is_keyframe(data)
        self._seq += 1
        pkt = EncodedPacket(self._seq, out.frame_id, out.t_capture_ns, t1, packet, is_key, len(data), out.record)
        self.frames_encoded += 1
        self.keyframes += int(is_key)
        self.bytes_out += len(data)
        self.encode_ms_last = (t1 - t0) / 1e6
        self.encode_ms_total += self.encode_ms_last
        if self.on_encoded is not None:
            try:
                self.on_encoded(out, t0, t1)
            except Exception:  # stamping a record is best effort
                log.debug("on_encoded failed", exc_info=True)
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._push, pkt)
            except RuntimeError:  # its loop is closed: the subscriber is gone
                self.unsubscribe(sub)

    def _is_keyframe(self, data: bytes) -> bool:
        if self.codec_name == "vp8":
            return len(data) > 0 and (data[0] & 0x01) == 0  # VP8 frame tag: bit 0 is 0 for a key frame
        # H.264 Annex B: an IDR slice (NAL type 5)
        i = data.find(b"\x00\x00\x01")
        while i >= 0 and i + 3 < len(data):
            if data[i + 3] & 0x1F == 5:
                return True
            i = data.find(b"\x00\x00\x01", i + 3)
        return False

    def stats(self) -> dict[str, Any]:
        n = self.frames_encoded
        return {"codec": self.codec_name, "bitrate": self.bitrate, "subscribers": self.subscribers,
                "frames_encoded": n, "keyframes": self.keyframes, "keyframe_requests": self.keyframe_requests,
                "bytes_out": self.bytes_out, "errors": self.errors,
                "encode_ms_mean": round(self.encode_ms_total / n, 3) if n else None}


def hook_keyframe_requests(sender, encoder: SharedEncoder) -> None:
    """Route an aiortc sender's keyframe requests (RTCP PLI / FIR) to the shared encoder.

    aiortc 1.16's ``RTCRtpSender._handle_rtcp_packet`` calls ``self._send_keyframe()``, which only sets a private flag
    read when *it* encodes a frame; for pre-encoded packets that flag is never read, so the request would be lost.
    """
    sender._send_keyframe = lambda: encoder.request_keyframe("rtcp pli/fir")


def set_aiortc_bitrate(bitrate: int) -> None:
    """Per-viewer mode: pin aiortc's own encoders (one per peer) to ``bitrate``.

    aiortc starts its VP8 encoder at 0.5 Mbit/s and its H.264 encoder at 1 Mbit/s and lets REMB move them only within
    0.25–1.5 / 0.5–3 Mbit/s. These are module constants, so this is process-wide; it makes the per-viewer comparison
    run at the same bitrate as the shared encoder.
    """
    from aiortc.codecs import h264, vpx

    for mod in (vpx, h264):
        mod.DEFAULT_BITRATE = mod.MIN_BITRATE = mod.MAX_BITRATE = int(bitrate)
