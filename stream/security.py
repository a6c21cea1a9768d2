"""Remote viewing security: bearer tokens for viewers and for control, a loopback exemption for the local display,
and a per-client rate limit on signalling (``/offer``, ``/whep``).

Two roles, each with its own token (either may be unset, which leaves that role open):

* **viewer** — watch (``/offer``, ``/whep``), read records, send feedback;
* **control** — everything a viewer may do, plus the control API, recordings and ``/metrics``.

Without a viewer token, watching is open (as on a closed OR network). Without a control token, control is allowed
from loopback only: a remote client can never change the model or start recordings unless a token was configured.

A token is read from ``Authorization: Bearer <token>`` or from ``?token=`` (the viewer page passes its own query
string on). Requests from the loopback interface (the OR display on the same machine) are exempt unless
``exempt_loopback`` is off. TLS is uvicorn's (``--ssl-certfile/--ssl-keyfile``); CORS is closed unless origins are
listed.
"""
from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from dataclasses import dataclass, field

from fastapi import HTTPException, Request


@dataclass
class SecurityConfig:
    viewer_token: str | None = None
    control_token: str | None = None
    exempt_loopback: bool = True
    """Requests from 127.0.0.1 / ::1 need no token (the local OR display)."""
    rate_per_s: float = 0.0
    """Sustained signalling requests (``/offer``, ``/whep``) per second per client address; 0: no limit (the library
    default; ``sonomaly serve`` sets 2/s with a burst of 20). Exempt loopback clients are not limited."""
    rate_burst: int = 20
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed to call the API from a browser page served elsewhere; none by default (closed)."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def request_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query_params.get("token")


def _matches(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """FastAPI dependencies for the two roles and the rate limit."""

    def __init__(self, config: SecurityConfig | None = None) -> None:
        self.config = config or SecurityConfig()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self.denied = 0
        self.limited = 0

    def _exempt(self, request: Request) -> bool:
        return self.config.exempt_loopback and _is_loopback(request.client.host if request.client else None)

    def check(self, request: Request, role: str) -> None:
        cfg = self.config
        if self._exempt(request):
            return
        token = request_token(request)
        if role == "viewer":
            if cfg.viewer_token is None or _matches(token, cfg.viewer_token) or _matches(token, cfg.control_token):
                return
        elif _matches(token, cfg.control_token):
            return
        elif cfg.control_token is None:
            self.denied += 1
            raise HTTPException(403, "remote control is off: start the server with --control-token to allow it")
        self.denied += 1
        raise HTTPException(401 if token is None else 403,
                            f"{role} token {'required' if token is None else 'not accepted'}",
                            headers={"WWW-Authenticate": "Bearer"} if token is None else None)

    def viewer(self, request: Request) -> None:
        self.check(request, "viewer")

    def control(self, request: Request) -> None:
        self.check(request, "control")

    def rate_limit(self, request: Request) -> None:
        """Token bucket per client address: ``rate_burst`` at once, then ``rate_per_s``."""
        rate, burst = self.config.rate_per_s, self.config.rate_burst
        if rate <= 0 or self._exempt(request):
            return
        key = request.client.host if request.client else "?"
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                self.limited += 1
                retry = max(1, int((1.0 - tokens) / rate + 0.999))
                raise HTTPException(429, "too many signalling requests; slow down",
                                    headers={"Retry-After": str(retry)})
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle clients
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
