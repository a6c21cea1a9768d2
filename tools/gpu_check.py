"""GPU check in one go, for a machine with an NVIDIA GPU: install the ``[gpu]`` extra, run the TensorRT / backend tests
and the engines benchmark, and write everything under ``benchmarks/gpu/``.

    python tools/gpu_check.py                 # from the repository root, with the project's venv active (make demo)
    python tools/gpu_check.py --no-install    # the extra is already installed
    python tools/gpu_check.py --ort-gpu       # also swap onnxruntime for onnxruntime-gpu (CUDA / TensorRT EPs)

Writes ``benchmarks/gpu/nvidia-smi.txt``, ``pip.txt``, ``pytest.txt``, ``engines.json``, ``engines.md`` and
``summary.json`` (exit codes, GPU, TensorRT version, whether the TensorRT FP16 256^2 target of <= 2 ms was met).
Exits non-zero when a step failed.  TensorRT's wheels come from NVIDIA's index (``https://pypi.nvidia.com``);
pycuda has no Linux wheels and builds from source, so the machine needs the CUDA toolkit (``cuda.h``, ``nvcc``) and
the driver (``libcuda``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "gpu"
NVIDIA_INDEX = "https://pypi.nvidia.com"


def sh(cmd: list[str], log: Path, timeout: int = 3600) -> int:
    print("+", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"  -> rc {rc}, log {log.relative_to(REPO)}", flush=True)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--ort-gpu", action="store_true", help="replace onnxruntime by onnxruntime-gpu")
    ap.add_argument("--iters", type=int, default=500)
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    summary: dict = {"steps": {}}
    if shutil.which("nvidia-smi"):
        summary["steps"]["nvidia-smi"] = sh(["nvidia-smi"], OUT / "nvidia-smi.txt", 60)
    else:
        (OUT / "nvidia-smi.txt").write_text("nvidia-smi not found\n")
    if not args.no_install:
        cmd = [py, "-m", "pip", "install", "--extra-index-url", NVIDIA_INDEX, "-e", ".[gpu]"]
        summary["steps"]["pip"] = sh(cmd, OUT / "pip.txt", 1800)
        if args.ort_gpu:
            sh([py, "-m", "pip", "uninstall", "-y", "onnxruntime"], OUT / "pip-ort-uninstall.txt", 300)
            summary["steps"]["pip-ort-gpu"] = sh([py, "-m", "pip", "install", "onnxruntime-gpu"],
                                                 OUT / "pip-ort-gpu.txt", 1800)
    probe = subprocess.run([py, "-c", "from sonomaly.engines.backends.tensorrt import available, gpu_probe; "
                                      "import json; print(json.dumps([available(), gpu_probe()]))"],
                           cwd=REPO, capture_output=True, text=True)
    try:
        (ok, why), (n, gpu) = json.loads(probe.stdout.strip().splitlines()[-1])
    except Exception:
        ok, why, gpu = False, probe.stderr.strip()[-500:], "?"
    summary.update(tensorrt_available=ok, tensorrt=why, gpu=gpu)
    print(f"TensorRT: {why}\nGPU: {gpu}", flush=True)
    summary["steps"]["pytest"] = sh([py, "-m", "pytest", "-rs", "-s", "tests/test_tensorrt.py",
                                     "tests/test_backends.py", "tests/test_export.py"], OUT / "pytest.txt", 1800)
    summary["steps"]["bench"] = sh([py, "-m", "sonomaly.tools", "bench", "engines", "--iters", str(args.iters),
                                    "--json", str(OUT / "engines.json"), "--md", str(OUT / "engines.md")],
                                   OUT / "bench.txt", 3600)
    try:
        rows = json.loads((OUT / "engines.json").read_text())["rows"]
        fp16 = [r for r in rows if r["backend"] == "tensorrt" and r["precision"] == "fp16" and r["size"] == 256
                and r.get("status") == "ok"]
        summary["tensorrt_fp16_256_ms_p50"] = {r["model"]: r["ms_p50"] for r in fp16}
        summary["target_2ms_met"] = bool(fp16) and all(r["ms_p50"] <= 2.0 for r in fp16)
    except Exception as e:
        summary["bench_error"] = str(e)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if all(rc == 0 for rc in summary["steps"].values()) and ok else 1


if __name__ == "__main__":
    sys.exit(main())
