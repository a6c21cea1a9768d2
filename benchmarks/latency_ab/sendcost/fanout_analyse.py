"""Summarise fanout_probe.py's log: per frame, how long the server takes from the first viewer's first packet to the
last viewer's last (marker) packet, each viewer's own send time, and each viewer's place in the send order."""
import json
import sys

import numpy as np

log = sorted(json.load(open(sys.argv[1])))  # (t_start_ns, t_end_ns, transport id, marker bit[, rtp timestamp])
n_viewers = len({e[2] for e in log})
cur, frames = {}, []
for t0, t1, tid, mark, *_ in log:
    cur.setdefault(tid, t0)
    if mark:
        frames.append((tid, cur.pop(tid), t1))
frames.sort(key=lambda x: x[1])
clusters, c = [], []
for f in frames:  # frames are 33 ms apart: a new frame starts more than 15 ms after the previous one's first packet
    if c and f[1] - c[0][1] > 15e6:
        clusters.append(c)
        c = []
    c.append(f)
clusters.append(c)
full = [c for c in clusters if len(c) == n_viewers and len({x[0] for x in c}) == n_viewers]
spread = [(max(x[2] for x in c) - min(x[1] for x in c)) / 1e6 for c in full]
own = [(x[2] - x[1]) / 1e6 for c in full for x in c]
pos: dict[int, list[int]] = {}
for c in full:
    for k, x in enumerate(sorted(c, key=lambda x: x[2])):
        pos.setdefault(x[0], []).append(k)
out = {"viewers": n_viewers, "frames_all_viewers": len(full), "frames": len(clusters),
       "fanout_ms": dict(zip(("p50", "p95", "p99"), np.percentile(spread, [50, 95, 99]).round(2).tolist())),
       "one_viewer_frame_send_ms": dict(zip(("p50", "p95"), np.percentile(own, [50, 95]).round(3).tolist())),
       "mean_send_position": sorted(round(float(np.mean(v)), 2) for v in pos.values())}
print(json.dumps(out, indent=2))
