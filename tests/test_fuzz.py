"""Bad input: property-based and fuzz tests (hypothesis) on the DICOM reader, video decoding and the HTTP surface.

Rules: a bad file gives frames (``H x W x 3`` uint8) or a :class:`SourceError`, never another exception and never a
hang; a bad request gets a 4xx, never a 5xx, and the server lives. The generators and checks are those of
``sonomaly selftest --faults`` (stream/faults.py); hypothesis explores them here, the selftest runs a seeded sample.
Expected failures name the file and function to fix; they turn into failures once fixed (strict).
"""
from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonomaly.stream import faults as F

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd value it is fed

def fuzz(n: int):
    """Deterministic hypothesis runs (derandomized: the same examples every run, no example database)."""
    return settings(deadline=None, derandomize=True, database=None, max_examples=n,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return F.Context(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def small_frames():
    return F.clip_frames(3, (32, 48))


@pytest.fixture(scope="module")
def valid_dicom(ctx, small_frames) -> bytes:
    return Path(F.save_dicom(F.dicom_dataset(small_frames), ctx.path("valid.dcm"))).read_bytes()


def assert_frames_or_source_error(outcome: str, secs: float, msg: str, limit_s: float) -> None:
    assert outcome in ("ok", "SourceError"), msg
    assert secs < limit_s, f"took {secs:.1f} s"
    assert not F.find_patient_data(msg), msg


# --------------------------------------------------------------------------------------------------------- DICOM
@fuzz(60)
@given(ops=st.lists(st.tuples(st.sampled_from(F._MUTABLE_TAGS),
                              st.one_of(st.none(), st.sampled_from(F._VALUES),
                                        st.integers(-2**31, 2**32), st.text(max_size=12))),
                    min_size=1, max_size=4))
def test_dicom_tag_mutations_give_frames_or_source_error(ctx, small_frames, ops):
    ds = F.dicom_dataset(small_frames)
    for tag, value in ops:
        try:
            if value is None:
                if tag in ds:
                    delattr(ds, tag)
            else:
                setattr(ds, tag, value)
        except Exception:  # noqa: BLE001 - pydicom refuses the value: this mutation cannot exist in a file
            continue
    path = ctx.path("hyp_mut.dcm")
    with F.quiet_pydicom():
        try:
            F.save_dicom(ds, path)
        except Exception:  # noqa: BLE001
            try:
                ds.save_as(str(path), enforce_file_format=False)
            except Exception:  # noqa: BLE001 - not writable: nothing to read
                return
        assert_frames_or_source_error(*F.check_dicom_file(path), limit_s=5)


@fuzz(60)
@given(data=st.data())
def test_dicom_byte_flips_give_frames_or_source_error(ctx, valid_dicom, data):
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(valid_dicom) - 1), st.integers(0, 255)), min_size=1,
                               max_size=40))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(valid_dicom))))
    b = bytearray(valid_dicom)
    for i, v in flips:
        b[i] = v
    path = ctx.path("hyp_flip.dcm")
    path.write_bytes(bytes(b[:cut] if cut is not None else b))
    with F.quiet_pydicom():
        assert_frames_or_source_error(*F.check_dicom_file(path), limit_s=5)


def test_dicom_edge_cases(ctx):
    """Odd transfer syntaxes (big endian, deflated, RLE/JPEG/JPEG 2000/JPEG-LS/HTJ2K with bad data, unknown UIDs),
    each required tag missing, out-of-range values, wrong pixel-data lengths, truncated files."""
    res = F.scenario_dicom_edge_cases(ctx)
    assert res.passed, (res.failed_checks, res.metrics.get("other"))
    assert res.metrics["cases"] >= 40
    assert res.metrics["outcomes"].get("SourceError", 0) >= 20  # the broken ones really are rejected


# --------------------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def valid_mp4(ctx) -> bytes:
    return Path(F.make_clip(ctx.path("hyp_src.mp4"), frames=12, gop=4)).read_bytes()


