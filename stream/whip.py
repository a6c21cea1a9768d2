"""WHIP publisher (RFC 9725): push the composed stream once to any WHIP ingest (an SFU such as Janus behind
simple-whip-server), which then carries the remote viewers.

``POST <url>`` with ``Content-Type: application/sdp`` (the offer, with all host candidates: no trickle) and
``Authorization: Bearer <token>`` when one is given → ``201 Created`` with the answer and a ``Location`` (the session
resource); ``DELETE`` on the Location ends the session. The publisher sends the shared encoder's packets (so
uploading costs no extra encode) and reconnects with exponential backoff when the session fails or the ingest is not
reachable.
"""
from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from sonomaly.stream.encoder import codec_preferences

log = logging.getLogger("sonomaly.whip")


class WhipError(RuntimeError):
    pass


def _http(method: str, url: str, body: bytes | None, token: str | None, timeout: float = 10.0):
    headers = {"Content-Type": "application/sdp"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class WhipPublisher:
    def __init__(self, url: str, webrtc, *, token: str | None = None, backoff_max_s: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.webrtc = webrtc
        self.backoff_max_s = backoff_max_s
        self.pc: RTCPeerConnection | None = None
        self.resource: str | None = None
        self.state = "idle"
        self.last_error: str | None = None
        self.sessions = 0
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.5
        while not self._closing:
            done = asyncio.Event()
            try:
                await self._connect(done)
                backoff = 0.5
                await done.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("WHIP publish to %s failed: %s", self.url, self.last_error)
            await self._teardown()
            if self._closing:
                break
            self.state = "reconnecting"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _connect(self, done: asyncio.Event) -> None:
        self.state = "connecting"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.webrtc.ice_servers)))
        self.pc = pc
        track = self.webrtc.make_track()
        transceiver = pc.addTransceiver(track, direction="sendonly")
        if self.webrtc.encoder is not None:
            transceiver.setCodecPreferences(codec_preferences(self.webrtc.encoder.codec_name))
            self.webrtc.attach_sender(transceiver.sender, track)

        @pc.on("connectionstatechange")
        def _state() -> None:
            log.info("WHIP session: %s", pc.connectionState)
            if pc.connectionState == "connected":
                self.state = "publishing"
            if pc.connectionState in ("failed", "closed"):
                done.set()

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers all candidates here: no trickle
        loop = asyncio.get_running_loop()
        status, headers, body = await loop.run_in_executor(
            None, _http, "POST", self.url, pc.localDescription.sdp.encode(), self.token)
        if status != 201:
            raise WhipError(f"ingest answered {status}: {body[:200].decode(errors='replace')}")
        location = next((v for k, v in headers.items() if k.lower() == "location"), None)
        if not location:
            raise WhipError("ingest gave no Location")
        self.resource = urllib.parse.urljoin(self.url, location)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
        self.sessions += 1

    async def _teardown(self) -> None:
        resource, self.resource = self.resource, None
        if resource:
            try:
                await asyncio.get_running_loop().run_in_executor(None, _http, "DELETE", resource, None, self.token,
                                                                 3.0)
            except Exception as exc:
                log.debug("WHIP DELETE failed: %s", exc)
        if self.pc is not None:
            pc, self.pc = self.pc, None
            await pc.close()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._teardown()
        self.state = "closed"

    def stats(self) -> dict:
        return {"url": self.url, "state": self.state, "sessions": self.sessions, "last_error": self.last_error,
                "resource": self.resource}
