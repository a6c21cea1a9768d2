"""The one-pass fan-out (stream/fanout.py) with real aiortc peers in one process: a shared encoder fed at 30 fps, a
WebRTCServer, three aiortc viewers over the host's own address.

* every viewer decodes the stream, its frames in one pass per frame, in the order the viewers connected;
* the senders' counters (RTCP sender reports, getStats) match the packets actually written;
* a packet dropped on its way to one viewer (fault injection) is NACKed and resent from the pass's history as RTX,
  and that viewer keeps decoding;
* where this aiortc lacks what the pass needs, the senders fall back to aiortc's own loop and still stream;
* the frame's record gets a ``send`` stage.
"""
from __future__ import annotations

import asyncio
import threading
import time

import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from sonomaly.stream import fanout as fanout_mod
from sonomaly.stream.encoder import SharedEncoder
from sonomaly.stream.frame import now_ns
from sonomaly.stream.pipeline import OutputFrame, OutputHub
from sonomaly.stream.webrtc import WebRTCServer

from conftest import arun


class Feeder(threading.Thread):
    """Publishes a moving synthetic picture into the hub at 30 fps (what the composer does), each with a record."""

    def __init__(self, hub: OutputHub, w: int = 320, h: int = 240) -> None:
        super().__init__(daemon=True)
        self.hub, self.w, self.h = hub, w, h
        self.stop_event = threading.Event()
        self.records: dict[int, dict] = {}

    def run(self) -> None:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (self.h, self.w, 3), dtype=np.uint8)
        i = 0
        while not self.stop_event.is_set():
            i += 1
            img = np.roll(base, i * 3, axis=1)
            cv2.putText(img, str(i), (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
            t = now_ns()
            rec = {"frame_id": i, "stages_ms": {}}
            self.records[i] = rec
            yuv = cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420)
            self.hub.publish(OutputFrame(i, i, t, t, img, yuv, {}, record=rec))
            time.sleep(1 / 30)


class SendLog:
    """Wraps a viewer's DTLS transport ``_send_rtp``: logs (viewer, t, payload type, seq, marker) of each RTP packet
    and can drop chosen packets (fault injection)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, int]] = []
        self.drop: set[tuple[int, int]] = set()  # (viewer, nth RTP packet of that viewer)
        self.dropped: list[tuple[int, int]] = []  # (viewer, seq)
        self.raw: dict[int, list[bytes]] = {}  # the first plain (not yet SRTP-protected) RTP packets of each viewer
        self._count: dict[int, int] = {}

    def wrap(self, k: int, transport) -> None:
        orig = transport._send_rtp

        async def _send_rtp(data: bytes) -> None:
            if len(data) > 12 and not 192 <= data[1] <= 223:  # RTP, not RTCP
                n = self._count[k] = self._count.get(k, 0) + 1
                seq = int.from_bytes(data[2:4], "big")
                if (k, n) in self.drop:
                    self.dropped.append((k, seq))
                    return  # lost on the way
                self.rows.append((k, time.perf_counter_ns(), data[1] & 0x7F, seq, data[1] >> 7))
                if len(self.raw.setdefault(k, [])) < 60:
                    self.raw[k].append(bytes(data))
            await orig(data)

        transport._send_rtp = _send_rtp


async def _viewer(server: WebRTCServer, log: SendLog, k: int, frames: list[int], stop: asyncio.Event):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def consume(track) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(track.recv(), 2.0)
            except (MediaStreamError, asyncio.TimeoutError):
                break
            frames[k] += 1

    pc.on("track", lambda t: asyncio.ensure_future(consume(t)))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    viewer = await server.answer_viewer(pc.localDescription, remote=f"v{k}")
    log.wrap(k, viewer.pc.getSenders()[0].transport)
    await pc.setRemoteDescription(viewer.pc.localDescription)
    return pc, viewer


async def _session(mode: str, seconds: float = 4.0, drop: set | None = None, stagger_s: float = 0.6):
    hub = OutputHub()
    t0 = now_ns()
    enc = SharedEncoder(hub, t0, codec="vp8", bitrate=1_000_000)
    server = WebRTCServer(hub, t0, encoder=enc, fanout="tasks" if mode == "tasks" else "pass")
    feeder = Feeder(hub)
    log = SendLog()
    log.drop = set(drop or ())
    frames = [0, 0, 0]
    stop = asyncio.Event()
    feeder.start()
    enc.start()
    pcs = []
    try:
        for k in range(3):  # one after another, so the connection order is known
            pcs.append(await _viewer(server, log, k, frames, stop))
            await asyncio.sleep(stagger_s)
        await asyncio.sleep(seconds)
        health = server.stats()
        sent = [await v.pc.getSenders()[0].getStats() for _, v in pcs]
        senders = [v.pc.getSenders()[0] for _, v in pcs]
        ext_maps = [getattr(x, "_RTCRtpSender__rtp_header_extensions_map") for x in senders]
        ids = [(x._ssrc, getattr(x, "_RTCRtpSender__mid")) for x in senders]
    finally:
        stop.set()
        for pc, _ in pcs:
            await pc.close()
        await server.close()
        enc.stop()
        feeder.stop_event.set()
    packets_sent = [next(s.packetsSent for s in rep.values() if s.type == "outbound-rtp") for rep in sent]
    return {"frames": frames, "log": log, "health": health, "packets_sent": packets_sent, "records": feeder.records,
            "ext_maps": ext_maps, "ids": ids,
            "vp8_pt": {pt for _, _, pt, _, _ in log.rows}}


def _passes(rows):
    """The media packets cut into frames at each viewer's marker bit: per frame, the viewers in the order their last
    packet went out, and whether each viewer's packets came as one unbroken run."""
    media_pt = min(pt for _, _, pt, _, _ in rows)  # VP8's payload type is below its RTX's in aiortc's offer
    order = []
    current: list[int] = []
    for k, _, pt, _, marker in rows:
        if pt != media_pt:
            continue
        if not current or current[-1] != k:
            current.append(k)
        if marker and k == max(r[0] for r in rows):  # the last viewer's marker closes a pass
            order.append(current)
            current = []
    return order


def test_one_pass_reaches_every_viewer_in_connection_order_with_matching_counters():
    r = arun(_session("pass"))
    assert r["health"]["fanout"]["mode"] == "pass" and r["health"]["fanout"]["fallbacks"] == 0
    assert min(r["frames"]) >= 0.8 * 30 * 4.0, r["frames"]  # every viewer decodes at the full rate
    passes = _passes(r["log"].rows)
    full = [p for p in passes if sorted(set(p)) == [0, 1, 2]]
    assert len(full) >= 100
    # one unbroken run per viewer per frame, the first-connected viewer (the theatre display) first
    assert sum(p == [0, 1, 2] for p in full) >= 0.98 * len(full), passes[:10]
    # aiortc's RTCP sender reports and getStats read the counters the pass keeps
    rows = r["log"].rows
    media_pt = min(pt for _, _, pt, _, _ in rows)
    for k in range(3):
        assert r["packets_sent"][k] == sum(1 for row in rows if row[0] == k and row[2] == media_pt)
    # the headers the pass packs itself read back as aiortc writes them: version, marker, sequence, SSRC, the
    # negotiated extensions (mid, abs-send-time); parsed and serialized again by aiortc, byte for byte the same
    from aiortc.rtp import RtpPacket

    for k in range(3):
        ssrc, mid = r["ids"][k]
        raw = [d for d in r["log"].raw[k] if d[1] & 0x7F == media_pt]
        assert len(raw) >= 20
        for data in raw:
            pkt = RtpPacket.parse(data, r["ext_maps"][k])
            assert pkt.version == 2 and pkt.ssrc == ssrc and pkt.payload_type == media_pt
            assert pkt.extensions.mid == mid and pkt.extensions.abs_send_time is not None
            assert pkt.serialize(r["ext_maps"][k]) == data
        seqs = [int.from_bytes(d[2:4], "big") for d in raw]
        assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:]))  # no gap, no repeat
    st = r["health"]["fanout"]
    assert st["viewers_total"] == 3 and st["passes"] >= 100 and st["pass_ms_mean"] > 0
    # each frame's record has the fan-out's time next to the encoder's
    sent = [rec["stages_ms"]["send"] for rec in r["records"].values() if "send" in rec["stages_ms"]]
    assert len(sent) >= 100 and all(0 <= s < 1000 for s in sent)


