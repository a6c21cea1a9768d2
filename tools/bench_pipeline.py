"""Per-stage cost of the pipeline on this machine: ROI, preprocess, infer, postprocess, overlay, I420 conversion.

Runs the very functions the live pipeline runs, frame by frame, on bundled clips resized to common display sizes,
without the network, so each stage's cost shows on its own. ``sonomaly bench pipeline [--json OUT]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from sonomaly.tools.machine import cpu_fields, cpu_label

REPO = Path(__file__).resolve().parents[1]
SIZES = {"native": None, "640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(REPO / "models" / "lung"))
    p.add_argument("--clip", default=str(REPO / "data" / "demo" / "lung_convex_covid_blines_01.mp4"))
    p.add_argument("--frames", type=int, default=200, help="frames per size (default 200)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--threads", type=int, default=None, help="inference threads")
    p.add_argument("--map-side", default=None,
                   help="heatmap working size(s), comma-separated (longer side; 0: the full frame); default the "
                        "pipeline's own (PipelineConfig.map_side)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--md", default=None, help="also write a Markdown table here")


def machine() -> dict:
    import onnxruntime

    return {**cpu_fields(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__, "platform": platform.platform()}


def _frames(clip: str, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(clip)
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            if not frames:
                raise SystemExit(f"cannot read {clip}")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        frames.append(f)
    cap.release()
    return frames


def bench_size(engine, frames: list[np.ndarray], size, map_side: int | None) -> dict:
    """The pipeline's per-frame work at one frame size; ``map_side`` as ``PipelineConfig.map_side`` (None: maps at
    the full frame size)."""
    from sonomaly import overlay
    from sonomaly.engines.processing import TemporalSmoother, postprocess, preprocess
    from sonomaly.stream.roi import RegionTracker

    tracker, smoother, style = RegionTracker(), TemporalSmoother(0.5), overlay.OverlayStyle()
    times: dict[str, list[float]] = {k: [] for k in ("roi", "preprocess", "infer", "postprocess", "layer",
                                                      "overlay", "i420", "total")}
    for i, f in enumerate(frames):
        img = f if size is None else cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)
        t0 = time.perf_counter_ns()
        region = tracker.update(img)
        t1 = time.perf_counter_ns()
        x = preprocess(img, region, engine.card)
        t2 = time.perf_counter_ns()
        raw_map, raw_score = engine.infer(x)
        t3 = time.perf_counter_ns()
        amap, score = postprocess(raw_map, raw_score, region, engine.card, img.shape[:2], work_side=map_side)
        amap = smoother.update(amap, region)
        t4 = time.perf_counter_ns()
        layer = overlay.layer_for(amap, region, img.shape[:2], style)  # once per AI result (in the worker)
        t4b = time.perf_counter_ns()
        out = overlay.compose(img, amap, region, score=score, style=style, hud_lines=["39.0 fps", "bench"],
                              layer=layer)
        t5 = time.perf_counter_ns()
        out = out[: out.shape[0] // 2 * 2, : out.shape[1] // 2 * 2]
        cv2.cvtColor(out, cv2.COLOR_BGR2YUV_I420)
        t6 = time.perf_counter_ns()
        if i < 10:  # warm-up
            continue
        for k, a, b in (("roi", t0, t1), ("preprocess", t1, t2), ("infer", t2, t3), ("postprocess", t3, t4),
                        ("layer", t4, t4b), ("overlay", t4b, t5), ("i420", t5, t6), ("total", t0, t6)):
            times[k].append((b - a) / 1e6)
    h, w = (frames[0].shape[:2] if size is None else (size[1], size[0]))
    return {"size": f"{w}x{h}", "frames": len(times["total"]), "map_side": map_side,
            "stages": {k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
                       for k, v in times.items()}}


def run(args) -> int:
    from sonomaly import engines

    opts = {} if args.threads is None else {"threads": args.threads}
    engine = engines.load(args.model, backend="onnxruntime", **opts)
    frames = _frames(args.clip, args.frames + 10)
    from sonomaly.stream.pipeline import PipelineConfig

    try:
        sides = ([PipelineConfig().map_side] if args.map_side is None else
                 [int(v) or None for v in str(args.map_side).split(",")])
    except ValueError:
        raise SystemExit(f"--map-side wants integers, got {args.map_side!r}") from None
    rows = []
    for name in args.sizes.split(","):
        if name not in SIZES:
            raise SystemExit(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
        for side in sides:
            rows.append(bench_size(engine, frames, SIZES[name], side))
    stages = list(rows[0]["stages"])
    mapcol = lambda r: str(r["map_side"] or "full")
    print(f"{'size':>10} {'map':>5} " + " ".join(f"{s:>15}" for s in stages))
    print(f"{'':>10} {'':>5} " + " ".join(f"{'p50 / p99 ms':>15}" for _ in stages))
    for r in rows:
        print(f"{r['size']:>10} {mapcol(r):>5} " + " ".join(f"{r['stages'][s]['p50']:6.2f} / {r['stages'][s]['p99']:6.2f}"
                                                          for s in stages))
    result = {"benchmark": "pipeline", "model": engine.card.name, "backend": engine.backend,
              "clip": Path(args.clip).name, "machine": machine(), "results": rows,
              "date": time.strftime("%Y-%m-%d")}
    if args.md:
        m = result["machine"]
        lines = ["# Pipeline stages — ms per frame (p50 / p99)", "",
                 f"Machine: {cpu_label(m)}, {m['cores']} cores; Python {m['python']}, ONNX Runtime {m['onnxruntime']}, "
                 f"OpenCV {m['opencv']}. Model `{engine.card.name}` on {engine.backend}; clip `{result['clip']}` "
                 f"resized to each size; {args.frames} frames per size after 10 warm-up frames. "
                 f"Command: `sonomaly bench pipeline {' '.join(sys.argv[3:]) if sys.argv[1:3] == ['bench', 'pipeline'] else ''}` "
                 f"({result['date']}). `map`: the heatmap's working size (longer side) in the worker and smoother; "
                 f"`serve` uses {PipelineConfig().map_side}; `full` = the frame's own size.", "",
                 "| size | map | " + " | ".join(stages) + " |", "|---|---|" + "---:|" * len(stages)]
        for r in rows:
            lines.append(f"| {r['size']} | {mapcol(r)} | " + " | ".join(f"{r['stages'][s]['p50']:.2f} / {r['stages'][s]['p99']:.2f}"
                                                         for s in stages) + " |")
        lines += ["", "`total` is the work the pipeline's threads do for one frame (the worker does ROI to `layer` — the "
                  "heatmap and contours drawn once per AI result — and the composer `overlay` (blending that layer, "
                  "gauge, HUD) and I420; they run in parallel on different frames). When the AI runs slower than the "
                  "video, a layer is blended over several frames and only `overlay` and `i420` recur per frame. Encoding and the network "
                  "are measured by `sonomaly latency` and `sonomaly bench viewers`."]
        Path(args.md).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.md}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
