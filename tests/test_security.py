"""Remote viewing security: token denials for viewers and control, the loopback exemption, the signalling rate
limit, closed CORS by default, and TLS through `sonomaly serve --ssl-certfile/--ssl-keyfile`."""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from fastapi.testclient import TestClient

from sonomaly.stream.app import ServerOptions, create_app
from sonomaly.stream.pipeline import Pipeline
from sonomaly.stream.security import SecurityConfig
from sonomaly.stream.sources import ReconnectingSource, open_source
from sonomaly.tools.client import make_offer

from conftest import arun

V, C = "viewer-secret", "control-secret"


async def _offer_sdp() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        return (await make_offer(pc)).sdp
    finally:
        await pc.close()


@pytest.fixture(scope="module")
def sdp() -> str:
    return arun(_offer_sdp())


def _app(demo_clip, tmp_path, **security):
    pipeline = Pipeline(ReconnectingSource(lambda: open_source(str(demo_clip), loop=True)), None)
    return create_app(pipeline, options=ServerOptions(security=SecurityConfig(**security),
                                                      recordings_dir=tmp_path / "rec",
                                                      dataset_dir=tmp_path / "fb"))


@pytest.fixture(scope="module")
def secured(demo_clip, tmp_path_factory):
    app = _app(demo_clip, tmp_path_factory.mktemp("sec"), viewer_token=V, control_token=C, rate_per_s=0.5,
               rate_burst=4)
    with TestClient(app) as remote:  # runs the app's lifespan (starts the pipeline) once
        yield remote, TestClient(app, client=("127.0.0.1", 50123))  # the same app, seen from loopback


def _bearer(t):
    return {"Authorization": f"Bearer {t}"}


def test_viewer_token_denials(secured, sdp):
    remote, _ = secured
    body = json.dumps({"sdp": sdp, "type": "offer"})
    assert remote.post("/offer", content=body).status_code == 401
    assert remote.post("/offer", content=body, headers=_bearer("wrong")).status_code == 403
    assert remote.post("/whep", content=sdp, headers={"Content-Type": "application/sdp"}).status_code == 401
    assert remote.get("/api/records").status_code == 401
    assert remote.post("/api/feedback", json={"kind": "false_alarm"}).status_code == 401
    r = remote.post("/offer", content=body, headers=_bearer(V))
    assert r.status_code == 200 and r.json()["type"] == "answer"
    assert remote.get(f"/api/records?token={V}").status_code == 200  # ?token= works too (the viewer page link)


def test_control_token_denials(secured):
    remote, _ = secured
    for method, path in (("get", "/api/control"), ("patch", "/api/control/settings"), ("get", "/metrics"),
                         ("post", "/api/recording/start"), ("get", "/api/snapshot.png"),
                         ("put", "/api/control/model")):
        kwargs = {"json": {}} if method in ("patch", "put", "post") else {}
        assert getattr(remote, method)(path, **kwargs).status_code == 401, path
        assert getattr(remote, method)(path, headers=_bearer(V), **kwargs).status_code == 403, path
    assert remote.get("/api/control", headers=_bearer(C)).status_code == 200
    assert remote.get("/metrics", headers=_bearer(C)).status_code == 200
    # public: the page itself and health (no patient data, no control)
    assert remote.get("/").status_code == 200 and remote.get("/health").status_code == 200


def test_loopback_is_exempt(secured):
    _, local = secured
    assert local.get("/api/control").status_code == 200
    assert local.get("/api/records").status_code == 200


def test_control_without_a_token_is_loopback_only(demo_clip, tmp_path):
    app = _app(demo_clip, tmp_path)
    with TestClient(app) as remote:
        local = TestClient(app, client=("::1", 5))
        assert remote.get("/api/control").status_code == 403
        assert local.get("/api/control").status_code == 200
        assert remote.get("/api/records").status_code == 200  # watching stays open without a viewer token


def test_signalling_rate_limit(demo_clip, tmp_path):
    app = _app(demo_clip, tmp_path, viewer_token=V, rate_per_s=0.5, rate_burst=4)
    remote, local = TestClient(app), TestClient(app, client=("127.0.0.1", 50123))  # no lifespan: signalling only
    codes = [remote.post("/offer", content=b"{}", headers=_bearer(V)).status_code for _ in range(8)]
    assert codes[:2] == [400, 400] and codes[-1] == 429, codes
    r = remote.post("/whep", content=b"v=0", headers={**_bearer(V), "Content-Type": "application/sdp"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert local.post("/offer", content=b"{}").status_code == 400  # the local display is not limited


def test_cors_closed_by_default_and_opened_by_config(demo_clip, tmp_path):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with TestClient(_app(demo_clip, tmp_path)) as c:
        r = c.options("/offer", headers=pre)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://evil.example"}).headers
    with TestClient(_app(demo_clip, tmp_path, cors_origins=["https://pacs.hospital.example"])) as c:
        ok = c.options("/offer", headers={**pre, "Origin": "https://pacs.hospital.example"})
        assert ok.headers.get("access-control-allow-origin") == "https://pacs.hospital.example"
        assert "access-control-allow-origin" not in c.options("/offer", headers=pre).headers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_via_serve(demo_clip, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sonomaly.tools", "serve", "--source", str(demo_clip), "--loop",
                     "--port", str(port), "--log-level", "warning", "--ssl-certfile", str(cert),
                     "--ssl-keyfile", str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        deadline, health = time.monotonic() + 30, None
        while time.monotonic() < deadline and health is None:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert health is not None and "frames_out" in health
        with pytest.raises(OSError):  # plain http on the TLS port is refused
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
    finally:
        proc.terminate()
        proc.wait(10)


def test_viewer_cap_is_a_503(demo_clip, tmp_path, sdp):
    pipeline = Pipeline(ReconnectingSource(lambda: open_source(str(demo_clip), loop=True)), None)
    app = create_app(pipeline, options=ServerOptions(max_viewers=1, recordings_dir=tmp_path / "r",
                                                     dataset_dir=tmp_path / "f"))
    with TestClient(app) as c:
        body = json.dumps({"sdp": sdp, "type": "offer"})
        assert c.post("/offer", content=body).status_code == 200
        r = c.post("/offer", content=body)
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert c.get("/health").json()["viewers"] == 1
