"""A headless aiortc viewer: connects to a Sonomaly server like the viewer page does and collects what arrives.

Used by the tests and the latency harness; ``python -m sonomaly.tools.client URL --seconds 5`` prints a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


@dataclass
class ReceiveStats:
    frames: int = 0
    first_frame_s: float | None = None
    sizes: set[tuple[int, int]] = field(default_factory=set)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    connection_states: list[str] = field(default_factory=list)


def _post_json(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


async def make_offer(pc: RTCPeerConnection) -> RTCSessionDescription:
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription


async def receive(url: str, seconds: float, *, on_frame: Callable[[Any, float], None] | None = None,
                  metadata: bool = True) -> ReceiveStats:
    """Watch ``url`` for ``seconds`` (counted from the first frame); ``on_frame(av_frame, t_monotonic)``."""
    stats = ReceiveStats()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    t_start = time.monotonic()
    done = asyncio.Event()

    @pc.on("connectionstatechange")
    def _state() -> None:
        stats.connection_states.append(pc.connectionState)

    if metadata:
        channel = pc.createDataChannel("meta", ordered=False, maxRetransmits=0)

        @channel.on("message")
        def _meta(msg) -> None:
            stats.metadata.append(json.loads(msg))

    async def consume(track) -> None:
        deadline = None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            now = time.monotonic()
            if stats.first_frame_s is None:
                stats.first_frame_s = now - t_start
                deadline = now + seconds
            stats.frames += 1
            stats.sizes.add((frame.width, frame.height))
            if on_frame is not None:
                on_frame(frame, now)
            if now >= deadline:
                break
        done.set()

    @pc.on("track")
    def _track(track) -> None:
        asyncio.ensure_future(consume(track))

    offer = await make_offer(pc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(None, _post_json, url.rstrip("/") + "/offer",
                                        {"sdp": offer.sdp, "type": offer.type})
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    try:
        await asyncio.wait_for(done.wait(), seconds + 20)
    finally:
        await pc.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="headless aiortc viewer")
    p.add_argument("url")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    s = asyncio.run(receive(a.url, a.seconds))
    print(json.dumps({"frames": s.frames, "fps": round(s.frames / a.seconds, 2), "first_frame_s": s.first_frame_s,
                      "sizes": sorted(s.sizes), "metadata_messages": len(s.metadata)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
