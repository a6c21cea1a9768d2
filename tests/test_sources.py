"""Frame sources: video files, folders, MJPEG over HTTP, devices, corrupt input, reconnection, URI parsing."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sonomaly.stream.frame import Frame, now_ns
from sonomaly.stream.sources import (
    DeviceSource,
    DicomSource,
    FolderSource,
    NetworkSource,
    ReconnectingSource,
    Source,
    SourceError,
    VideoFileSource,
    open_source,
)

W, H = 64, 48


def level(i: int) -> int:
    return (i * 12) % 240 + 8


def write_video(path, n=20, fps=25, codec="libx264", w=W, h=H, noise=False, gop=None):
    """A small video whose frame i has mean intensity level(i) (optionally with noise to make it larger)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for i in range(n):
            img = np.full((h, w, 3), level(i), np.uint8)
            if noise:
                img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4")


def check_frames(frames, n=None):
    if n is not None:
        assert len(frames) == n
    for f in frames:
        assert isinstance(f, Frame)
        assert f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
    ids = [f.id for f in frames]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    ts = [f.t_capture_ns for f in frames]
    assert all(b >= a for a, b in zip(ts, ts[1:]))


# ---------------------------------------------------------------------------------------------------------------------
# video files
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_file_reads_all_frames_unpaced(tmp_path, codec):
    path = write_video(tmp_path / f"c_{codec}.mp4", codec=codec)
    src = open_source(path, realtime=False)
    assert isinstance(src, VideoFileSource)
    t0 = time.monotonic()
    with src:
        assert src.fps == pytest.approx(25.0)
        frames = list(src)
    assert time.monotonic() - t0 < 0.5  # not paced (20 frames at 25 fps would take 0.8 s)
    check_frames(frames, 20)
    assert frames[0].id == 0
    means = [f.image.mean() for f in frames]
    assert all(abs(m - level(i)) < 12 for i, m in enumerate(means)), means  # decoded in order
    m = frames[5].meta
    assert m["source"] == path and m["kind"] == "file" and m["index"] == 5 and m["fps"] == pytest.approx(25.0)
    assert src.read() is None  # closed -> None


@pytest.mark.timeout(20)
def test_file_realtime_pacing(video):
    with open_source(video, realtime=True) as src:
        frames = list(src)
    check_frames(frames, 20)
    span = (frames[-1].t_capture_ns - frames[0].t_capture_ns) / 1e9
    assert 0.65 < span < 1.3, span  # 19 intervals of 40 ms = 0.76 s
    gaps = np.diff([f.t_capture_ns for f in frames]) / 1e6
    assert np.median(gaps) == pytest.approx(40, abs=10)


@pytest.mark.timeout(20)
def test_pacing_no_burst_after_slow_consumer(video):
    with open_source(video, realtime=True) as src:
        src.read()
        time.sleep(0.3)  # consumer stalls for ~7 frame periods
        t1 = src.read().t_capture_ns  # late: released at once
        t2 = src.read().t_capture_ns  # schedule was reset: one period later, not a burst
    assert (t2 - t1) / 1e6 > 25


@pytest.mark.timeout(20)
def test_file_loop_continues_with_increasing_ids(video):
    with open_source(video, loop=True, realtime=False) as src:
        frames = [src.read() for _ in range(45)]
    check_frames(frames, 45)
    assert [f.meta["index"] for f in frames[18:23]] == [18, 19, 0, 1, 2]
    assert frames[20].meta["loop"] == 1 and frames[44].meta["loop"] == 2
    assert abs(frames[20].image.mean() - frames[0].image.mean()) < 3


@pytest.mark.timeout(20)
def test_file_uri_forms_and_fps_override(video):
    for uri in (f"file:{video}", f"file://{video}"):
        src = open_source(uri, realtime=False)
        assert isinstance(src, VideoFileSource) and src.path == video
    src = open_source(f"{video}?fps=50", realtime=True)
    with src:
        assert src.fps == 50
        frames = [src.read() for _ in range(6)]
    span = (frames[-1].t_capture_ns - frames[0].t_capture_ns) / 1e6
    assert 80 < span < 180  # 5 intervals of 20 ms


@pytest.mark.timeout(20)
def test_close_from_other_thread_interrupts_paced_read(video):
    src = open_source(f"{video}?fps=0.5", realtime=True)  # 2 s per frame
    src.open()
    src.read()
    threading.Timer(0.2, src.close).start()
    t0 = time.monotonic()
    assert src.read() is None
    assert time.monotonic() - t0 < 1.0
    src.close()  # idempotent


