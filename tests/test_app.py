"""Signalling and health over HTTP: malformed offers get 400 and the server lives; a real aiortc viewer watches."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonomaly.stream.app import create_app
from sonomaly.stream.pipeline import Pipeline
from sonomaly.stream.sources import ReconnectingSource, open_source
from sonomaly.tools.client import make_offer, receive


async def _offer_sdp() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        return (await make_offer(pc)).sdp
    finally:
        await pc.close()


@pytest.fixture(scope="module")
def client(demo_clip):
    pipeline = Pipeline(ReconnectingSource(lambda: open_source(str(demo_clip), loop=True)), None)
    with TestClient(create_app(pipeline)) as c:
        yield c


@pytest.fixture(scope="module")
def valid_sdp() -> str:
    return asyncio.run(_offer_sdp())


BAD_BODIES = [
    b"",
    b"not json",
    b"{",
    b"[]",
    b"null",
    b'"v=0"',
    b'{"type": "offer"}',
    b'{"sdp": 5, "type": "offer"}',
    b'{"sdp": "", "type": "offer"}',
    b'{"sdp": "hello", "type": "offer"}',
    b'{"sdp": "v=0\\r\\n", "type": "offer"}',
    b'{"sdp": "v=0\\r\\nm=video 9 UDP/TLS/RTP/SAVPF 96\\r\\n", "type": "offer"}',
    b'{"sdp": "v=0\\r\\nm=video", "type": "answer"}',
    b"\xff\xfe\x00garbage",
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_malformed_offer_is_a_400_and_the_server_lives(client, body):
    r = client.post("/offer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_offer_without_video_is_rejected(client, valid_sdp):
    audio_only = valid_sdp.replace("m=video", "m=audio")
    r = client.post("/offer", json={"sdp": audio_only, "type": "offer"})
    assert r.status_code == 400


def test_truncated_real_offer_is_rejected(client, valid_sdp):
    r = client.post("/offer", json={"sdp": valid_sdp[: len(valid_sdp) // 3], "type": "offer"})
    assert r.status_code == 400
    assert client.get("/health").json()["viewers"] == 0  # nothing leaked


def test_oversized_offer_is_413(client):
    r = client.post("/offer", content=b"{" + b" " * 70_000 + b"}")
    assert r.status_code == 413


def test_valid_offer_gets_an_answer(client, valid_sdp):
    r = client.post("/offer", json={"sdp": valid_sdp, "type": "offer"})
    assert r.status_code == 200
    ans = r.json()
    assert ans["type"] == "answer" and ans["sdp"].startswith("v=0") and "m=video" in ans["sdp"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"type": st.sampled_from(["offer", "answer", "pranswer"]),
                           "sdp": st.text(max_size=400).map(lambda t: "v=0\r\n" + t)}).map(
        lambda d: json.dumps(d).encode()),
))
def test_fuzzed_offer_bodies_never_500(client, body):
    r = client.post("/offer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 413), (r.status_code, r.text)


def test_health_fields(client):
    h = client.get("/health").json()
    for key in ("status", "frames_in", "frames_out", "frames_dropped", "ai", "backend", "model"):
        assert key in h
    assert h["ai"] == "off"  # no model: video only
    assert h["frames_in"] > 0


def test_viewer_page(client):
    r = client.get("/")
    assert r.status_code == 200 and "RTCPeerConnection" in r.text and "offer" in r.text


def test_aiortc_viewer_receives_frames_and_metadata(serve, demo_clip, lung_model):
    server = serve("--source", str(demo_clip), "--model", str(lung_model), "--loop")
    stats = asyncio.run(receive(server.url, seconds=3.0))
    assert stats.first_frame_s is not None and stats.first_frame_s < 10
    assert stats.frames >= 0.8 * 3 * 39
    assert stats.sizes == {(450, 450)}
    assert len(stats.metadata) > 30
    ids = [m["frame_id"] for m in stats.metadata if m["frame_id"] is not None]
    assert ids == sorted(ids)
    assert {m["ai"] for m in stats.metadata} <= {"ok", "delayed"}
    h = server.health()
    assert h["backend"] == "onnxruntime" and h["viewers_total"] == 1
