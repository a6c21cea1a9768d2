"""``sonomaly export`` (ONNX variants + INT8 accuracy gate) and ``sonomaly build-engine`` (TensorRT engine cache)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model directory to ONNX variants (batch-1, batch-N, FP16, INT8)",
                       description="Export MODEL_DIR's model.pt to ONNX (opset >= 17, static batch-1 model.onnx and "
                                   "a batch-N variant), optionally FP16 and static QDQ INT8. INT8 is kept only if it "
                                   "passes the accuracy gate (image AUROC drop <= 1 pt, pixel AUROC drop <= 2 pt vs "
                                   "FP32 on validation clips); otherwise FP32 is used and the card says so.")
    p.add_argument("model_dir")
    p.add_argument("--out", default=None, help="write into this folder instead of MODEL_DIR")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (FP16 maths, float32 I/O)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ, needs --calib)")
    p.add_argument("--calib", nargs="+", default=None, metavar="DIR",
                   help="normal clips / images (files or folders) to calibrate INT8 on")
    p.add_argument("--val", nargs="+", default=None, metavar="CLIP",
                   help="labelled validation clips ('normal' in the name = normal; default: data/demo)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the batch-N variant (default 4; 0: none)")
    p.add_argument("--size", type=int, default=None, help="re-export at another square input size (needs --out)")
    p.add_argument("--force", action="store_true", help="re-export model.onnx even when it is valid")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run_export)

    p = sub.add_parser("build-engine", help="build and cache a TensorRT engine for a model (NVIDIA GPU + [gpu] extra)")
    p.add_argument("model_dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="FP16 (the default)")
    g.add_argument("--int8", action="store_true", help="INT8: the card's QDQ model if accepted, else calibrate")
    g.add_argument("--fp32", action="store_true")
    p.add_argument("--calib", nargs="+", default=None, metavar="DIR", help="normal clips to calibrate INT8 on")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--workspace-mb", type=int, default=512)
    p.add_argument("--cuda-graph", action="store_true", help="also try CUDA-graph capture")
    p.set_defaults(func=run_build_engine)


def run_export(args: argparse.Namespace) -> int:
    from sonomaly.engines.export import ExportError, export

    try:
        rep = export(args.model_dir, args.out, fp16=args.fp16, int8=args.int8, calib=args.calib, val=args.val,
                     batch=args.batch, size=args.size, force=args.force, opset=args.opset)
    except ExportError as e:
        print(f"sonomaly export: {e}", file=sys.stderr)
        return 2
    from sonomaly.engines.export import _jsonable

    if args.json:
        print(json.dumps(_jsonable(rep), indent=2))
    out = args.out or args.model_dir
    for name, v in rep["variants"].items():
        f = v.get("file")
        extra = ""
        if "vs_fp32" in v:
            c = v["vs_fp32"]
            extra = (f"  map max|d| {c['map_max_abs_diff']:.2e}, score rho {c['score_spearman']:.4f}, "
                     f"image AUROC {c['image_auroc']:.4f}, pixel AUROC {c['pixel_auroc']:.4f}")
        print(f"{name:8s} {f or '(none: fell back to fp32)'}{extra}")
    if "int8" in rep["variants"]:
        print(f"INT8 gate: {rep['variants']['int8']['gate']['reason']}")
    print(f"card updated: {out}/card.json ({rep['seconds']} s)")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    from sonomaly.engines import BackendUnavailable
    from sonomaly.engines.backends.tensorrt import build_engine

    precision = "int8" if args.int8 else "fp32" if args.fp32 else "fp16"
    try:
        be = build_engine(args.model_dir, precision=precision, calib=args.calib, device=args.device,
                          workspace_mb=args.workspace_mb, cuda_graph=args.cuda_graph)
    except BackendUnavailable as e:
        from sonomaly.engines.backends.tensorrt import gpu_probe

        print(f"sonomaly build-engine: {e} (GPU probe: {gpu_probe()[1]})", file=sys.stderr)
        return 2
    print(f"engine: {be.engine_path} ({precision}; CUDA graph {be.graph_reason})")
    be.close()
    return 0