# ---------------------------------------------------------------------------------------------------------------------
# corrupt input
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_random_bytes_mp4_is_a_clear_error(tmp_path):
    p = tmp_path / "noise.mp4"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError) as ei:
        open_source(str(p)).open()
    assert "noise.mp4" in str(ei.value)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("missing", ["nope.mp4", "empty.mp4"])
def test_missing_or_empty_file(tmp_path, missing):
    if missing == "empty.mp4":
        (tmp_path / missing).write_bytes(b"")
    with pytest.raises(SourceError, match="not found|empty"):
        open_source(str(tmp_path / missing)).open()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("faststart", [False, True])
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_mp4_never_hangs(tmp_path, faststart, cut):
    src_path = tmp_path / "full.mp4"
    n = 40
    with av.open(str(src_path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = 5
        rng = np.random.default_rng(2)
        for i in range(n):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = src_path.read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: int(len(data) * cut)])
    frames = []
    try:
        with open_source(str(bad), realtime=False) as src:
            while (f := src.read()) is not None:
                frames.append(f)
    except SourceError as exc:
        assert "cut.mp4" in str(exc)
    assert len(frames) < n
    if frames:
        check_frames(frames)


# ---------------------------------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------------------------------
def _single_frame_dcm(path, value):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "US"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    ds.set_pixel_data(np.full((H, W), value, np.uint8), "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.timeout(20)
def test_folder_sorted_with_dicom_and_loop(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    values = {}
    for i in (1, 2, 10):  # natural order: 1, 2, 3(dcm), 10
        img = np.full((H, W, 3), 20 * i, np.uint8)
        cv2.imwrite(str(d / f"img{i}.png"), img)
        values[f"img{i}.png"] = 20 * i
    cv2.imwrite(str(d / "img4.jpg"), np.full((H, W), 90, np.uint8))  # grayscale -> 3 channels
    _single_frame_dcm(str(d / "img3.dcm"), 77)
    (d / "notes.txt").write_text("ignored")

    src = open_source(str(d), realtime=False)
    assert isinstance(src, FolderSource)
    with src:
        assert src.fps == 10
        frames = list(src)
    check_frames(frames, 5)
    assert [f.meta["file"] for f in frames] == ["img1.png", "img2.png", "img3.dcm", "img4.jpg", "img10.png"]
    assert [int(round(f.image.mean())) for f in frames] == [20, 40, 77, 90, 200]
    assert frames[0].meta["kind"] == "folder" and frames[0].meta["source"] == str(d)

    with open_source(str(d), loop=True, realtime=False) as src:
        ids = [src.read().meta["index"] for _ in range(12)]
    assert ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


@pytest.mark.timeout(20)
def test_folder_fps_query_paces(tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.zeros((H, W, 3), np.uint8))
    src = open_source(f"{tmp_path}?fps=40")
    assert isinstance(src, FolderSource)
    with src:
        assert src.fps == 40
        frames = list(src)
    span = (frames[-1].t_capture_ns - frames[0].t_capture_ns) / 1e6
    assert 60 < span < 160, span  # 3 intervals of 25 ms


@pytest.mark.timeout(10)
def test_empty_folder_and_bad_image(tmp_path):
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path)).open()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with open_source(str(tmp_path), realtime=False) as src:
        with pytest.raises(SourceError, match="broken.png"):
            src.read()


# ---------------------------------------------------------------------------------------------------------------------
# MJPEG over HTTP
# ---------------------------------------------------------------------------------------------------------------------
class _MjpegServer:
    def __init__(self, port=0):
        self.stop = threading.Event()
        self.sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not outer.stop.is_set():
                        ok, buf = cv2.imencode(".jpg", np.full((H, W, 3), level(i), np.uint8))
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(buf) + buf.tobytes() + b"\r\n")
                        self.wfile.flush()
                        outer.sent += 1
                        i += 1
                        time.sleep(0.02)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/video.mjpg"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def shutdown(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.timeout(30)
def test_mjpeg_over_http_then_server_gone():
    server = _MjpegServer()
    try:
        src = open_source(server.url)
        assert isinstance(src, NetworkSource)
        src.open()
        frames = [src.read() for _ in range(8)]
        check_frames(frames, 8)
        assert frames[0].meta["kind"] == "network" and frames[0].meta["source"] == server.url
        assert all(f.image.std() < 3 for f in frames)  # flat JPEG frames decoded
        server.shutdown()
        t0 = time.monotonic()
        with pytest.raises(SourceError) as ei:
            for _ in range(1000):  # frames still buffered are fine; then the loss must surface
                if src.read() is None:
                    break
        assert time.monotonic() - t0 < 8
        assert server.url in str(ei.value)
        src.close()
    finally:
        server.shutdown()


