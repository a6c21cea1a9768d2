"""The one CLI: commands exist, errors are clear, the pipeline benchmark writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sonomaly.tools.cli import build_parser, main


def test_help_lists_the_front_door_commands():
    text = build_parser().format_help()
    for cmd in ("demo", "serve", "train", "bench"):
        assert cmd in text


def test_demo_with_a_missing_model_says_so(tmp_path, capsys):
    rc = main(["demo", "--model", str(tmp_path / "nope")])
    assert rc == 2
    assert "demo model is missing" in capsys.readouterr().err


def test_serve_requires_a_source():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])


def test_serve_rejects_a_bad_playout_delay(demo_clip, capsys):
    rc = main(["serve", "--source", str(demo_clip), "--playout-delay", "50,10"])
    assert rc == 2
    assert "--playout-delay" in capsys.readouterr().err


@pytest.mark.parametrize("opt", ["--max-ai-lag-ms", "--ai-wait-ms"])
def test_serve_rejects_a_nan_time(demo_clip, capsys, opt):
    rc = main(["serve", "--source", str(demo_clip), opt, "nan"])
    assert rc == 2
    assert opt in capsys.readouterr().err


def test_real_lesions_is_for_draem_only(tmp_path, capsys):
    rc = main(["train", "--family", "conv_ae", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
               "--real-lesions", "0.5"])
    assert rc == 2
    assert "--family draem" in capsys.readouterr().err


def test_train_config_is_checked_before_any_decoding(tmp_path, capsys):
    """``--config`` reaches the family's constructor first: an unknown key or a bad value is a clear error (rc 2)
    and no model directory is written."""
    for cfg, want in (("membres=2", "membres"), ("members=0", "members"), ("aug=sepia", "aug"), ("members", "KEY=VALUE")):
        rc = main(["train", "--family", "draem", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--config", cfg])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--config for draem" in err and want in err
    assert not (tmp_path / "m").exists()


def test_bench_pipeline_writes_json(tmp_path, lung_model, demo_clip):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "sonomaly.tools", "bench", "pipeline", "--frames", "12",
                        "--sizes", "native,640x480", "--model", str(lung_model), "--clip", str(demo_clip),
                        "--map-side", "200,0", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [(row["size"], row["map_side"]) for row in data["results"]] == [
        ("450x450", 200), ("450x450", None), ("640x480", 200), ("640x480", None)]
    for row in data["results"]:
        st = row["stages"]
        assert set(st) == {"roi", "preprocess", "infer", "postprocess", "layer", "overlay", "i420", "total"}
        assert all(0 < v["p50"] <= v["p99"] for v in st.values())
        assert st["total"]["p50"] >= st["infer"]["p50"]
    assert data["machine"]["cores"] >= 1 and "450x450" in r.stdout


def test_bench_encoder_encodes_decodes_and_compares(tmp_path, lung_model, demo_clip):
    """The encoder benchmark encodes the composed stream with the shared encoder's settings and decodes every frame
    again: every frame comes back, the quality is that of a real encode (not a copy, not garbage), and a lower
    bitrate costs quality."""
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "sonomaly.tools", "bench", "encoder", "--frames", "20", "--speeds",
                        "6,12", "--bitrates", "2M,300k", "--repeats", "1", "--model", str(lung_model), "--clip",
                        str(demo_clip), "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    rows = {(row["bitrate"], row["speed"]): row for row in data["results"]}
    assert set(rows) == {(2_000_000, 6), (2_000_000, 12), (300_000, 6), (300_000, 12)}
    for row in rows.values():
        assert row["decoded"] == row["frames"] == 20  # lag-in-frames 0: one frame out per frame in
        assert 20 < row["psnr_y_min"] <= row["psnr_y"] < 99 and row["mbit_s"] > 0
        assert 0 < row["ms_p50"] <= row["ms_p99"]
    for speed in (6, 12):
        assert rows[(300_000, speed)]["psnr_y"] < rows[(2_000_000, speed)]["psnr_y"]
        assert rows[(300_000, speed)]["mbit_s"] < rows[(2_000_000, speed)]["mbit_s"]
    assert data["default_vp8_speed"] == 12 and data["size"] == [450, 450]


def test_bench_encoder_compares_codecs_in_one_run(tmp_path, lung_model, demo_clip):
    """``--codec vp8,h264`` encodes the same composed frames with both codecs in one run (H.264 has no speed): each
    decodes every frame with a real encode's quality; an unknown codec is refused with the reason."""
    out = tmp_path / "c.json"
    base = [sys.executable, "-m", "sonomaly.tools", "bench", "encoder", "--frames", "12", "--speeds", "12",
            "--bitrates", "2M", "--repeats", "1", "--model", str(lung_model), "--clip", str(demo_clip)]
    r = subprocess.run(base + ["--codec", "vp8,h264", "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    rows = {(row["codec"], row["speed"]): row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {("vp8", 12), ("h264", None)}
    for row in rows.values():
        assert row["decoded"] == row["frames"] == 12  # zerolatency / lag-in-frames 0: no frame held back
        assert 20 < row["psnr_y_min"] <= row["psnr_y"] < 99 and 0 < row["ms_p50"] <= row["ms_p99"]
    bad = subprocess.run(base + ["--codec", "vp9"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--codec takes vp8, h264" in bad.stderr


def test_vp8_speed_is_checked():
    from sonomaly.stream.encoder import SharedEncoder, open_encoder

    with pytest.raises(ValueError, match="0..16"):
        SharedEncoder(None, 0, speed=17)
    assert open_encoder("vp8", 64, 48, 1_000_000, speed=16).width == 64


@pytest.mark.parametrize("bad, says", [(["--ai-nice", "20"], "--ai-nice must be a finite number >= 0 and <= 19"),
                                       (["--vp8-speed", "20"], "--vp8-speed must be 0..16"),
                                       (["--bitrate", "fast"], "--bitrate: not a bitrate"),
                                       (["--playout-delay", "x"], "--playout-delay"),
                                       (["--ssl-certfile", "c.pem"], "go together"),
                                       (["--ai-max-fps", "-1"], "--ai-max-fps must be a finite number >= 0"),
                                       (["--ai-max-fps", "1001"], "--ai-max-fps must be a finite number >= 0 and <= 1000"),
                                       (["--ai-max-fps", "inf"], "--ai-max-fps must be a finite number >= 0"),
                                       (["--engine-timeout-s", "0"], "--engine-timeout-s must be in (0, 3600]"),
                                       (["--engine-timeout-s", "nan"], "--engine-timeout-s must be in (0, 3600]")])
def test_serve_options_are_checked_before_the_model_loads(bad, says, tmp_path):
    # a model folder that does not exist: had the model been loaded first, the error would be about the model
    r = subprocess.run([sys.executable, "-m", "sonomaly.tools", "serve", "--source", "x.mp4",
                        "--model", str(tmp_path / "no-such-model"), *bad],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-500:]


def test_machine_facts_read_the_cpu_model_and_fall_back(tmp_path):
    """Every benchmark's machine block comes from tools.machine: the first 'model name' line of cpuinfo, a fallback
    that is never empty when the file is missing or has no such line, and the memory in GiB."""
    import platform

    from sonomaly.tools.machine import cpu_model, memory_gib

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\n"
                    "processor\t: 1\nmodel name\t: something else\n")
    assert cpu_model(info) == "AMD EPYC 9B14"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # e.g. some ARM kernels print no model name
    assert cpu_model(info) == (platform.processor() or "?")
    assert cpu_model(tmp_path / "missing") == (platform.processor() or "?")
    mem = memory_gib()
    assert mem is None or 0.1 < mem < 1 << 20


def test_cpu_id_tells_apart_vms_with_the_same_model_name(tmp_path):
    """Two VMs that both say "AMD EPYC" (and ran the benchmarks at different speeds) differ in family, model and
    clock: cpu_id reads them from the first processor's block only, leaves out what is missing, and a report line
    shows it beside the name (old JSON without it keeps the bare name)."""
    from sonomaly.tools.machine import cpu_id, cpu_label

    info = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {fam}\nmodel\t\t: {mod}\n"
             "model name\t: AMD EPYC\nstepping\t: 0\ncpu MHz\t\t: {mhz}\n\n")
    info.write_text(block.format(n=0, fam=23, mod=49, mhz="2245.780") + block.format(n=1, fam=25, mod=1, mhz="1.0"))
    zen2 = cpu_id(info)
    assert zen2 == "AuthenticAMD family 23 model 49 stepping 0, 2246 MHz"
    info.write_text(block.format(n=0, fam=25, mod=1, mhz="2445.4"))
    assert cpu_id(info) == "AuthenticAMD family 25 model 1 stepping 0, 2445 MHz" != zen2
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: unknown\n")
    assert cpu_id(info) == "GenuineIntel"  # an unreadable clock is left out, not a traceback
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_id(info) == "" and cpu_id(tmp_path / "missing") == ""
    assert cpu_label({"cpu": "AMD EPYC", "cpu_id": zen2}) == f"AMD EPYC ({zen2})"
    assert cpu_label({"cpu_model": "Intel Xeon", "cpu_id": ""}, "cpu_model") == "Intel Xeon"
    assert cpu_label({"cpu": "AMD EPYC"}) == "AMD EPYC"
