"""Send each encoded frame to every viewer in one pass (the shared encoder's fan-out).

aiortc gives every RTP sender its own task: it awaits its track's ``recv()``, packetises what it gets and writes the
packets. With the shared encoder (``stream.encoder``) that meant, per frame, one wake-up per viewer through a queue
each, and the N senders' turns were spread over the event loop between its other work (RTCP, the ``meta`` data
channels, HTTP): measured live, the last of 8 Chromium viewers got its last packet 5.6 ms (median, M9) to 9 ms (M10)
after the first viewer's first, of which each viewer's own writing took 0.4–0.6 ms (benchmarks/latency.md, "Where the
8-viewer path grows").

:class:`FanOut` takes the encoder's packets through **one** subscription and, for each frame, packetises it once
(aiortc's own packer: VP8 payload descriptors, H.264 FU-A / STAP-A) and writes it to every viewer in connection order
(the first viewer, normally the theatre display, first) in one go. Each viewer keeps its own RTP stream: its SSRC,
sequence numbers and timestamp origin, the header extensions it negotiated (``abs-send-time``, ``mid``), the packet
history that RTCP NACKs are answered from (RTX), and the packet and octet counts and timestamps that aiortc's RTCP
sender reports read, exactly as aiortc's own loop keeps them.

It does so by giving each sender a replacement for ``RTCRtpSender._run_rtp``, the task aiortc starts when the peer
connects; the replacement registers the sender here and waits until the sender stops. That reaches into aiortc's
private state (name-mangled attributes), so :func:`supported` checks for every attribute first; with an aiortc that
lacks one, the sender keeps aiortc's own loop over the track (``EncodedVideoTrack``), which works everywhere, and
``/health`` says which path runs (``fanout.mode``).

A new viewer starts at the next keyframe (and asks the encoder for one); a viewer whose transport closes is dropped
from the pass without touching the others. No queue is added: a frame is written as soon as it is encoded, and when
the event loop falls behind the encoder, the one subscription is cut back to the next keyframe as before.

Measured against aiortc's loop (M10, benchmarks/latency.md): with 8 viewers a little less server CPU and a lower
``send_network``, the same with one. The pass alone did not shorten the spread from the first viewer's first packet
to the last one's last (~9 ms median at 8 viewers there): it is each viewer's own writing, which every SRTP call and
``sendto`` slows by handing the GIL to the pipeline's other threads, not the gaps between the senders' turns. Less
Python per packet did (:meth:`_Output.send`: the header extensions once per viewer and frame): the pass 10.8–11.4 →
6.2–6.8 ms median at 8 viewers.
"""
from __future__ import annotations

import asyncio
import logging
from struct import pack
from typing import Any

from aiortc import RTCRtpSender, clock
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpsender import random_sequence_number
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket
from aiortc.utils import random32, uint16_add, uint32_add

from sonomaly.stream.encoder import EncodedPacket, SharedEncoder, Subscription, codec_mime
from sonomaly.stream.frame import now_ns
from sonomaly.stream.pipeline import stamp_stage

log = logging.getLogger("sonomaly.fanout")

#: the private attributes of aiortc's RTCRtpSender (as in aiortc 1.16) that the pass reads and keeps up to date; checked
#: on every sender by supported(), since another release may rename them
_SENDER_STATE = ("rtp_history", "rtp_header_extensions_map", "mid", "ntp_timestamp", "rtp_timestamp", "octet_count",
                 "packet_count", "rtp_started", "rtp_exited")
MODES = ("pass", "tasks")


def supported(sender) -> bool:
    """Whether this aiortc's sender has everything the one-pass fan-out keeps (else aiortc's own loop runs)."""
    return isinstance(sender, RTCRtpSender) and all(hasattr(sender, f"_RTCRtpSender__{n}") for n in _SENDER_STATE) \
        and hasattr(sender, "_run_rtp") and hasattr(sender.transport, "_send_rtp")


class _Output:
    """One viewer's RTP stream inside the pass."""

    def __init__(self, sender, codec, track) -> None:
        self.sender = sender
        self.track = track
        self.payload_type = codec.payloadType
        self.sequence_number = random_sequence_number()
        self.timestamp_origin = random32()
        self.need_keyframe = True
        self.closed = asyncio.Event()

    async def send(self, payloads: list[bytes], timestamp: int, keyframe: bool) -> bool:
        """Write one frame's payloads as this viewer's RTP packets; False when the viewer's transport is gone.

        What aiortc's loop does per packet, with the per-frame parts done once a frame: the header extensions
        (``abs-send-time`` read once as the frame starts, ``mid``, the playout-delay extension) are serialized once
        and every packet's 12-byte header is packed around them; the RTCP sender report's counters and timestamps are
        updated once, after the frame. Over host and server-reflexive candidates the writes never yield to the event
        loop, so no sender report can fall between them; through a TURN relay one may, and then reports the counts
        of the frame before, as it would between frames."""
        sender = self.sender
        if not getattr(sender, "_enabled", True):
            return True
        if self.need_keyframe:
            if not keyframe:
                return True  # a decoder cannot start on a P-frame
            self.need_keyframe = False
        p = "_RTCRtpSender__"  # aiortc's private state (checked by supported())
        history = getattr(sender, p + "rtp_history")
        ts = uint32_add(self.timestamp_origin, timestamp)
        pt, ssrc = self.payload_type, sender._ssrc
        frame = RtpPacket(payload_type=pt, timestamp=ts)  # the frame's header extensions, shared by its packets
        frame.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
        frame.extensions.mid = getattr(sender, p + "mid")
        profile, ext = getattr(sender, p + "rtp_header_extensions_map").set(frame.extensions)
        ext_block = pack("!HH", profile, len(ext) >> 2) + ext if ext else b""
        first_byte = 0x80 | (0x10 if ext else 0)  # RTP version 2, the extension bit
        transport = sender.transport
        last = len(payloads) - 1
        sent = octets = 0
        try:
            for i, payload in enumerate(payloads):
                seq = self.sequence_number
                packet = RtpPacket(payload_type=pt, marker=int(i == last), sequence_number=seq, timestamp=ts,
                                   ssrc=ssrc, payload=payload)
                packet.extensions = frame.extensions
                history[seq % RTP_HISTORY_SIZE] = packet  # what a NACK is answered from (RTX)
                await transport._send_rtp(pack("!BBHLL", first_byte, (packet.marker << 7) | pt, seq, ts, ssrc)
                                          + ext_block + payload)
                sent += 1
                octets += len(payload)
                self.sequence_number = uint16_add(seq, 1)
        except ConnectionError:
            return False
        finally:
            if sent:  # what aiortc's loop keeps for its RTCP sender reports and getStats()
                setattr(sender, p + "ntp_timestamp", clock.current_ntp_time())
                setattr(sender, p + "rtp_timestamp", ts)
                setattr(sender, p + "octet_count", getattr(sender, p + "octet_count") + octets)
                setattr(sender, p + "packet_count", getattr(sender, p + "packet_count") + sent)
        note = getattr(self.track, "note_sent", None)
        if note is not None:
            note(keyframe)
        return True


