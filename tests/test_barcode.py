"""Frame-id barcodes (stream/stamp.py): exact round trips, through real VP8 and H.264 encode/decode, and in Chromium."""
from __future__ import annotations

import base64
import fractions

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonomaly.stream import stamp
from sonomaly.stream.frame import Frame
from sonomaly.stream.sources import ReconnectingSource, open_source

IDS = st.integers(min_value=0, max_value=2**40)


def _clip_frames(path, n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            img = f.to_ndarray(format="bgr24")
            if size is not None:
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            out.append(img)
            if len(out) == n:
                break
    return out


class _ListSource:
    """A minimal source over a list of images (ids from 0, like every Sonomaly source)."""

    def __init__(self, images):
        self.images, self.i, self.uri, self.fps = images, 0, "list", 30.0

    def open(self):
        pass

    def close(self):
        pass

    def read(self):
        if self.i >= len(self.images):
            return None
        f = Frame(self.i, 0, self.images[self.i].copy(), {"fps": 30.0})
        self.i += 1
        return f


# --------------------------------------------------------------------------------------------------------- the code
def test_crc8_matches_the_standard_check_value():
    assert stamp.crc8(b"123456789") == 0xF4  # CRC-8/SMBUS check value


@given(fid=IDS)
@settings(max_examples=300, deadline=None)
def test_pixel_round_trip_is_exact(fid):
    img = np.zeros((240, 320, 3), np.uint8)
    stamp.draw(img, fid)
    assert stamp.decode(img) == fid & stamp.ID_MASK
    assert stamp.decode(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)) == fid & stamp.ID_MASK
    assert stamp.decode(img[:, :, ::-1], order="rgb") == fid & stamp.ID_MASK


@given(fid=st.integers(0, stamp.ID_MASK), cell=st.tuples(st.integers(1, 8), st.integers(0, 3)))
@settings(max_examples=200, deadline=None)
def test_one_flipped_cell_is_rejected_never_misread(fid, cell):
    img = np.zeros((450, 450, 3), np.uint8)
    stamp.draw(img, fid)
    lay = stamp.layout(450, 450)
    r, q = cell
    y, x = lay.y0 + r * lay.cell, lay.x0 + q * lay.cell
    img[y:y + lay.cell, x:x + lay.cell] = 255 - img[y:y + lay.cell, x:x + lay.cell]
    assert stamp.decode_detail(img) == (None, "damaged")


def test_no_code_reads_as_none():
    rng = np.random.default_rng(0)
    assert stamp.decode_detail(np.zeros((450, 450, 3), np.uint8)) == (None, "no_code")
    assert stamp.decode_detail(np.full((450, 450, 3), 255, np.uint8)) == (None, "no_code")
    noise = [stamp.decode(rng.integers(0, 256, (450, 450, 3), dtype=np.uint8)) for _ in range(200)]
    assert noise.count(None) == 200
    assert stamp.decode(np.zeros((40, 40, 3), np.uint8)) is None  # too small for a code


def test_unwrap_restores_full_ids():
    for fid in (0, 5, stamp.ID_MASK, stamp.ID_MASK + 1, 3 * 2**24 + 17):
        assert stamp.unwrap(fid & stamp.ID_MASK, fid + 1000) == fid
        assert stamp.unwrap(fid & stamp.ID_MASK, max(0, fid - 1000)) == fid


# ------------------------------------------------------------------------------------------------------- the source
def test_stamp_source_pads_a_band_when_the_scan_fills_the_frame(demo_clip):
    src = open_source(f"stamp:{demo_clip}", realtime=False)
    assert isinstance(src, stamp.StampSource)
    with src:
        frames = [src.read() for _ in range(5)]
    raw = _clip_frames(demo_clip, 1)[0]
    bw = stamp.band_width(*raw.shape[:2])
    for i, f in enumerate(frames):
        assert f.meta["stamp"] == "band"
        assert f.image.shape == (raw.shape[0], raw.shape[1] + bw, 3)
        assert stamp.decode(f.image) == i
    np.testing.assert_array_equal(frames[0].image[:, bw:], raw)  # the picture itself is untouched
    assert src.fps == pytest.approx(39.0, abs=0.5)
    # the scan region found in the stamped frame is the picture's own: the code is not merged into it
    from sonomaly.stream.roi import detect_scan_region

    region = detect_scan_region(frames[0].image)
    assert region.kind == "sector" and region.bbox[0] >= bw - 2  # (the detector works at ~1/2 scale)
    assert not region.mask[:, :stamp.COLS * stamp.cell_size(raw.shape[0]) + 8].any()


