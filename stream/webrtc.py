"""WebRTC output (aiortc): one video track per viewer fed by the pipeline's :class:`OutputHub`, plus a data channel
carrying per-frame metadata.

* Each viewer's track returns the *newest* composed frame; a viewer that cannot keep up skips frames instead of
  queueing them (latest frame wins), and never slows the others.
* Presentation timestamps come from the frame's capture time on the 90 kHz RTP clock (RFC 3551 §5, video), not from
  aiortc's fixed 30 fps pacer, so the receiver's playout follows the source's real timing.
* The offer/answer exchange is the aiortc example convention: ``POST /offer`` with JSON ``{"sdp", "type"}``.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
from dataclasses import dataclass, field

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sonomaly.stream.pipeline import OutputHub

log = logging.getLogger("sonomaly.webrtc")

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class OfferError(ValueError):
    """A malformed offer: the HTTP layer answers 400 with this message."""


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


@dataclass(eq=False)
class Viewer:
    pc: RTCPeerConnection
    track: PipelineVideoTrack
    remote: str
    tasks: set[asyncio.Task] = field(default_factory=set)


def parse_offer(body: bytes, max_bytes: int = 64 * 1024) -> RTCSessionDescription:
    """Validate a ``POST /offer`` body (JSON ``{"sdp": str, "type": "offer"}``) or raise :class:`OfferError`."""
    if len(body) > max_bytes:
        raise OfferError(f"offer too large ({len(body)} bytes > {max_bytes})")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfferError(f"body is not valid JSON: {exc}") from None
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
                 metadata=None) -> None:
        self.hub = hub
        self.t0_ns = t0_ns
        self.ice_servers = [RTCIceServer(urls=u) for u in (ice_servers or [])]
        self.viewers: set[Viewer] = set()
        self.metadata = metadata
        self.total_viewers = 0

    def _config(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=list(self.ice_servers))

    async def answer(self, offer: RTCSessionDescription, remote: str = "?") -> RTCSessionDescription:
        pc = RTCPeerConnection(configuration=self._config())
        track = PipelineVideoTrack(self.hub, self.t0_ns)
        viewer = Viewer(pc, track, remote)
        self.viewers.add(viewer)
        self.total_viewers += 1

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            log.info("viewer %s: %s", remote, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._drop(viewer)

        @pc.on("datachannel")
        def _on_channel(channel) -> None:
            task = asyncio.ensure_future(self._send_metadata(channel))
            viewer.tasks.add(task)
            task.add_done_callback(viewer.tasks.discard)

        try:
            await pc.setRemoteDescription(offer)
            transceivers = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not transceivers:
                raise OfferError("the offer has no video transceiver")
            pc.addTrack(track)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except OfferError:
            await self._drop(viewer)
            raise
        except Exception as exc:  # aiortc rejects bad SDP with assorted exceptions
            await self._drop(viewer)
            raise OfferError(f"cannot use this offer: {type(exc).__name__}: {exc}") from None
        return pc.localDescription

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

    async def _drop(self, viewer: Viewer) -> None:
        if viewer not in self.viewers:
            return
        self.viewers.discard(viewer)
        viewer.track.stop()
        for task in list(viewer.tasks):
            task.cancel()
        await viewer.pc.close()

    async def close(self) -> None:
        await asyncio.gather(*(self._drop(v) for v in list(self.viewers)), return_exceptions=True)

    def stats(self) -> dict:
        return {"viewers": len(self.viewers), "viewers_total": self.total_viewers,
                "states": sorted(v.pc.connectionState for v in self.viewers)}