@fuzz(30)
@given(data=st.data())
@pytest.mark.timeout(120)
def test_video_byte_flips_give_frames_or_source_error(ctx, valid_mp4, data):
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(valid_mp4) - 1), st.integers(0, 255)), min_size=1,
                               max_size=200))
    cut = data.draw(st.one_of(st.none(), st.integers(1, len(valid_mp4))))
    b = bytearray(valid_mp4)
    for i, v in flips:
        b[i] = v
    path = ctx.path("hyp_flip.mp4")
    path.write_bytes(bytes(b[:cut] if cut is not None else b))
    outcome, secs, frames, msg = F.check_video_file(path)
    assert outcome in ("ok", "SourceError"), msg
    assert secs < 10


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"ftyp" + b"\x00" * 100, b"GIF89a\x01\x00\x01\x00",
                                     b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, b"RIFF\x00\x00\x00\x00AVI "])
def test_video_edge_files(ctx, content):
    path = ctx.path("edge.mp4")
    path.write_bytes(content)
    outcome, secs, frames, msg = F.check_video_file(path)
    assert outcome == "SourceError" and secs < 5, (outcome, msg)


def test_tiny_and_odd_sized_videos_decode(ctx):
    for size in ((2, 2), (16, 16), (257, 321)):
        clip = F.make_clip(ctx.path(f"odd_{size[0]}.mp4"), frames=4, codec="mpeg4", size=size)
        outcome, _, frames, msg = F.check_video_file(clip)
        assert outcome == "ok" and frames == 4, (size, msg)


# --------------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def client(ctx):
    app, _ = F.make_test_app(ctx)
    with F.http_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def offer_sdp() -> str:
    return F.valid_offer_sdp()


@pytest.mark.parametrize("name,body", [b for b in F.BAD_OFFER_BODIES if not b[0].startswith("deeply")],
                         ids=[b[0] for b in F.BAD_OFFER_BODIES if not b[0].startswith("deeply")])
def test_bad_offer_bodies_are_4xx(client, name, body):
    r = client.post("/offer", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("name,body", [b for b in F.BAD_OFFER_BODIES if b[0].startswith("deeply")],
                         ids=[b[0] for b in F.BAD_OFFER_BODIES if b[0].startswith("deeply")])
def test_deeply_nested_offer_json_is_400(client, name, body):
    """Regression: json.loads' RecursionError on nested JSON under 64 KiB was a 500 (stream/webrtc.py parse_offer)."""
    r = client.post("/offer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:200]


@fuzz(80)
@given(body=st.one_of(
    st.binary(max_size=400),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=60),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["sdp", "type", "x", ""]), c,
                                                                      max_size=4),
                 max_leaves=12).map(lambda v: __import__("json").dumps(v).encode())))
def test_fuzzed_offer_json_is_4xx(client, body):
    r = client.post("/offer", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])


@fuzz(60)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_sdp_offers_are_200_or_400(client, offer_sdp, rnd):
    """Regression: a failed setRemoteDescription made pc.close() raise inside _drop → 500 (stream/webrtc.py)."""
    r = client.post("/offer", json={"sdp": F.mutate_sdp(offer_sdp, rnd), "type": "offer"})
    assert r.status_code in (200, 400), (r.status_code, r.text[:200])


def test_whep_fuzz(client, ctx):
    if "/whep" not in client.get("/openapi.json").json().get("paths", {}):
        pytest.skip("POST /whep (WHEP signalling) is not in /openapi.json yet: nothing to fuzz")
    res = F.scenario_whep(ctx, n=40)
    assert res.passed, (res.failed_checks, res.metrics)


def test_openapi_operations_never_5xx(ctx):
    """Every operation the app publishes (the control API, /whep, /metrics, records...) with random input."""
    res = F.scenario_openapi(ctx, per_op=10)
    assert res.passed, (res.failed_checks, res.metrics)


