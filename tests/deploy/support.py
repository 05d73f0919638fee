"""Helpers for the deployment tests: compose config, gateway rendering, processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
GATEWAY_TEMPLATES = REPO / "deploy" / "gateway" / "templates"
RENDER_SCRIPT = REPO / "scripts" / "render-gateway-conf.sh"
TEST_UPSTREAM = "cfg_test_replicas"


def require_tool(name: str) -> str:
    """The Debian tools are part of the tested setup: missing one is a failure, not a skip."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: run `scripts/install.sh --system`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@cache
def compose_config(*compose_files: str) -> dict:
    """The compose files (later ones override earlier ones) as `docker-compose config` resolves them:
    defaults filled in, paths absolute. No files: docker-compose.yml."""
    docker_compose = require_tool("docker-compose")
    files = [arg for f in compose_files or ("docker-compose.yml",) for arg in ("-f", str(REPO / f))]
    # Only the variables this test sets: a developer's own GATEWAY_API_KEY must not leak in.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    out = subprocess.run(
        [docker_compose, "--project-directory", str(REPO), *files, "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"docker-compose config failed for {compose_files}:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


def gateway_env(**overrides: str) -> dict[str, str]:
    """The gateway service's environment from the compose file, with the test's overrides."""
    env = {k: "" if v is None else str(v) for k, v in compose_config()["services"]["gateway"]["environment"].items()}
    env.update(overrides)
    return env


def render_gateway(env: dict[str, str], out_dir: Path) -> Path:
    """Render deploy/gateway/templates into out_dir as the nginx image's entrypoint does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["bash", str(RENDER_SCRIPT), str(GATEWAY_TEMPLATES), str(out_dir)],
        env={"PATH": os.environ["PATH"], **env},
        check=True,
        timeout=30,
    )
    return out_dir


def nginx_main_conf(prefix: Path, conf_d: Path, extra_http: str = "") -> Path:
    """A stand-in for the nginx image's /etc/nginx/nginx.conf: conf.d/*.conf inside http {}, with every
    path under the temp prefix so that nginx runs (even as root) without touching /etc/nginx or /var."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{extra_http}
    include {conf_d}/*.conf;
}}
"""
    )
    return conf


def nginx_test(prefix: Path, conf: Path) -> subprocess.CompletedProcess:
    nginx = require_tool("nginx")
    return subprocess.run(
        [nginx, "-e", "stderr", "-p", str(prefix), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def answers_ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Replica:
    """One `python -m app.serve` process with the shipped checkpoint, on the CPU."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def hostport(self) -> str:
        """host:port, as nginx's upstream {} group and its access log name the replica."""
        return self.url.removeprefix("http://")

    def counters(self) -> dict[str, float]:
        """This replica's own cfg_requests_total, by outcome."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "cfg_requests_total":  # summed over the models
                    counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0.0) + sample.value
        return counts

    def gauge(self, *names: str) -> float:
        """Gauges of this replica's, such as cfg_requests_in_flight, summed over their labels (the models) and
        over the names, all read from one scrape: a job that moves from the queue into the batch between two
        scrapes would be in neither."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def start_replica(log_path: Path, **env: str) -> Replica:
    """One more `python -m app.serve` on a free port, on the CPU; the caller waits for /readyz and stops it."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "CFG_DEVICE": "cpu", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Replica(f"http://127.0.0.1:{port}", proc, log_path)


@dataclass
class Gateway:
    url: str
    prefix: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def access_log(self) -> str:
        return (self.prefix / "stdout.log").read_text(errors="replace")


class StubDNS:
    """A DNS server on 127.0.0.1 that answers A queries for `names` with 127.0.0.1 and NXDOMAIN otherwise.

    A stand-in for Docker's embedded DNS (127.0.0.11), which only exists inside a compose network: it
    lets the gateway's resolver path, proxy_pass through a variable, run for real.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, client = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(self._answer(packet), client)

    def _answer(self, packet: bytes) -> bytes:
        # RFC 1035 4.1: a 12-byte header, then the question: length-prefixed labels, type, class.
        query_id, qdcount = struct.unpack("!H2xH", packet[:6])
        labels, offset = [], 12
        while packet[offset]:
            labels.append(packet[offset + 1 : offset + 1 + packet[offset]].decode())
            offset += 1 + packet[offset]
        qtype, _ = struct.unpack("!HH", packet[offset + 1 : offset + 5])
        question = packet[12 : offset + 5]
        name = ".".join(labels)
        self.queries.append(name)
        if name not in self.names:
            return struct.pack("!HHHHHH", query_id, 0x8183, qdcount, 0, 0, 0) + question
        answers = []
        if qtype == 1:  # A: a pointer to the question's name, type A, class IN, TTL 5 s, 4 bytes
            answers.append(struct.pack("!HHHIH4B", 0xC00C, 1, 1, 5, 4, 127, 0, 0, 1))
        header = struct.pack("!HHHHHH", query_id, 0x8180, qdcount, len(answers), 0, 0)
        return header + question + b"".join(answers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextmanager
def running_replicas(logs: Path, env: dict[str, str], count: int = 2) -> Iterator[list[Replica]]:
    """`count` real `python -m app.serve` replicas on free 127.0.0.1 ports, each ready (its /readyz 200), stopped
    (SIGTERM) on leaving; each one's log in `logs`."""
    started: list[Replica] = []
    try:
        for i in range(count):
            port = free_port()
            log_path = logs / f"replica{i}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started.append(Replica(f"http://127.0.0.1:{port}", proc, log_path))
        for replica in started:
            try:
                wait_for(partial(answers_ready, replica.url), 240, f"replica {replica.url}", replica.proc)
            except (TimeoutError, RuntimeError) as exc:
                pytest.fail(f"{exc}\n{replica.log()}")
        yield started
    finally:
        for replica in started:
            stop_process(replica.proc, timeout=60)
