"""WHIP end to end: `sonomaly serve --whip` → Debian's simple-whip-server → Debian's Janus (videoroom) → a real
headless Chromium subscribing through Janus's HTTP API. Everything runs on loopback (media over this machine's own
address: ICE never uses loopback).

Needs `janus` (apt) and simple-whip-server unpacked with its Node dependencies under build/whip/app (`make janus`
does both; `make test` runs it when it can). Skips with the reason when they are missing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.janus, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
WHIP_APP = REPO / "build" / "whip" / "app"
JANUS = shutil.which("janus")
JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
ROOM = 1234


def _missing() -> str | None:
    if JANUS is None:
        return "Debian's janus is not installed (run `make janus`)"
    if not (JANUS_LIB / "plugins" / "libjanus_videoroom.so").exists():
        return f"janus's videoroom plugin is missing under {JANUS_LIB}"
    if shutil.which("node") is None:
        return "node is not installed (simple-whip-server needs it)"
    if not (WHIP_APP / "src" / "server.js").exists() or not (WHIP_APP / "node_modules" / "express").exists():
        return "simple-whip-server is not unpacked under build/whip/app (run `make janus`)"
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_ip() -> str:
    from aioice.ice import get_host_addresses

    addrs = [a for a in get_host_addresses(use_ipv4=True, use_ipv6=False) if not a.startswith("127.")]
    if not addrs:
        pytest.skip("no non-loopback IPv4 address on this machine (ICE needs one)")
    return addrs[0]


def _wait(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except OSError:
            pass
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _post(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        try:
            return json.loads(data)
        except ValueError:  # simple-whip-server answers /create with a plain "OK"
            return {"text": data.decode(errors="replace")}


def _start_janus(tmp: Path, http_port: int, ws_port: int, host_ip: str) -> subprocess.Popen:
    for sub in ("plugins", "transports", "events", "loggers"):
        (tmp / sub).mkdir()
    os.symlink(JANUS_LIB / "plugins" / "libjanus_videoroom.so", tmp / "plugins" / "libjanus_videoroom.so")
    for t in ("libjanus_http.so", "libjanus_websockets.so"):
        os.symlink(JANUS_LIB / "transports" / t, tmp / "transports" / t)
    (tmp / "janus.jcfg").write_text(f"""
general: {{
  configs_folder = "{tmp}"
  plugins_folder = "{tmp}/plugins"
  transports_folder = "{tmp}/transports"
  events_folder = "{tmp}/events"
  loggers_folder = "{tmp}/loggers"
  debug_level = 4
  session_timeout = 60
}}
media: {{ rtp_port_range = "20000-40000" }}
nat: {{
  ice_enforce_list = "{host_ip}"
  ignore_mdns = true
}}
""")
    (tmp / "janus.transport.http.jcfg").write_text(f"""
general: {{ json = "indented" base_path = "/janus" http = true port = {http_port} ip = "127.0.0.1" https = false }}
admin: {{ admin_http = false }}
""")
    (tmp / "janus.transport.websockets.jcfg").write_text(f"""
general: {{ json = "indented" ws = true ws_port = {ws_port} ws_ip = "127.0.0.1" wss = false }}
admin: {{ admin_ws = false }}
""")
    (tmp / "janus.plugin.videoroom.jcfg").write_text(f"""