def test_oversized_offer_is_413(client):
    r = client.post("/offer", content=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.timeout(60)
def test_huge_content_length_is_refused_at_once(serve, demo_clip):
    """Regression: the whole body was read (and buffered) before the 64 KiB check (stream/app.py)."""
    server = serve("--source", str(demo_clip), "--loop")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as so:
        so.sendall(b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100000000\r\n\r\n" + b" " * 65536)
        so.settimeout(2.0)
        t0 = time.monotonic()
        try:
            answer = so.recv(100)
        except OSError:
            answer = b""
    assert b" 413 " in answer[:20] and time.monotonic() - t0 < 2
    assert server.health()["frames_out"] > 0


def test_seeded_samples_match_the_selftest(ctx):
    """The selftest's seeded samples (what docs/RELIABILITY.md reports) pass too."""
    for res in (F.scenario_dicom_mutations(ctx, n=60), F.scenario_video_byte_flips(ctx, n=15)):
        assert res.passed, (res.id, res.failed_checks, res.metrics)
    assert random.Random(1).random() == random.Random(1).random()  # seeds are deterministic


# ---- viewer reports (the page's "report" data channel) -----------------------------------------------------------------

def test_viewer_reports_parse_or_say_why():
    from sonomaly.stream.webrtc import parse_report

    assert parse_report('{"type":"stale","age_ms":612,"limit_ms":500}') == {"type": "stale", "age_ms": 612.0,
                                                                             "limit_ms": 500.0}
    assert parse_report('{"type":"live","stalled_ms":2300.5,"extra":1}') == {"type": "live", "stalled_ms": 2300.5}
    for bad, why in ((b'{"type":"live"}', "text"), ("[1]", "object"), ('{"type":"gone"}', "object"),
                     ('{"type":"live","stalled_ms":-1}', "stalled_ms"), ('{"type":"live","stalled_ms":NaN}', "stalled_ms"),
                     ('{"type":"live","stalled_ms":1e400}', "stalled_ms"), ('{"type":"live","stalled_ms":true}', "stalled_ms"),
                     ('{"type":"stale","age_ms":"600","limit_ms":500}', "age_ms"), ("x" * 2000, "too long"),
                     ("{" * 900, "JSON"), ("", "JSON")):
        with pytest.raises(ValueError, match=why):
            parse_report(bad)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=1200), st.binary(max_size=64),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                                  ["type", "age_ms", "limit_ms", "stalled_ms", "x"]), c, max_size=4),
                              max_leaves=12).map(json.dumps)))
def test_any_viewer_report_is_counted_never_raised(msg):
    """Whatever a page (or anyone holding a viewer token) sends, the server counts it as a report or as bad, and its
    totals stay finite and non-negative."""
    from sonomaly.stream.webrtc import Viewer, WebRTCServer

    class _Hub:  # the report path never touches the hub
        pass

    server = WebRTCServer(_Hub(), 0)
    viewer = Viewer(pc=None, track=None, remote="fuzz")
    server.viewer_report(viewer, msg)
    assert server.viewer_reports_bad + server.viewer_stalls <= 1  # one report, one outcome
    if not server.viewer_reports_bad:  # accepted: a JSON object of the type it was counted as
        kind = json.loads(msg)["type"]
        assert (kind == "stale") == (server.viewer_stalls == 1 and viewer.stalled_since is not None)
        assert kind in ("stale", "live")
    assert 0 <= server.viewer_stalled_ms < float("inf") and server.viewer_stalled_ms == viewer.stalled_ms


def test_a_flood_of_viewer_reports_is_counted_as_bad():
    from sonomaly.stream.webrtc import Viewer, WebRTCServer

    server = WebRTCServer(object(), 0)
    viewer = Viewer(pc=None, track=None, remote="flood")
    for _ in range(1000):
        server.viewer_report(viewer, '{"type":"stale","age_ms":600,"limit_ms":500}')
    assert server.viewer_stalls == 10 and server.viewer_reports_bad == 990  # the budget: 10 at once
    viewer.last_report -= 2.0  # two seconds later: two more
    for _ in range(5):
        server.viewer_report(viewer, '{"type":"live","stalled_ms":700}')
    assert server.viewer_stalled_ms == 1400.0 and server.viewer_reports_bad == 993
