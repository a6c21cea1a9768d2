"""Detector families x datasets benchmark: group-aware splits, >= 3 seeds, mean ± sd; prints a table, writes JSON.

For every family and seed it trains from scratch (normal data only, except the classifier), chooses the threshold on
held-out *normal* groups, and evaluates with :func:`sonomaly.engines.evaluate.evaluate` on a test split disjoint by
``MANIFEST.csv`` group (patient / near-duplicate cluster):

* ``busi``: BUSI breast images.  Per seed the normal groups are shuffled into fit (60 %) / threshold (15 %) / test
  (25 %); the abnormal groups into a classifier-training half and a test half.  Every family is tested on the same
  test normals + test abnormals (with masks -> pixel metrics).
* ``lung``: lung clips.  Per seed one normal patient group is the test normal, another the threshold group, the rest
  fit; all 5 abnormal clips are test (the classifier is then weakly supervised by synthetic lesions only).  Evaluated
  as they are and brightness-matched (each clip rescaled to a common in-region mean / std).

CPU ms per frame is measured separately on the 256² export of each family (ONNX Runtime, batch 1, 1 and 2 threads).

    flock /tmp/sonomaly-cpu.lock sonomaly bench detectors --data $DATA --json benchmarks/detectors.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sonomaly.tools.machine import cpu_fields, cpu_label

FAMILIES = ("conv_ae", "ae", "patch_gaussian", "student_teacher", "draem", "classifier")
# training steps per family at the benchmark size (epochs are derived from the fit-set size, so runs are
# deterministic for a seed, unlike a wall-clock cap)
STEPS = {"conv_ae": 100, "ae": 100, "patch_gaussian": 0, "student_teacher": 70, "draem": 200, "classifier": 160}


def family_config(family: str, dataset: str) -> dict:
    synth = "breast" if dataset == "busi" else "lung"
    return {
        "conv_ae": dict(),  # the previous lung default (masked-L2 autoencoder), for reference
        "ae": dict(loss="ssim", latent=16),
        "patch_gaussian": dict(cov_fp16=True, bands=4, dim=48),
        "student_teacher": dict(width=32, feat=64, teacher_epochs=3),
        "draem": dict(synth=synth),
        "classifier": dict(synth=synth, pool="gap"),
    }[family]


def read_manifest(root: Path) -> list[dict]:
    with open(root / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def _split_groups(groups: list[str], fracs: tuple[float, ...], rng) -> list[list[str]]:
    g = sorted(set(groups))
    rng.shuffle(g)
    out, i = [], 0
    for k, fr in enumerate(fracs):
        n = len(g) - i if k == len(fracs) - 1 else max(1, int(round(fr * len(g))))
        out.append(g[i : i + n])
        i += n
    return out


def _link_dir(base: Path, normals: list[Path], abnormals: list[Path], masks: list[Path]) -> Path:
    for sub, files in (("normal", normals), ("abnormal", abnormals), ("masks", masks)):
        (base / sub).mkdir(parents=True, exist_ok=True)
        for p in files:
            (base / sub / p.name).symlink_to(p.resolve())
    return base


def splits(root: Path, dataset: str, seed: int):
    """-> dict(train_sources, val_groups, test_dir_files) for one seed."""
    from sonomaly.engines.train import Source

    rows = read_manifest(root)
    rng = np.random.default_rng(seed)
    if dataset == "busi":
        imgs = [r for r in rows if r["organ"] == "breast" and r["kind"] == "image"]
        nor = [r for r in imgs if r["label"] == "normal"]
        abn = [r for r in imgs if r["label"] != "normal"]
        fit_g, val_g, test_g = _split_groups([r["group"] for r in nor], (0.6, 0.15, 0.25), rng)
        abn_train_g, abn_test_g = _split_groups([r["group"] for r in abn], (0.5, 0.5), rng)
        train_src = [Source(root / r["path"], r["group"]) for r in nor if r["group"] in fit_g + val_g]
        train_abn = [Source(root / r["path"], r["group"], "abnormal") for r in abn if r["group"] in abn_train_g]
        test_n = [root / r["path"] for r in nor if r["group"] in test_g]
        test_a = [root / r["path"] for r in abn if r["group"] in abn_test_g]
        stems = {p.stem for p in test_a}
        masks = [root / r["path"] for r in rows if r["kind"] == "mask" and r["path"].split("/")[-1].split("_mask")[0] in stems]
        return dict(train=train_src, train_abnormal=train_abn, val_groups=val_g, test=(test_n, test_a, masks),
                    test_groups=test_g)
    vids = [r for r in rows if r["organ"] == "lung" and r["kind"] == "video"]
    nor = [r for r in vids if r["label"] == "normal"]
    abn = [r for r in vids if r["label"] != "normal"]
    groups = sorted({r["group"] for r in nor})
    order = [groups[(seed + k) % len(groups)] for k in range(len(groups))]
    test_g, val_g, fit_g = [order[0]], [order[1]], order[2:]
    train_src = [Source(root / r["path"], r["group"]) for r in nor if r["group"] in fit_g + val_g]
    return dict(train=train_src, train_abnormal=[], val_groups=val_g,
                test=([root / r["path"] for r in nor if r["group"] in test_g], [root / r["path"] for r in abn], []),
                test_groups=test_g)


def _epochs_for(family: str, n_frames: int, batch: int, scale: float = 1.0) -> int | None:
    if STEPS[family] == 0:
        return None
    per_epoch = max(1, math.ceil(n_frames / batch))
    return max(1, math.ceil(STEPS[family] * scale / per_epoch))


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def onnx_latency(family: str, cfg: dict, size: int = 256, n: int = 60) -> dict:
    """ms per frame of the family's ``size``² ONNX export (weights untrained: the graph and its cost are the same),
    with the machine it was timed on."""
    import onnxruntime as ort

    from sonomaly.engines.models import build
    from sonomaly.engines.train import export_onnx

    model = build(family, **{**cfg, "size": [size, size], "in_channels": 2})
    tmp = Path(tempfile.mkdtemp(prefix="sonomaly_lat_"))
    try:
        export_onnx(model, tmp / "m.onnx", (size, size), 2)
        size_mb = (tmp / "m.onnx").stat().st_size / 1e6
        x = np.random.default_rng(0).standard_normal((1, 2, size, size)).astype(np.float32)
        x[0, 1] = 1.0
        out = {"params": count_params(model), "onnx_mb": round(size_mb, 2)}
        for th in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = th
            so.inter_op_num_threads = 1
            s = ort.InferenceSession(str(tmp / "m.onnx"), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                s.run(None, {"input": x})
            t = []
            for _ in range(n):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                t.append(time.perf_counter() - t0)
            out[f"ms_{th}t"] = round(float(np.median(t) * 1e3), 2)
        out["machine"] = cpu_label(cpu_fields())  # the rows of one file come from many
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_overrides(text: str) -> dict:
    """``"real_p=0.5,synth=breast"`` -> ``{"real_p": 0.5, "synth": "breast"}`` (numbers parsed, the rest strings)."""
    out: dict = {}
    for kv in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = kv.partition("=")
        if not _:
            raise ValueError(f"--config wants KEY=VALUE, got {kv!r}")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def run_one(root: Path, dataset: str, family: str, seed: int, size: int, work: Path, progress: bool,
            steps_scale: float = 1.0, overrides: dict | None = None) -> dict:
    from sonomaly.engines.evaluate import evaluate
    from sonomaly.engines.train import train, uses_abnormal

    sp = splits(root, dataset, seed)
    every, maxf = (1, None) if dataset == "busi" else (8, 60)
    cfg = {**family_config(family, dataset), **(overrides or {})}
    data = sp["train"] + (sp["train_abnormal"] if uses_abnormal(family, cfg) else [])
    n_fit_est = len(sp["train"]) * (1 if dataset == "busi" else 40)
    epochs = _epochs_for(family, n_fit_est, 16, steps_scale)
    if family == "student_teacher" and steps_scale < 1:
        cfg = {**cfg, "teacher_epochs": 1}
    out_dir = work / f"{dataset}_{family}_s{seed}"
    t0 = time.time()
    card = train(family, data, out_dir, size=size, epochs=epochs, seed=seed, val_groups=sp["val_groups"],
                 every=every, max_frames_per_file=maxf, family_config=cfg, progress=progress, threads=1,
                 max_seconds=600)
    t_train = time.time() - t0
    test_n, test_a, masks = sp["test"]
    tdir = _link_dir(work / f"test_{dataset}_s{seed}_{family}", test_n, test_a, masks)
    res = {"train_seconds": round(t_train, 1), "fit_steps": card.training["fit"].get("steps"),
           "test_groups": sp["test_groups"], "val_groups": sp["val_groups"]}
    variants = [False] if dataset == "busi" else [False, True]
    for bm in variants:
        r = evaluate(out_dir, tdir, every=every if dataset == "busi" else 4, max_frames=maxf, brightness_matched=bm,
                     progress=False, threads=1)
        res["brightness_matched" if bm else "as_is"] = {k: r.get(k) for k in (
            "image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "dice", "dice_mean", "peak_hit_rate",
            "clip_auroc", "brightness_auroc", "clip_brightness_auroc", "n_normal", "n_abnormal", "n_frames",
            "frames_over_threshold", "ms_per_frame")}
    shutil.rmtree(tdir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


METRICS = ("image_auroc", "image_ap", "clip_auroc", "pixel_auroc", "aupro", "dice", "peak_hit_rate", "brightness_auroc",
           "sens_at_threshold", "fpr_at_threshold")


def _metric(res: dict, k: str):
    """One run's metric; ``sens_at_threshold`` / ``fpr_at_threshold``: the share of abnormal / normal images (frames)
    over the card's image threshold (the operating point that ships: AUROC says nothing about it)."""
    if k in ("sens_at_threshold", "fpr_at_threshold"):
        fot = res.get("frames_over_threshold") or {}
        return fot.get("abnormal" if k == "sens_at_threshold" else "normal") if isinstance(fot, dict) else None
    return res.get(k)


