"""``sonomaly``: the one command line of the project."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "data" / "demo" / "lung_convex_covid_blines_01.mp4"
DEMO_MODEL = REPO / "models" / "lung"
# Commands that live beside the code they drive. Each module has register(subparsers), which adds its parser with
# set_defaults(func=run); run(args) returns the exit code. A module not (yet) present is skipped.
PLUGIN_COMMANDS: tuple[str, ...] = (
    "sonomaly.tools.latency",      # sonomaly latency
    "sonomaly.tools.evaluate",     # sonomaly evaluate
    "sonomaly.tools.export",       # sonomaly export, sonomaly build-engine
    "sonomaly.tools.selftest",     # sonomaly selftest
)
# `sonomaly bench WHAT`: each module has add_arguments(parser) and run(args) -> exit code; it prints a table and
# writes JSON.
BENCHES: dict[str, str] = {
    "engines": "sonomaly.tools.bench_engines",
    "detectors": "sonomaly.tools.bench_detectors",
    "viewers": "sonomaly.tools.bench_viewers",
    "pipeline": "sonomaly.tools.bench_pipeline",
    "encoder": "sonomaly.tools.bench_encoder",
    "process": "sonomaly.tools.bench_process",
}
LIVE_PREFIXES = ("device:", "/dev/video", "rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                   help="inference backend (auto: TensorRT when a GPU and TensorRT are present, else ONNX Runtime)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for inference (default 1: on a small shared CPU one thread that "
                        "never spins gives the same time per frame as two, at less than half the CPU)")
    p.add_argument("--ort-spin", action="store_true",
                   help="let ONNX Runtime's idle intra-op threads busy-wait between frames (off by default: the "
                        "spinning burns most of a core that the grabber, composer and encoder need)")
    p.add_argument("--engine-process", choices=["on", "off"], default="on",
                   help="run the inference engine in a process of its own (default on): a crash or hang inside the "
                        "inference library then costs heatmaps (AI OFF, a new engine process) but never the video")
    p.add_argument("--engine-timeout-s", type=float, default=5.0, metavar="S",
                   help="with --engine-process on: an inference that takes longer is a hung engine, whose process "
                        "is killed and started again (default 5)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for WebRTC (repeatable; none by default: closed networks)")
    p.add_argument("--max-ai-lag-ms", type=float, default=100.0,
                   help="draw a heatmap only if it is younger than this (default 100)")
    p.add_argument("--ai-wait-ms", type=float, default=15.0,
                   help="wait up to this long after capture for the heatmap of the same frame when the model is "
                        "fast enough (default 15; 0 draws the newest heatmap at once)")
    p.add_argument("--ai-nice", type=int, default=0, metavar="N",
                   help="run the AI worker thread N nice levels below the video path, 0..19 (default 0: the same "
                        "priority); it then yields to every other process too (docs/ENGINES.md)")
    p.add_argument("--ai-max-fps", type=float, default=None, metavar="F",
                   help="at most F heatmaps a second, 0..1000 (default or 0: one per frame the worker can take); the "
                        "CPU it frees goes to the encoder and the viewers, every frame still goes out (docs/ENGINES.md)")
    p.add_argument("--no-hud", action="store_true", help="hide the HUD (fps, latency, backend, model)")
    p.add_argument("--log-level", default="info")
    g = p.add_argument_group("streaming (docs/STREAMING.md)")
    g.add_argument("--encode", choices=["shared", "per-viewer"], default="shared",
                   help="shared: one encoder for all viewers (default); per-viewer: aiortc's one encoder per viewer")
    g.add_argument("--fanout", choices=["pass", "tasks"], default="pass",
                   help="how the shared encoder's packets reach the viewers: pass (default), every viewer in one pass "
                        "per frame; tasks: aiortc's own sender loop per viewer")
    g.add_argument("--codec", choices=["vp8", "h264"], default="vp8", help="codec of the shared encoder (default vp8)")
    g.add_argument("--bitrate", default="4M", help="bitrate of the shared encoder, e.g. 2M..6M on a hospital LAN "
                                                   "(default 4M)")
    g.add_argument("--vp8-speed", type=int, default=None, metavar="N",
                   help="libvpx realtime speed of the shared VP8 encoder, 0..16, higher is faster at a little less "
                        "quality per bit (default 12; benchmarks/encoder.md)")
    g.add_argument("--playout-delay", default="0,0", metavar="MIN,MAX",
                   help="ms sent to viewers in the playout-delay RTP extension: 0,0 (default) asks browsers to show "
                        "each frame as soon as it is decoded, without smoothing; 'off' keeps their smoothing")
    g.add_argument("--max-viewers", type=int, default=64,
                   help="direct WebRTC viewers at most (more get 503; use --whip and an SFU for large audiences)")
    g.add_argument("--whip", default=None, metavar="URL", help="also publish the stream to this WHIP ingest")
    g.add_argument("--whip-token", default=None, metavar="T", help="bearer token for the WHIP ingest")
    g.add_argument("--recordings", default="recordings", metavar="DIR", help="recordings and event clips")
    g.add_argument("--feedback-dir", default="feedback", metavar="DIR",
                   help="dataset folder for viewer feedback (de-identified frames + metadata)")
    g.add_argument("--models-dir", default=None, metavar="DIR",
                   help="models the control API may switch to (default: the repository's models/)")
    g.add_argument("--event-clips", action="store_true",
                   help="write an event clip when the score stays over the threshold (see --event-frames)")
    g.add_argument("--event-frames", type=int, default=10, help="frames over the threshold that start a clip")
    g.add_argument("--pre-roll", type=float, default=3.0, help="seconds of pre-roll in event clips")
    g = p.add_argument_group("security")
    g.add_argument("--viewer-token", default=os.environ.get("SONOMALY_VIEWER_TOKEN"),
                   help="token remote viewers need (env SONOMALY_VIEWER_TOKEN; none: watching is open)")
    g.add_argument("--control-token", default=os.environ.get("SONOMALY_CONTROL_TOKEN"),
                   help="token for the control API and /metrics (env SONOMALY_CONTROL_TOKEN; none: loopback only)")
    g.add_argument("--no-loopback-exempt", action="store_true",
                   help="require tokens from loopback clients too (by default the local display needs none)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin to call the API (repeatable; none by default)")
    g.add_argument("--signalling-rate", type=float, default=2.0,
                   help="/offer and /whep requests per second per remote address (burst 20; 0: no limit)")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM): serve https")
    g.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sonomaly", description="Real-time ultrasound anomaly heatmaps over WebRTC")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="stream the bundled lung clip with the bundled model (CPU) to a browser")
    _add_serve_args(p)
    p.add_argument("--source", default=None, help=f"override the clip (default {DEMO_CLIP.relative_to(REPO)})")
    p.add_argument("--model", default=None, help=f"override the model (default {DEMO_MODEL.relative_to(REPO)})")

    p = sub.add_parser("serve", help="stream any source through a model")
    p.add_argument("--source", required=True,
                   help="video file, device:N, rtsp://…, http(s)://… (MJPEG too), image folder, DICOM file")
    p.add_argument("--model", default=None, help="model directory (model.onnx + card.json); none: video only")
    p.add_argument("--loop", action="store_true", help="loop a file source")
    _add_serve_args(p)

    p = sub.add_parser("train", help="train a detector on normal images or clips")
    p.add_argument("--family", default="patch_gaussian")
    p.add_argument("--data", required=True, nargs="+", help="folder(s) or files of normal images / clips")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-lesions", type=float, default=0.0, metavar="P",
                   help="draem: also learn from abnormal images that have lesion masks (masks/<stem>_mask*.png): a "
                        "share P of the training items becomes a real lesion, as it is or pasted onto a normal frame "
                        "(the threshold is still chosen on normal frames only)")
    p.add_argument("--config", default="", metavar="KEY=VAL,...",
                   help="family configuration overrides, e.g. draem: members=2,tta_flip=1,aug=photo,score_erode=0 "
                        "(the breast default's recipe, see benchmarks/detectors.md)")

    for name in PLUGIN_COMMANDS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    benches = {k: v for k, v in BENCHES.items() if importlib.util.find_spec(v) is not None}
    if benches:
        p = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
        bench_sub = p.add_subparsers(dest="bench", required=True)
        for what, name in benches.items():
            module = importlib.import_module(name)
            bp = bench_sub.add_parser(what, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__
                                      else None)
            module.add_arguments(bp)
            bp.set_defaults(func=module.run)
    return parser


def _serve(args, source_uri: str, model_dir: str | None, loop: bool) -> int:
    import uvicorn

    from sonomaly import engines
    from sonomaly.stream.app import create_app
    from sonomaly.stream.encoder import DEFAULT_VP8_SPEED, parse_bitrate
    from sonomaly.stream.pipeline import Pipeline, PipelineConfig
    from sonomaly.stream.playout import parse as parse_playout
    from sonomaly.stream.sources import ReconnectingSource, open_source

    # the options first: a wrong value is answered at once, not after the model has loaded
    try:  # the pipeline's own checks (ranges, NaN, negative times): one rule for the CLI, the config and the API
        config = PipelineConfig(max_ai_lag_ms=args.max_ai_lag_ms, ai_wait_ms=args.ai_wait_ms, hud=not args.no_hud,
                                ai_nice=args.ai_nice, ai_max_fps=args.ai_max_fps)
    except ValueError as e:
        print(f"sonomaly: {str(e).replace('PipelineConfig.', '--').replace('_', '-')}", file=sys.stderr)
        return 2
    try:
        playout_delay = parse_playout(args.playout_delay)
    except ValueError as e:
        print(f"sonomaly: --playout-delay: {e}", file=sys.stderr)
        return 2
    try:
        bitrate = parse_bitrate(args.bitrate)
    except ValueError as e:
        print(f"sonomaly: --bitrate: {e}", file=sys.stderr)
        return 2
    vp8_speed = DEFAULT_VP8_SPEED if args.vp8_speed is None else args.vp8_speed
    if not 0 <= vp8_speed <= 16:
        print(f"sonomaly: --vp8-speed must be 0..16, not {vp8_speed}", file=sys.stderr)
        return 2
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("sonomaly: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    if not 0 < args.engine_timeout_s <= 3600:
        print(f"sonomaly: --engine-timeout-s must be in (0, 3600], not {args.engine_timeout_s}", file=sys.stderr)
        return 2
    engine_process = ({"timeout_s": args.engine_timeout_s, "nice": int(config.ai_nice)}
                      if args.engine_process == "on" else False)
    log = logging.getLogger("sonomaly")
    engine = None
    if model_dir:
        opts = {**engines.LIVE_OPTIONS, "spin": bool(args.ort_spin)}
        if args.threads is not None:
            opts["threads"] = args.threads
        engine = engines.load(model_dir, backend=args.backend, process=engine_process, **opts)
        log.info("model %s on %s (%s)", engine.card.name, engine.backend, engine.backend_reason or "as asked")
    # a live source (camera, network) that ends has failed: reconnect; a file that ends without --loop has ended
    live = source_uri.removeprefix("stamp:").startswith(LIVE_PREFIXES)  # stamp: = frame-id barcode (latency)
    source = ReconnectingSource(lambda: open_source(source_uri, loop=loop), reconnect_on_end=live)
    pipeline = Pipeline(source, engine, config)
    from sonomaly.stream.app import ServerOptions
    from sonomaly.stream.recorder import EventConfig
    from sonomaly.stream.security import SecurityConfig

    options = ServerOptions(
        encode=args.encode, fanout=args.fanout, codec=args.codec, bitrate=bitrate, vp8_speed=vp8_speed,
        engine_process=engine_process,
        security=SecurityConfig(viewer_token=args.viewer_token, control_token=args.control_token,
                                exempt_loopback=not args.no_loopback_exempt, rate_per_s=args.signalling_rate,
                                cors_origins=list(args.cors_origin)),
        recordings_dir=Path(args.recordings), dataset_dir=Path(args.feedback_dir),
        models_dir=Path(args.models_dir) if args.models_dir else DEMO_MODEL.parent,
        events=EventConfig(enabled=args.event_clips, event_frames=args.event_frames, pre_roll_s=args.pre_roll),
        whip_url=args.whip, whip_token=args.whip_token, max_viewers=args.max_viewers,
        playout_delay=playout_delay)
    app = create_app(pipeline, ice_servers=args.ice_server, options=options)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"Sonomaly: streaming {source_uri} — open {scheme}://{args.host}:{args.port}/ in a browser", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        source = args.source or str(DEMO_CLIP)
        model = args.model or str(DEMO_MODEL)
        for path, what in ((source, "demo clip"), (model, "demo model")):
            if not Path(path).exists():
                print(f"sonomaly demo: the {what} is missing: {path} (run from a clone of the repository, "
                      f"or pass --source/--model)", file=sys.stderr)
                return 2
        return _serve(args, source, model, loop=True)
    if args.command == "serve":
        return _serve(args, args.source, args.model, loop=args.loop)
    if hasattr(args, "func"):
        return int(args.func(args) or 0)
    if args.command == "train":
        from sonomaly.engines.train import train

        from sonomaly.engines.models import build
        from sonomaly.tools.bench_detectors import parse_overrides

        if args.real_lesions > 0 and args.family != "draem":
            print("sonomaly train: --real-lesions is for --family draem", file=sys.stderr)
            return 2
        try:
            cfg = parse_overrides(args.config)
            if args.real_lesions > 0:
                cfg["real_p"] = args.real_lesions
            build(args.family, **{**cfg, "size": [args.size, args.size]})  # bad keys / values fail before decoding
        except (TypeError, ValueError) as e:
            print(f"sonomaly train: --config for {args.family}: {e}", file=sys.stderr)
            return 2
        extra = {"family_config": cfg} if cfg else {}
        card = train(args.family, args.data, args.out, size=args.size, epochs=args.epochs, seed=args.seed, **extra)
        print(f"wrote {args.out} ({card.name}, family {card.family})")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
