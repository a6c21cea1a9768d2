"""Playout delay: ask the viewer's browser to show each frame as soon as it is decoded.

A browser's WebRTC receiver smooths video: besides its jitter buffer it holds each decoded frame until a render time
it estimates for even motion. On a closed hospital LAN with no jitter to hide, that hold is the largest part of the
latency after the server (20-40 ms in headless Chromium here, see benchmarks/latency.md). The RTP header extension
``playout-delay`` (http://www.webrtc.org/experiments/rtp-hdrext/playout-delay, the one cloud gaming uses) lets the
sender set the receiver's minimum and maximum playout delay; ``0, 0`` means "render as soon as possible".

aiortc 1.x neither negotiates nor writes that extension, so :func:`enable` adds it (process-wide, idempotent):

* the URI joins aiortc's video header extensions, so an answer to a browser that offers it (Chromium does) lists it,
  and aiortc's own offers (the WHIP publisher) carry it;
* every video RTP packet of a sender whose negotiated parameters contain it carries the 3-byte value (12 bits
  minimum, 12 bits maximum, in 10 ms units). The extension's rules allow sending it on every packet.

A receiver that does not offer the extension never gets it: nothing changes for it.
"""
from __future__ import annotations

import threading

URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
# an id not used by aiortc's own audio/video extensions (mid 1, audio level 2, abs-send-time 3), for aiortc's offers;
# in an answer, the offerer's id is used
LOCAL_ID = 6
MAX_MS = 40950

_lock = threading.Lock()
_state: dict[str, object] = {"enabled": False, "value": None}  # value: the 3 bytes sent, None when not sending


def encode(min_ms: int, max_ms: int) -> bytes:
    """The extension's 3 bytes: 12-bit minimum and 12-bit maximum, each in 10 ms units."""
    if not (0 <= min_ms <= max_ms <= MAX_MS):
        raise ValueError(f"playout delay must satisfy 0 <= min <= max <= {MAX_MS} ms, got {min_ms}, {max_ms}")
    lo, hi = int(min_ms) // 10, int(max_ms) // 10
    return bytes([(lo >> 4) & 0xFF, ((lo & 0x0F) << 4) | ((hi >> 8) & 0x0F), hi & 0xFF])


def decode(value: bytes) -> tuple[int, int]:
    """Inverse of :func:`encode`: ``(min_ms, max_ms)``."""
    if len(value) != 3:
        raise ValueError(f"playout-delay value has 3 bytes, got {len(value)}")
    lo = (value[0] << 4) | (value[1] >> 4)
    hi = ((value[1] & 0x0F) << 8) | value[2]
    return lo * 10, hi * 10


def parse(text: str) -> tuple[int, int] | None:
    """``"0,0"`` / ``"0:100"`` -> ``(min, max)`` ms; ``"off"`` -> ``None``."""
    t = str(text).strip().lower()
    if t in ("off", "none", "no", ""):
        return None
    parts = t.replace(":", ",").split(",")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"playout delay: want MIN,MAX in ms (e.g. 0,0) or 'off', got {text!r}") from None
    encode(lo, hi)  # range check
    return lo, hi


def enable(min_ms: int = 0, max_ms: int = 0) -> None:
    """Negotiate and send ``playout-delay`` with these bounds on every aiortc video sender of this process."""
    from aiortc import codecs, rtp
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters

    value = encode(min_ms, max_ms)
    with _lock:
        _state["value"] = value
        if _state["enabled"]:
            return
        video = codecs.HEADER_EXTENSIONS["video"]
        if not any(e.uri == URI for e in video):
            video.append(RTCRtpHeaderExtensionParameters(id=LOCAL_ID, uri=URI))
        cls = rtp.HeaderExtensionsMap
        orig_configure, orig_set = cls.configure, cls.set

        def configure(self, parameters) -> None:
            orig_configure(self, parameters)
            self._sonomaly_playout_id = next((e.id for e in parameters.headerExtensions if e.uri == URI), None)

        def set_(self, values):
            profile, data = orig_set(self, values)
            ext_id = getattr(self, "_sonomaly_playout_id", None)
            current = _state["value"]
            if not ext_id or current is None:
                return profile, data
            items = list(rtp.unpack_header_extensions(profile, data)) if data else []
            items.append((ext_id, current))
            return rtp.pack_header_extensions(items)

        cls.configure, cls.set = configure, set_
        _state["enabled"] = True


def disable() -> None:
    """Stop writing the extension (it stays negotiable; receivers keep their default smoothing)."""
    with _lock:
        _state["value"] = None


def status() -> dict[str, object]:
    """For /health: whether the extension is sent, and its bounds."""
    value = _state["value"]
    return {"playout_delay_ms": None if value is None else list(decode(value))}
