"""What the server pays per viewer per frame to send one encoded frame, split into the steps aiortc 1.16's
RTCRtpSender takes for every viewer (the encode is shared; these steps are not): packing the frame into RTP payloads
(`Encoder.pack`), building and serializing each RTP packet, SRTP protection (pylibsrtp) and the UDP send.

Question it answers: would sharing the payloading across viewers (only SSRC, sequence numbers and SRTP differ per
viewer) shorten the 8-viewer path? Run from the repository root:

    .venv/bin/python benchmarks/latency_ab/sendcost/send_cost.py --json benchmarks/latency_ab/sendcost/send_cost_vm9.json
"""
import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import av
import numpy as np
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from sonomaly.stream.encoder import open_encoder
from sonomaly.tools.bench_encoder import composed_frames, machine

REPO = Path(__file__).resolve().parents[3]


def encoded(frames, codec):
    h, w = frames[0].shape[0] * 2 // 3, frames[0].shape[1]
    ctx = open_encoder(codec, w, h, 4_000_000, threads=1)
    out = []
    for i, yuv in enumerate(frames):
        f = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        f.pts, f.time_base = i * 3000, ctx.time_base
        out += ctx.encode(f)
    return out


def measure(packets, codec, repeats):
    mime = "video/VP8" if codec == "vp8" else "video/H264"
    params = {"packetization-mode": "1"} if codec == "h264" else {}
    packer = get_encoder(RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96, parameters=params))
    hmap = HeaderExtensionsMap()
    srtp = Session(policy=Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                                 srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    addr = rx.getsockname()
    t = {"pack": [], "serialize": [], "protect": [], "sendto": []}
    n_payloads, seq = 0, 0
    for _ in range(repeats):
        for pkt in packets:
            t0 = time.perf_counter()
            payloads, ts = packer.pack(pkt)
            t1 = time.perf_counter()
            wire = []
            for i, p in enumerate(payloads):  # as RTCRtpSender._run_rtp builds each packet
                rp = RtpPacket(payload_type=96, sequence_number=seq % 65536, timestamp=ts)
                rp.ssrc, rp.payload, rp.marker = 1234, p, int(i == len(payloads) - 1)
                rp.extensions.abs_send_time, rp.extensions.mid = 1, "0"
                wire.append(rp.serialize(hmap))
                seq += 1
            t2 = time.perf_counter()
            wire = [srtp.protect(b) for b in wire]
            t3 = time.perf_counter()
            for b in wire:
                tx.sendto(b, addr)
            t4 = time.perf_counter()
            try:
                while True:
                    rx.recv(4096)
            except BlockingIOError:
                pass
            n_payloads += len(payloads)
            for k, a, b in (("pack", t0, t1), ("serialize", t1, t2), ("protect", t2, t3), ("sendto", t3, t4)):
                t[k].append((b - a) * 1e6)
    med = {k: float(np.median(v)) for k, v in t.items()}
    return {"codec": codec, "frames": len(t["pack"]), "bytes_per_frame": float(np.mean([p.size for p in packets])),
            "rtp_packets_per_frame": n_payloads / len(t["pack"]),
            "us_median": med, "us_mean": {k: float(np.mean(v)) for k, v in t.items()},
            "us_total_median": float(np.median(np.sum([t[k] for k in t], axis=0)))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    frames = composed_frames(str(REPO / "data/demo/lung_convex_covid_blines_01.mp4"), str(REPO / "models/lung"),
                             a.frames)
    rows = [measure(encoded(frames, c), c, a.repeats) for c in ("vp8", "h264")]
    print("codec  bytes/frame  RTP pkts  pack  serialize  protect  sendto  total   (µs per frame per viewer, median)")
    for r in rows:
        m = r["us_median"]
        print(f"{r['codec']:5} {r['bytes_per_frame']:11.0f} {r['rtp_packets_per_frame']:9.1f} {m['pack']:5.0f} "
              f"{m['serialize']:10.0f} {m['protect']:8.0f} {m['sendto']:7.0f} {r['us_total_median']:6.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"benchmark": "send_cost", "bitrate": 4_000_000, "machine": machine(),
                                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                            "command": " ".join(sys.argv), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
