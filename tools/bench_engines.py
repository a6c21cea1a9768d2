"""Engines: every shipped model x backend x precision x input size: ms/frame p50/p99, fps, peak memory, accuracy vs FP32.

For each ``models/*/card.json`` and each size (default 256 and 512), the model is exported into a temporary folder
(``engines.export``: FP32 batch-1 + batch-4, FP16, static QDQ INT8 with its accuracy gate; at the card's own size the
shipped ``model.onnx`` itself is used) and every backend (onnxruntime; torch, the FP32 reference; tensorrt when
TensorRT and a GPU are present) runs every precision it has.  Timing: batch-1 ``Engine.infer`` on a real
preprocessed frame after a warm-up, all engines of one size interleaved in rounds (so load from other users of a
shared CPU hits them alike).  Peak memory: in a fresh process with the libraries already imported, the peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS before the engine was loaded and run.  Accuracy vs the torch FP32 reference at the
same size, on the validation clips (``data/demo``: ``*normal*`` = normal, others abnormal): anomaly-map max |d|,
score Spearman rho, image AUROC and pixel AUROC (synthetic lesions) with their change.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sonomaly.tools.machine import cpu_id, cpu_label, cpu_model, memory_gib

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "ultrasound" / "videos"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=str(REPO / "benchmarks" / "engines.json"), metavar="OUT",
                   help="write the results here (default benchmarks/engines.json)")
    p.add_argument("--md", default=None, metavar="OUT",
                   help="also write the markdown table into this file (between bench markers; text around is kept)")
    p.add_argument("--models", nargs="+", default=None, help="model dirs (default: models/*/ with a card.json)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "torch", "tensorrt"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"])
    p.add_argument("--iters", type=int, default=300, help="timed calls at 256^2 (scaled down by area for larger)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val", nargs="+", default=None, help="validation clips (default data/demo/*.mp4)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the markdown (--md) from a results JSON written earlier; measures nothing")
    p.add_argument("--calib", nargs="+", default=None,
                   help="normal clips for INT8 calibration (default: the shared normal lung clips other than the "
                        "validation one when the shared data folder is present, else the bundled normal clip)")


# ---------------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import cv2
    import onnx
    import onnxruntime
    import torch

    from sonomaly.engines.backends.tensorrt import available, gpu_probe

    cpu, mem_gb = cpu_model(), memory_gib()
    ok, why = available()
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "cpu_id": cpu_id(), "memory_gb": mem_gb, "machine": platform.machine(), "os": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "ort_providers": onnxruntime.get_available_providers(), "opencv": cv2.__version__,
            "gpu": gpu_probe()[1], "tensorrt": why if not ok else f"available: {why}",
            "shared_machine": "yes: CPU shared with other engineers; runs serialised with flock /tmp/sonomaly-cpu.lock"}


def default_models() -> list[Path]:
    return sorted(p.parent for p in (REPO / "models").glob("*/card.json"))


BUSI = REPO.parent / "shared" / "data" / "ultrasound" / "busi"


def bench_data(card, args) -> tuple[list[Path], list[Path], str]:
    """(validation files, calibration files, note) for one model: the bundled lung clips for lung models; for a
    breast model, BUSI images when the shared data is present (even-numbered normal + the first abnormal images for
    validation, odd-numbered normal images for calibration)."""
    from sonomaly.engines.export import media_files

    if args.val or args.calib:
        val = media_files(args.val) if args.val else sorted(DEMO.glob("*.mp4"))
        return val, media_files(args.calib) if args.calib else default_calib(val), "as given"
    text = (card.name + " " + card.description + " " + json.dumps(card.training)).lower()
    if "lung" not in text and "breast" in text and BUSI.exists():
        normal = sorted((BUSI / "normal").glob("*.png"))
        abnormal = sorted((BUSI / "abnormal").glob("*.png"))
        return (normal[0::2][:24] + abnormal[:24], normal[1::2][:32],
                "BUSI images (the model may have been fitted on some of them: AUROCs are optimistic; changes vs FP32 "
                "are what counts)")
    val = sorted(DEMO.glob("*.mp4"))
    note = "" if "lung" in text else "validation on lung clips: AUROCs are a domain mismatch for this model"
    return val, default_calib(val), note


def default_calib(val_files: list[Path]) -> list[Path]:
    val_names = {p.name for p in val_files}
    if SHARED_VIDEOS.exists():
        c = sorted(p for p in SHARED_VIDEOS.glob("lung_*normal*.mp4") if p.name not in val_names)
        if c:
            return c
    return sorted(DEMO.glob("*normal*.mp4"))


class _Batched:
    """Times an ORT batch-N session per frame (for several streams)."""

    def __init__(self, path: Path, n: int, threads: int):
        from sonomaly.engines.export import ort_infer

        self.f, self.n = ort_infer(path, threads), n

    def infer(self, x):
        return self.f(np.repeat(x, self.n, axis=0))


_MEM_CODE = r"""
import json, sys
from pathlib import Path
import numpy as np
kw = json.loads(sys.argv[2])
if kw["backend"] == "torch":
    import torch  # the library itself is not the engine's memory
