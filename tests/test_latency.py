"""The latency harness (tools/latency.py): its arithmetic on known data, and real runs against served clips."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sonomaly.stream import stamp
from sonomaly.tools import cli, latency
from sonomaly.tools.latency import ViewerData, Window, analyse

T0 = 5_000_000_000
PERIOD_NS = 33_333_333


def _records(n: int, *, missing=(), server_ms: float = 5.0) -> dict[int, dict]:
    recs = {}
    for i in range(n):
        if i in missing:
            continue
        tc = T0 + i * PERIOD_NS
        recs[i] = {"frame_id": i, "t_capture_ns": tc, "t_composed_ns": tc + int(server_ms * 1e6),
                   "stages_ms": {"grab": 0.5, "ai_wait": 1.0, "overlay": 3.0, "infer": 7.0}}
    return recs


def _lat_ms(i: int) -> float:
    return 40.0 + (i % 10)


def _synthetic(budget_ms: float = 200.0, window_s: float | None = None):
    """100 frames; 30 never composed; 10-12 composed but never shown; 50 shown without a callback; 5 read twice;
    one code that matches no record; unreadable frames inside and outside the window."""
    recs = _records(100, missing={30})
    v = ViewerData("chromium", 0)
    count = 0
    for i in range(100):
        if i in (10, 11, 12, 30):
            continue
        count += 1
        if i == 50:
            continue  # presented (the counter moves on) but no callback: shown, not timed
        t = T0 + i * PERIOD_NS + int(_lat_ms(i) * 1e6)
        if i == 5:  # read early by a callback that raced ahead (its time is not this frame's): the last read wins
            v.samples.append((i, t - 10_000_000, -1, -1, count))
        v.samples.append((i, t, t - 20_000_000, t - 1_000_000, count))
    v.samples.append((5000, T0 + 60 * PERIOD_NS, -1, -1, -1))
    v.unreadable = [T0 + 20 * PERIOD_NS, T0 + 21 * PERIOD_NS, T0 - 10 * PERIOD_NS]
    v.damaged = [T0 + 22 * PERIOD_NS]
    w = Window()
    w.t0_ns, w.t1_ns = T0, T0 + 100 * PERIOD_NS + 100_000_000
    return analyse("sonomaly", [v], recs, w, budget_ms=budget_ms, window_s=window_s)


def test_analysis_of_known_data():
    r = _synthetic(window_s=1.0)
    shown = [i for i in range(100) if i not in (10, 11, 12, 30, 50)]
    want = np.array([_lat_ms(i) for i in shown])
    g = r["glass_to_glass_ms"]
    assert g["n"] == len(shown) == r["frames"]
    for q in (10, 50, 90, 95, 99):
        assert g[f"p{q}"] == pytest.approx(np.percentile(want, q), abs=1e-3)
    assert g["max"] == pytest.approx(49.0) and g["min"] == pytest.approx(40.0)
    assert g["tail"] == pytest.approx(g["max"] - g["p95"], abs=2e-3)
    assert g["flatness"] == pytest.approx(g["p90"] - g["p10"], abs=2e-3)
    assert r["lost_at_server"] == 1  # frame 30: never composed
    assert r["lost_after_server"] == 3  # frames 10-12: composed, never shown
    assert r["shown_not_timed"] == 1  # frame 50
    assert r["frames_lost"] == 4
    assert r["no_code"] == 2 and r["damaged_code"] == 1
    assert r["unmatched"] == 1 and r["shown_before_composed"] == 0 and r["repeated_reads"] == 1
    assert r["received_fps"] == pytest.approx((len(shown) + 1) / r["seconds"], abs=0.01)
    st = r["stages_ms"]
    assert st["server_total"]["p50"] == pytest.approx(5.0)
    assert st["after_server"]["p50"] == pytest.approx(np.percentile(want - 5.0, 50), abs=1e-3)
    assert st["send_network"]["p50"] == pytest.approx(np.percentile(want - 25.0, 50), abs=1e-3)
    assert st["jitter_decode"]["p50"] == pytest.approx(19.0) and st["paint"]["p50"] == pytest.approx(1.0)
    assert st["overlay"]["p50"] == 3.0 and "infer" not in st  # the AI runs beside the frame's path
    assert r["parallel_stages_ms"]["infer"]["p50"] == 7.0
    assert r["pass"] is True
    assert [w["n"] for w in r["windows"]] == [26, 28, 30, 11]  # e.g. 1-2 s: frames 29..58 but 30 and 50
    assert r["windows"][0]["t_s"] == 0.0
    assert "drift" not in r  # 1-s windows: too short to speak of drift
    r = _synthetic(window_s=10.0)
    assert len(r["windows"]) == 1 and "drift" not in r  # one window only


def test_per_viewer_stages_tell_a_late_send_turn_from_a_slow_decoder():
    """Each viewer gets its own medians of the stages after the server: one viewer whose packets arrive 6 ms later
    (a late turn in the server's send) and one whose decode takes 6 ms longer show it in different stages."""
    recs = _records(60)
    viewers = []
    for idx, (late_recv, slow_decode) in enumerate([(0, 0), (6, 0), (0, 6)]):
        v = ViewerData("chromium", idx)
        v.stats = {"codec": "video/VP8", "frameWidth": 450, "frameHeight": 450}
        for i in range(60):
            t_recv = T0 + i * PERIOD_NS + int((5 + 10 + late_recv) * 1e6)
            t_pres = t_recv + int((3 + slow_decode) * 1e6)
            v.samples.append((i, t_pres + 2_000_000, t_recv, t_pres, i + 1))
        viewers.append(v)
    w = Window()
    w.t0_ns, w.t1_ns = T0, T0 + 60 * PERIOD_NS + 100_000_000
    r = analyse("sonomaly", viewers, recs, w, budget_ms=200.0)
    got = [(v["stages_ms"]["send_network"]["p50"], v["stages_ms"]["jitter_decode"]["p50"],
            v["stages_ms"]["paint"]["p95"]) for v in r["per_viewer"]]
    assert got == [pytest.approx((10.0, 3.0, 2.0)), pytest.approx((16.0, 3.0, 2.0)), pytest.approx((10.0, 9.0, 2.0))]
    assert r["per_viewer"][1]["stages_ms"]["after_server"]["p50"] == pytest.approx(21.0)
    assert "| 10.0, 16.0, 10.0 |" in latency.markdown({"runs": [r]})  # the receivers' table, a column


def test_composited_times_give_one_definition_for_both_render_paths():
    """--screencast: where the first composited page showing a frame is known, the run gets capture -> that page
    (``to_composited_ms``) and that page's time minus the time the harness calls shown; frames without a picture
    are left out of it, not counted as lost; and naive / Sonomaly is also given on it."""
    recs = _records(60)
    runs = []
    for server, after_shown_ms in (("sonomaly", -16.7), ("naive", 16.4)):  # the two paths' offsets seen on M10
        v = ViewerData("chromium", 0)
        for i in range(60):
            t = T0 + i * PERIOD_NS + int(_lat_ms(i) * 1e6)
            v.samples.append((i, t, -1, t - 1_000_000, i + 1))
            if i % 6:  # every sixth frame has no picture of its own
                v.composited[i] = t + int(after_shown_ms * 1e6)
        w = Window()
        w.t0_ns, w.t1_ns = T0, T0 + 60 * PERIOD_NS + 100_000_000
        r = analyse(server, [v], recs, w, budget_ms=200.0)
        want = np.array([_lat_ms(i) + after_shown_ms for i in range(60) if i % 6])
        tk = r["to_composited_ms"]
        assert tk["n"] == 50 and r["frames"] == 60 and r["frames_lost"] == 0
        assert tk["p50"] == pytest.approx(np.percentile(want, 50), abs=1e-3)
        assert tk["p99"] == pytest.approx(np.percentile(want, 99), abs=1e-3)
        assert r["composited_minus_shown_ms"]["p50"] == pytest.approx(after_shown_ms, abs=1e-3)
        assert r["per_viewer"][0]["to_composited_ms"] == tk
        runs.append({**r, "server": server, "viewer": "chromium", "viewers": 1, "seconds": 30.0, "label": server,
                     "health": {"model": "lung"}})
    c = latency.comparisons(runs)["naive_over_sonomaly_1_viewers"]
    # shown: the same latencies either way (ratio 1); composited: the naive path 33 ms later at every percentile
    assert c["p99"] == 1.0
    assert c["p99_composited"] == pytest.approx(round((49.0 + 16.4) / (49.0 - 16.7), 3), abs=0.02)
    # without screencast data the run has no such field
    v = ViewerData("chromium", 0)
    v.samples = [(i, T0 + i * PERIOD_NS + 40_000_000, -1, -1, i + 1) for i in range(10)]
    w = Window()
    w.t0_ns, w.t1_ns = T0, T0 + 10 * PERIOD_NS + 100_000_000
    assert "to_composited_ms" not in analyse("sonomaly", [v], recs, w, budget_ms=200.0)


def test_budget_and_causality():
    assert _synthetic(budget_ms=48.0)["pass"] is False  # p99 ≈ 49 ms
    recs = _records(10)
    v = ViewerData("aiortc", 0)
    v.samples = [(i, recs[i]["t_capture_ns"] + 2_000_000, -1, -1, -1) for i in range(10)]  # before composition
    w = Window()
    w.t0_ns, w.t1_ns = T0, T0 + 10 * PERIOD_NS
    assert analyse("sonomaly", [v], recs, w, budget_ms=200)["shown_before_composed"] == 10


def test_exit_status_follows_the_budget(monkeypatch, tmp_path):
    def fake_measure(url, server, *, budget_ms, **kw):
        r = _synthetic(budget_ms=budget_ms)
        r.update(url=url, codec=None, health={}, clock={})
        return r

    monkeypatch.setattr(latency, "measure", fake_measure)
    out = tmp_path / "r.json"
    assert latency.main(["--url", "http://x", "--budget-ms", "200", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["runs"][0]["pass"] is True
    assert latency.main(["--url", "http://x", "--budget-ms", "45", "--quiet"]) == 1
    monkeypatch.setattr(latency, "measure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no frames")))
    assert latency.main(["--url", "http://x", "--quiet"]) == 3


def _check_run(r: dict, *, max_ms: float | None = 1000.0) -> None:
    g = r["glass_to_glass_ms"]
    for k in ("p50", "p95", "p99", "max", "tail", "flatness", "min"):
        assert k in g, k
    assert 0 < g["min"] <= g["p50"] <= g["p95"] <= g["p99"] <= g["max"]
    if max_ms is not None:
        assert g["max"] < max_ms, g
    assert g["tail"] == pytest.approx(g["max"] - g["p95"], abs=0.01)
    assert r["shown_before_composed"] == 0 and r["unmatched"] == 0
    assert r["damaged_code"] <= 0.02 * r["frames"] + 1
    assert r["frames_lost"] >= 0 and r["received_fps"] > 0
    st = r["stages_ms"]
    assert st["server_total"]["p50"] < g["p50"]
    assert st["after_server"]["p50"] > 0
    assert len(r["per_viewer"]) == r["viewers"]


@pytest.mark.browser
@pytest.mark.parametrize("reader", ["videoframe", "canvas"])
def test_chromium_harness_on_a_served_clip(serve, browser, demo_clip, lung_model, reader):
    server = serve("--source", f"stamp:{demo_clip}?fps=30", "--model", str(lung_model), "--loop")
    seconds = 5 if reader == "videoframe" else 3
    r = latency.measure(server.url, "sonomaly", viewer="chromium", viewers=1, seconds=seconds, warmup=1.5,
                        browser=browser, quiet=True, reader=reader)
    _check_run(r)
    assert r["reader"] == reader  # Debian's Chromium gives I420 VideoFrames: no fall-back to the canvas
    if reader == "videoframe":  # every 30th frame is read both ways: the two readers agree on every id
        assert r["reader_cross_check"]["frames"] >= 3 and r["reader_cross_check"]["disagreed"] == 0
        assert r["per_viewer"][0]["receiver"]["reader_cross_check"] == r["reader_cross_check"]
    else:
        assert "reader_cross_check" not in r
        return
    assert r["viewer"] == "chromium" and r["seconds"] == pytest.approx(5, abs=0.5)
    assert r["frames"] >= 0.5 * 30 * 5  # 30 fps source; slack for a loaded CI machine
    st = r["stages_ms"]
    for k in ("grab", "ai_wait", "overlay", "send_network", "jitter_decode", "paint"):
        assert k in st, k
    for k in ("roi", "preprocess", "infer", "postprocess"):
        assert k in r["parallel_stages_ms"], k
    rx = r["per_viewer"][0]["receiver"]
    assert rx["codec"] and rx["frameHeight"] == 450
    assert rx["frameWidth"] == 450 + stamp.band_width(450, 450)  # the band is on the wire
    assert rx["decode_ms_avg"] > 0 and rx["jitter_buffer_ms_avg"] >= 0
    cal = rx["clock_calibration_ms"]  # wall-clock route vs a direct bracketed reading of the browser's clock
    assert abs(cal["cross_check"]) <= cal["cross_check_bound"] + 2.0, cal
    assert r["health"]["model"] and r["health"]["ai"] in ("ok", "delayed")
    # the one-pass fan-out (the default) stamps its parts of send_network on the records, and the run says it ran
    assert r["health"]["encode"] == "shared" and r["health"]["fanout"]["mode"] == "pass"
    assert st["send"]["p50"] > 0 and st["send_wait"]["p50"] >= 0 and "send" not in r["serial_stages"]


@pytest.mark.browser
def test_screencast_times_the_composited_page(serve, browser, demo_clip, lung_model):
    """--screencast: the first viewer's page is recorded through the DevTools screencast; every picture carries a
    readable code, nearly every timed frame gets the time of the first composited page showing it, and that page
    comes after the frame was handed to the compositor (rVFC's presentationTime)."""
    server = serve("--source", f"stamp:{demo_clip}?fps=30", "--model", str(lung_model), "--loop")
    r = latency.measure(server.url, "sonomaly", viewer="chromium", viewers=1, seconds=3, warmup=1.5,
                        browser=browser, quiet=True, layout="page", screencast=True)
    _check_run(r)
    sc = r["per_viewer"][0]["receiver"]["screencast"]
    assert sc["pictures"] >= 0.5 * 30 * 3 and sc["unread"] == 0 and sc["codes"] >= 0.5 * 30 * 3
    tk, tc = r["to_composited_ms"], r["to_compositor_ms"]
    assert tk["n"] >= 0.8 * r["frames"]
    assert tk["p50"] >= tc["p50"] - 1.0  # composited no earlier than handed over
    assert tk["p99"] < 200 and -40 < r["composited_minus_shown_ms"]["p50"] < 40


def test_cli_serves_sonomaly_and_the_naive_baseline(tmp_path, demo_clip, lung_model):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = cli.main(["latency", "--serve", str(demo_clip), "--fps", "30", "--model", str(lung_model),
                   "--viewer", "aiortc", "--seconds", "3", "--warmup", "1", "--baseline", "naive",
                   "--budget-ms", "1", "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 1  # nothing streams in under 1 ms: the budget check must fail
    report = json.loads(out.read_text())
    runs = {r["server"]: r for r in report["runs"]}
    assert set(runs) == {"sonomaly", "naive"}
    assert report["config"]["source_uri"].startswith("stamp:") and report["machine"]["nproc"] >= 1
    _check_run(runs["sonomaly"])
    _check_run(runs["naive"], max_ms=None)  # the naive server's backlog has no bound worth asserting
    assert runs["sonomaly"]["pass"] is False and runs["sonomaly"]["frames"] >= 0.5 * 30 * 3
    assert {"queue", "infer", "overlay"} <= set(runs["naive"]["stages_ms"])
    assert "infer" in runs["naive"]["serial_stages"] and "infer" not in runs["sonomaly"]["serial_stages"]
    assert "naive_over_sonomaly_1_viewers" in report["comparisons"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_sessions_receive_the_stream_beside_the_measured_viewer(serve, demo_clip, lung_model):
    """--load-viewers: real aiortc sessions that receive (no decoding) while one viewer is measured; the server
    counts them as viewers, each receives the stream at its rate, and the run says so."""
    server = serve("--source", f"stamp:{demo_clip}?fps=30", "--model", str(lung_model), "--loop")
    seen = []
    with latency.LoadViewers(server.url, 2):
        seen.append(latency.get_json(server.url + "/health")["viewers"])
    assert seen == [2]
    r = latency.measure(server.url, "sonomaly", viewer="aiortc", viewers=1, seconds=3, warmup=1, quiet=True,
                        load_viewers=2)
    _check_run(r)
    lv = r["load_viewers"]
    assert lv["n"] == 2 and lv["received"] == 2
    assert lv["fps_min"] >= 0.5 * 30 and lv["fps_mean"] <= 30 * 1.2  # a 30 fps source, every session fed
    assert "1+2 load" in latency.table([r]) and "2 load sessions" in latency.markdown({"runs": [r]})
    assert latency.comparisons([r]) == {}  # nothing to divide by without a plain 1-viewer run
    deadline = time.monotonic() + 10
    while latency.get_json(server.url + "/health")["viewers"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latency.get_json(server.url + "/health")["viewers"] == 0  # the sessions closed with the run


@pytest.mark.browser
def test_chromium_viewers_in_one_page(serve, browser, demo_clip, lung_model):
    """--chromium-layout page: three viewers as <video> elements of one page, each its own peer connection and
    decoder, each timed on its own; the run says how its viewers lived."""
    server = serve("--source", f"stamp:{demo_clip}?fps=30", "--model", str(lung_model), "--loop")
    r = latency.measure(server.url, "sonomaly", viewer="chromium", viewers=3, seconds=4, warmup=1.5,
                        browser=browser, quiet=True, layout="page")
    _check_run(r)
    assert r["chromium_layout"] == "page" and len(r["per_viewer"]) == 3
    for v in r["per_viewer"]:
        rx = v["receiver"]
        assert rx["layout"] == "page" and rx["reader"] == "videoframe"
        assert v["glass_to_glass_ms"]["n"] >= 0.5 * 30 * 4  # every viewer saw the stream, not one of them
        assert rx["framesDecoded"] >= 0.5 * 30 * 4 and rx["decode_ms_avg"] > 0  # its own decoder
    assert r["reader_cross_check"]["frames"] >= 9 and r["reader_cross_check"]["disagreed"] == 0
    assert "examples" not in r["per_viewer"][0]["receiver"]["reader_cross_check"]
    tc = r["to_compositor_ms"]  # capture -> presentationTime, within glass to glass
    assert tc["n"] >= 0.9 * r["glass_to_glass_ms"]["n"] and 0 < tc["p50"] <= r["glass_to_glass_ms"]["p50"]
    assert "one page" in latency.markdown({"runs": [r]})
    with pytest.raises(ValueError, match="layout"):
        latency.collect_chromium(server.url, 1, 1, 0, Window(), browser=browser, layout="tabs")


def test_one_page_runs_are_compared_only_with_one_page_runs():
    def run(n, p99, layout=None, to_comp=None):
        return {"server": "sonomaly", "viewer": "chromium", "viewers": n, "seconds": 30.0, "label": "sonomaly",
                "health": {"model": "lung"}, "reader": "videoframe", "glass_to_glass_ms": {"n": 100, "p50": 10.0,
                                                                                          "p99": p99},
                **({"chromium_layout": layout} if layout else {}),
                **({"to_compositor_ms": {"n": 100, "p99": to_comp}} if to_comp else {})}

    # runs saved before the field existed had a context each: they pair with "contexts" runs
    c = latency.merge_reports([{"runs": [run(1, 50.0), run(8, 150.0, "contexts")]},
                               {"runs": [run(1, 40.0, "page", 20.0), run(8, 44.0, "page", 30.0)]}])["comparisons"]
    assert c["sonomaly_8_over_1_viewer_p99"] == 3.0
    assert c["chromium_30s_videoframe_onepage_sonomaly_8_over_1_viewer_p99"] == 1.1
    # beside it the same ratio up to the compositor (no refresh wait), where both runs have it
    assert c["chromium_30s_videoframe_onepage_sonomaly_8_over_1_viewer_to_compositor_p99"] == 1.5
    assert "sonomaly_8_over_1_viewer_to_compositor_p99" not in c


def test_load_runs_are_compared_with_the_plain_one_viewer_run():
    def run(server, n, p99, load=0):
        return {"server": server, "viewer": "chromium", "viewers": n, "seconds": 30.0, "label": server,
                "health": {"model": None if server == "naive" else "lung"}, "reader": "videoframe",
                "glass_to_glass_ms": {"n": 100, "p50": p99 / 2, "p99": p99},
                **({"load_viewers": {"n": load, "received": load}} if load else {})}

    c = latency.comparisons([run("sonomaly", 1, 50.0), run("naive", 1, 100.0), run("sonomaly", 1, 55.0, load=7),
                             run("naive", 1, 2000.0, load=7), run("sonomaly", 8, 150.0)])
    assert c["sonomaly_1+7load_over_1_viewer_p99"] == 1.1 and c["sonomaly_8_over_1_viewer_p99"] == 3.0
    assert c["naive_over_sonomaly_1+7load_viewers"]["p99"] == pytest.approx(36.364, abs=1e-3)
    assert c["naive_over_sonomaly_1_viewers"]["p99"] == 2.0  # the load run did not replace the plain one
    assert c["naive_1+7load_over_1_viewer_p99"] == 20.0


def test_merged_reports_compare_each_run_only_with_its_own_kind():
    """A sweep merged from several sessions (--from-json: Chromium with the naive baseline, a no-model control, an
    aiortc sweep, a 120-s run) holds five runs with server "sonomaly" and 1 viewer. Each ratio pairs runs of one
    command: before, the last such run won, and the naive Chromium run was divided by an aiortc run."""
    def run(server, viewer, n, p99, seconds=30.0, label=None, model="lung", reader=None):
        return {"server": server, "viewer": viewer, "viewers": n, "seconds": seconds, "label": label or server,
                "health": {"model": None if server == "naive" else model},
                "glass_to_glass_ms": {"n": 100, "p50": p99 / 2, "p99": p99},
                **({"reader": reader} if reader else {})}

    sweep = {"runs": [run("sonomaly", "chromium", 1, 50.0), run("naive", "chromium", 1, 150.0),
                      run("sonomaly", "chromium", 8, 100.0), run("naive", "chromium", 8, 1000.0)]}
    control = {"runs": [run("sonomaly", "chromium", 1, 40.0, model=None),
                        run("sonomaly", "chromium", 8, 400.0, seconds=31.0, model=None)]}
    other = {"runs": [run("sonomaly", "aiortc", 1, 60.0, seconds=20.0), run("sonomaly", "aiortc", 8, 90.0, seconds=20.0),
                      run("sonomaly", "chromium", 1, 30.0, 120.0, "sonomaly (chromium, 120 s)"),
                      run("naive", "chromium", 1, 120.0, 120.0, "naive (chromium, 120 s)"),
                      run("sonomaly", "chromium", 1, 45.0, label="sonomaly --playout-delay=off")]}
    # the same sweep with the viewers reading the code from VideoFrames (cheaper viewers): a kind of its own; runs
    # saved before the field existed read it from a canvas
    frames = {"runs": [run("sonomaly", "chromium", 1, 48.0, reader="videoframe"),
                       run("sonomaly", "chromium", 8, 60.0, reader="videoframe"),
                       run("sonomaly", "chromium", 8, 75.0, reader="canvas")]}
    c = latency.merge_reports([sweep, control, other, frames])["comparisons"]
    assert c["chromium_30s_videoframe_sonomaly_8_over_1_viewer_p99"] == 1.25
    assert not any("canvas" in k for k in c)  # the canvas 8-viewer run joins the first sweep's group, whose 8 won
    assert c["naive_over_sonomaly_1_viewers"]["p99"] == 3.0 and c["naive_over_sonomaly_8_viewers"]["p99"] == 10.0
    assert c["sonomaly_8_over_1_viewer_p99"] == 2.0 and c["naive_8_over_1_viewer_p99"] == pytest.approx(6.667)
    assert c["chromium_30s_nomodel_sonomaly_8_over_1_viewer_p99"] == 10.0
    assert c["aiortc_20s_sonomaly_8_over_1_viewer_p99"] == 1.5
    assert c["chromium_120s_naive_over_sonomaly_1_viewers"]["p99"] == 4.0
    assert not any("playout" in k for k in c)  # a lone run has nothing to be compared with
    assert latency.merge_reports([sweep])["comparisons"] == latency.comparisons(sweep["runs"])


def test_drift_compares_the_first_and_last_full_windows():
    def run(lat_of_t):
        recs = _records(750)  # 25 s at 30 fps
        v = ViewerData("aiortc", 0)
        for i, r in recs.items():
            t = r["t_capture_ns"] + int(lat_of_t((r["t_capture_ns"] - T0) / 1e9) * 1e6)
            v.samples.append((i, t, -1, -1, -1))
        w = Window()
        w.t0_ns, w.t1_ns = T0, T0 + 25 * 10**9
        return analyse("sonomaly", [v], recs, w, budget_ms=200, window_s=10.0)

    flat = run(lambda t: 40.0)
    assert [x["length_s"] for x in flat["windows"]] == [10.0, 10.0, 5.0]
    d = flat["drift"]
    assert {k: d[k] for k in ("first_window_p99", "last_window_p99", "last_over_first", "within_10_pct")} == {
        "first_window_p99": 40.0, "last_window_p99": 40.0, "last_over_first": 1.0, "within_10_pct": True}
    assert d["p99_slope_ms_per_min"] == 0.0 and d["p99_min"] == d["p99_max"] == 40.0
    growing = run(lambda t: 40.0 + 2.0 * t)  # 2 ms more every second: a queue that never drains
    d = growing["drift"]
    assert d["last_over_first"] > 1.3 and d["within_10_pct"] is False
    assert 100 < d["p99_slope_ms_per_min"] < 140  # ~2 ms/s between the two full windows' p99


def test_drift_is_also_given_without_the_display_refresh_wait():
    """A browser's viewer waits for the compositor's next refresh after each frame is handed over; the phase of the
    30 fps source against the 60 Hz refresh wanders, so the glass-to-glass p99 can differ by most of a refresh
    between two minutes while the system adds nothing. The drift also says the p99 up to the hand-over."""
    recs = _records(750)

    def run(paint_of_t, hand_over_of_t):
        v = ViewerData("chromium", 0)
        for i, r in recs.items():
            t = (r["t_capture_ns"] - T0) / 1e9
            t_pres = r["t_capture_ns"] + int(hand_over_of_t(t) * 1e6)
            t_show = t_pres + int(paint_of_t(t) * 1e6)
            v.samples.append((i, t_show, t_pres - 5_000_000, t_pres, i))
        w = Window()
        w.t0_ns, w.t1_ns = T0, T0 + 25 * 10**9
        return analyse("sonomaly", [v], recs, w, budget_ms=200, window_s=10.0)

    # the refresh wait grows from ~1 to ~15 ms over the run (a phase wander), the system's part is flat at 30 ms
    wander = run(lambda t: 1.0 + 0.6 * t, lambda t: 30.0)["drift"]
    assert wander["within_10_pct"] is False and wander["last_over_first"] > 1.1
    assert wander["to_compositor"] == {"first_window_p99": 30.0, "last_window_p99": 30.0, "last_over_first": 1.0,
                                       "within_10_pct": True}
    # a queue that grows before the compositor shows in both
    queue = run(lambda t: 8.0, lambda t: 30.0 + 2.0 * t)["drift"]
    assert queue["within_10_pct"] is False and queue["to_compositor"]["within_10_pct"] is False
    # receivers that report no hand-over (aiortc) have only the glass-to-glass criterion
    v = ViewerData("aiortc", 0)
    for i, r in recs.items():
        v.samples.append((i, r["t_capture_ns"] + 40_000_000, -1, -1, -1))
    w = Window()
    w.t0_ns, w.t1_ns = T0, T0 + 25 * 10**9
    assert "to_compositor" not in analyse("sonomaly", [v], recs, w, budget_ms=200, window_s=10.0)["drift"]


def test_drift_trend_separates_a_wander_from_a_growing_queue():
    from sonomaly.tools.latency import drift_summary

    def windows(p99s):
        return [{"t_s": 60.0 * i, "length_s": 60.0, "p99": v, "server_total_p50": 6.0} for i, v in enumerate(p99s)]

    # a sawtooth (two clocks drifting against each other): no trend, yet last vs first is 20 % off
    saw = drift_summary(windows([51, 49, 62, 60, 58, 56, 53, 51, 49, 61.5]), 60.0)
    assert saw["within_10_pct"] is False and abs(saw["p99_slope_ms_per_min"]) < 0.6
    assert saw["p99_min"] == 49 and saw["p99_max"] == 62 and saw["server_p50_range_ms"] == [6.0, 6.0]
    queue = drift_summary(windows([50 + 3 * i for i in range(10)]), 60.0)
    assert queue["p99_slope_ms_per_min"] == 3.0
    assert drift_summary(windows([50]), 60.0) is None and drift_summary(windows([50, 51]), 5.0) is None


def test_a_clock_step_during_the_run_voids_it():
    """Numbers from a real 10-minute run on a VM whose wall clock stepped mid-run (every frame ~450 ms "late"):
    the run is declared invalid; the calibrations of good runs pass."""
    from sonomaly.tools.latency import clock_problem

    good = {"offset_start": -0.1, "offset_end": 0.3, "spread": 0.9, "cross_check": 0.2, "cross_check_bound": 0.5}
    assert clock_problem({"server_offset_spread_us": 3.2}, [good, None]) is None
    assert "8181.5 ms" in clock_problem({"server_offset_spread_us": 8181483.3}, [good])
    stepped = dict(good, offset_end=838.0, cross_check=-419.0)
    assert "disagree" in clock_problem({"server_offset_spread_us": 3.2}, [stepped])
    assert "moved" in clock_problem({"server_offset_spread_us": None}, [dict(good, offset_end=9.0)])


def test_sfu_runs_are_compared_with_their_own_and_with_one_direct_viewer():
    """--via direct,janus: runs through Janus form a group of their own (N over 1 through the SFU), and each is also
    divided by the 1-viewer run straight from the server (the same command's direct twin)."""
    def run(n, p99, via=None, to_comp=None, paint=None):
        return {"server": "sonomaly", "viewer": "chromium", "viewers": n, "seconds": 30.0,
                "label": "sonomaly" + (" via janus" if via else ""), "health": {"model": "lung"},
                "reader": "videoframe", "chromium_layout": "page",
                "glass_to_glass_ms": {"n": 100, "p50": p99 / 2, "p99": p99},
                **({"stages_ms": {"paint": {"p50": paint}}} if paint is not None else {}),
                **({"via": via} if via else {}), "to_compositor_ms": {"n": 100, "p99": to_comp or p99 / 2}}

    c = latency.comparisons([run(1, 50.0, to_comp=20.0, paint=26.84), run(1, 40.0, "janus", 22.0),
                             run(8, 100.0, to_comp=60.0, paint=4.6), run(8, 44.0, "janus", 24.0)])
    assert c["sonomaly_8_over_1_viewer_p99"] == 2.0 and c["sonomaly_8_over_1_viewer_to_compositor_p99"] == 3.0
    # the two runs' display waits beside the ratio (the 1-viewer run's first); not where a run lacks the stage
    assert c["sonomaly_8_over_1_viewer_paint_p50_ms"] == [26.8, 4.6]
    assert not any(k.endswith("_paint_p50_ms") for k in c if "janus" in k)
    j = "chromium_30s_videoframe_onepage_via-janus_sonomaly_"
    assert c[j + "8_over_1_viewer_p99"] == 1.1
    assert c[j + "8_over_direct_1_viewer_p99"] == 0.88 and c[j + "8_over_direct_1_viewer_to_compositor_p99"] == 1.2
    assert c[j + "1_over_direct_1_viewer_p99"] == 0.8
    # a direct run never divides by a run through the SFU
    assert not any("over_direct" in k for k in c if "via-janus" not in k)
    # without a direct 1-viewer run there is no cross ratio; a first group through the SFU still says so
    c2 = latency.comparisons([run(1, 40.0, "janus"), run(8, 44.0, "janus")])
    assert c2 == {"via-janus_sonomaly_8_over_1_viewer_p99": 1.1,
                  "via-janus_sonomaly_8_over_1_viewer_to_compositor_p99": 1.1}
    # SFU runs first (--via janus,direct): the direct runs' names then carry their group, never "via-janus"
    c3 = latency.comparisons([run(1, 40.0, "janus"), run(1, 50.0), run(8, 44.0, "janus"), run(8, 100.0)])
    assert c3["via-janus_sonomaly_8_over_direct_1_viewer_p99"] == 0.88
    assert c3["chromium_30s_videoframe_onepage_sonomaly_8_over_1_viewer_p99"] == 2.0


@pytest.mark.parametrize("args, why", [
    (["--url", "http://127.0.0.1:9", "--via", "janus"], "needs --serve"),
    (["--serve", "x.mp4", "--via", "janus", "--viewer", "aiortc"], "Chromium"),
    (["--serve", "x.mp4", "--via", "janus", "--baseline", "naive"], "WHIP"),
    (["--serve", "x.mp4", "--via", "sfu"], "--via"),
    (["--serve", "x.mp4", "--via", "direct,direct"], "--via"),
    (["--serve", "x.mp4", "--via", "janus", "--janus-threads", "-1"], "janus-threads"),
    (["--serve", "x.mp4", "--viewer", "aiortc", "--screencast"], "--screencast"),
])
def test_via_janus_refuses_what_it_cannot_measure(args, why, capsys):
    assert cli.main(["latency", *args, "--quiet"]) == 2
    assert why in capsys.readouterr().err
