"""Probe: `sonomaly serve` with RTCDtlsTransport._send_rtp wrapped to log each RTP packet's send time per viewer
(written to /tmp/lat/probe_send.json at exit). Run it, attach viewers (e.g. `sonomaly latency --url
http://127.0.0.1:8765 --viewer chromium --viewers 8 --chromium-layout page --seconds 15`), stop it with SIGTERM, then
`python fanout_analyse.py /tmp/lat/probe_send.json`:

    python benchmarks/latency_ab/sendcost/fanout_probe.py serve --source "stamp:data/demo/lung_convex_covid_blines_01.mp4?fps=30" --loop --model models/lung --port 8765
"""
import atexit
import json
import os
import signal
import sys
import time

from aiortc import rtcdtlstransport

LOG = []  # (start ns, end ns, transport id, marker bit: the last packet of a frame)
_send_rtp = rtcdtlstransport.RTCDtlsTransport._send_rtp


async def _timed_send_rtp(self, data):
    t0 = time.perf_counter_ns()
    await _send_rtp(self, data)
    if len(data) > 12 and not 192 <= data[1] <= 223:  # RTP, not RTCP (packet types 192-223)
        LOG.append((t0, time.perf_counter_ns(), id(self), data[1] & 0x80))


def _dump():
    os.makedirs("/tmp/lat", exist_ok=True)
    with open("/tmp/lat/probe_send.json", "w") as f:
        json.dump(LOG, f)


rtcdtlstransport.RTCDtlsTransport._send_rtp = _timed_send_rtp
atexit.register(_dump)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))

from sonomaly.tools.cli import main  # noqa: E402  (after the patch)

sys.exit(main(sys.argv[1:]))