def test_stamp_source_draws_inside_when_the_spot_is_background():
    # a letter-boxed rectangle scan in the middle third: the left edge is background
    rng = np.random.default_rng(1)
    img = np.zeros((360, 640, 3), np.uint8)
    img[40:320, 200:440] = rng.integers(60, 200, (280, 240, 1), dtype=np.uint8)
    src = stamp.StampSource(_ListSource([img] * 3))
    f = src.read()
    assert f.meta["stamp"] == "inside" and f.image.shape == img.shape
    assert stamp.decode(f.image) == 0
    np.testing.assert_array_equal(f.image[:, 200:], img[:, 200:])
    assert img.max() < 255  # the source's own image was not drawn on


def test_renumbered_frames_show_their_new_id():
    # ReconnectingSource renumbers frames from its own counter (reconnects): the code must follow
    made = []

    def factory():
        s = stamp.StampSource(_ListSource([np.zeros((240, 320, 3), np.uint8)] * 2))
        made.append(s)
        return s

    src = ReconnectingSource(factory, reconnect_on_end=True, backoff_initial=0.0, placeholder_interval=0)
    src.open()
    try:
        ids = []
        for _ in range(5):
            f = src.read()
            ids.append((f.id, stamp.decode(f.image)))
    finally:
        src.close()
    assert len(made) >= 3  # it did reconnect (each inner source restarts its ids at 0)
    assert ids == [(i, i) for i in range(5)]


def test_the_overlay_never_covers_the_code(demo_clip, lung_model):
    """Through the real pipeline: heatmap, contours, gauge, HUD and banners are drawn, the code stays readable."""
    import threading
    import time

    from sonomaly import engines
    from sonomaly.stream.pipeline import Pipeline, PipelineConfig

    eng = engines.load(str(lung_model), backend="onnxruntime")

    class Hot:  # anomalies amplified: heatmap and contours all over the scan region
        card, backend, backend_reason = eng.card, eng.backend, None

        def infer(self, x):
            m, sc = eng.infer(x)
            return m * 50.0, sc * 50.0

    p = Pipeline(open_source(f"stamp:{demo_clip}", loop=True), Hot(), PipelineConfig(ai_wait_ms=30.0))
    seen, stop = [], threading.Event()

    def collect():
        seq = 0
        while not stop.is_set():
            seq2, out = p.out.slot.get_newer(seq, timeout=0.1, take=False)
            if out is not None and seq2 > seq:
                seq = seq2
                seen.append((out.frame_id, out.meta["ai"], stamp.decode(out.image)))

    t = threading.Thread(target=collect, daemon=True)
    p.start()
    t.start()
    try:
        time.sleep(2.5)
    finally:
        stop.set()
        t.join(2)
        p.stop()
    real = [s for s in seen if s[0] >= 0]
    assert len(real) > 40
    assert sum(1 for s in real if s[1] == "ok") > 20  # the heatmap was drawn on most frames
    assert [s[2] for s in real] == [s[0] for s in real]


# ------------------------------------------------------------------------------------------------ through codecs
def _encoder(codec: str, w: int, h: int, bitrate: int):
    """PyAV encoders configured like aiortc's (aiortc/codecs/vpx.py and h264.py)."""
    if codec == "vp8":
        enc = av.CodecContext.create("libvpx", "w")
        enc.width, enc.height, enc.bit_rate, enc.pix_fmt = w, h, bitrate, "yuv420p"
        enc.time_base = fractions.Fraction(1, 90000)
        enc.gop_size, enc.qmin, enc.qmax = 3000, 2, 56
        enc.options = {"bufsize": str(bitrate), "cpu-used": "-6", "deadline": "realtime", "lag-in-frames": "0",
                       "minrate": str(bitrate), "maxrate": str(bitrate), "noise-sensitivity": "4",
                       "overshoot-pct": "15", "partitions": "0", "static-thresh": "1", "undershoot-pct": "100"}
        return enc, av.CodecContext.create("vp8", "r")
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.bit_rate, enc.pix_fmt = w, h, bitrate, "yuv420p"
    enc.framerate, enc.time_base = fractions.Fraction(30, 1), fractions.Fraction(1, 30)
    enc.options = {"level": "31", "tune": "zerolatency"}
    enc.profile = "Baseline"
    return enc, av.CodecContext.create("h264", "r")


CODEC_CASES = [
    # (codec, frame size (w, h) before stamping, bitrate): aiortc's VP8 range is 0.25-1.5 Mbit/s, H.264 0.5-3;
    # the lowest of each is below aiortc's floor on purpose
    ("vp8", (320, 240), 150_000),
    ("vp8", (450, 450), 250_000),
    ("vp8", (450, 450), 1_500_000),
    ("vp8", (1280, 720), 250_000),
    ("h264", (320, 240), 250_000),
    ("h264", (450, 450), 500_000),
    ("h264", (450, 450), 3_000_000),
    ("h264", (1280, 720), 500_000),
]