general: {{ }}
room-{ROOM}: {{
  description = "Sonomaly"
  publishers = 4
  bitrate = 6000000
  fir_freq = 10
  videocodec = "vp8,h264"
}}
""")
    return subprocess.Popen([JANUS, "-F", str(tmp), "-C", str(tmp / "janus.jcfg")], stdout=open(tmp / "janus.log", "w"),
                            stderr=subprocess.STDOUT)


def _start_whip_server(tmp: Path, port: int, ws_port: int) -> subprocess.Popen:
    src = tmp / "whip" / "src"
    src.mkdir(parents=True)
    for f in ("server.js", "whip-janus.js"):
        text = (WHIP_APP / "src" / f).read_text()
        if f == "server.js":  # bind to loopback only (upstream listens on every interface)
            text = text.replace("http.listen(config.port, function", "http.listen(config.port, '127.0.0.1', function")
        (src / f).write_text(text)
    (src / "config.js").write_text(
        "module.exports = { janus: { address: 'ws://127.0.0.1:%d' }, port: %d, rest: '/whip', allowTrickle: true,"
        " strictETags: false, iceServers: [] };\n" % (ws_port, port))
    env = {**os.environ, "NODE_PATH": str(WHIP_APP / "node_modules")}
    return subprocess.Popen(["node", str(src / "server.js")], cwd=tmp / "whip", env=env,
                            stdout=open(tmp / "whip.log", "w"), stderr=subprocess.STDOUT)


SUBSCRIBE_JS = """async (offer) => {
  const pc = new RTCPeerConnection({iceServers: []});
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  window.sub = {frames: 0, width: 0, height: 0, state: 'new'};
  pc.ontrack = (ev) => { video.srcObject = ev.streams[0] || new MediaStream([ev.track]); };
  pc.onconnectionstatechange = () => { window.sub.state = pc.connectionState; };
  const onFrame = (now, md) => { window.sub.frames = md.presentedFrames; window.sub.width = md.width;
                                 window.sub.height = md.height; video.requestVideoFrameCallback(onFrame); };
  video.requestVideoFrameCallback(onFrame);
  await pc.setRemoteDescription(offer);
  await pc.setLocalDescription(await pc.createAnswer());
  if (pc.iceGatheringState !== 'complete') {
    await new Promise(r => { const t = setTimeout(r, 3000);
      pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') { clearTimeout(t); r(); } }); });
  }
  window.subPc = pc;
  return {type: 'answer', sdp: pc.localDescription.sdp};
}"""


def test_whip_publish_through_janus_to_chromium(serve, browser, demo_clip, tmp_path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    host_ip = _host_ip()
    http_port, ws_port, whip_port = _port(), _port(), _port()
    procs = [_start_janus(tmp_path, http_port, ws_port, host_ip)]
    janus = f"http://127.0.0.1:{http_port}/janus"
    page = None
    try:
        _wait(lambda: urllib.request.urlopen(janus + "/info", timeout=1).status == 200, 15, "janus")
        procs.append(_start_whip_server(tmp_path, whip_port, ws_port))
        whip = f"http://127.0.0.1:{whip_port}/whip"
        _wait(lambda: _post(whip + "/create", {"id": "sonomaly", "room": ROOM, "token": "whip-secret"}) is not None,
              15, "simple-whip-server")

        server = serve("--source", str(demo_clip), "--loop", "--whip", whip + "/endpoint/sonomaly",
                       "--whip-token", "whip-secret")
        _wait(lambda: server.health().get("whip", {}).get("state") == "publishing", 20, "the WHIP session")

        # subscribe through Janus's HTTP API (Janus 1.1.2 has no WHEP)
        t = iter(range(1000))
        session = _post(janus, {"janus": "create", "transaction": f"t{next(t)}"})["data"]["id"]
        handle = _post(f"{janus}/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom",
                                               "transaction": f"t{next(t)}"})["data"]["id"]
        hp = f"{janus}/{session}/{handle}"

        def publisher():
            r = _post(hp, {"janus": "message", "transaction": f"t{next(t)}",
                           "body": {"request": "listparticipants", "room": ROOM}})
            return [p["id"] for p in r["plugindata"]["data"]["participants"] if p.get("publisher")]

        feed = _wait(publisher, 10, "the publisher in the room")[0]
        _post(hp, {"janus": "message", "transaction": f"t{next(t)}",
                   "body": {"request": "join", "ptype": "subscriber", "room": ROOM, "streams": [{"feed": feed}]}})

        def offer():
            with urllib.request.urlopen(f"{janus}/{session}?maxev=1", timeout=10) as r:
                ev = json.loads(r.read())
            return ev.get("jsep") if ev.get("jsep", {}).get("type") == "offer" else None

        jsep = _wait(offer, 15, "Janus's subscriber offer")
        page = browser.new_page()
        page.goto("about:blank")
        answer = page.evaluate(SUBSCRIBE_JS, jsep)
        _post(hp, {"janus": "message", "transaction": f"t{next(t)}", "body": {"request": "start"}, "jsep": answer})
        page.wait_for_function("window.sub.frames > 5", timeout=20_000)
        f0 = page.evaluate("window.sub.frames")
        time.sleep(3.0)
        sub = page.evaluate("window.sub")
        fps = (sub["frames"] - f0) / 3.0
        assert (sub["width"], sub["height"]) == (450, 450)
        assert fps > 20, f"Chromium presented {fps:.1f} fps through Janus"
        h = server.health()
        assert h["whip"]["sessions"] == 1 and h["encoder"]["frames_encoded"] > 0
        _post(f"{janus}/{session}", {"janus": "destroy", "transaction": "bye"})
    finally:
        if page is not None:
            page.close()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
