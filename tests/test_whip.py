"""The WHIP publisher against a real aiortc ingest in its own process (tests/whip_ingest.py), and its silence watch.

An ingest that dies without a goodbye (SIGKILL) sends no DTLS close; ICE consent alone would take 24-36 s to notice.
The publisher watches the RTCP the ingest sends and reconnects after a few seconds of silence."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port
from test_control import parse_prometheus
from sonomaly.stream.faults import _wait_until as _until
from sonomaly.stream.whip import ReportWatch

INGEST = Path(__file__).with_name("whip_ingest.py")
POLL = 0.25


# --- the silence rule --------------------------------------------------------------------------------------------

def _replay(arrivals: list[float], end: float, watch: ReportWatch, poll: float = POLL):
    """Poll ``watch`` every ``poll`` s from 0 to ``end`` with the packet count at that time; the first silence."""
    t, i = 0.0, 0
    while t <= end:
        while i < len(arrivals) and arrivals[i] <= t:
            i += 1
        silent = watch.update(i, t)
        if silent is not None:
            return t, silent
        t = round(t + poll, 6)
    return None


def test_no_packet_yet_is_never_silence():
    assert _replay([], 60.0, ReportWatch()) is None


def test_one_second_reports_then_nothing():
    arrivals = [0.4, 0.45, 0.5, 1.7, 2.7, 3.7, 4.7]  # Janus: a REMB burst, then a receiver report every second
    t, silent = _replay(arrivals, 30.0, ReportWatch(3.0))
    assert 4.7 + 3.0 < t <= 4.7 + 3.0 * 1.5 + POLL  # the limit is 3 s or 3 x the longest gap (1.2 s + a poll)
    assert silent > 3.0


def test_a_slow_reporter_is_not_declared_dead():
    arrivals = [5.0 * k for k in range(1, 9)]  # one report every 5 s
    assert _replay(arrivals, 40.0, ReportWatch(3.0)) is None
    t, _ = _replay(arrivals, 90.0, ReportWatch(3.0))
    assert t > 40.0 + 15.0  # three of its gaps


def test_start_counts_from_the_connection_for_a_known_reporter():
    w = ReportWatch(3.0)
    w.start(0.0)
    assert w.update(0, 5.0) is None  # still warming up: at least 10 s until three packets
    assert w.update(0, 10.5) == pytest.approx(10.5)


@settings(max_examples=200, deadline=None)
@given(period=st.floats(0.05, 6.0), jitter=st.lists(st.floats(-0.25, 0.25), min_size=3, max_size=40),
       silence=st.floats(1.0, 5.0))
def test_a_regular_reporter_is_never_cut_and_its_loss_is_found(period, jitter, silence):
    """Packets every ``period`` s (± 25 %), then none: no silence while they come; found once the gap passes the limit,
    within one poll of it, and never later than 3 of the longest gap (+ polls) or the warm-up."""
    arrivals, t = [], 0.0
    for j in jitter:
        t += period * (1 + j)
        arrivals.append(t)
    last = arrivals[-1]
    w = ReportWatch(silence)
    found = _replay(arrivals, last + 40.0, w)
    assert found is not None
    at, silent = found
    assert at > last  # never while packets still come
    assert silent > w.limit_s - 1e-9
    assert at - last <= w.limit_s + 2 * POLL
    longest = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert w.limit_s <= max(silence, 3 * (longest + 2 * POLL))  # three packets at least: past the warm-up


# --- the publisher, end to end --------------------------------------------------------------------------------------

class Ingest:
    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/whip"
        self.proc = subprocess.Popen([sys.executable, str(INGEST), str(port), *args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "READY"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def ingest():
    made: list[Ingest] = []

    def start(port: int | None = None, *args: str) -> Ingest:
        i = Ingest(port or free_port(), *args)
        made.append(i)
        return i

    yield start
    for i in made:
        i.stop()


def _metrics(url: str) -> dict[str, float]:
    """``/metrics`` (loopback needs no control token), read by the strict parser of tests/test_control.py, as
    {'name' or 'name{label=value}': value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        fam = parse_prometheus(r.read().decode())
    return {name + ("{" + ",".join(f'{k}="{v}"' for k, v in lab.items()) + "}" if lab else ""): v
            for f in fam.values() for name, lab, v in f["samples"]}


@pytest.mark.timeout(90)
def test_publisher_notices_a_killed_ingest_and_comes_back(serve, ingest, demo_clip):
    first = ingest()
    s = serve("--source", str(demo_clip), "--loop", "--whip", first.url)
    assert _until(lambda: s.health()["whip"]["state"] == "publishing", 20.0) is not None
    assert _until(lambda: first.stats()["frames"] > 30, 20.0) is not None  # the ingest decodes the stream
    assert _until(lambda: s.health()["whip"]["rtcp_packets"] >= 3, 10.0) is not None  # and reports: warm-up over
    first.kill()
    noticed = _until(lambda: s.health()["whip"]["state"] == "reconnecting", 15.0)
    w = s.health()["whip"]
    # aiortc reports every 0.5-1.5 s: the limit is 3-5 s; ICE consent alone would take 24-36 s
    assert noticed is not None and noticed <= 8.0, w
    assert w["silences"] == 1
    m = _metrics(s.url)  # what a monitoring system scrapes says the same
    assert m["sonomaly_whip_silences_total"] == 1 and m["sonomaly_whip_sessions_total"] == 1
    assert m['sonomaly_whip_state{state="publishing"}'] == 0
    frames = s.health()["frames_out"]
    time.sleep(1.0)
    assert s.health()["frames_out"] > frames + 20  # the server's own video goes on meanwhile
    assert "refused" in (s.health()["whip"]["last_error"] or "").lower()  # retries meet a closed port
    second = ingest(first.port)
    assert _until(lambda: s.health()["whip"]["state"] == "publishing", 20.0) is not None
    assert _until(lambda: second.stats()["frames"] > 30, 20.0) is not None
    assert s.health()["whip"]["sessions"] == 2
    m = _metrics(s.url)
    assert m['sonomaly_whip_state{state="publishing"}'] == 1 and m["sonomaly_whip_sessions_total"] == 2
    assert 0 <= m["sonomaly_whip_rtcp_age_seconds"] < 5 or math.isnan(m["sonomaly_whip_rtcp_age_seconds"])


@pytest.mark.timeout(60)
def test_publisher_says_why_an_ingest_refuses(serve, ingest, demo_clip):
    refusing = ingest(None, "--status", "401")
    s = serve("--source", str(demo_clip), "--loop", "--whip", refusing.url)
    assert _until(lambda: "401" in (s.health()["whip"]["last_error"] or ""), 15.0) is not None
    w = s.health()["whip"]
    assert w["state"] in ("reconnecting", "connecting") and w["sessions"] == 0
    assert refusing.stats()["sessions"] == 0
    frames = s.health()["frames_out"]
    time.sleep(1.0)
    assert s.health()["frames_out"] > frames + 20
