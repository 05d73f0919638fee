"""Shared fixtures. Tests use the real shipped checkpoint in model_store/ unless they say otherwise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.config import DEFAULT_MODEL_PATH
from app.models import LoadedModel, load_checkpoint, unet_denoiser
from tests.metrics import metric_value

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def loaded(checkpoint_path: Path) -> LoadedModel:
    return load_checkpoint(checkpoint_path, "cpu")


@pytest.fixture(scope="session")
def denoiser(loaded: LoadedModel):
    return unet_denoiser(loaded.unet)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real `python -m app.serve` process on 127.0.0.1 (or another module that runs app.serve's main)."""

    def __init__(self, env: dict[str, str], log_path: Path, module: str = "app.serve") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait for /readyz 200. The default warmup (a forward at each of 32 row counts) took over 120 s on the
        2-core machine shared with other test runs; the bound only turns a hang into a failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s: {self.log()}")

    def wait_listening(self, timeout: float = 120.0) -> float:
        """Wait until the port answers HTTP (any status); returns the seconds since the process started."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError(f"server not listening after {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return metric_value(text, f"{name}{{{labels}}}" if labels else name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def launch_server(tmp_path: Path) -> Iterator:
    """Start a server process and return at once, before it listens: `launch(module, CFG_NAME=value, ...)`."""
    servers: list[LiveServer] = []

    def launch(module: str = "app.serve", **env: str) -> LiveServer:
        server = LiveServer(env, tmp_path / f"s{len(servers)}.log", module)
        servers.append(server)
        return server

    yield launch
    for server in servers:
        server.stop()


@pytest.fixture
def start_server(launch_server) -> Callable[..., LiveServer]:
    """Start `python -m app.serve` with settings as keywords (max_queue=1 is CFG_MAX_QUEUE) and wait until ready."""

    def start(**env: str) -> LiveServer:
        server = launch_server(**{f"CFG_{k.upper()}": str(v) for k, v in env.items()})
        server.wait_ready()
        return server

    return start
