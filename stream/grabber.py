"""The grabber: a thread that reads a source as fast as it delivers and keeps only the newest frame."""
from __future__ import annotations

import logging
import threading
import time

from sonomaly.stream.frame import Frame, now_ns
from sonomaly.stream.slot import LatestSlot

log = logging.getLogger("sonomaly.grabber")


class Grabber:
    """Reads ``source`` on its own thread and overwrites ``slot`` with each frame (latest frame wins).

    The source is expected to be a :class:`~sonomaly.stream.sources.ReconnectingSource` (it recovers from failures
    itself); any other exception is logged and retried after ``retry_s`` so the grabber never dies silently.
    """

    def __init__(self, source, slot: LatestSlot[Frame] | None = None, *, retry_s: float = 0.5) -> None:
        self.source = source
        self.slot: LatestSlot[Frame] = slot if slot is not None else LatestSlot()
        self.retry_s = retry_s
        self.frames_in = 0
        self.errors = 0
        self.last_error: str | None = None
        self.ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonomaly-grabber", daemon=True)

    @property
    def dropped(self) -> int:
        return self.slot.dropped

    def start(self) -> "Grabber":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # closing a broken source must not raise during shutdown
            log.exception("closing source failed")
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.source.open()
        except Exception as exc:  # ReconnectingSource.open never raises; a plain source may
            self._note_error(exc)
        while not self._stop.is_set():
            try:
                frame = self.source.read()
            except Exception as exc:
                self._note_error(exc)
                self._stop.wait(self.retry_s)
                continue
            if frame is None:
                if self._stop.is_set():
                    break
                self.ended = True
                log.info("source ended: %s", getattr(self.source, "uri", "?"))
                break
            t = now_ns()
            frame.stamp("grab", frame.t_capture_ns, t)
            self.frames_in += 1
            self.slot.put(frame)

    def _note_error(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("source error: %s", self.last_error)
        time.sleep(0)  # yield
