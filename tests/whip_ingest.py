"""A minimal WHIP ingest (RFC 9725) for tests: a real aiortc peer that receives the stream, in its own process so a
test can SIGKILL it (an ingest that dies without a goodbye) and start it again on the same port.

    python tests/whip_ingest.py PORT [--status N]

``POST /whip`` (``application/sdp``) → ``201`` with the answer and ``Location: /whip/<n>``; ``DELETE /whip/<n>`` →
``200``; ``GET /stats`` → ``{"sessions", "frames", "deleted"}``. With ``--status N`` every POST is answered ``N`` (an
ingest that refuses). Prints ``READY`` once it listens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

STATS = {"sessions": 0, "frames": 0, "deleted": 0}
PEERS: dict[str, RTCPeerConnection] = {}


async def _drain(track) -> None:
    try:
        while True:
            await track.recv()
            STATS["frames"] += 1
    except MediaStreamError:
        pass


async def _answer(sdp: str) -> tuple[str, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.on("track", lambda track: asyncio.ensure_future(_drain(track)))
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    STATS["sessions"] += 1
    rid = str(STATS["sessions"])
    PEERS[rid] = pc
    return rid, pc.localDescription.sdp


async def _delete(rid: str) -> bool:
    pc = PEERS.pop(rid, None)
    if pc is None:
        return False
    await pc.close()
    STATS["deleted"] += 1
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--status", type=int, default=201)
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(20)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if args.status != 201:
                return self._reply(args.status, b"refused by --status")
            rid, answer = run(_answer(body.decode()))
            self._reply(201, answer.encode(), {"Content-Type": "application/sdp", "Location": f"/whip/{rid}"})

        def do_DELETE(self) -> None:
            self._reply(200 if run(_delete(self.path.rsplit("/", 1)[-1])) else 404)

        def do_GET(self) -> None:
            self._reply(200, json.dumps(STATS).encode(), {"Content-Type": "application/json"})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("READY", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