import onnxruntime  # noqa
from sonomaly import engines
from sonomaly.engines.export import ort_infer
def rss(f):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f + ":"):
            return int(line.split()[1])
base = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
d = Path(sys.argv[1])
if "batch" in kw:
    f = ort_infer(d / kw["file"], kw["threads"])
    infer = lambda x: f(np.repeat(x, kw["batch"], 0))
else:
    opts = {k: v for k, v in kw.items() if k not in ("backend", "precision")}
    infer = engines.load(d, backend=kw["backend"], precision=kw["precision"], **opts).infer
card = engines.ModelCard.load(d)
x = np.zeros((1, card.input.channels, *card.input_size), np.float32)
x[0, 0] = np.random.default_rng(0).standard_normal(card.input_size)
x[0, 1:] = 1.0
for _ in range(20):
    infer(x)
print(json.dumps({"peak_delta_mb": (rss("VmHWM") - base) / 1024.0}))
"""


def _mem_probe(d: Path, kw: dict) -> float | None:
    """Peak RSS growth (MB) of a fresh process that loads the engine and runs 20 frames (libraries imported first,
    so this is the engine: weights, session, arenas, workspaces)."""
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", _MEM_CODE, str(d), json.dumps(kw)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        return round(json.loads(out.strip().splitlines()[-1])["peak_delta_mb"], 1)
    except Exception:
        return None


def _row_accuracy(ref, ev) -> dict[str, Any]:
    from sonomaly.engines.export import compare

    return compare(ref, ev)


def bench_model(model_dir: Path, args, log) -> list[dict[str, Any]]:
    from sonomaly import engines
    from sonomaly.engines.backends.tensorrt import available
    from sonomaly.engines.card import ModelCard
    from sonomaly.engines.export import copy_model, evaluate, export, validation_set

    card0 = ModelCard.load(model_dir)
    val_files, calib_files, data_note = bench_data(card0, args)
    log(f"{model_dir.name}: validation {len(val_files)} files, calibration {len(calib_files)} files {data_note}")
    rows: list[dict[str, Any]] = []
    trt_ok, trt_why = available()
    native = card0.input_size[0] if card0.input_size[0] == card0.input_size[1] else None
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="sonomaly-bench-") as td:
            d = Path(td) / f"{model_dir.name}-{size}"
            t0 = time.time()
            if size == native:
                copy_model(model_dir, d)
                rep = export(d, fp16=True, int8=True, calib=calib_files, val=val_files, keep_rejected=True,
                             progress=False)
            else:
                rep = export(model_dir, d, fp16=True, int8=True, calib=calib_files, val=val_files, size=size,
                             keep_rejected=True, progress=False)
            log(f"{model_dir.name} {size}: exported in {time.time() - t0:.0f}s; INT8 "
                f"{rep['variants']['int8']['gate']['reason']}")
            card = ModelCard.load(d)
            val = validation_set(card, val_files)
            x = val.x[len(val.x) // 2 : len(val.x) // 2 + 1].copy()
            iters = max(30, int(args.iters * (256 * 256) / float(size * size)))
            ref_eng = engines.load(d, backend="torch", threads=args.threads)
            ref = evaluate(ref_eng.infer, val)
            del ref_eng
            combos = []
            for be in args.backends:
                for prec in args.precisions:
                    combos.append((be, prec, None))
                if be == "onnxruntime" and "fp32" in args.precisions and card.files.get("onnx_batch"):
                    combos.append((be, "fp32", "batch"))
            live = []  # (row, engine, load kwargs)
            for be, prec, variant in combos:
                row: dict[str, Any] = {"model": model_dir.name, "family": card.family, "size": size, "backend": be,
                                       "precision": prec, "native_size": size == native}
                if be == "tensorrt" and not trt_ok:
                    rows.append({**row, "status": "skipped", "note": f"TensorRT: {trt_why}"})
                    continue
                if be == "torch" and prec != "fp32":
                    rows.append({**row, "status": "n/a", "note": "torch is the FP32 reference (no CPU fp16/int8 path)"})
                    continue
                note, kw = "", {"backend": be, "precision": prec, "threads": args.threads}
                try:
                    if variant == "batch":
                        n = int(card.files["onnx_batch"].split(".b")[1].split(".")[0])
                        row["precision"] = f"fp32-b{n}"
                        eng = _Batched(d / card.files["onnx_batch"], n, args.threads)
                        row["file"] = card.files["onnx_batch"]
                        kw = {"backend": be, "precision": "fp32", "threads": args.threads, "file": row["file"], "batch": n}
                        note = f"batch of {n} per call; times per frame"
                    elif be == "onnxruntime" and prec == "int8" and not card.files.get("onnx_int8"):
                        rej = rep["variants"]["int8"].get("rejected_file")
                        eng = engines.load(d, backend=be, precision="fp32", threads=args.threads, file=rej)
                        row["file"] = rej
                        kw = {**kw, "precision": "fp32", "file": rej}
                        note = "INT8 REJECTED by the accuracy gate (not shipped; load() falls back to fp32)"
                    else:
                        eng = engines.load(d, backend=be, precision=prec, threads=args.threads)
                        row["file"] = getattr(eng.impl, "path", Path(card.files.get("torch", "model.pt"))).name
                        if eng.precision != prec:
                            note = eng.backend_reason
                    if prec == "int8" and variant is None:
                        row["int8_gate"] = "accepted" if rep["variants"]["int8"]["gate"]["accepted"] else "rejected"
                    row["note"] = note
                    live.append((row, eng, kw))
                except Exception as e:  # one broken combination must not sink the benchmark
                    rows.append({**row, "status": "error", "note": f"{e.__class__.__name__}: {e}"})
            # timing, interleaved in rounds so that load from other users of the shared CPU hits every engine alike
            times = {id(e): [] for _, e, _ in live}
            for _, eng, _ in live:
                for _ in range(20):
                    eng.infer(x)
            rounds = 6
            for _ in range(rounds):
                for _, eng, _ in live:
                    t = times[id(eng)]
                    for _ in range(max(5, iters // rounds)):
                        t0 = time.perf_counter()
                        eng.infer(x)
                        t.append(time.perf_counter() - t0)
            for row, eng, kw in live:
                try:
                    t = np.array(times[id(eng)]) * 1e3
                    n = kw.get("batch", 1)
                    row.update(ms_p50=float(np.median(t)) / n, ms_p99=float(np.percentile(t, 99)) / n,
                               ms_mean=float(t.mean()) / n, fps=float(1e3 * n / np.median(t)), calls=int(len(t)))
                    if "batch" not in kw:
                        row.update(_row_accuracy(ref, evaluate(eng.infer, val)))
                    row["peak_rss_delta_mb"] = _mem_probe(d, kw)
                    row["status"] = "ok"
                except Exception as e:
                    row.update(status="error", note=f"{e.__class__.__name__}: {e}")
                row["validation_files"] = [p.name for p in val_files]
                row["calibration_files"] = [p.name for p in calib_files]
                if data_note and data_note != "as given":
                    row["data_note"] = data_note
                rows.append(row)
                log(_fmt_row(row))
            live.clear()
            gc.collect()
    return rows


def _f(v, fmt):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def _fmt_row(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['model']} {r['size']} {r['backend']} {r['precision']}: {r['status']} ({r.get('note', '')})"
    return (f"{r['model']} {r['size']} {r['backend']} {r['precision']}: p50 {r['ms_p50']:.2f} ms p99 "
            f"{r['ms_p99']:.2f} ms {r['fps']:.0f} fps peak {r.get('peak_rss_delta_mb')} MB")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Run {result['started']} ({result['seconds']:.0f} s): `{result['command']}`", "",
             f"Machine: {m['nproc']} CPUs ({cpu_label(m, 'cpu_model')}), {m['memory_gb']} GiB, {m['os']}; Python {m['python']}, "
             f"torch {m['torch']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']} ({', '.join(m['ort_providers'])}), "
             f"numpy {m['numpy']}, OpenCV {m['opencv']}. GPU: {m['gpu']}. TensorRT: {m['tensorrt']}. "
             f"{m['shared_machine']}.", "",
             f"Threads: {result['threads']}.", ""] + _data_lines(result["rows"]) + [""] + [
             "| model | size | backend | precision | p50 ms | p99 ms | fps | peak RSS Δ MB | map max abs Δ | map p99.9 abs Δ "
             "| score ρ | image AUROC (Δ pt) | pixel AUROC (Δ pt) | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    border = {"onnxruntime": 0, "torch": 1, "tensorrt": 2}
    porder = {"fp32": 0, "fp16": 1, "int8": 2}
    rows = sorted(result["rows"], key=lambda r: (r["model"], r["size"], border.get(r["backend"], 9),
                                                 porder.get(r["precision"], 3), r["precision"]))
    for r in rows:
        if r.get("status") != "ok":
            note = r.get("note", "")
            if r["backend"] == "tensorrt" and r.get("status") == "skipped":
                note = "TensorRT unavailable here (reason on the machine line; full text in the JSON)"
            lines.append(f"| {r['model']} | {r['size']}² | {r['backend']} | {r['precision']} | – | – | – | – | – | – | – "
                         f"| – | – | {r['status']}: {note} |")
            continue
        acc = "image_auroc" in r
        ia = f"{r['image_auroc']:.3f} ({100 * r['image_auroc_change']:+.1f})" if acc else "–"
        pa = f"{r['pixel_auroc']:.3f} ({100 * r['pixel_auroc_change']:+.1f})" if acc else "–"
        note = r.get("note", "")
        if r.get("int8_gate"):
            note = (f"gate: {r['int8_gate']}; " + note).strip("; ")
        lines.append(f"| {r['model']} | {r['size']}² | {r['backend']} | {r['precision']} | {r['ms_p50']:.2f} | "
                     f"{r['ms_p99']:.2f} | {r['fps']:.0f} | {_f(r.get('peak_rss_delta_mb'), '.1f')} | "
                     f"{_f(r.get('map_max_abs_diff'), '.1e')} | {_f(r.get('map_p999_abs_diff'), '.1e')} | "
                     f"{_f(r.get('score_spearman'), '.4f')} | {ia} | {pa} | "
                     f"{note} |")
    return "\n".join(lines)


def _data_lines(rows) -> list[str]:
    seen, out = set(), []
    for r in rows:
        if r["model"] in seen or "validation_files" not in r:
            continue
        seen.add(r["model"])
        v, c = r["validation_files"], r["calibration_files"]
        short = lambda fs: ", ".join(fs) if len(fs) <= 6 else f"{len(fs)} files ({fs[0]} … {fs[-1]})"  # noqa: E731
        out.append(f"- `{r['model']}`: validation {short(v)}; INT8 calibration {short(c)}"
                   + (f" — {r['data_note']}" if r.get("data_note") else ""))
    return out


def write_md(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Engines benchmark\n\n" + block + "\n"
    path.write_text(text)


def run(args: argparse.Namespace) -> int:
    if args.render:
        md = markdown(json.loads(Path(args.render).read_text()))
        print(md)
        if args.md:
            write_md(Path(args.md), md)
        return 0
    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    models = [Path(m) for m in args.models] if args.models else default_models()
    if not models:
        print("sonomaly bench engines: no models (models/*/card.json)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for m in models:
        rows += bench_model(m, args, log)
    result = {"benchmark": "engines", "started": started, "seconds": round(time.time() - t0, 1),
              "command": "sonomaly bench engines " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "engines"]
              else "sonomaly bench engines", "threads": args.threads, "machine": machine(),
              "rows": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=1) + "\n")
    md = markdown(result)
    print(md)
    if args.md:
        write_md(Path(args.md), md)
    log(f"wrote {out}" + (f" and {args.md}" if args.md else ""))
    return 0 if all(r.get("status") in ("ok", "skipped", "n/a") for r in rows) else 1


def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return None if not np.isfinite(o) else float(f"{float(o):.6g}")
    if isinstance(o, np.integer):
        return int(o)
    return o
