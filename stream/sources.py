"""Frame sources: video files, capture devices, network streams, image folders and DICOM cine files.

Every source yields :class:`~sonomaly.stream.frame.Frame` objects whose ``image`` is ``H x W x 3`` uint8 BGR and whose
``meta`` holds ``source``, ``fps``, ``index`` (position within the file / stream) and ``kind``
(``file`` | ``device`` | ``network`` | ``folder`` | ``dicom``). Frame ids increase from 0 per source object.

>>> with open_source("clip.mp4", loop=True) as src:     # doctest: +SKIP
...     frame = src.read()                              # None = clean end of stream

URI forms understood by :func:`open_source`:

* ``path/to/clip.mp4`` (any container FFmpeg reads) or ``file:...`` -> :class:`VideoFileSource` (PyAV);
* ``device:N``, ``/dev/videoN`` or a bare number ``N`` -> :class:`DeviceSource` (OpenCV / V4L2);
* ``rtsp://``, ``rtsps://``, ``rtmp://``, ``rtmps://``, ``http://``, ``https://``, ``udp://``, ``tcp://``, ``srt://``
  (including MJPEG over HTTP, multipart/x-mixed-replace) -> :class:`NetworkSource` (PyAV, with timeouts);
* a directory -> :class:`FolderSource` (png/jpg/jpeg/bmp/tif/tiff/dcm, natural name order, 10 fps by default);
* ``*.dcm`` / ``*.dicom``, a file with the DICM signature, or ``dicom:...`` -> :class:`DicomSource`;
* ``stamp:<any of the above>`` -> the same source with each frame's id drawn as a barcode
  (:class:`sonomaly.stream.stamp.StampSource`, for the latency harness).

Local sources (file, folder, DICOM) accept ``?fps=N`` after the path to override their nominal rate, e.g.
``/data/frames?fps=5``. Local sources are paced to their fps when ``realtime=True`` (absolute schedule on the
monotonic clock, no drift; a consumer that falls behind by more than a frame resets the schedule instead of getting a
burst). Live sources (device, network) are never paced.

All failures surface as :class:`SourceError` with a message naming the URI and the reason; :class:`ReconnectingSource`
turns a flaky input into an endless one.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sonomaly.stream.frame import Frame, now_ns

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpeg", ".mpg", ".ts", ".wmv", ".flv", ".mjpeg",
                    ".mjpg", ".ogv", ".3gp", ".h264", ".264", ".hevc", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
DEFAULT_FOLDER_FPS = 10.0
DEFAULT_VIDEO_FPS = 25.0  # pacing rate for files that declare none


class SourceError(RuntimeError):
    """A source could not be opened or stopped delivering: the message says what failed, which URI and why."""


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _to_bgr(image: np.ndarray) -> np.ndarray:
    from sonomaly.stream.dicom import to_bgr_u8

    return to_bgr_u8(image)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isascii() and t.isdigit() else (1, 0, t.lower()) for t in re.split(r"([0-9]+)", name)]


class _Pacer:
    """Releases frames at ``fps`` on the monotonic clock: absolute schedule (no drift), no catch-up bursts."""

    def __init__(self, fps: float, stop: threading.Event):
        self.period_ns = int(round(1e9 / fps))
        self._stop = stop
        self._due: int | None = None

    def reset(self) -> None:
        self._due = None

    def wait(self) -> bool:
        """Block until the next frame is due; False when the source was closed meanwhile."""
        now = now_ns()
        if self._due is None:
            self._due = now
        elif now < self._due:
            if self._stop.wait((self._due - now) / 1e9):
                return False
        elif now - self._due > self.period_ns:
            self._due = now  # consumer fell behind by more than a frame: restart the schedule, no burst
        self._due += self.period_ns
        return not self._stop.is_set()


# ---------------------------------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------------------------------
class Source:
    """Base class. Subclasses implement ``_open``, ``_read`` (-> Frame | None) and ``_release``.

    ``close()`` may be called from any thread: it wakes a read that is waiting (pacing, back-off) and releases the
    underlying resources as soon as no read is using them, so a read in flight returns ``None`` promptly.
    """

    kind = "source"

    def __init__(self, uri: str, *, fps: float | None = None):
        self.uri = uri
        self.fps: float | None = fps
        self._next_id = 0
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._busy = False
        self._opened = False
        self._released = True

    # ---- public API -------------------------------------------------------------------------------------------------
    def open(self) -> None:
        with self._state_lock:
            if self._opened and not self._released:
                return
            self._stop.clear()
            self._busy = True
        try:
            self._open()
            with self._state_lock:
                self._opened = True
                self._released = False
        except SourceError:
            self._safe_release()
            raise
        except Exception as exc:  # noqa: BLE001 - never leak decoder exception types
            self._safe_release()
            raise SourceError(f"cannot open {self.uri}: {_describe(exc)}") from exc
        finally:
            self._finish_io()

    def read(self) -> Frame | None:
        with self._state_lock:
            if self._stop.is_set():
                return None
            if not self._opened or self._released:
                raise SourceError(f"{self.uri}: read() before open()")
            self._busy = True
        try:
            frame = self._read()
            if self._stop.is_set():
                return None
            return frame
        except SourceError:
            if self._stop.is_set():
                return None
            raise
        except Exception as exc:  # noqa: BLE001
            if self._stop.is_set():
                return None
            raise SourceError(f"{self.uri}: read failed: {_describe(exc)}") from exc
        finally:
            self._finish_io()

    def close(self) -> None:
        """Idempotent, thread-safe."""
        with self._state_lock:
            self._stop.set()
            if self._busy:
                return  # the reading thread releases when its read returns
            self._release_locked()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, fps={self.fps})"

    # ---- for subclasses ---------------------------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> Frame | None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _emit(self, image: np.ndarray, index: int, **extra: Any) -> Frame:
        img = image if (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                        and image.flags.c_contiguous) else _to_bgr(image)
        meta = {"source": self.uri, "fps": self.fps, "index": index, "kind": self.kind}
        meta.update(extra)
        frame = Frame(id=self._next_id, t_capture_ns=now_ns(), image=img, meta=meta)
        self._next_id += 1
        return frame

    # ---- internals --------------------------------------------------------------------------------------------------
    def _finish_io(self) -> None:
        with self._state_lock:
            self._busy = False
            if self._stop.is_set():
                self._release_locked()

    def _release_locked(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self._release()
        except Exception as exc:  # noqa: BLE001
            log.debug("%s: error while closing: %s", self.uri, exc)

    def _safe_release(self) -> None:
        try:
            self._release()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------------------------------
# PyAV-based sources (files and network)
# ---------------------------------------------------------------------------------------------------------------------
class _AVSource(Source):
    """Demux + decode with PyAV; tolerates a few corrupt packets, wraps every FFmpeg error in SourceError."""

    max_consecutive_errors = 8
    thread_type = "AUTO"  # frame threading: fastest, but adds a few frames of latency

    def __init__(self, uri: str, target: str, *, fps: float | None = None):
        super().__init__(uri, fps=fps)
        self._target = target
        self._container: Any = None
        self._stream: Any = None
        self._packets: Iterator[Any] | None = None
        self._pending: list[Any] = []
        self._flushed = False
        self._index = 0
        self._duration: float | None = None

    # subclasses choose open arguments
    def _av_open(self) -> Any:
        raise NotImplementedError

    def _open_container(self) -> None:
        import av

        container = self._av_open()
        try:
            if not container.streams.video:
                raise SourceError(f"cannot open {self.uri}: no video stream in the input (streams: "
                                  f"{', '.join(s.type for s in container.streams) or 'none'}; truncated or not a "
                                  "video?)")
            stream = container.streams.video[0]
            stream.thread_type = self.thread_type
        except Exception:
            container.close()
            raise
        self._container, self._stream = container, stream
        self._packets = container.demux(stream)
        self._pending = []
        self._flushed = False
        self._index = 0
        self._duration = float(container.duration) / av.time_base if container.duration else None

    def _close_container(self) -> None:
        c, self._container, self._stream, self._packets, self._pending = self._container, None, None, None, []
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def _release(self) -> None:
        self._close_container()

    def _stream_fps(self) -> float | None:
        s = self._stream
        for rate in (s.average_rate, s.guessed_rate, s.base_rate):
            try:
                v = float(rate) if rate else 0.0
            except (TypeError, ZeroDivisionError):
                v = 0.0
            if 0 < v < 1000 and math.isfinite(v):
                return v
        return None

    def _next_image(self) -> np.ndarray | None:
        """Next decoded frame as BGR, None at end of input. Raises SourceError on unrecoverable errors."""
        import av

        errors = 0
        while True:
            if self._pending:
                vf = self._pending.pop(0)
                try:
                    return vf.to_ndarray(format="bgr24")
                except Exception as exc:  # noqa: BLE001
                    raise SourceError(f"{self.uri}: cannot convert decoded frame: {_describe(exc)}") from exc
            if self._flushed or self._packets is None:
                return None
            if self._stop.is_set():
                return None
            try:
                packet = next(self._packets)
            except StopIteration:
                packet = None
            except av.error.EOFError:
                packet = None
            except (av.error.FFmpegError, OSError) as exc:
                raise SourceError(self._io_error_message(exc)) from exc
            if packet is None or packet.size == 0 and packet.pts is None and packet.dts is None:
                # end of demuxing: flush the decoder
                self._flushed = True
                try:
                    self._pending.extend(self._stream.codec_context.decode(None))
                except Exception as exc:  # noqa: BLE001
                    log.warning("%s: decoder flush failed: %s", self.uri, _describe(exc))
                continue
            try:
                self._pending.extend(f for f in packet.decode() if isinstance(f, av.VideoFrame))
                errors = 0
            except (av.error.FFmpegError, ValueError) as exc:
                errors += 1
                log.warning("%s: skipping undecodable packet (%s)", self.uri, _describe(exc))
                if errors > self.max_consecutive_errors:
                    raise SourceError(f"{self.uri}: {errors} consecutive undecodable packets, giving up "
                                      f"({_describe(exc)})") from exc

    def _io_error_message(self, exc: BaseException) -> str:
        return f"{self.uri}: read error: {_describe(exc)}"


class VideoFileSource(_AVSource):
    """A video file decoded with PyAV; paced to the file's fps when ``realtime``; ``loop`` restarts at the end."""

    kind = "file"

    def __init__(self, uri: str, path: str, *, loop: bool = False, realtime: bool = True, fps: float | None = None):
        super().__init__(uri, path, fps=fps)
        self.path = path
        self.loop = loop
        self.realtime = realtime
        self._fps_override = fps
        self._pacer: _Pacer | None = None
        self._first: np.ndarray | None = None
        self.loops = 0

    def _av_open(self) -> Any:
        import av

        try:
            return av.open(self.path, metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise SourceError(f"cannot open video file {self.path}: not a readable video ({reason}; corrupt, "
                              "truncated or not a video file)") from exc

    def _open(self) -> None:
        if not os.path.exists(self.path):
            raise SourceError(f"cannot open video file {self.path}: file not found")
        if os.path.isdir(self.path):
            raise SourceError(f"cannot open video file {self.path}: is a directory")
        if os.path.getsize(self.path) == 0:
            raise SourceError(f"cannot open video file {self.path}: file is empty")
        self._open_container()
        self.fps = self._fps_override or self._stream_fps()
        # decode the first frame now so that a broken file fails on open(), not later
        try:
            first = self._next_image()
        except SourceError as exc:
            raise SourceError(f"cannot open video file {self.path}: no decodable frame ({exc})") from exc
        if first is None:
            raise SourceError(f"cannot open video file {self.path}: no decodable video frames")
        self._first = first
        self._pacer = _Pacer(self.fps or DEFAULT_VIDEO_FPS, self._stop) if self.realtime else None
        self.loops = 0

    def _read(self) -> Frame | None:
        if self._first is not None:
            img, self._first = self._first, None
        else:
            img = self._next_image()
            if img is None and self.loop and not self._stop.is_set():
                index_before = self._index
                self._close_container()
                self._open_container()  # reopen: simpler and more robust than seeking every container format
                img = self._next_image()
                if img is None:
                    log.warning("%s: no frame after restarting the loop (had %d)", self.uri, index_before)
                    return None
                self.loops += 1
            if img is None:
                return None
        if self._pacer is not None and not self._pacer.wait():
            return None
        frame = self._emit(img, self._index, loop=self.loops)
        self._index += 1
        return frame


class NetworkSource(_AVSource):
    """A live network stream (RTSP, RTMP, HTTP(S) incl. MJPEG, ...) read with PyAV; never paced.

    ``open_timeout`` bounds connecting, ``read_timeout`` bounds each wait for data, so a vanished server yields a
    :class:`SourceError` within a few seconds. A live stream (unknown duration) that ends is reported as a SourceError
    (connection lost); a finite remote file that ends returns ``None``.
    """

    kind = "network"
    thread_type = "SLICE"  # live: no frame-threading delay

    def __init__(self, uri: str, *, open_timeout: float = 10.0, read_timeout: float = 5.0, options: dict | None = None):
        super().__init__(uri, uri)
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.extra_options = dict(options or {})
        self._first: np.ndarray | None = None

    def _options(self) -> dict[str, str]:
        scheme = urllib.parse.urlsplit(self.uri).scheme.lower()
        us = str(int(self.read_timeout * 1e6))
        opts: dict[str, str] = {"fflags": "nobuffer", "flags": "low_delay", "analyzeduration": "1000000",
                                "probesize": "1000000"}
        if scheme in ("rtsp", "rtsps"):
            opts.update({"rtsp_transport": "tcp", "timeout": us})
        elif scheme in ("http", "https"):
            opts.update({"rw_timeout": us, "timeout": us, "reconnect": "0"})
        elif scheme in ("rtmp", "rtmps", "tcp", "udp", "srt"):
            opts.update({"rw_timeout": us})
        opts.update({k: str(v) for k, v in self.extra_options.items()})
        return opts

    def _av_open(self) -> Any:
        import av

        scheme = urllib.parse.urlsplit(self.uri).scheme.lower()
        attempts: list[str | None] = [None]
        if scheme in ("http", "https"):
            attempts.append("mpjpeg")  # MJPEG over HTTP (multipart/x-mixed-replace) when probing fails
        last: BaseException | None = None
        for fmt in attempts:
            if self._stop.is_set():
                break
            try:
                return av.open(self.uri, format=fmt, options=self._options(),
                               timeout=(self.open_timeout, self.read_timeout))
            except (av.error.ExitError, TimeoutError) as exc:
                last = exc
                break  # timed out: retrying with another format would double the wait
            except (av.error.FFmpegError, OSError) as exc:
                last = exc
        reason = _describe(last) if last is not None else "closed"
        raise SourceError(f"cannot open network stream {self.uri}: {reason}")

    def _open(self) -> None:
        self._open_container()
        self.fps = self._stream_fps()
        first = self._next_image()
        if first is None:
            raise SourceError(f"cannot open network stream {self.uri}: stream ended before the first frame")
        self._first = first

    def _io_error_message(self, exc: BaseException) -> str:
        return (f"network stream {self.uri} failed (server gone or no data for {self.read_timeout:g} s): "
                f"{_describe(exc)}")

    def _read(self) -> Frame | None:
        if self._first is not None:
            img, self._first = self._first, None
        else:
            img = self._next_image()
            if img is None:
                if self._stop.is_set():
                    return None
                if self._duration is None:
                    raise SourceError(f"network stream {self.uri} ended unexpectedly (connection closed by server)")
                return None
        frame = self._emit(img, self._index)
        self._index += 1
        return frame


# ---------------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------------
class DeviceSource(Source):
    """A capture device (``device:N`` / ``/dev/videoN``) through OpenCV (V4L2 on Linux); never paced."""

    kind = "device"

    def __init__(self, uri: str, index: int, *, path: str | None = None):
        super().__init__(uri)
        self.index = index
        self.path = path if path is not None else f"/dev/video{index}"
        self._cap: Any = None
        self._count = 0

    def _open(self) -> None:
        import cv2

        if os.name == "posix" and os.path.isdir("/dev") and not os.path.exists(self.path):
            raise SourceError(f"cannot open capture device {self.uri}: {self.path} does not exist (no such device)")
        backend = cv2.CAP_V4L2 if os.name == "posix" and hasattr(cv2, "CAP_V4L2") else cv2.CAP_ANY
        try:
            cap = cv2.VideoCapture(self.index, backend)
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"cannot open capture device {self.uri}: {_describe(exc)}") from exc
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open capture device {self.uri}: OpenCV could not open it "
                              "(busy, no permission, or not a video capture device)")
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self._count = 0

    def _read(self) -> Frame | None:
        ok, img = self._cap.read()
        if not ok or img is None:
            raise SourceError(f"capture device {self.uri} stopped delivering frames (unplugged or busy)")
        frame = self._emit(img, self._count)
        self._count += 1
        return frame

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


