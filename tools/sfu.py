"""A local SFU for scale-out: Debian's Janus (videoroom) behind Debian's simple-whip-server, on loopback.

``sonomaly serve --whip`` publishes the composed stream once; Janus, a C SFU, forwards its packets to every
subscriber. Used by the WHIP end-to-end test and by ``sonomaly latency --via janus`` (the viewers subscribe through
Janus instead of connecting to the server), so both start the SFU the same way.

Needs ``janus`` (apt) and simple-whip-server unpacked with its Node dependencies under ``build/whip/app``
(``make janus`` installs both). :func:`missing` says what is absent.

Janus 1.1.2 has no WHEP: a subscriber goes through its HTTP API (``create`` → ``attach`` → ``join`` as subscriber →
the offer on the session's long poll → ``start`` with the answer), which :meth:`Janus.subscribe` does.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
WHIP_APP = REPO / "build" / "whip" / "app"
JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
ROOM = 1234
WHIP_ID = "sonomaly"


class SFUError(RuntimeError):
    pass


def missing() -> str | None:
    """Why the local SFU cannot run here, or ``None``."""
    if shutil.which("janus") is None:
        return "Debian's janus is not installed (run `make janus`)"
    if not (JANUS_LIB / "plugins" / "libjanus_videoroom.so").exists():
        return f"janus's videoroom plugin is missing under {JANUS_LIB}"
    if shutil.which("node") is None:
        return "node is not installed (simple-whip-server needs it)"
    if not (WHIP_APP / "src" / "server.js").exists() or not (WHIP_APP / "node_modules" / "express").exists():
        return "simple-whip-server is not unpacked under build/whip/app (run `make janus`)"
    try:
        host_ip()
    except SFUError as exc:
        return str(exc)
    return None


def host_ip() -> str:
    """This machine's first non-loopback IPv4 address (ICE never uses loopback; Janus is held to this one)."""
    from aioice.ice import get_host_addresses

    addrs = [a for a in get_host_addresses(use_ipv4=True, use_ipv6=False) if not a.startswith("127.")]
    if not addrs:
        raise SFUError("no non-loopback IPv4 address on this machine (ICE needs one)")
    return addrs[0]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
    try:
        return json.loads(data)
    except ValueError:  # simple-whip-server answers /create with a plain "OK"
        return {"text": data.decode(errors="replace")}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1):
    """``pred()``'s first truthy value within ``timeout`` s (connection errors count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except OSError:
            pass
        time.sleep(step)
    raise SFUError(f"timed out waiting for {what}")


@dataclass
class Subscription:
    """One subscriber's Janus session and videoroom handle."""

    session: int
    handle: int
    offer: dict