@pytest.fixture(scope="module")
def clip_frames(demo_clip):
    return _clip_frames(demo_clip, 12)


@pytest.mark.parametrize("codec,size,bitrate", CODEC_CASES, ids=[f"{c}-{s[0]}x{s[1]}-{b // 1000}k"
                                                                  for c, s, b in CODEC_CASES])
@given(start=IDS, steps=st.lists(st.integers(1, 3000), min_size=11, max_size=11))
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_codes_survive_real_encode_decode(codec, size, bitrate, start, steps, clip_frames):
    images = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in clip_frames]
    ids = [start]
    for s in steps:
        ids.append(ids[-1] + s)  # ids jump around: every frame must carry a different code
    src = stamp.StampSource(_ListSource(images), placement="auto")
    stamped = []
    for fid in ids:
        f = src.read()
        f.id = fid
        stamped.append(f.image)
    h, w = stamped[0].shape[:2]
    enc, dec = _encoder(codec, w, h, bitrate)
    decoded = []
    for i, img in enumerate(stamped):
        vf = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
        vf.pts = i * (3000 if codec == "vp8" else 1)
        for pkt in enc.encode(vf):
            decoded += [d.to_ndarray(format="bgr24") for d in dec.decode(pkt)]
    for pkt in enc.encode(None):
        decoded += [d.to_ndarray(format="bgr24") for d in dec.decode(pkt)]
    assert len(decoded) == len(ids)
    got = [stamp.decode(img) for img in decoded]
    assert got == [i & stamp.ID_MASK for i in ids]


# ------------------------------------------------------------------------------------------------------ in Chromium
@pytest.mark.browser
def test_javascript_decoder_agrees_with_numpy(browser):
    """The browser's decoder gives the same ids as numpy, and None where numpy does: on canvas RGBA, and on the luma
    plane of a VideoFrame (full range, and BT.601 limited range: 16 + 219/255 of the gray level)."""
    page = browser.new_page()
    try:
        page.evaluate(f"window.S = {stamp.JS_DECODER}")
        rng = np.random.default_rng(3)
        cases = []
        for fid in [0, 1, 2**23, stamp.ID_MASK, *rng.integers(0, 2**24, 6).tolist()]:
            for h, w in ((240, 320), (450, 510), (720, 1280)):
                img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                stamp.draw(img, fid)
                img = cv2.GaussianBlur(img, (5, 5), 1.5)  # soften the edges like a codec would
                cases.append((img, fid))
        bad = np.zeros((450, 510, 3), np.uint8)
        stamp.draw(bad, 1234)
        lay = stamp.layout(450, 510)
        bad[lay.y0 + 3 * lay.cell:lay.y0 + 4 * lay.cell, lay.x0:lay.x0 + lay.cell] ^= 255
        cases.append((bad, None))
        for img, want in cases:
            h, w = img.shape[:2]
            lay = stamp.layout(h, w)
            box = img[lay.y0:lay.y0 + lay.height, lay.x0:lay.x0 + lay.width, ::-1]
            rgba = np.concatenate([box, np.full(box.shape[:2] + (1,), 255, np.uint8)], axis=2)
            js = page.evaluate("([b64, bw, h, w]) => { const lay = S.layout(h, w);"
                               " const d = Uint8ClampedArray.from(atob(b64), c => c.charCodeAt(0));"
                               " return [S.decode(d, bw, lay, lay.x0, lay.y0), S.lastReason]; }",
                               [base64.b64encode(rgba.tobytes()).decode(), lay.width, h, w])
            assert js == list(stamp.decode_detail(img)) and js[0] == want
            gray = cv2.cvtColor(box[:, :, ::-1], cv2.COLOR_BGR2GRAY)
            for full, y in ((True, gray), (False, np.round(16 + gray * (219 / 255)).astype(np.uint8))):
                js = page.evaluate("([b64, bw, h, w, full]) => { const lay = S.layout(h, w);"
                                   " const d = Uint8Array.from(atob(b64), c => c.charCodeAt(0));"
                                   " return [S.decode(d, bw, lay, lay.x0, lay.y0, { full }), S.lastReason]; }",
                                   [base64.b64encode(y.tobytes()).decode(), lay.width, h, w, full])
                assert js == list(stamp.decode_detail(img)), (full, js)
            assert page.evaluate("([h, w]) => S.layout(h, w)", [h, w]) == {
                "x0": lay.x0, "y0": lay.y0, "cell": lay.cell, "width": lay.width, "height": lay.height}
    finally:
        page.close()
