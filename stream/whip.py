"""WHIP publisher (RFC 9725): push the composed stream once to any WHIP ingest (an SFU such as Janus behind
simple-whip-server), which then carries the remote viewers.

``POST <url>`` with ``Content-Type: application/sdp`` (the offer, with all host candidates: no trickle) and
``Authorization: Bearer <token>`` when one is given → ``201 Created`` with the answer and a ``Location`` (the session
resource); ``DELETE`` on the Location ends the session. The publisher sends the shared encoder's packets (so
uploading costs no extra encode) and reconnects with exponential backoff when the session fails or the ingest is not
reachable.

An ingest that dies without a goodbye (SIGKILL, power, a pulled cable) sends no DTLS close and no ICE error; aiortc
would notice only when ICE consent expires (RFC 7675: 6 failed checks 4-6 s apart, 24-36 s). So the publisher watches
the RTCP the ingest sends about its stream (receiver reports: Janus every 1.0 s, browsers and aiortc about every
second; REMB, NACK, PLI): a silence of ``silence_s`` (default 3 s) or three of the longest gap seen in the session,
whichever is longer (at least 10 s until three packets have come), ends the session and starts the reconnect
(:class:`ReportWatch`). The silence counts from the first packet, or from the connection once the ingest has sent RTCP
in an earlier session; an ingest that never sends any is left to ICE consent.
"""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from sonomaly.stream.encoder import codec_preferences
from sonomaly.stream.webrtc import on_rtcp

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
    def __init__(self, url: str, webrtc, *, token: str | None = None, backoff_max_s: float = 10.0,
                 silence_s: float = 3.0, watch_every_s: float = 0.25) -> None:
        self.url = url
        self.token = token
        self.webrtc = webrtc
        self.backoff_max_s = backoff_max_s
        self.silence_s = silence_s
        self.watch_every_s = watch_every_s
        self.reports = ReportWatch(silence_s)  # this session's
        self.silences = 0  # sessions ended because the ingest fell silent
        self.ingest_reports = False  # has the ingest ever sent RTCP (in any session)?
        self._rtcp_packets = 0
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
                await self._watch(done)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("WHIP publish to %s failed: %s", self.url, self.last_error)
            if self._closing:
                break
            self.state = "reconnecting"  # at once: the teardown's DELETE may wait for a dead ingest
            await self._teardown()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _watch(self, done: asyncio.Event) -> None:
        """Until the session ends: every ``watch_every_s``, look at when the ingest last sent RTCP, and end the
        session when it has fallen silent (see the module's docstring)."""
        started = False
        last_tick = time.monotonic()
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), self.watch_every_s)
                return
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            late, last_tick = now - last_tick > 4 * self.watch_every_s, now
            pc = self.pc
            if late or pc is None or pc.connectionState != "connected":
                continue  # after a stalled loop, let the queued packets be read before judging the silence
            if not started:
                started = True
                if self.ingest_reports:  # it sent RTCP in an earlier session: count from the connection
                    self.reports.start(now)
            silent = self.reports.update(self._rtcp_packets, now)
            if silent is not None:
                self.silences += 1
                self.last_error = (f"the ingest fell silent: no RTCP for {silent:.1f} s (limit "
                                   f"{self.reports.limit_s:.1f} s; the longest gap before was "
                                   f"{self.reports.longest_s:.1f} s)")
                log.warning("WHIP publish to %s: %s", self.url, self.last_error)
                return

    def _noted_rtcp(self) -> None:
        self._rtcp_packets += 1
        self.ingest_reports = True

    async def _connect(self, done: asyncio.Event) -> None:
        self.state = "connecting"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.webrtc.ice_servers)))
        self.pc = pc
        track = self.webrtc.make_track()
        transceiver = pc.addTransceiver(track, direction="sendonly")
        self.reports, self._rtcp_packets = ReportWatch(self.silence_s), 0
        on_rtcp(transceiver.sender, self._noted_rtcp)
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
        age = self.reports.age_s(time.monotonic())
        return {"url": self.url, "state": self.state, "sessions": self.sessions, "last_error": self.last_error,
                "resource": self.resource, "rtcp_packets": self._rtcp_packets,
                "rtcp_age_s": None if age is None else round(age, 2),
                "silence_limit_s": round(self.reports.limit_s, 2), "silences": self.silences}


class ReportWatch:
    """When has the ingest gone silent? ``update(count, now)``, called every poll with the number of RTCP packets the
    session has had so far, returns the silence in seconds once it exceeds :attr:`limit_s` (else ``None``).

    The limit is ``silence_s`` or three of the longest gap seen between packets in this session, whichever is longer, so
    an ingest that reports every 5 s is not declared dead after 3 s. Until ``settle_packets`` have come, the gaps are
    not known yet and the limit is at least ``warmup_s``. Gaps are measured at the polls, so to within one poll."""

    def __init__(self, silence_s: float = 3.0, warmup_s: float = 10.0, settle_packets: int = 3) -> None:
        self.silence_s = silence_s
        self.warmup_s = warmup_s
        self.settle_packets = settle_packets
        self.longest_s = 0.0
        self.count = 0
        self._seen_at: float | None = None

    @property
    def limit_s(self) -> float:
        limit = max(self.silence_s, 3.0 * self.longest_s)
        return limit if self.count >= self.settle_packets else max(limit, self.warmup_s)

    def start(self, now: float) -> None:
        """Count the silence from ``now`` even before the first packet (an ingest known to send RTCP)."""
        if self._seen_at is None:
            self._seen_at = now

    def age_s(self, now: float) -> float | None:
        return None if self._seen_at is None else now - self._seen_at

    def update(self, count: int, now: float) -> float | None:
        if count != self.count:
            if self._seen_at is not None and self.count:
                self.longest_s = max(self.longest_s, now - self._seen_at)
            self.count, self._seen_at = count, now
            return None
        if self._seen_at is None:
            return None  # nothing yet from an ingest not known to send RTCP: only ICE consent can tell
        age = now - self._seen_at
        return age if age > self.limit_s else None