class JanusAPI:
    """A client of a running Janus's HTTP API (``api``: its ``…/janus`` URL) for videoroom subscribers. Sessions it
    opens are kept alive by a thread (``keepalive`` every 15 s, from :meth:`keep_alive` on), so runs longer than
    Janus's session timeout work, and :meth:`close` ends every one of them."""

    def __init__(self, api: str) -> None:
        self.api = api
        self._tx = itertools.count()
        self._sessions: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    def keep_alive(self) -> None:
        if self._keepalive is None:
            self._keepalive = threading.Thread(target=self._keep, name="sonomaly-janus-keepalive", daemon=True)
            self._keepalive.start()

    def close(self) -> None:
        self._stop.set()
        for s in list(self._sessions):
            self.destroy(s)

    @property
    def sessions(self) -> set[int]:
        with self._lock:
            return set(self._sessions)

    # ------------------------------------------------------------------------------------------------ the API
    def request(self, path: str, body: dict, timeout: float = 10.0) -> dict:
        body = {**body, "transaction": f"t{next(self._tx)}"}
        out = post_json(f"{self.api}{path}", body, timeout)
        if out.get("janus") == "error":
            raise SFUError(f"janus {body.get('janus')} failed: {out.get('error')}")
        return out

    def _message(self, session: int, handle: int, body: dict, jsep: dict | None = None) -> dict:
        msg: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            msg["jsep"] = jsep
        return self.request(f"/{session}/{handle}", msg)

    def publishers(self) -> list[int]:
        """Ids of the room's publishers (a throw-away session)."""
        session = self.request("", {"janus": "create"})["data"]["id"]
        try:
            handle = self.request(f"/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom"})["data"]["id"]
            r = self._message(session, handle, {"request": "listparticipants", "room": ROOM})
            return [p["id"] for p in r["plugindata"]["data"]["participants"] if p.get("publisher")]
        finally:
            self.destroy(session)

    def subscribe(self, timeout: float = 15.0) -> Subscription:
        """Join the room as a subscriber of its publisher; returns the session with Janus's SDP offer."""
        feed = wait_for(self.publishers, timeout, "a publisher in the Janus room")[0]
        session = self.request("", {"janus": "create"})["data"]["id"]
        with self._lock:
            self._sessions.add(session)
        handle = self.request(f"/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom"})["data"]["id"]
        self._message(session, handle, {"request": "join", "ptype": "subscriber", "room": ROOM,
                                        "streams": [{"feed": feed}]})

        def offer():
            with urllib.request.urlopen(f"{self.api}/{session}?maxev=1", timeout=10) as r:
                ev = json.loads(r.read())
            jsep = ev.get("jsep") or {}
            return jsep if jsep.get("type") == "offer" else None

        return Subscription(session, handle, wait_for(offer, timeout, "Janus's subscriber offer"))

    def start_subscription(self, sub: Subscription, answer: dict) -> None:
        """Hand the subscriber's answer to Janus: media starts flowing."""
        self._message(sub.session, sub.handle, {"request": "start"}, jsep=answer)

    def destroy(self, session: int) -> None:
        with self._lock:
            self._sessions.discard(session)
        try:
            post_json(f"{self.api}/{session}", {"janus": "destroy", "transaction": "bye"}, timeout=3)
        except (OSError, ValueError):
            pass

    def _keep(self) -> None:
        while not self._stop.wait(15.0):
            with self._lock:
                sessions = list(self._sessions)
            for s in sessions:
                try:
                    post_json(f"{self.api}/{s}", {"janus": "keepalive", "transaction": "ka"}, timeout=3)
                except (OSError, ValueError):
                    pass