def aggregate(runs: list[dict], variant: str) -> dict:
    out = {}
    for k in METRICS:
        v = [x for x in (_metric(r[variant], k) for r in runs if variant in r) if x is not None]
        out[k] = {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4),
                  "n": len(v)} if v else None
    return out


def fmt(m):
    return "—" if m is None else f"{m['mean']:.3f} ± {m['sd']:.3f}"


def _at_threshold(agg: dict) -> str:
    a, n = agg.get("sens_at_threshold"), agg.get("fpr_at_threshold")
    return "—" if a is None or n is None else f"{100 * a['mean']:.0f} / {100 * n['mean']:.0f} %"


def _at_size(lat: dict) -> str:
    at = lat.get("at_size")
    return f" ({at['size']}²: {at.get('ms_1t', '?')} / {at.get('ms_2t', '?')})" if at else ""


def table(results: dict) -> str:
    lines = ["| dataset | family | image AUROC | image AP | clip AUROC | pixel AUROC | AUPRO | Dice | peak hit | "
             "brightness AUROC | at the threshold: abnormal / normal over | ms/frame 256² (ORT 1t / 2t) | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.get("summary", {}).items():
        lat = results["latency"].get(r["family"], results["latency"].get(r["family"].split("+")[0], {}))
        lines.append(f"| {r['dataset_label']} | {r['family']} | " + " | ".join(fmt(r['agg'][k]) for k in (
            "image_auroc", "image_ap", "clip_auroc", "pixel_auroc", "aupro", "dice", "peak_hit_rate",
            "brightness_auroc")) + f" | {_at_threshold(r['agg'])} | {lat.get('ms_1t', '?')} / {lat.get('ms_2t', '?')}{_at_size(lat)} | "
            f"{lat.get('params', '?')} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrasound"),
                   help="the ultrasound data folder (MANIFEST.csv, busi/, videos/)")
    p.add_argument("--json", default="benchmarks/detectors.json")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--datasets", default="busi,lung")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=128, help="training / evaluation input size (latency is always 256²)")
    p.add_argument("--steps", default="", help="override steps per family, e.g. draem=600,classifier=400")
    p.add_argument("--tag", default="", help="suffix for the run keys / family labels (e.g. 'long'): keeps earlier "
                                            "runs of the same family when merging")
    p.add_argument("--config", default="", help="family config overrides, e.g. real_p=0.5 (draem: learn from the "
                                               "training abnormals' lesion masks too); use with --tag")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale the training steps (smoke runs: 0.05)")
    p.add_argument("--merge", action="store_true", help="merge into an existing --json instead of replacing it")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--latency-only", action="store_true",
                   help="train nothing: time every label already in --json at the size it was benchmarked at (its "
                        "'at_size' entry) with the label's own configuration, and rewrite the file")
    p.add_argument("--latency-table", default="", metavar="OUT.json",
                   help="with --latency-only: time every label of --json at 256² and at its own size on this one "
                        "machine and write them to OUT.json (with the machine), leaving --json as it is")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    import torch

    torch.set_num_threads(1)
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        STEPS[k] = int(v)
    if args.latency_only:  # times the labels of an existing file: needs no data
        if args.latency_table:
            return latency_table(Path(args.json), Path(args.latency_table))
        return retime_at_size(Path(args.json))
    root = Path(args.data)
    if not (root / "MANIFEST.csv").exists():
        print(f"bench detectors: {root}/MANIFEST.csv not found (pass --data)", file=sys.stderr)
        return 2
    fams = [f for f in args.families.split(",") if f]
    dsets = [d for d in args.datasets.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_overrides(args.config)
    out_path = Path(args.json)
    label_of = {f: f"{f}+{args.tag}" if args.tag else f for f in fams}  # the run keys' family label
    results = json.loads(out_path.read_text()) if args.merge and out_path.exists() else {"runs": {}, "latency": {}}
    work = Path(tempfile.mkdtemp(prefix="sonomaly_bench_"))
    try:
        for seed in seeds:
            for ds in dsets:
                for fam in fams:
                    key = f"{ds}/{label_of[fam]}/{seed}"
                    t0 = time.time()
                    try:
                        results["runs"][key] = run_one(root, ds, fam, seed, args.size, work, not args.quiet,
                                                          args.steps_scale, overrides)
                    except Exception as e:  # keep going; the failure is recorded
                        results["runs"][key] = {"error": f"{type(e).__name__}: {e}"}
                    r = results["runs"][key]
                    print(f"[bench] {key}: {time.time() - t0:.0f}s " + json.dumps(
                        {v: {k: r[v].get(k) for k in ("image_auroc", "clip_auroc", "pixel_auroc", "dice", "peak_hit_rate")}
                         for v in ("as_is", "brightness_matched") if v in r} if "error" not in r else r),
                        file=sys.stderr, flush=True)
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    out_path.write_text(json.dumps(results, indent=1) + "\n")
        if not args.no_latency:
            for fam, label in label_of.items():
                cfg = {**family_config(fam, "lung"), **overrides}
                results["latency"][label] = onnx_latency(fam, cfg)
                if args.size != 256:  # also at the size the accuracy was measured at (a default may ship at it)
                    results["latency"][label]["at_size"] = {"size": args.size, **onnx_latency(fam, cfg, args.size)}
                print(f"[bench] latency {label}: {results['latency'][label]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["summary"] = summarise(results)
    note = results.get("machine", {}).get("note") if args.merge else None  # a merged file keeps its note (which
    # rows ran on which machine): edit it by hand when a merge adds rows from another machine
    results["machine"] = {"nproc": os.cpu_count(), **cpu_fields(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "note": note or "2 cores; heavy runs serialised with flock"}
    prev = results.get("settings", {})
    results["settings"] = {
        **prev, "size": prev.get("size", args.size), "seeds": seeds,
        "sizes": {**prev.get("sizes", {}), **{lb: args.size for lb in label_of.values()}},
        "configs": {**prev.get("configs", {}),
                    **{lb: {d: {**family_config(f, d), **overrides} for d in ("busi", "lung")}
                       for f, lb in label_of.items()}},
        "steps": {**prev.get("steps", {}), **{lb: STEPS[f] for f, lb in label_of.items()}}}
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def _labels_and_configs(path: Path):
    """``path``'s results and its labels as (label, family, lung config); None (said on stderr) if it is missing."""
    if not path.exists():
        print(f"bench detectors: {path} not found (--latency-only times the labels of an existing file)",
              file=sys.stderr)
        return None
    results = json.loads(path.read_text())
    labels = sorted({k.split("/")[1] for k in results.get("runs", {})})
    configs = results.get("settings", {}).get("configs", {})
    return results, [(lb, lb.split("+")[0], configs.get(lb, {}).get("lung") or family_config(lb.split("+")[0], "lung"))
                     for lb in labels]


def retime_at_size(path: Path) -> int:
    """``--latency-only``: every label of ``path`` timed at the size it was benchmarked at (a default ships there)."""
    from sonomaly.engines.train import label_size

    found = _labels_and_configs(path)
    if found is None:
        return 2
    results, labels = found
    for label, fam, cfg in labels:
        size = label_size(results, label)
        lat = results.setdefault("latency", {}).setdefault(label, {})
        lat["at_size"] = {"size": size, **onnx_latency(fam, cfg, size)}
        print(f"[bench] latency {label} at {size}²: {lat['at_size']}", file=sys.stderr, flush=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def latency_table(path: Path, out: Path) -> int:
    """``--latency-only --latency-table OUT``: every label of ``path`` timed at 256² and at its own size, all on this
    machine, written to ``out`` with the machine and the time (the file's own latencies come from many machines)."""
    from datetime import datetime, timezone

    from sonomaly.engines.train import label_size

    found = _labels_and_configs(path)
    if found is None:
        return 2
    results, labels = found
    rows = {}
    for label, fam, cfg in labels:
        size = label_size(results, label)
        rows[label] = {**onnx_latency(fam, cfg), "at_size": {"size": size, **onnx_latency(fam, cfg, size)}}
        print(f"[bench] latency {label}: {rows[label]}", file=sys.stderr, flush=True)
    doc = {"source": path.name, "utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "machine": {"nproc": os.cpu_count(), **cpu_fields(), "platform": platform.platform()}, "latency": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(latency_md(doc))
    return 0


def latency_md(doc: dict) -> str:
    """A Markdown table of a :func:`latency_table` file: one machine, every label, ms per frame at 256² and its size."""
    lines = [f"ONNX Runtime CPU, batch 1, median of 60 calls; {cpu_label(doc['machine'])}, nproc "
             f"{doc['machine'].get('nproc', '?')}, {doc['utc']} UTC.", "",
             "| label | params | 256² 1 thread | 256² 2 threads | own size | 1 thread | 2 threads |",
             "|---|---|---|---|---|---|---|"]
    for label, r in sorted(doc["latency"].items()):
        a = r["at_size"]
        lines.append(f"| {label} | {r['params']} | {r['ms_1t']} | {r['ms_2t']} | {a['size']}² | {a['ms_1t']} | "
                     f"{a['ms_2t']} |")
    return "\n".join(lines)


def summarise(results: dict) -> dict:
    """Mean ± sd per dataset / variant / family label over every run in ``results["runs"]``."""
    summ = {}
    base = lambda f: f.split("+")[0]
    all_fams = sorted({k.split("/")[1] for k in results["runs"]},
                      key=lambda f: (FAMILIES.index(base(f)) if base(f) in FAMILIES else 99, f))
    for ds, variants in (("busi", [("as_is", "BUSI breast images")]),
                         ("lung", [("as_is", "lung clips, as is"), ("brightness_matched", "lung clips, brightness-matched")])):
        for variant, label in variants:
            for fam in all_fams:
                runs = [v for k, v in results["runs"].items() if k.startswith(f"{ds}/{fam}/") and "error" not in v]
                if runs:
                    summ[f"{ds}/{variant}/{fam}"] = {"dataset": ds, "variant": variant, "dataset_label": label,
                                                     "family": fam, "seeds": len(runs), "agg": aggregate(runs, variant)}
    return summ


def write_md(results: dict, path: str | Path, commands: list[str] | None = None, narrative: str = "") -> Path:
    """``benchmarks/detectors.md`` from the JSON (table, per-run details, machine, commands)."""
    path = Path(path)
    m = results.get("machine", {})
    st = results.get("settings", {})
    lines = ["# Detector benchmark — families × datasets", "",
             f"Machine: {cpu_label(m)}, nproc {m.get('nproc', '?')} ({m.get('note', '')}); "
             f"{m.get('platform', '')}; Python {m.get('python', '')}, torch {m.get('torch', '')}.", "",
             f"Training/evaluation size {st.get('size')}²"
             + "".join(f", {lb} {sz}²" for lb, sz in sorted(st.get("sizes", {}).items()) if sz != st.get("size"))
             + f"; seeds {st.get('seeds')}; training steps per family "
             f"{st.get('steps')} (scaled by `--steps-scale`, see the JSON runs' `fit_steps`). Latency: each family's "
             "256² ONNX export, ONNX Runtime CPU, batch 1, median of 60 calls, 1 and 2 intra-op threads; in brackets "
             "at the label's own training size, where a default ships.", "",
             "Values: mean ± sd over the seeds (group-aware splits; see `tools/bench_detectors.py`). Image AUROC is per "
             "image (BUSI) or per frame (lung); clip AUROC uses the clip score = mean frame score; pixel metrics are "
             "inside the scan region with burned-in text / calipers removed; Dice at the card's threshold (chosen on "
             "held-out normal groups only); brightness AUROC = the same split scored by mean in-region gray alone.", "",
             table(results), ""]
    if narrative:
        lines += [narrative, ""]
    lines += ["## Runs", "", "| run | train s | steps | test groups (normal) | image AUROC | clip AUROC | pixel AUROC | Dice | "
              "peak hit | brightness AUROC |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.get("runs", {}).items():
        if "error" in r:
            lines.append(f"| {k} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        for v in ("as_is", "brightness_matched"):
            if v in r:
                a = r[v]
                f = lambda x: "—" if x is None else f"{x:.3f}"
                lines.append(f"| {k} {v} | {r['train_seconds']} | {r['fit_steps']} | {', '.join(r['test_groups'])[:40]} | "
                             f"{f(a['image_auroc'])} | {f(a['clip_auroc'])} | {f(a['pixel_auroc'])} | {f(a['dice'])} | "
                             f"{f(a['peak_hit_rate'])} | {f(a['brightness_auroc'])} |")
    if commands:
        lines += ["", "## Reproduce", "", "```sh"] + commands + ["```"]
    path.write_text("\n".join(lines) + "\n")
    return path