@pytest.mark.timeout(30)
def test_network_unreachable_is_quick_error():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=f"127.0.0.1:{port}"):
        open_source(f"http://127.0.0.1:{port}/x.mjpg").open()
    assert time.monotonic() - t0 < 8


@pytest.mark.timeout(30)
def test_silent_server_times_out():
    """A server that accepts but never answers: open() fails after the timeout, no hang."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    try:
        src = NetworkSource(f"http://127.0.0.1:{lsock.getsockname()[1]}/s", open_timeout=1.5, read_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(SourceError):
            src.open()
        assert time.monotonic() - t0 < 6
    finally:
        lsock.close()


# ---------------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
@pytest.mark.parametrize("uri", ["device:99", "/dev/video99"])
def test_missing_device_fails_fast(uri):
    src = open_source(uri)
    assert isinstance(src, DeviceSource) and src.index == 99
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="99"):
        src.open()
    assert time.monotonic() - t0 < 2


# ---------------------------------------------------------------------------------------------------------------------
# URI parsing
# ---------------------------------------------------------------------------------------------------------------------
@given(st.integers(min_value=0, max_value=10**6))
def test_device_uris(n):
    for uri in (f"device:{n}", f"/dev/video{n}"):
        src = open_source(uri)
        assert isinstance(src, DeviceSource) and src.index == n and src.uri == uri


@given(scheme=st.sampled_from(["rtsp", "rtmp", "http", "https", "RTSP"]),
       host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?", fullmatch=True),
       port=st.integers(1, 65535), path=st.from_regex(r"(/[A-Za-z0-9_.-]{0,12}){0,3}", fullmatch=True))
def test_network_uris(scheme, host, port, path):
    uri = f"{scheme}://{host}:{port}{path}"
    src = open_source(uri)
    assert isinstance(src, NetworkSource) and src.uri == uri and src.fps is None


@settings(max_examples=60)
@given(text=st.text(max_size=40))
def test_open_source_never_raises_unexpected(text):
    """Any string: a Source or a SourceError, nothing else (parsing only; nothing is opened)."""
    try:
        src = open_source(text)
    except SourceError:
        return
    assert isinstance(src, Source)


@pytest.mark.parametrize("uri", ["", "   ", "ftp://host/x.mp4", "device:abc", "rtsp://", "gopher:x"])
def test_bad_uris(uri):
    with pytest.raises(SourceError):
        open_source(uri)


def test_uri_kinds(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"")
    assert isinstance(open_source(str(tmp_path / "a.dcm")), DicomSource)
    assert isinstance(open_source("dicom:/x/y/z.bin"), DicomSource)
    assert isinstance(open_source(str(tmp_path)), FolderSource)
    assert isinstance(open_source(f"{tmp_path}?fps=3"), FolderSource)
    with pytest.raises(SourceError, match="fps"):
        open_source(f"{tmp_path}?fps=-1")
    assert isinstance(open_source("clip.mov"), VideoFileSource)


# ---------------------------------------------------------------------------------------------------------------------
# ReconnectingSource
# ---------------------------------------------------------------------------------------------------------------------
class FakeSource(Source):
    kind = "fake"

    def __init__(self, n_frames=3, fail_open=False, fail_after=None, block=False):
        super().__init__("fake://x", fps=30.0)
        self.n, self.fail_open, self.fail_after, self.block = n_frames, fail_open, fail_after, block
        self.i = 0
        self.released = False

    def _open(self):
        if self.fail_open:
            raise SourceError("fake://x: connection refused")

    def _read(self):
        if self.block:
            self._stop.wait(30)
            return None
        if self.fail_after is not None and self.i >= self.fail_after:
            raise SourceError("fake://x: connection lost")
        if self.i >= self.n:
            return None
        f = self._emit(np.full((4, 4, 3), self.i, np.uint8), self.i)
        self.i += 1
        return f

    def _release(self):
        self.released = True


@pytest.mark.timeout(10)
def test_reconnect_after_failures_with_backoff():
    made, sleeps = [], []

    def factory():
        k = len(made)
        src = FakeSource(fail_open=k < 2, fail_after=2 if k == 2 else None, n_frames=3)
        made.append(src)
        return src

    rs = ReconnectingSource(factory, backoff_initial=0.25, backoff_max=1.0, sleep=sleeps.append)
    assert rs.state == "connecting"
    rs.open()
    f0 = rs.read()
    assert f0 is not None and rs.state == "live"
    assert sleeps == [0.25, 0.5] and rs.reconnects == 2
    assert "connection refused" in rs.last_error
    frames = [f0] + [rs.read() for _ in range(4)]  # source 2 dies after 2 frames, source 3 gives 3
    assert sleeps == [0.25, 0.5, 0.25]  # back-off reset after frames arrived
    assert rs.reconnects == 3 and "connection lost" in rs.last_error
    assert [f.id for f in frames] == [0, 1, 2, 3, 4]  # own counter: no repeats across reconnects
    assert [f.meta["index"] for f in frames] == [0, 1, 0, 1, 2]
    assert made[2].released
    assert rs.read() is None and rs.state == "ended"  # clean end without reconnect_on_end
    rs.close()


@pytest.mark.timeout(10)
def test_backoff_doubles_and_caps():
    sleeps = []
    calls = []

    def factory():
        calls.append(1)
        if len(calls) > 6:
            return FakeSource(n_frames=1)
        return FakeSource(fail_open=True)

    with ReconnectingSource(factory, backoff_initial=0.1, backoff_max=0.5, sleep=sleeps.append) as rs:
        assert rs.read() is not None
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    assert rs.state == "ended"


@pytest.mark.timeout(10)
def test_reconnect_on_end_keeps_going_with_unique_ids():
    rs = ReconnectingSource(lambda: FakeSource(n_frames=2), backoff_initial=0.01, reconnect_on_end=True,
                            sleep=lambda s: None)
    with rs:
        frames = [rs.read() for _ in range(7)]
    assert [f.id for f in frames] == list(range(7))
    assert [f.meta["index"] for f in frames] == [0, 1, 0, 1, 0, 1, 0]
    assert rs.reconnects == 3 and rs.state == "ended"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("where", ["backoff", "inner_read"])
def test_close_from_another_thread_unblocks_read(where):
    if where == "backoff":
        rs = ReconnectingSource(lambda: FakeSource(fail_open=True), backoff_initial=30, backoff_max=60)
    else:
        rs = ReconnectingSource(lambda: FakeSource(block=True))
    rs.open()
    result = {}

    def reader():
        result["frame"] = rs.read()
        result["t"] = time.monotonic()

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    rs.close()
    th.join(3)
    assert not th.is_alive()
    assert result["frame"] is None and result["t"] - t0 < 1.0
    assert rs.state == "ended"


@pytest.mark.timeout(10)
def test_placeholder_frames_during_outage():
    n = []

    def factory():
        n.append(1)
        return FakeSource(fail_open=len(n) < 2, n_frames=5)

    rs = ReconnectingSource(factory, backoff_initial=0.2, placeholder_interval=0.05)
    with rs:
        frames = []
        t0 = now_ns()
        while (f := rs.read()) is not None and f.meta.get("signal", True) is False:
            frames.append(f)
        assert f is not None and f.signal
    assert 2 <= len(frames) <= 4 and not frames[0].signal
    assert (now_ns() - t0) / 1e9 < 1
    assert [x.id for x in frames + [f]] == list(range(len(frames) + 1))


@pytest.mark.timeout(20)
def test_reconnecting_file_source_real(video):
    rs = ReconnectingSource(lambda: open_source(video, realtime=False), reconnect_on_end=True,
                            backoff_initial=0.01, sleep=lambda s: None)
    with rs:
        frames = [rs.read() for _ in range(25)]
    assert [f.id for f in frames] == list(range(25)) and rs.reconnects == 1 and rs.fps == pytest.approx(25)
    assert rs.uri == video


@pytest.mark.timeout(30)
def test_reconnecting_mjpeg_server_restart():
    server = _MjpegServer()
    port = server.httpd.server_address[1]
    url = server.url
    rs = ReconnectingSource(lambda: NetworkSource(url, open_timeout=2, read_timeout=1), backoff_initial=0.1,
                            backoff_max=0.4)
    servers = [server]
    try:
        rs.open()
        frames = [rs.read() for _ in range(5)]
        assert rs.state == "live"
        server.shutdown()

        def restart():
            servers.append(_MjpegServer(port))

        threading.Timer(0.6, restart).start()
        t0 = time.monotonic()
        while True:
            f = rs.read()
            frames.append(f)
            if rs.reconnects >= 1 and f.meta["index"] == 0:  # first frame from the restarted server
                break
            assert time.monotonic() - t0 < 8
        frames += [rs.read() for _ in range(3)]
        ids = [f.id for f in frames]
        assert ids == list(range(len(ids)))
        assert rs.state == "live" and rs.reconnects >= 1 and rs.last_error
    finally:
        rs.close()
        for s in servers:
            s.shutdown()
