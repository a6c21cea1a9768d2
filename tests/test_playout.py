"""The playout-delay RTP header extension (stream/playout.py): wire format, negotiation in a real aiortc offer/answer,
and the bytes on the RTP packets the server sends."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sonomaly.stream import playout


@given(st.integers(0, playout.MAX_MS // 10), st.integers(0, playout.MAX_MS // 10))
def test_encode_decode_round_trip(a, b):
    lo, hi = sorted((a * 10, b * 10))
    value = playout.encode(lo, hi)
    assert len(value) == 3
    assert playout.decode(value) == (lo, hi)


def test_wire_format_matches_the_spec():
    # 12 bits min, 12 bits max, 10 ms units: min 100 ms (10 = 0x00a), max 1000 ms (100 = 0x064) -> 00 a0 64
    assert playout.encode(100, 1000) == bytes([0x00, 0xA0, 0x64])
    assert playout.encode(0, 0) == b"\x00\x00\x00"
    assert playout.encode(playout.MAX_MS, playout.MAX_MS) == b"\xff\xff\xff"


@pytest.mark.parametrize("bad", [(-10, 0), (20, 10), (0, playout.MAX_MS + 10)])
def test_encode_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        playout.encode(*bad)


def test_parse():
    assert playout.parse("0,0") == (0, 0)
    assert playout.parse("0:100") == (0, 100)
    assert playout.parse("40") == (40, 40)
    assert playout.parse("off") is None
    for bad in ("a,b", "1,2,3", "50,10"):
        with pytest.raises(ValueError):
            playout.parse(bad)


def test_header_map_writes_the_extension_only_when_negotiated():
    from aiortc import rtp
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

    playout.enable(0, 0)
    mid = RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid")
    with_ext = rtp.HeaderExtensionsMap()
    with_ext.configure(RTCRtpParameters(headerExtensions=[mid, RTCRtpHeaderExtensionParameters(id=9, uri=playout.URI)]))
    without = rtp.HeaderExtensionsMap()
    without.configure(RTCRtpParameters(headerExtensions=[mid]))
    values = rtp.HeaderExtensions()
    values.mid = "0"
    got = dict(rtp.unpack_header_extensions(*with_ext.set(values)))
    assert got == {1: b"0", 9: b"\x00\x00\x00"}
    assert dict(rtp.unpack_header_extensions(*without.set(values))) == {1: b"0"}
    playout.enable(0, 100)
    assert dict(rtp.unpack_header_extensions(*with_ext.set(values)))[9] == playout.encode(0, 100)
    playout.disable()
    assert dict(rtp.unpack_header_extensions(*with_ext.set(values))) == {1: b"0"}
    playout.enable(0, 0)


def test_real_offer_answer_negotiates_and_packets_carry_it(demo_clip, monkeypatch):
    """A real aiortc viewer against the real app: the answer lists playout-delay, /health says it is sent, and the
    server's RTP packets carry 0,0 in the negotiated id."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from fastapi.testclient import TestClient

    from sonomaly.stream import sources
    from sonomaly.stream.app import create_app
    from sonomaly.stream.pipeline import Pipeline

    playout.enable(0, 0)
    src = sources.ReconnectingSource(lambda: sources.open_source(str(demo_clip), loop=True))
    app = create_app(Pipeline(src, None))
    seen: list[bytes | None] = []
    ext_ids: list[int] = []
    from aiortc import rtp

    orig_get = rtp.HeaderExtensionsMap.get

    def spy_get(self, profile, value):  # the viewer's parse of every RTP packet it receives: the raw extensions
        if ext_ids:
            seen.append(dict(rtp.unpack_header_extensions(profile, value)).get(ext_ids[0]))
        return orig_get(self, profile, value)

    monkeypatch.setattr(rtp.HeaderExtensionsMap, "get", spy_get)

    async def viewer(client) -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        got_frame = asyncio.Event()

        @pc.on("track")
        def _on_track(track):
            async def pull():
                await track.recv()
                got_frame.set()
            asyncio.ensure_future(pull())

        await pc.setLocalDescription(await pc.createOffer())
        assert playout.URI in pc.localDescription.sdp  # aiortc's own offers carry it (the WHIP publisher)
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(None, lambda: client.post(
            "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}))
        assert res.status_code == 200, res.text
        answer = res.json()
        ext_line = [ln for ln in answer["sdp"].splitlines() if playout.URI in ln]
        assert ext_line, "the answer does not negotiate playout-delay"
        ext_ids.append(int(ext_line[0].split(":", 1)[1].split()[0].split("/")[0]))
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(got_frame.wait(), 20)
        await pc.close()
        return answer["sdp"]

    with TestClient(app) as client:
        asyncio.run(viewer(client))
        health = client.get("/health").json()
    assert health["playout_delay_ms"] == [0, 0]
    assert seen and all(v == b"\x00\x00\x00" for v in seen), seen[:5]
