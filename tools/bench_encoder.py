"""The shared encoder's speed against its quality: ms per frame, bitrate and PSNR per VP8 speed and bitrate.

Encodes what ``sonomaly serve`` sends (the bundled clip composed with the default model's heatmap, contours and
HUD, by the very functions the live pipeline runs) with the shared encoder's own settings
(:func:`sonomaly.stream.encoder.open_encoder`) on one thread, decodes every packet again (PyAV) and compares it with
the frame that went in. ``sonomaly bench encoder [--speeds 6,12] [--bitrates 4M,1.5M] [--json OUT] [--md OUT]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from sonomaly.tools.machine import cpu_label

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", default=str(REPO / "data" / "demo" / "lung_convex_covid_blines_01.mp4"))
    p.add_argument("--model", default=str(REPO / "models" / "lung"),
                   help="model whose heatmaps are drawn on the frames ('none': the raw clip)")
    p.add_argument("--frames", type=int, default=300, help="frames per setting (default 300: 10 s at 30 fps)")
    p.add_argument("--speeds", default="6,8,10,12,16", help="VP8 realtime speeds (libvpx cpu-used), comma-separated")
    p.add_argument("--bitrates", default="4M,1.5M", help="bitrates, comma-separated (e.g. 4M,1.5M)")
    p.add_argument("--codec", default="vp8",
                   help="vp8, h264 or both (vp8,h264: compared in one run, in turn); h264 ignores the speeds "
                        "(x264 veryfast, what serve uses)")
    p.add_argument("--repeats", type=int, default=3,
                   help="encode each setting this many times, in turn; times are the median over the passes "
                        "(default 3)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--md", default=None, help="also write a Markdown table here")


def composed_frames(clip: str, model: str | None, n: int) -> list[np.ndarray]:
    """``n`` frames of ``clip`` as the live pipeline composes them (heatmap layer, gauge, HUD), I420, even sizes."""
    from sonomaly import overlay
    from sonomaly.engines.processing import TemporalSmoother, postprocess, preprocess
    from sonomaly.stream.pipeline import PipelineConfig
    from sonomaly.stream.roi import RegionTracker

    engine = None
    if model and model.lower() != "none":
        from sonomaly import engines

        engine = engines.load(model, backend="onnxruntime")
    cap = cv2.VideoCapture(clip)
    tracker, smoother, style = RegionTracker(), TemporalSmoother(0.5), overlay.OverlayStyle()
    out: list[np.ndarray] = []
    while len(out) < n:
        ok, img = cap.read()
        if not ok:
            if not out:
                raise SystemExit(f"cannot read {clip}")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        img = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]
        region = tracker.update(img)
        amap = score = None
        if engine is not None:
            raw_map, raw_score = engine.infer(preprocess(img, region, engine.card))
            amap, score = postprocess(raw_map, raw_score, region, engine.card, img.shape[:2],
                                      work_side=PipelineConfig().map_side)
            amap = smoother.update(amap, region)
        frame = overlay.compose(img, amap, region, score=score, style=style,
                                hud_lines=["30.0 fps  capture->screen 45 ms", "onnxruntime  lung-default"])
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420))
    cap.release()
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def encode_pass(frames: list[np.ndarray], codec: str, bitrate: int, speed: int) -> dict:
    """Encode ``frames`` at 30 fps with the shared encoder's settings; time each ``encode`` call, decode each packet
    and compare planes (Y, U, V) with the input."""
    import av

    from sonomaly.stream.encoder import open_encoder

    h = frames[0].shape[0] * 2 // 3
    w = frames[0].shape[1]
    ctx = open_encoder(codec, w, h, bitrate, speed=speed, threads=1)
    dec = av.CodecContext.create("vp8" if codec == "vp8" else "h264", "r")
    times, sizes, psnr = [], 0, {"y": [], "u": [], "v": []}
    pending: list[np.ndarray] = []
    for i, yuv in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = i * 3000
        frame.time_base = ctx.time_base
        if i == 0:
            frame.pict_type = av.video.frame.PictureType.I
        pending.append(yuv)
        t0 = time.perf_counter()
        packets = ctx.encode(frame)
        times.append((time.perf_counter() - t0) * 1e3)
        for pkt in packets:
            sizes += pkt.size
            for d in dec.decode(pkt):
                got = d.to_ndarray(format="yuv420p")
                ref = pending.pop(0)
                q = h // 4
                psnr["y"].append(_psnr(got[:h], ref[:h]))
                psnr["u"].append(_psnr(got[h : h + q], ref[h : h + q]))
                psnr["v"].append(_psnr(got[h + q :], ref[h + q :]))
    n = len(frames)
    return {"codec": codec, "speed": speed if codec == "vp8" else None, "bitrate": bitrate, "frames": n,
            "decoded": len(psnr["y"]), "ms_p50": float(np.percentile(times, 50)),
            "ms_p99": float(np.percentile(times, 99)), "ms_mean": float(np.mean(times)),
            "mbit_s": sizes * 8 / n * 30 / 1e6,
            "psnr_y": float(np.mean(psnr["y"])), "psnr_u": float(np.mean(psnr["u"])),
            "psnr_v": float(np.mean(psnr["v"])), "psnr_y_min": float(np.min(psnr["y"]))}


def machine() -> dict:
    import av

    from sonomaly.tools.bench_pipeline import machine as pipeline_machine

    return {**pipeline_machine(), "pyav": av.__version__}


def run(args) -> int:
    from sonomaly.stream.encoder import DEFAULT_VP8_SPEED, parse_bitrate

    try:
        codecs = list(dict.fromkeys(c.strip() for c in args.codec.split(",")))
        speeds = [int(v) for v in args.speeds.split(",")]
        bitrates = [parse_bitrate(v) for v in args.bitrates.split(",")]
    except ValueError as e:
        raise SystemExit(f"bench encoder: {e}") from None
    if any(c not in ("vp8", "h264") for c in codecs):
        raise SystemExit(f"bench encoder: --codec takes vp8, h264 or vp8,h264 (got {args.codec!r})")
    if any(not 0 <= s <= 16 for s in speeds):
        raise SystemExit("bench encoder: speeds are 0..16")
    settings = [(c, br, sp) for c in codecs for br in bitrates for sp in (speeds if c == "vp8" else [None])]
    frames = composed_frames(args.clip, args.model, args.frames)
    passes: dict[tuple, list[dict]] = {}
    for _ in range(max(1, args.repeats)):  # settings in turn, so drift of a shared machine falls on all of them
        for c, br, sp in settings:
            passes.setdefault((c, br, sp), []).append(encode_pass(frames, c, br, sp or 0))
    rows = []
    for key in settings:
        runs = passes[key]
        row = dict(runs[0])  # the encoder is deterministic: bytes and PSNR are the same in every pass
        for k in ("ms_p50", "ms_p99", "ms_mean"):
            row[k] = float(np.median([r[k] for r in runs]))
        row["ms_mean_passes"] = [r["ms_mean"] for r in runs]
        rows.append(row)
    h, w = frames[0].shape[0] * 2 // 3, frames[0].shape[1]
    head = f"{'codec':>5} {'speed':>5} {'Mbit/s':>7} {'ms mean':>7} {'ms p50':>7} {'ms p99':>7} {'PSNR Y':>7} {'U':>6} {'V':>6} {'Y min':>6}"
    print(f"{Path(args.clip).name} composed ({'model ' + Path(args.model).name if args.model != 'none' else 'raw'}), "
          f"{w}x{h}, {args.frames} frames, 1 thread")
    print(head)
    for r in rows:
        sp = "-" if r["speed"] is None else str(r["speed"])
        print(f"{r['codec']:>5} {sp:>5} {r['mbit_s']:7.2f} {r['ms_mean']:7.2f} {r['ms_p50']:7.2f} {r['ms_p99']:7.2f} {r['psnr_y']:7.2f} "
              f"{r['psnr_u']:6.2f} {r['psnr_v']:6.2f} {r['psnr_y_min']:6.2f}")
    result = {"benchmark": "encoder", "clip": Path(args.clip).name, "model": args.model, "size": [w, h],
              "default_vp8_speed": DEFAULT_VP8_SPEED, "repeats": args.repeats, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}
    if args.md:
        m = result["machine"]
        cmd = " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "encoder"] else ""
        lines = ["# Shared encoder: speed against quality", "",
                 f"Machine: {cpu_label(m)}, {m['cores']} cores; Python {m['python']}, PyAV {m['pyav']}. What `serve` "
                 f"sends: `{result['clip']}` composed with the heatmap of `{Path(args.model).name}`, its contours, gauge "
                 f"and HUD, {w}x{h}, {args.frames} frames at 30 fps, encoded with the shared encoder's settings on one "
                 f"thread, every packet decoded again and compared with its input. Times: the median over {args.repeats} "
                 f"passes per setting, the settings in turn (bytes and PSNR are the same in every pass). Command: `sonomaly bench encoder {cmd}` ({result['date']}). The default "
                 f"VP8 speed is {DEFAULT_VP8_SPEED}.", "",
                 "| codec | speed | Mbit/s | ms / frame mean | p50 | p99 | PSNR Y dB | U | V | worst frame Y |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            sp = "—" if r["speed"] is None else str(r["speed"])
            lines.append(f"| {r['codec']} | {sp} | {r['mbit_s']:.2f} | {r['ms_mean']:.2f} | {r['ms_p50']:.2f} | {r['ms_p99']:.2f} | "
                         f"{r['psnr_y']:.2f} | {r['psnr_u']:.2f} | {r['psnr_v']:.2f} | {r['psnr_y_min']:.2f} |")
        Path(args.md).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.md}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
