"""``sonomaly evaluate``: score a model on a labelled folder (normal/, abnormal/, optional masks/) and write JSON
(+ a PNG grid and Markdown report with ``--report``).

    sonomaly evaluate --model models/breast --data DIR --json out.json --report out_dir
"""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="evaluate a model on DIR/normal, DIR/abnormal (+ DIR/masks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (card.json + model.onnx)")
    p.add_argument("--data", required=True, help="folder with normal/ and abnormal/ (images or clips) and optional "
                                                 "masks/ (<stem>_mask*.png, united per stem)")
    p.add_argument("--json", required=True, help="write the metrics here")
    p.add_argument("--report", default=None, help="folder for grid.png + report.md")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    p.add_argument("--every", type=int, default=4, help="score every N-th frame of clips (default 4)")
    p.add_argument("--max-frames", type=int, default=150, help="at most this many frames per clip (default 150)")
    p.add_argument("--brightness-matched", action="store_true",
                   help="rescale each clip/image to a common in-region mean/std first (removes the brightness cue)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sonomaly.engines.evaluate import FIELDS, run_cli

    res = run_cli(args.model, args.data, args.json, args.report, backend=args.backend, threads=args.threads,
                  every=args.every, max_frames=args.max_frames, brightness_matched=args.brightness_matched,
                  progress=not args.quiet)
    print(json.dumps({k: res.get(k) for k in FIELDS}, indent=None))
    print(f"wrote {args.json}" + (f" and {args.report}/" if args.report else ""), file=sys.stderr)
    return 0
