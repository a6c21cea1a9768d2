"""Shared fixtures: bundled data, the bundled model, a live `sonomaly serve` process, and Chromium."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
DEMO_CLIP = DEMO / "lung_convex_covid_blines_01.mp4"
NORMAL_CLIP = DEMO / "lung_convex_normal_02.mp4"
LUNG_MODEL = REPO / "models" / "lung"
SHARED = REPO.parent / "shared" / "data" / "ultrasound"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


def arun(coro):
    """``asyncio.run`` on a fresh thread: Playwright's sync API (the session's ``browser`` fixture) keeps an event loop
    running on the main thread once a browser test has run, and ``asyncio.run`` refuses to start beside it."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def demo_clip() -> Path:
    assert DEMO_CLIP.exists(), "bundled demo clip missing"
    return DEMO_CLIP


@pytest.fixture(scope="session")
def lung_model() -> Path:
    assert (LUNG_MODEL / "card.json").exists(), "bundled lung model missing"
    return LUNG_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip("../shared/data/ultrasound is absent")
    return SHARED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """`sonomaly serve` in a subprocess, the way a user runs it."""

    def __init__(self, *args: str, ready_timeout: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sonomaly.tools", "serve", "--port", str(self.port), "--log-level", "warning",
               *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                h = self.health()
                if h["frames_out"] > 0:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(*args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    # Module scope: Playwright's sync API keeps an event loop on the main thread while it runs; closing it at the end
    # of each module lets later modules use asyncio.run() again.
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