class Janus(JanusAPI):
    """Janus + simple-whip-server in a temporary folder on free loopback ports, and a client of its API; a context
    manager.

    ``whip_url`` / ``token``: what ``sonomaly serve --whip … --whip-token …`` publishes to. ``threads``: the room's
    relay helper threads (Janus's ``threads`` room option; 0 = the publisher's own thread relays to everyone).
    """

    def __init__(self, *, threads: int = 0, token: str = "whip-secret", bitrate: int = 6_000_000,
                 debug_level: int = 4, start_timeout: float = 15.0) -> None:
        reason = missing()
        if reason:
            raise SFUError(reason)
        self.ip = host_ip()
        self.threads = threads
        self.token = token
        self.bitrate = bitrate
        self.debug_level = debug_level
        self.start_timeout = start_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="sonomaly-janus-")
        self.dir = Path(self._tmp.name)
        self.http_port, self.ws_port, self.whip_port = _port(), _port(), _port()
        super().__init__(f"http://127.0.0.1:{self.http_port}/janus")
        self.whip_base = f"http://127.0.0.1:{self.whip_port}/whip"
        self.whip_url = f"{self.whip_base}/endpoint/{WHIP_ID}"
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Janus":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.procs.append(self._start_janus())
        wait_for(lambda: self._alive() and urllib.request.urlopen(self.api + "/info", timeout=1).status == 200,
                 self.start_timeout, f"janus to answer (log: {self.log('janus')[-500:]!r})")
        self.procs.append(self._start_whip_server())
        wait_for(lambda: self._alive() and post_json(self.whip_base + "/create",
                                                     {"id": WHIP_ID, "room": ROOM, "token": self.token}),
                 self.start_timeout, f"simple-whip-server (log: {self.log('whip')[-500:]!r})")
        self.keep_alive()

    def _alive(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise SFUError(f"{p.args[0]} exited with {p.returncode}: {self.log(Path(p.args[0]).name)[-800:]}")
        return True

    def stop(self) -> None:
        self.close()
        self._end_processes()
        self._tmp.cleanup()

    def _end_processes(self, sig: int = signal.SIGTERM, janus_first: bool = False) -> None:
        for p in (self.procs if janus_first else reversed(self.procs)):
            if p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()

    def crash(self) -> None:
        """Kill Janus, then the WHIP server (SIGKILL: no goodbye to anyone), keeping their ports and folder. Janus goes
        first: killed after the WHIP server, it would hang up its publisher when the server's WebSocket closes (a DTLS
        close that tells the publisher at once), which a media server that really dies never sends."""
        with self._lock:
            self._sessions.clear()
        self._end_processes(signal.SIGKILL, janus_first=True)

    def restart(self) -> None:
        """Start Janus and the WHIP server again on the same ports (after :meth:`crash`), the endpoint created anew."""
        self._end_processes()
        self.start()

    def log(self, name: str) -> str:
        f = self.dir / f"{'whip' if name in ('whip', 'node') else 'janus'}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def _start_janus(self) -> subprocess.Popen:
        tmp = self.dir
        for sub in ("plugins", "transports", "events", "loggers"):
            (tmp / sub).mkdir(exist_ok=True)
        links = [(JANUS_LIB / "plugins" / "libjanus_videoroom.so", tmp / "plugins" / "libjanus_videoroom.so")]
        links += [(JANUS_LIB / "transports" / t, tmp / "transports" / t)
                  for t in ("libjanus_http.so", "libjanus_websockets.so")]
        for target, link in links:
            if not link.exists():
                os.symlink(target, link)
        (tmp / "janus.jcfg").write_text(f"""
general: {{
  configs_folder = "{tmp}"
  plugins_folder = "{tmp}/plugins"
  transports_folder = "{tmp}/transports"
  events_folder = "{tmp}/events"
  loggers_folder = "{tmp}/loggers"
  debug_level = {self.debug_level}
  session_timeout = 60
}}
media: {{ rtp_port_range = "20000-40000" }}
nat: {{
  ice_enforce_list = "{self.ip}"
  ignore_mdns = true
}}
""")
        (tmp / "janus.transport.http.jcfg").write_text(f"""
general: {{ json = "indented" base_path = "/janus" http = true port = {self.http_port} ip = "127.0.0.1" https = false }}
admin: {{ admin_http = false }}
""")
        (tmp / "janus.transport.websockets.jcfg").write_text(f"""
general: {{ json = "indented" ws = true ws_port = {self.ws_port} ws_ip = "127.0.0.1" wss = false }}
admin: {{ admin_ws = false }}
""")
        (tmp / "janus.plugin.videoroom.jcfg").write_text(f"""
general: {{ }}
room-{ROOM}: {{
  description = "Sonomaly"
  publishers = 4
  bitrate = {self.bitrate}
  fir_freq = 10
  videocodec = "vp8,h264"
  playoutdelay_ext = true
  threads = {self.threads}
}}
""")
        return subprocess.Popen(["janus", "-F", str(tmp), "-C", str(tmp / "janus.jcfg")],
                                stdout=open(tmp / "janus.log", "a"), stderr=subprocess.STDOUT)

    def _start_whip_server(self) -> subprocess.Popen:
        src = self.dir / "whip" / "src"
        src.mkdir(parents=True, exist_ok=True)
        for f in ("server.js", "whip-janus.js"):
            text = (WHIP_APP / "src" / f).read_text()
            if f == "server.js":  # bind to loopback only (upstream listens on every interface)
                text = text.replace("http.listen(config.port, function",
                                    "http.listen(config.port, '127.0.0.1', function")
            (src / f).write_text(text)
        (src / "config.js").write_text(
            "module.exports = { janus: { address: 'ws://127.0.0.1:%d' }, port: %d, rest: '/whip', "
            "allowTrickle: true, strictETags: false, iceServers: [] };\n" % (self.ws_port, self.whip_port))
        env = {**os.environ, "NODE_PATH": str(WHIP_APP / "node_modules")}
        return subprocess.Popen(["node", str(src / "server.js")], cwd=self.dir / "whip", env=env,
                                stdout=open(self.dir / "whip.log", "a"), stderr=subprocess.STDOUT)

    @staticmethod
    def version() -> str | None:
        """``janus --version``'s version line (e.g. "1102 (1.1.2)")."""
        try:
            out = subprocess.run(["janus", "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        line = next((ln for ln in out.splitlines() if ln.startswith("Janus version:")), "")
        return line.split(":", 1)[1].strip() or None if line else None