def test_a_lost_packet_is_resent_from_the_pass_history():
    # viewer 1 loses its 40th and 41st media packets (well after its keyframe): its receiver NACKs them and the
    # sender answers from the history the pass keeps, as RTX
    r = arun(_session("pass", drop={(1, 40), (1, 41)}))
    log = r["log"]
    assert len(log.dropped) == 2
    media_pt = min(pt for _, _, pt, _, _ in log.rows)
    rtx = [row for row in log.rows if row[0] == 1 and row[2] != media_pt]
    assert rtx, "no retransmission reached viewer 1"
    assert min(r["frames"]) >= 0.8 * 30 * 4.0, r["frames"]  # and viewer 1 kept decoding


@pytest.mark.parametrize("mode", ["tasks", "fallback"])
def test_without_the_pass_each_sender_runs_its_own_loop(mode, monkeypatch):
    if mode == "fallback":  # an aiortc whose sender lacks what the pass keeps
        monkeypatch.setattr(fanout_mod, "supported", lambda sender: False)
    r = arun(_session(mode, seconds=2.0, stagger_s=0.3))
    f = r["health"]["fanout"]
    if mode == "tasks":
        assert f == {"mode": "tasks"}
    else:
        assert f["mode"] == "pass" and f["fallbacks"] == 3 and f["passes"] == 0
    assert min(r["frames"]) >= 0.8 * 30 * 2.0, r["frames"]
    assert not any("send" in rec["stages_ms"] for rec in r["records"].values())


def test_supported_refuses_what_is_not_an_aiortc_sender():
    assert not fanout_mod.supported(object())
