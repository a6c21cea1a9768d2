"""WebRTC output (aiortc): one video track per viewer fed by the pipeline's :class:`OutputHub`, plus a data channel
carrying per-frame metadata.

* Each viewer's track returns the *newest* composed frame; a viewer that cannot keep up skips frames instead of
  queueing them (latest frame wins), and never slows the others.
* Presentation timestamps come from the frame's capture time on the 90 kHz RTP clock (RFC 3551 §5, video), not from
  aiortc's fixed 30 fps pacer, so the receiver's playout follows the source's real timing.
* The offer/answer exchange is the aiortc example convention: ``POST /offer`` with JSON ``{"sdp", "type"}``; WHEP
  (``POST /whep`` with ``application/sdp``) uses the same :meth:`WebRTCServer.answer`.
* Two encode modes. ``shared`` (default): one :class:`~sonomaly.stream.encoder.SharedEncoder` per stream; the
  answer is forced to the shared codec and the viewers' keyframe requests reach the shared encoder. Its packets reach
  the viewers through the one-pass :class:`~sonomaly.stream.fanout.FanOut` (every viewer written in one pass per
  frame, ``fanout="pass"``, the default) or, with ``fanout="tasks"`` or an aiortc the pass cannot drive, through each
  viewer's :class:`EncodedVideoTrack`, whose packets aiortc's own sender loop packetises. ``per-viewer``: aiortc's
  default, one encoder per peer (:class:`PipelineVideoTrack` returns raw frames), kept for comparison.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sonomaly.stream.encoder import SharedEncoder, codec_mime, hook_keyframe_requests
from sonomaly.stream.fanout import MODES as FANOUT_MODES
from sonomaly.stream.fanout import FanOut
from sonomaly.stream.pipeline import OutputHub

log = logging.getLogger("sonomaly.webrtc")

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


def restrict_codecs(codecs: list, codec: str) -> list:
    """The negotiated codecs that carry ``codec`` (H.264: packetization-mode 1 only), each with its RTX."""
    mime = codec_mime(codec).lower()
    base = [c for c in codecs if c.mimeType.lower() == mime
            and (codec != "h264" or str(c.parameters.get("packetization-mode")) == "1")]
    if codec == "h264":  # prefer constrained baseline, what libx264's Baseline profile makes
        base.sort(key=lambda c: str(c.parameters.get("profile-level-id", "")).lower()[:4] != "42e0")
    pts = {c.payloadType for c in base}
    rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx" and c.parameters.get("apt") in pts]
    return base + rtx


def _playout_status() -> dict:
    from sonomaly.stream import playout

    return playout.status()


def on_rtcp(sender, note: Callable[[], None]) -> bool:
    """Call ``note()`` for every RTCP packet the far end sends about ``sender``'s stream (receiver reports, REMB, NACK,
    PLI/FIR): aiortc routes each to the sender's ``_handle_rtcp_packet`` (aiortc >= 1.0). How the server tells a live
    peer from one that vanished without a goodbye, long before ICE consent expires (24-36 s). False where this aiortc
    has no such method (then only ICE consent watches)."""
    handle = getattr(sender, "_handle_rtcp_packet", None)
    if handle is None:
        log.warning("this aiortc has no RTCRtpSender._handle_rtcp_packet: a peer that vanishes is noticed only when "
                     "ICE consent expires (about 30 s)")
        return False

    async def _noting(packet) -> None:
        note()
        await handle(packet)

    sender._handle_rtcp_packet = _noting
    return True


class OfferError(ValueError):
    """A malformed offer: the HTTP layer answers 400 with this message."""


class TooManyViewers(RuntimeError):
    """The server is at ``max_viewers``: the HTTP layer answers 503."""


class PipelineVideoTrack(MediaStreamTrack):
    """A video track that hands aiortc the newest composed frame, stamped with its capture time."""

    kind = "video"

    def __init__(self, hub: OutputHub, t0_ns: int, *, idle_timeout_s: float = 5.0) -> None:
        super().__init__()
        self._hub = hub
        self._t0_ns = t0_ns
        self._token = None
        self._last_seq = 0
        self._last_pts = -1
        self._idle_timeout_s = idle_timeout_s
        self.frames_sent = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._token is None:
            self._token = self._hub.subscribe_async()
        out = await self._hub.next_async(self._token, self._last_seq, timeout=self._idle_timeout_s)
        if out is None:  # the pipeline has stopped: end the track rather than hang the sender
            self.stop()
            raise MediaStreamError
        self._last_seq = out.seq
        frame = av.VideoFrame.from_ndarray(out.yuv, format="yuv420p")
        pts = (out.t_capture_ns - self._t0_ns) * VIDEO_CLOCK_RATE // 1_000_000_000
        if pts <= self._last_pts:  # pts must grow strictly (e.g. two NO SIGNAL frames in one tick)
            pts = self._last_pts + 1
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        return frame

    def stop(self) -> None:
        if self._token is not None:
            self._hub.unsubscribe_async(self._token)
            self._token = None
        super().stop()


class EncodedVideoTrack(MediaStreamTrack):
    """A video track that returns the shared encoder's packets (aiortc packs an ``av.Packet`` without encoding).

    With the one-pass fan-out (``stream.fanout``) aiortc never calls :meth:`recv`: the track stands in the session
    description, and the fan-out counts what it sends to this viewer through :meth:`note_sent`."""

    kind = "video"

    def __init__(self, encoder: SharedEncoder, *, idle_timeout_s: float = 5.0) -> None:
        super().__init__()
        self._encoder = encoder
        self._sub = None
        self._idle_timeout_s = idle_timeout_s
        self.frames_sent = 0
        self.keyframes_sent = 0
        self.first_keyframe_s: float | None = None
        self._t_subscribed: float | None = None

    def note_subscribed(self) -> None:
        self._t_subscribed = asyncio.get_running_loop().time()

    def note_sent(self, keyframe: bool) -> None:
        """Count a frame sent to this viewer (by :meth:`recv`, or by the one-pass fan-out, which bypasses it)."""
        self.frames_sent += 1
        if keyframe:
            self.keyframes_sent += 1
            if self.first_keyframe_s is None and self._t_subscribed is not None:
                self.first_keyframe_s = asyncio.get_running_loop().time() - self._t_subscribed

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._sub is None:
            self._sub = self._encoder.subscribe()
            self.note_subscribed()
        pkt = await self._sub.next(timeout=self._idle_timeout_s)
        if pkt is None:
            self.stop()
            raise MediaStreamError
        self.note_sent(pkt.keyframe)
        return pkt.packet

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        super().stop()


@dataclass(eq=False)
class Viewer:
    pc: RTCPeerConnection
    track: MediaStreamTrack
    remote: str
    kind: str = "offer"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tasks: set[asyncio.Task] = field(default_factory=set)
    t_created: float = field(default_factory=time.monotonic)
    last_rtcp: float | None = None
    """When the viewer last sent RTCP (receiver reports, PLI, REMB): a live peer does so every second or two."""
    stalls: int = 0
    """Times the viewer page reported its picture NOT LIVE (``report`` data channel)."""
    stalled_ms: float = 0.0
    """Their total length, as the page measured it (reported when each ends)."""
    stalled_since: float | None = None
    """Server time of the last NOT LIVE report not yet followed by a "live" one."""
    report_budget: float = 10.0
    """Reports this viewer may still send now (refills 1 per second up to 10): a page sends two per stall."""
    last_report: float | None = None


REPORT_LABEL = "report"
"""The data channel on which the viewer page reports to the server: ``{"type": "stale", "age_ms", "limit_ms"}`` when
its picture turns NOT LIVE, ``{"type": "live", "stalled_ms"}`` when frames come again (ordered and reliable, unlike
``meta``, so a report sent as the network recovers still arrives)."""


def parse_report(msg) -> dict:
    """Validate one viewer report or raise :class:`ValueError` with the reason (the page is not trusted: any text may
    come). Returns ``{"type", ...}`` with finite, non-negative numbers."""
    if not isinstance(msg, str):
        raise ValueError("a report is a JSON text message")
    if len(msg) > 1024:
        raise ValueError(f"report too long ({len(msg)} characters)")
    try:
        data = json.loads(msg)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"report is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") not in ("stale", "live"):
        raise ValueError("a report is an object with type 'stale' or 'live'")
    keys = ("age_ms", "limit_ms") if data["type"] == "stale" else ("stalled_ms",)
    out = {"type": data["type"]}
    for k in keys:
        v = data.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 1e9:
            raise ValueError(f"'{k}' must be a number of milliseconds, not {v!r}")
        out[k] = float(v)
    return out


def parse_offer(body: bytes, max_bytes: int = 64 * 1024) -> RTCSessionDescription:
    """Validate a ``POST /offer`` body (JSON ``{"sdp": str, "type": "offer"}``) or raise :class:`OfferError`."""
    if len(body) > max_bytes:
        raise OfferError(f"offer too large ({len(body)} bytes > {max_bytes})")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfferError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OfferError("body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise OfferError("body must be a JSON object with 'sdp' and 'type'")
    sdp, kind = data.get("sdp"), data.get("type")
    if kind != "offer":
        raise OfferError("'type' must be \"offer\"")
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferError("'sdp' must be a non-empty string")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("'sdp' is not an SDP session description (must start with v=0)")
    if "m=video" not in sdp:
        raise OfferError("the offer has no video media section (m=video)")
    return RTCSessionDescription(sdp=sdp, type="offer")


class WebRTCServer:
    """Answers offers and keeps track of the viewers of one pipeline."""

    def __init__(self, hub: OutputHub, t0_ns: int, *, ice_servers: list[str] | None = None,
                 metadata=None, encoder: SharedEncoder | None = None, max_viewers: int = 64,
                 connect_timeout_s: float = 20.0, rtcp_timeout_s: float = 8.0, fanout: str = "pass") -> None:
        if fanout not in FANOUT_MODES:
            raise ValueError(f"fanout must be one of {FANOUT_MODES}, not {fanout!r}")
        self.hub = hub
        self.t0_ns = t0_ns
        self.ice_servers = [RTCIceServer(urls=u) for u in (ice_servers or [])]
        self.viewers: set[Viewer] = set()
        self.metadata = metadata
        self.total_viewers = 0
        self.encoder = encoder
        """The shared encoder (encode once, fan out), or ``None``: one aiortc encoder per viewer."""
        self.fanout = FanOut(encoder) if encoder is not None and fanout == "pass" else None
        """With the shared encoder: the one-pass fan-out (``stream.fanout``), or ``None``: aiortc's loop per viewer."""
        self.fanout_fallbacks = 0
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self.rtcp_timeout_s = rtcp_timeout_s
        self.viewer_stalls = 0
        self.viewer_stalled_ms = 0.0
        self.viewer_reports_bad = 0
        self.dropped_by_watchdog = 0
        self._watchdog: asyncio.Task | None = None

    async def _watch(self) -> None:
        """Drop peers that never connect (half-open offers) and peers that vanished without a goodbye (no RTCP)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for v in list(self.viewers):
                state = v.pc.connectionState
                never = state in ("new", "connecting") and now - v.t_created > self.connect_timeout_s
                silent = (state == "connected" and now - (v.last_rtcp or v.t_created) > self.rtcp_timeout_s
                          and now - v.t_created > self.rtcp_timeout_s)
                if never or silent:
                    log.info("dropping viewer %s: %s", v.remote, "never connected" if never else "no RTCP")
                    self.dropped_by_watchdog += 1
                    await self._drop(v)

    @property
    def encode_mode(self) -> str:
        return "shared" if self.encoder is not None else "per-viewer"

    def by_id(self, viewer_id: str) -> Viewer | None:
        return next((v for v in self.viewers if v.id == viewer_id), None)

    def make_track(self) -> MediaStreamTrack:
        return EncodedVideoTrack(self.encoder) if self.encoder is not None else PipelineVideoTrack(self.hub, self.t0_ns)

    def prepare_sender(self, pc: RTCPeerConnection, transceiver, track: MediaStreamTrack) -> None:
        """With the shared encoder: answer with its codec only, and route the viewer's PLI/FIR to it."""
        if self.encoder is None:
            return
        # The codecs were negotiated in setRemoteDescription: keep only the shared encoder's (and its RTX), so the
        # answer carries exactly the payload type whose packets the encoder makes.
        common = restrict_codecs(transceiver._codecs, self.encoder.codec_name)
        if not common:
            raise OfferError(f"the offer does not support {codec_mime(self.encoder.codec_name)}, which this server "
                             f"sends to every viewer (encode once); start the server with another --codec")
        transceiver._codecs = common
        self.attach_sender(transceiver.sender, track)

    def attach_sender(self, sender, track: MediaStreamTrack) -> None:
        """A shared-encoder sender (a viewer's, the WHIP publisher's): its keyframe requests go to the encoder, and it
        joins the one-pass fan-out where this aiortc allows it (else aiortc's own loop reads ``track``)."""
        hook_keyframe_requests(sender, self.encoder)
        if self.fanout is not None and not self.fanout.attach(sender, track):
            self.fanout_fallbacks += 1

    def _config(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=list(self.ice_servers))

    async def answer(self, offer: RTCSessionDescription, remote: str = "?", kind: str = "offer") -> RTCSessionDescription:
        return (await self.answer_viewer(offer, remote, kind)).pc.localDescription

    async def answer_viewer(self, offer: RTCSessionDescription, remote: str = "?", kind: str = "offer") -> Viewer:
        if len(self.viewers) >= self.max_viewers:
            raise TooManyViewers(f"this server already has {len(self.viewers)} viewers (--max-viewers); "
                                 f"use an SFU (--whip) for more")
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())
        pc = RTCPeerConnection(configuration=self._config())
        track = self.make_track()
        viewer = Viewer(pc, track, remote, kind)
        self.viewers.add(viewer)
        self.total_viewers += 1

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            log.info("viewer %s: %s", remote, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._drop(viewer)

        @pc.on("datachannel")
        def _on_channel(channel) -> None:
            if channel.label == REPORT_LABEL:
                channel.on("message", lambda msg: self.viewer_report(viewer, msg))
                return
            task = asyncio.ensure_future(self._send_metadata(channel))
            viewer.tasks.add(task)
            task.add_done_callback(viewer.tasks.discard)

        try:
            await pc.setRemoteDescription(offer)
            transceivers = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not transceivers:
                raise OfferError("the offer has no video transceiver")
            sender = pc.addTrack(track)
            transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
            self.prepare_sender(pc, transceiver, track)
            on_rtcp(transceiver.sender, lambda: setattr(viewer, "last_rtcp", time.monotonic()))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except OfferError:
            await self._drop(viewer)
            raise
        except Exception as exc:  # aiortc rejects bad SDP with assorted exceptions
            await self._drop(viewer)
            raise OfferError(f"cannot use this offer: {type(exc).__name__}: {exc}") from None
        return viewer

    async def _send_metadata(self, channel) -> None:
        token = self.hub.subscribe_async()
        last = 0
        try:
            while channel.readyState in ("connecting", "open"):
                out = await self.hub.next_async(token, last, timeout=1.0)
                if out is None:
                    continue
                last = out.seq
                if channel.readyState == "open" and channel.bufferedAmount < 256 * 1024:
                    channel.send(json.dumps(out.meta, separators=(",", ":")))
        except Exception as exc:  # a vanished viewer must not take anything else down
            log.debug("metadata channel closed: %s", exc)
        finally:
            self.hub.unsubscribe_async(token)

    def viewer_report(self, viewer: Viewer, msg) -> None:
        """A report from the viewer page (see :data:`REPORT_LABEL`): counted, logged; a malformed one, or one beyond
        the viewer's budget (10 at once, 1 more per second: a page sends two per stall of at least 0.5 s, so more is a
        flood), is only counted as bad."""
        now = time.monotonic()
        if viewer.last_report is not None:
            viewer.report_budget = min(10.0, viewer.report_budget + (now - viewer.last_report))
        viewer.last_report = now
        try:
            if viewer.report_budget < 1.0:
                raise ValueError("reports too frequent")
            viewer.report_budget -= 1.0
            r = parse_report(msg)
        except ValueError as exc:
            self.viewer_reports_bad += 1
            log.debug("viewer %s: bad report: %s", viewer.remote, exc)
            return
        if r["type"] == "stale":
            viewer.stalls += 1
            self.viewer_stalls += 1
            viewer.stalled_since = now
            log.warning("viewer %s: NOT LIVE (no new picture for %.0f ms; its limit %.0f ms)", viewer.remote,
                        r["age_ms"], r["limit_ms"])
        else:
            viewer.stalled_ms += r["stalled_ms"]
            self.viewer_stalled_ms += r["stalled_ms"]
            viewer.stalled_since = None
            log.warning("viewer %s: live again after %.1f s NOT LIVE", viewer.remote, r["stalled_ms"] / 1000)

    async def _drop(self, viewer: Viewer) -> None:
        if viewer not in self.viewers:
            return
        self.viewers.discard(viewer)
        viewer.track.stop()
        for task in list(viewer.tasks):
            task.cancel()
        try:
            await viewer.pc.close()
        except Exception as exc:  # aiortc can fail to close a half-built peer (e.g. SCTP never started)
            log.debug("closing viewer %s: %s: %s", viewer.remote, type(exc).__name__, exc)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self._drop(v) for v in list(self.viewers)), return_exceptions=True)
        if self.fanout is not None:
            await self.fanout.close()

    async def drop_id(self, viewer_id: str) -> bool:
        viewer = self.by_id(viewer_id)
        if viewer is None:
            return False
        await self._drop(viewer)
        return True

    def stats(self) -> dict:
        return {"viewers": len(self.viewers), "viewers_total": self.total_viewers,
                "viewers_dropped_by_watchdog": self.dropped_by_watchdog, "max_viewers": self.max_viewers,
                # what the viewer pages saw: NOT LIVE reports (since start), their length, who is NOT LIVE now
                "viewer_stalls": self.viewer_stalls, "viewer_stalled_s": round(self.viewer_stalled_ms / 1000, 2),
                "viewers_not_live": sum(v.stalled_since is not None for v in self.viewers),
                "viewer_reports_bad": self.viewer_reports_bad,
                # each viewer, the first-connected (the theatre display) first: which screen saw what (no address:
                # /health is open; the log names it)
                "viewer_list": [{"id": v.id[:8], "kind": v.kind, "state": v.pc.connectionState,
                                 "age_s": round(time.monotonic() - v.t_created, 1), "stalls": v.stalls,
                                 "stalled_s": round(v.stalled_ms / 1000, 2), "not_live": v.stalled_since is not None}
                                for v in sorted(self.viewers, key=lambda v: v.t_created)],
                "states": sorted(v.pc.connectionState for v in self.viewers), "encode": self.encode_mode,
                **_playout_status(),
                # per viewer: how long after it subscribed its first keyframe went out (shared encoder)
                "first_keyframe_ms": sorted(round(v.track.first_keyframe_s * 1000, 1) for v in self.viewers
                                            if getattr(v.track, "first_keyframe_s", None) is not None),
                **({"encoder": self.encoder.stats(), "fanout": self.fanout_stats()}
                   if self.encoder is not None else {})}

    def fanout_stats(self) -> dict:
        """How the shared encoder's packets reach the viewers: ``pass`` (one pass per frame, ``stream.fanout``) or
        ``tasks`` (aiortc's loop per viewer: chosen, or the fallback on an aiortc without what the pass needs)."""
        if self.fanout is None:
            return {"mode": "tasks"}
        return {**self.fanout.stats(), "fallbacks": self.fanout_fallbacks}
