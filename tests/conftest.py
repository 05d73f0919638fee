"""Shared fixtures. Tests use the real shipped checkpoint in model_store/ unless they say otherwise.

The tiers (docs/testing.md): `integration` (the real checkpoint, its numerics, or a real server process),
`deploy` (nginx, Prometheus, compose, k8s), `browser` (chromium) and `slow` mark what the fast tier,
`-m "not integration and not deploy and not browser and not slow"` (FAST_TIER), leaves out. A test marked
`stand_in` gets the stand-in checkpoint (tests/stand_in.py) from `loaded`, `denoiser`, `checkpoint_path` and
`Settings()`. A test that takes the real checkpoint's fixtures or starts a server is marked `integration` here,
and a fast-tier test that loads the real checkpoint anyway fails (_refuse_the_real_checkpoint).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

import app.models.checkpoint
from app.config import DEFAULT_MODEL_PATH
from app.models import LoadedModel, UNetDenoiser, load_checkpoint, unet_denoiser
from tests.metrics import metric_value
from tests.stand_in import save_stand_in

REPO = Path(__file__).resolve().parent.parent
FAST_TIER = "not integration and not deploy and not browser and not slow"
LEAVE_THE_FAST_TIER = ("integration", "deploy", "browser", "slow")
REAL_CHECKPOINT_FIXTURES = {"loaded", "denoiser", "checkpoint_path", "real_loaded", "real_denoiser"}
SERVER_FIXTURES = {"start_server", "launch_server"}  # a real `python -m app.serve`: loads in its own process


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        real = fixtures & REAL_CHECKPOINT_FIXTURES and item.get_closest_marker("stand_in") is None
        if real or fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run of fast-tier tests only runs torch on one thread. Its models are tiny, and OpenMP's teams (one per
    thread that runs torch: the test's, the engine's) sleep between parallel regions once they outnumber the
    cores: on the shared 2-core machine a 0.8 s jobs test took 36 s with two threads. The whole suite keeps
    torch's default, which the real checkpoint's tests and the service run with."""
    if session.items and all(in_fast_tier(item) for item in session.items):
        torch.set_num_threads(1)


def in_fast_tier(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(name) for name in LEAVE_THE_FAST_TIER)


def uses_stand_in(item: pytest.Item | None) -> bool:
    """The stand-in serves a `stand_in` test in the fast tier; marked integration too, it keeps the real one."""
    return item is not None and item.get_closest_marker("stand_in") is not None and in_fast_tier(item)


_current: list[pytest.Item] = []  # the test under way: a module fixture is built in its first test's setup
_real_load_module = app.models.checkpoint._load_module


def _refuse_the_real_checkpoint(component, config, weight_files, folder: Path, device):
    """checkpoint._load_module, failing a fast-tier test that loads the real checkpoint's weights."""
    item = _current[-1] if _current else None
    if item is not None and in_fast_tier(item) and Path(folder).resolve().is_relative_to(DEFAULT_MODEL_PATH):
        pytest.fail(
            f"{item.nodeid} is in the fast tier but loads the real checkpoint ({folder}): "
            "mark it integration, or stand_in (tests/stand_in.py) if its subject is not the model",
            pytrace=False,
        )
    return _real_load_module(component, config, weight_files, folder, device)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current.append(item)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(app.models.checkpoint, "_load_module", _refuse_the_real_checkpoint)
            if uses_stand_in(item):  # Settings() serves the stand-in: its folder has the real one's name
                mp.setenv("CFG_MODEL_STORE", str(stand_in_folder(item.config).parent))
            return (yield)
    finally:
        _current.pop()


_STAND_IN = pytest.StashKey[Path]()


def stand_in_folder(config: pytest.Config) -> Path:
    """The stand-in checkpoint, written once per session (tests/stand_in.py), removed at its end."""
    if _STAND_IN not in config.stash:
        config.stash[_STAND_IN] = save_stand_in(Path(tempfile.mkdtemp(prefix="stand_in_store_")))
    return config.stash[_STAND_IN]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STAND_IN in config.stash:
        shutil.rmtree(config.stash[_STAND_IN].parent, ignore_errors=True)


@pytest.fixture(scope="session")
def real_loaded() -> LoadedModel:
    return load_checkpoint(DEFAULT_MODEL_PATH, "cpu")


@pytest.fixture(scope="session")
def real_denoiser(real_loaded: LoadedModel) -> UNetDenoiser:
    return unet_denoiser(real_loaded.unet)


@pytest.fixture(scope="session")
def stand_in_loaded(pytestconfig: pytest.Config) -> LoadedModel:
    return load_checkpoint(stand_in_folder(pytestconfig), "cpu")


@pytest.fixture(scope="session")
def stand_in_denoiser(stand_in_loaded: LoadedModel) -> UNetDenoiser:
    return unet_denoiser(stand_in_loaded.unet)


@pytest.fixture
def checkpoint_path(request: pytest.FixtureRequest) -> Path:
    return stand_in_folder(request.config) if uses_stand_in(request.node) else DEFAULT_MODEL_PATH


@pytest.fixture
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue("stand_in_loaded" if uses_stand_in(request.node) else "real_loaded")


@pytest.fixture
def denoiser(request: pytest.FixtureRequest) -> UNetDenoiser:
    return request.getfixturevalue("stand_in_denoiser" if uses_stand_in(request.node) else "real_denoiser")


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