class FanOut:
    """The one-pass fan-out of one :class:`SharedEncoder` (see the module docstring). Lives on the event loop."""

    def __init__(self, encoder: SharedEncoder) -> None:
        self.encoder = encoder
        self._outputs: list[_Output] = []
        self._task: asyncio.Task | None = None
        self._sub: Subscription | None = None
        # aiortc's packetiser, once per frame for every viewer (its VP8 picture id then counts this stream's frames)
        self._packer = get_encoder(RTCRtpCodecParameters(mimeType=codec_mime(encoder.codec_name), clockRate=90_000,
                                                         payloadType=96))
        # statistics (/health)
        self.passes = 0
        self.pass_ms_max = 0.0
        self._pass_ms_total = 0.0
        self.viewers_total = 0
        self.viewers_lost = 0

    def attach(self, sender, track) -> bool:
        """Make ``sender`` (not yet started) part of the pass; False (nothing changed) when this aiortc lacks what the
        pass needs, and the sender then runs aiortc's own loop over ``track``."""
        if not supported(sender):
            log.warning("this aiortc's RTCRtpSender lacks what the one-pass fan-out keeps: each viewer's sender "
                        "runs its own loop instead")
            return False
        fanout = self

        async def _run_rtp(codec) -> None:  # replaces RTCRtpSender._run_rtp (started by RTCRtpSender.send)
            getattr(sender, "_RTCRtpSender__rtp_started").set()
            out = _Output(sender, codec, track)
            fanout._add(out)
            try:
                await out.closed.wait()
            except asyncio.CancelledError:
                pass
            finally:
                fanout._remove(out)
                if sender.track is not None:
                    sender.track.stop()
                getattr(sender, "_RTCRtpSender__rtp_exited").set()

        sender._run_rtp = _run_rtp
        return True

    def _add(self, out: _Output) -> None:
        self._outputs.append(out)
        self.viewers_total += 1
        if hasattr(out.track, "note_subscribed"):
            out.track.note_subscribed()
        self.encoder.request_keyframe("new viewer", urgent=True)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def _remove(self, out: _Output) -> None:
        if out in self._outputs:
            self._outputs.remove(out)

    async def _run(self) -> None:
        sub = self._sub = self.encoder.subscribe()
        try:
            while self._outputs:
                pkt = await sub.next(timeout=1.0)
                if pkt is None:
                    if sub.closed:
                        break
                    continue
                await self.send(pkt)
        except asyncio.CancelledError:
            pass
        finally:
            sub.close()
            self._sub = None

    async def send(self, pkt: EncodedPacket) -> None:
        """One pass: ``pkt`` to every viewer, in connection order."""
        if not self._outputs:
            return
        t0 = now_ns()
        payloads, timestamp = self._packer.pack(pkt.packet)
        for out in list(self._outputs):
            if not await out.send(payloads, timestamp, pkt.keyframe):
                self.viewers_lost += 1
                self._remove(out)
                out.closed.set()
        t1 = now_ns()
        ms = (t1 - t0) / 1e6
        self.passes += 1
        self.pass_ms_max = max(self.pass_ms_max, ms)
        self._pass_ms_total += ms
        # the frame's record: how long the encoded frame waited for the event loop, and the pass itself
        stamp_stage(pkt.record, "send_wait", pkt.t_encoded_ns, t0)
        stamp_stage(pkt.record, "send", t0, t1)

    async def close(self) -> None:
        for out in list(self._outputs):
            out.closed.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def stats(self) -> dict[str, Any]:
        n = self.passes
        return {"mode": "pass", "viewers": len(self._outputs), "viewers_total": self.viewers_total,
                "viewers_lost": self.viewers_lost, "passes": n,
                "pass_ms_mean": round(self._pass_ms_total / n, 3) if n else None,
                "pass_ms_max": round(self.pass_ms_max, 3) if n else None,
                "resyncs": self._sub.resyncs if self._sub is not None else None}