# ---------------------------------------------------------------------------------------------------------------------
# local paced sources: folders and DICOM
# ---------------------------------------------------------------------------------------------------------------------
class _PacedLocalSource(Source):
    def __init__(self, uri: str, *, loop: bool, realtime: bool, fps: float | None):
        super().__init__(uri, fps=fps)
        self.loop = loop
        self.realtime = realtime
        self._pacer: _Pacer | None = None
        self._pos = 0
        self.loops = 0

    def _count(self) -> int:
        raise NotImplementedError

    def _image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _start(self) -> None:
        self._pos = 0
        self.loops = 0
        self._pacer = _Pacer(self.fps or DEFAULT_FOLDER_FPS, self._stop) if self.realtime else None

    def _read(self) -> Frame | None:
        n = self._count()
        if self._pos >= n:
            if not self.loop or n == 0:
                return None
            self._pos = 0
            self.loops += 1
        i = self._pos
        img = self._image(i)
        self._pos += 1
        if self._pacer is not None and not self._pacer.wait():
            return None
        return self._emit(img, i, loop=self.loops, **self._extra_meta(i))

    def _extra_meta(self, i: int) -> dict[str, Any]:
        return {}


class FolderSource(_PacedLocalSource):
    """A folder of still images (png/jpg/jpeg/bmp/tif/tiff and single-frame dcm) in natural name order."""

    kind = "folder"

    def __init__(self, uri: str, path: str, *, loop: bool = False, realtime: bool = True, fps: float | None = None):
        super().__init__(uri, loop=loop, realtime=realtime, fps=fps or DEFAULT_FOLDER_FPS)
        self.path = path
        self.files: list[str] = []

    def _open(self) -> None:
        if not os.path.isdir(self.path):
            raise SourceError(f"cannot open image folder {self.path}: not a directory")
        try:
            names = os.listdir(self.path)
        except OSError as exc:
            raise SourceError(f"cannot open image folder {self.path}: {_describe(exc)}") from exc
        files = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
                 and os.path.isfile(os.path.join(self.path, n))]
        if not files:
            raise SourceError(f"cannot open image folder {self.path}: no images in it "
                              f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.files = [os.path.join(self.path, n) for n in sorted(files, key=_natural_key)]
        self._start()

    def _count(self) -> int:
        return len(self.files)

    def _image(self, i: int) -> np.ndarray:
        import cv2

        path = self.files[i]
        if path.lower().endswith(".dcm"):
            from sonomaly.stream.dicom import read_dicom

            return read_dicom(path).frame_bgr(0)
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise SourceError(f"image folder {self.path}: cannot decode {os.path.basename(path)} (corrupt or "
                              "unsupported image)")
        if img.dtype == np.uint16 and img.ndim == 2:
            mx = int(img.max())
            img = (img.astype(np.float32) * (255.0 / mx)).astype(np.uint8) if mx > 255 else img.astype(np.uint8)
        return _to_bgr(img)

    def _extra_meta(self, i: int) -> dict[str, Any]:
        return {"file": os.path.basename(self.files[i])}


class DicomSource(_PacedLocalSource):
    """A (multi-frame) DICOM file, paced to its FrameTime / CineRate / RecommendedDisplayFrameRate (else 10 fps)."""

    kind = "dicom"

    def __init__(self, uri: str, path: str, *, loop: bool = False, realtime: bool = True, fps: float | None = None):
        super().__init__(uri, loop=loop, realtime=realtime, fps=fps)
        self.path = path
        self._fps_override = fps
        self._clip: Any = None
        self.dicom_meta: dict[str, Any] = {}

    def _open(self) -> None:
        from sonomaly.stream.dicom import read_dicom

        self._clip = read_dicom(self.path)
        self.fps = self._fps_override or self._clip.fps
        self.dicom_meta = self._clip.meta()
        self.dicom_meta["fps"] = self.fps
        self._start()

    def _count(self) -> int:
        return self._clip.n_frames

    def _image(self, i: int) -> np.ndarray:
        return self._clip.frame_bgr(i)

    def _extra_meta(self, i: int) -> dict[str, Any]:
        m = dict(self.dicom_meta)
        m.pop("fps", None)
        return m

    def _release(self) -> None:
        self._clip = None


# ---------------------------------------------------------------------------------------------------------------------
# URI parsing
# ---------------------------------------------------------------------------------------------------------------------
_DEVICE_RE = re.compile(r"^(?:device:(?://)?|/dev/video)([0-9]+)$", re.IGNORECASE)


def _split_query(path: str) -> tuple[str, dict[str, str]]:
    """``/dir?fps=5`` -> (``/dir``, {"fps": "5"}); a path that exists as written is never split."""
    if "?" not in path or os.path.exists(path):
        return path, {}
    base, _, query = path.rpartition("?")
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if not params or not set(params) <= {"fps"}:
        return path, {}
    return base, params


def _parse_fps(value: str | None, uri: str) -> float | None:
    if value is None:
        return None
    try:
        fps = float(value)
    except ValueError:
        raise SourceError(f"{uri}: fps={value!r} is not a number") from None
    if not (math.isfinite(fps) and 0 < fps <= 1000):
        raise SourceError(f"{uri}: fps={value!r} must be between 0 and 1000")
    return fps


def _is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def open_source(uri: str | os.PathLike[str], *, loop: bool = False, realtime: bool = True) -> Source:
    """Parse ``uri`` and return the matching (unopened) :class:`Source`; unknown forms raise :class:`SourceError`.

    ``loop`` and ``realtime`` apply to local sources (files, folders, DICOM); live sources ignore them.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"empty or invalid source URI {uri!r}")
    raw = uri.strip()

    if raw[:6].lower() == "stamp:":  # frame-id barcode for the latency harness (sonomaly.stream.stamp)
        from sonomaly.stream.stamp import StampSource

        return StampSource(open_source(raw[6:], loop=loop, realtime=realtime))

    m = _DEVICE_RE.match(raw)
    if m:
        n = int(m.group(1))
        return DeviceSource(raw, n, path=raw if raw.startswith("/dev/") else None)
    if re.fullmatch(r"[0-9]+", raw) and not os.path.exists(raw):
        return DeviceSource(raw, int(raw))
    if raw.lower().startswith("device:"):
        raise SourceError(f"invalid device URI {raw!r}: expected device:N with N a number, e.g. device:0")

    scheme = ""
    sm = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", raw)
    if sm and len(sm.group(1)) > 1:  # one letter = Windows drive
        scheme = sm.group(1).lower()
    if scheme in NETWORK_SCHEMES:
        parts = urllib.parse.urlsplit(raw)
        if not parts.netloc:
            raise SourceError(f"invalid network URI {raw!r}: no host")
        return NetworkSource(raw)

    force_dicom = False
    if scheme == "dicom":
        force_dicom = True
        path = raw[len("dicom:"):]
        if path.startswith("//"):
            path = urllib.parse.unquote(urllib.parse.urlsplit(raw).path) or path[2:]
    elif scheme == "file":
        if raw.lower().startswith("file://"):
            parts = urllib.parse.urlsplit(raw)
            path = urllib.parse.unquote(parts.path) + (f"?{parts.query}" if parts.query else "")
            if parts.netloc not in ("", "localhost"):
                raise SourceError(f"invalid file URI {raw!r}: remote host {parts.netloc!r}")
        else:
            path = raw[len("file:"):]
    elif scheme:
        raise SourceError(f"unsupported source URI {raw!r}: unknown scheme {scheme!r} (use a file path, a folder, "
                          f"device:N, dicom:PATH or one of {', '.join(s + '://' for s in NETWORK_SCHEMES)})")
    else:
        path = raw
    if not path:
        raise SourceError(f"invalid source URI {raw!r}: empty path")

    path, params = _split_query(os.path.expanduser(path))
    fps = _parse_fps(params.get("fps"), raw)

    if force_dicom or path.lower().endswith(DICOM_EXTENSIONS):
        return DicomSource(raw, path, loop=loop, realtime=realtime, fps=fps)
    if os.path.isdir(path):
        return FolderSource(raw, path, loop=loop, realtime=realtime, fps=fps)
    if os.path.isfile(path) and not path.lower().endswith(VIDEO_EXTENSIONS) and _is_dicom_file(path):
        return DicomSource(raw, path, loop=loop, realtime=realtime, fps=fps)
    return VideoFileSource(raw, path, loop=loop, realtime=realtime, fps=fps)


# ---------------------------------------------------------------------------------------------------------------------
# reconnecting wrapper
# ---------------------------------------------------------------------------------------------------------------------
class ReconnectingSource(Source):
    """Wraps a factory ``() -> Source`` and keeps it alive: on SourceError (or, with ``reconnect_on_end``, on end of
    stream) the inner source is closed and reopened after an exponential back-off (``backoff_initial``, doubling,
    capped at ``backoff_max``; reset once a frame arrives) until :meth:`close`.

    ``state`` is ``"connecting"`` | ``"live"`` | ``"reconnecting"`` | ``"ended"``; ``last_error`` the last failure
    message; ``reconnects`` the number of retry attempts made after a failure or end; ``backoff_history`` the delays
    waited. Frame ids come from this object's own counter, so they never repeat across reconnects.

    Waiting uses an Event, so ``close()`` from another thread makes a blocked ``read()`` return ``None`` promptly. An
    injected ``sleep`` (tests) is called with each delay instead of the Event wait.

    With ``placeholder_interval`` set (seconds), ``read()`` does not block through an outage: it returns a black
    placeholder frame with ``meta["signal"] = False`` (see :attr:`Frame.signal`) at that interval while waiting to
    reconnect.
    """

    kind = "reconnecting"

    def __init__(self, factory: Callable[[], Source], *, backoff_initial: float = 0.25, backoff_max: float = 5.0,
                 reconnect_on_end: bool = False, sleep: Callable[[float], Any] = time.sleep,
                 uri: str | None = None, placeholder_interval: float | None = None):
        super().__init__(uri or f"reconnecting:{getattr(factory, '__name__', 'factory')}")
        self._uri_given = uri is not None
        self.factory = factory
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.reconnect_on_end = reconnect_on_end
        self._sleep = sleep
        self.placeholder_interval = placeholder_interval
        self.state = "connecting"
        self.last_error: str | None = None
        self.reconnects = 0
        self.backoff_history: list[float] = []
        self._inner: Source | None = None
        self._inner_lock = threading.Lock()
        self._delay = self.backoff_initial
        self._wait_left = 0.0  # back-off still to wait before the next attempt
        self._failed = False  # a failure happened: the next connect is a reconnect
        self._failures_in_row = 0
        self._last_shape: tuple[int, ...] = (480, 640, 3)

    def _open(self) -> None:
        self.state = "connecting"

    def _release(self) -> None:
        with self._inner_lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()
        if self.state != "ended":
            self.state = "ended"

    def close(self) -> None:
        self._stop.set()
        with self._inner_lock:
            inner = self._inner
        if inner is not None:
            inner.close()  # thread-safe: wakes and ends a read in flight
        super().close()

    def _wait(self, seconds: float) -> None:
        if self._sleep is time.sleep:
            self._stop.wait(seconds)
        else:
            self._sleep(seconds)

    def _drop_inner(self, error: str) -> None:
        with self._inner_lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            try:
                inner.close()
            except Exception:  # noqa: BLE001
                pass
        was_live = self.state == "live"
        self.last_error = error
        self.state = "reconnecting"
        self._failed = True
        self._wait_left = self._delay
        self.backoff_history.append(self._delay)
        self._delay = min(self._delay * 2, self.backoff_max)
        self._failures_in_row = 1 if was_live else self._failures_in_row + 1
        level = logging.WARNING if self._failures_in_row in (1, 2) or self._failures_in_row % 20 == 0 else logging.DEBUG
        log.log(level, "%s (attempt %d); retrying in %.2f s", error, self._failures_in_row, self._wait_left)

    def _placeholder(self) -> Frame:
        frame = Frame(id=self._next_id, t_capture_ns=now_ns(), image=np.zeros(self._last_shape, np.uint8),
                      meta={"source": self.uri, "fps": self.fps, "index": -1, "kind": "placeholder",
                            "signal": False, "state": self.state, "error": self.last_error})
        self._next_id += 1
        return frame

    def _read(self) -> Frame | None:
        while not self._stop.is_set():
            if self._inner is None:
                if self._wait_left > 0:
                    chunk = self._wait_left
                    if self.placeholder_interval:
                        chunk = min(chunk, self.placeholder_interval)
                    self._wait(chunk)
                    self._wait_left = max(0.0, self._wait_left - chunk)
                    if self._stop.is_set():
                        return None
                    if self.placeholder_interval and self._wait_left > 0:
                        return self._placeholder()
                    continue
                if self._failed:
                    self.reconnects += 1
                try:
                    src = self.factory()
                    if not self._uri_given:
                        self.uri = getattr(src, "uri", self.uri)
                    with self._inner_lock:
                        if self._stop.is_set():
                            return None
                        self._inner = src
                    src.open()
                    if self._stop.is_set():  # closed while connecting: don't leak the fresh source
                        src.close()
                        return None
                except Exception as exc:  # noqa: BLE001 - any failure to (re)connect is retried
                    if self._stop.is_set():
                        return None
                    self._drop_inner(str(exc) if isinstance(exc, SourceError) else _describe(exc))
                    continue
                if src.fps is not None:
                    self.fps = src.fps
            inner = self._inner
            if inner is None:
                continue
            try:
                frame = inner.read()
            except Exception as exc:  # noqa: BLE001
                if self._stop.is_set():
                    return None
                self._drop_inner(str(exc) if isinstance(exc, SourceError) else _describe(exc))
                continue
            if frame is None:
                if self._stop.is_set():
                    return None
                if self.reconnect_on_end:
                    self._drop_inner(f"{inner.uri}: stream ended")
                    continue
                self.state = "ended"
                with self._inner_lock:
                    self._inner = None
                inner.close()
                self._stop.set()
                return None
            self.state = "live"
            self._delay = self.backoff_initial
            frame.id = self._next_id
            self._next_id += 1
            frame.meta.setdefault("signal", True)
            frame.meta["reconnects"] = self.reconnects
            self._last_shape = frame.image.shape
            return frame
        return None
