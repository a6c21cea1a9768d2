"""The inference engine in a process of its own: a crash or a hang inside the inference library costs heatmaps, never
the video.

The pipeline already keeps the video going when an engine *raises*, stalls for a while or returns NaN
(docs/RELIABILITY.md). What it cannot survive in-process is native failure: a segmentation fault or an ``abort()``
inside ONNX Runtime, TensorRT or a CUDA driver ends the whole server, the raw scan with it; a call that never returns
leaves the AI worker stuck for good. :class:`IsolatedBackend` runs the engine (:func:`sonomaly.engines.load`, the same
backends and options) in a child process (a fresh interpreter, ``python -m sonomaly.engines.isolated``) and talks
to it over a socket pair:

* ``infer`` sends the preprocessed tensor and waits at most ``timeout_s`` for the map and score. The child computes
  exactly what the same backend computes in-process (tests compare them bit for bit).
* The child died (a signal, an exit) → :class:`EngineCrashed` naming the signal; it did not answer in time → the
  child is killed and :class:`EngineCrashed` says so. The pipeline shows AI OFF with that reason while the video goes
  on; the next call starts a fresh child (model load and one warm-up inference), after a back-off that doubles from
  ``restart_backoff_s`` up to ``restart_backoff_max_s`` while the crashes go on, so a model that kills its process
  on every frame does not turn into a restart loop that eats the CPU.
* An error the engine raises comes back as a ``RuntimeError`` with its type and message; the child lives on.
* The child ignores SIGINT (the server's Ctrl-C stops it through the socket) and exits when the socket closes: the
  server stopped it, or went away, even by SIGKILL.

Cost: one socket round trip per frame (the tensor out, the map back), measured in docs/ENGINES.md ("A process of its
own"). ``sonomaly serve`` uses it by default (``--engine-process off`` keeps the engine in the server's process).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BackendUnavailable

log = logging.getLogger("sonomaly.engine_process")


class EngineCrashed(RuntimeError):
    """The engine's process died or stopped answering (the pipeline shows AI OFF with this message)."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _child(conn) -> None:
    """The engine process: load, warm up, then answer ``("infer", x)`` until ``("stop",)`` or the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model_dir, backend, precision, opts, nice = conn.recv()
        if nice > 0:
            os.nice(min(19, int(nice)))  # the server's --ai-nice: the inference is the AI worker's heaviest part
        from sonomaly.engines import load

        engine = load(model_dir, backend=backend, precision=precision, **opts)
        card = engine.card
        engine.infer(np.zeros((1, card.input.channels, *card.input_size), np.float32))  # the first call is slow
    except BaseException as exc:  # noqa: BLE001 - the parent needs the reason, whatever it is
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"backend": engine.backend, "backend_reason": engine.backend_reason,
                         "precision": engine.precision, "pid": os.getpid()}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if msg[0] != "infer":
            return
        try:
            amap, score = engine.infer(msg[1])
            conn.send(("ok", amap, score))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class IsolatedBackend:
    """A backend whose engine runs in a child process (see the module docstring). Thread-safe: one call at a time."""

    isolated = True

    def __init__(self, model_dir: str | Path, backend: str = "auto", precision: str | None = None, *,
                 timeout_s: float = 5.0, start_timeout_s: float = 600.0, restart_backoff_s: float = 1.0,
                 restart_backoff_max_s: float = 30.0, nice: int = 0, **opts: Any) -> None:
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError("timeout_s and start_timeout_s must be > 0")
        self.model_dir = str(model_dir)
        self.backend = backend
        self.precision = precision
        self.opts = opts
        self.nice = int(nice)
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.restart_backoff_s = float(restart_backoff_s)
        self.restart_backoff_max_s = float(restart_backoff_max_s)
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._closed = False
        self._backoff = self.restart_backoff_s
        self._restart_at = 0.0
        # statistics (/health)
        self.starts = 0
        self.crashes = 0
        self.timeouts = 0
        self.last_failure: str | None = None
        with self._lock:
            self._start()  # a model that cannot load fails here, as an in-process load would

    # -------------------------------------------------------------------------------------------------- process
    def _start(self) -> None:
        # a fresh interpreter (not fork: no copy of the server's threads, locks or CUDA state), its end of a socket
        # pair as a multiprocessing Connection
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "sonomaly.engines.isolated", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send((self.model_dir, self.backend, self.precision, self.opts, self.nice))
            if not conn.poll(self.start_timeout_s):
                raise EngineCrashed(f"the engine process did not load the model within {self.start_timeout_s:.0f} s")
            msg = conn.recv()
        except (EOFError, OSError):
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
            msg = ("error", f"the engine process {_describe_exit(proc.poll())} while loading")
        except EngineCrashed:
            self._kill(proc, conn)
            raise
        if msg[0] != "ready":
            self._kill(proc, conn)
            raise BackendUnavailable(msg[1])
        self._proc, self._conn, self.info = proc, conn, msg[1]
        self.starts += 1

    def _kill(self, proc=None, conn=None) -> None:
        proc = proc if proc is not None else self._proc
        conn = conn if conn is not None else self._conn
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                log.error("the engine process %s did not end after SIGKILL", proc.pid)
        if proc is self._proc:
            self._proc, self._conn = None, None

    def _failed(self, what: str) -> EngineCrashed:
        self.crashes += 1
        self.last_failure = what
        self._kill()
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.restart_backoff_max_s)
        log.warning("%s; a new engine process starts in %.1f s at the earliest", what,
                    self._restart_at - time.monotonic())
        return EngineCrashed(what)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -------------------------------------------------------------------------------------------------- calls
    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._closed:
                raise EngineCrashed("the engine process was closed")
            if self._proc is None:
                wait = self._restart_at - time.monotonic()
                if wait > 0:
                    raise EngineCrashed(f"the engine process failed ({self.last_failure}); next start in {wait:.1f} s")
                try:
                    self._start()  # model load + warm-up: the AI stays off meanwhile, the video does not wait
                except Exception as exc:
                    raise self._failed(f"a new engine process failed to start: {exc}") from None
            try:
                self._conn.send(("infer", np.ascontiguousarray(x, np.float32)))
                if not self._conn.poll(self.timeout_s):
                    self.timeouts += 1
                    raise self._failed(f"the engine process did not answer within {self.timeout_s:g} s (killed)")
                msg = self._conn.recv()
            except (EOFError, OSError):
                try:
                    self._proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
                raise self._failed(f"the engine process {_describe_exit(self._proc.poll())}") from None
            if msg[0] == "error":
                raise RuntimeError(msg[1])
            self._backoff = self.restart_backoff_s  # a good answer: the next crash backs off from the start again
            return msg[1], msg[2]

    def close(self) -> None:
        """Stop the child (after a call in flight, if any)."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.send(("stop",))
                except OSError:
                    pass
            if self._proc is not None:
                try:
                    self._proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "starts": self.starts, "crashes": self.crashes, "timeouts": self.timeouts,
                "last_failure": self.last_failure, "timeout_s": self.timeout_s}


if __name__ == "__main__":  # the engine process (started by IsolatedBackend._start with its end of the socket pair)
    _child(Connection(int(sys.argv[1])))
