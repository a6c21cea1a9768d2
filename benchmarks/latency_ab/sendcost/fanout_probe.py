"""Probe: `sonomaly serve` with RTCDtlsTransport._send_rtp wrapped to log each RTP packet's send time per viewer
(written to /tmp/lat/probe_send.json at exit). Run it, attach viewers (e.g. `sonomaly latency --url
http://127.0.0.1:8765 --viewer chromium --viewers 8 --chromium-layout page --seconds 15`), stop it with SIGTERM, then
`python fanout_analyse.py /tmp/lat/probe_send.json`:

    python benchmarks/latency_ab/sendcost/fanout_probe.py serve --source "stamp:data/demo/lung_convex_covid_blines_01.mp4?fps=30" --loop --model models/lung --port 8765
"""
import sys, time, atexit, struct, json
from aiortc import rtcdtlstransport
LOG=[]
orig=rtcdtlstransport.RTCDtlsTransport._send_rtp
async def _send_rtp(self, data):
    is_rtp = len(data) > 12 and not (192 <= data[1] <= 223)  # RTCP packet types are 192-223
    t0=time.perf_counter_ns()
    await orig(self, data)
    if is_rtp:  # (start, end, transport, marker bit = last packet of a frame, RTP timestamp)
        LOG.append((t0, time.perf_counter_ns(), id(self), data[1] & 0x80, struct.unpack('!I', data[4:8])[0]))
rtcdtlstransport.RTCDtlsTransport._send_rtp=_send_rtp
def dump():
    import os
    os.makedirs('/tmp/lat', exist_ok=True)
    json.dump(LOG, open('/tmp/lat/probe_send.json','w'))
atexit.register(dump)
import signal
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
from sonomaly.tools.cli import main
sys.exit(main(sys.argv[1:]))
