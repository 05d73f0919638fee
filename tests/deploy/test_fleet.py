"""Jobs on a shared Redis store (CFG_JOB_STORE=redis://...): a real Debian `redis-server` on 127.0.0.1 and two
real replicas (`python -m app.serve`) using it. A job submitted on replica A is read, followed and cancelled on
replica B; an Idempotency-Key holds across them; with Redis stopped POST /v1/jobs is 503 and /generate still
answers; restarted, Redis still has the finished jobs (append-only file, as the compose service keeps).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.metrics import metric_value

from .support import Replica, free_port, require_tool, running_replicas, stop_process, wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.integration]

BODY = {"class_label": "sneaker", "num_images": 2, "steps": 12, "seed": 5}


@dataclass
class RedisServer:
    port: int
    folder: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        conf = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", ""]
        conf += ["--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "yes"]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 (the server keeps it)
        self.proc = subprocess.Popen([require_tool("redis-server"), *conf], stdout=log, stderr=subprocess.STDOUT)
        cli = require_tool("redis-cli")
        ping = ["-h", "127.0.0.1", "-p", str(self.port), "ping"]
        wait_for(lambda: subprocess.run([cli, *ping], capture_output=True).stdout == b"PONG\n", 30, "redis", self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)  # SIGTERM: the append-only file is flushed


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two replicas on the one store."""
    logs = tmp_path_factory.mktemp("fleet")
    env = {**os.environ, "CFG_DEVICE": "cpu", "CFG_WARMUP": "false", "CFG_JOB_STORE": redis_server.url}
    with running_replicas(logs, env) as started:
        yield started


def events(url: str, job_id: str) -> list[tuple[str, dict]]:
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as r:
        assert r.status_code == 200, r.read()
        text = "".join(r.iter_text())
    out = []
    for chunk in filter(None, text.split("\n\n")):
        if chunk.startswith(":"):
            continue
        kind, data = chunk.split("\n", 1)
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def wait_job(url: str, job_id: str, pred, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if pred(job):
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


def test_a_job_submitted_on_one_replica_is_read_and_followed_on_the_other(fleet):
    a, b = fleet
    r = httpx.post(f"{a.url}/v1/jobs", json=BODY, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    on_b = httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10)
    assert on_b.status_code == 200 and on_b.json()["id"] == job_id and on_b.json()["steps"] == 12

    stream = events(b.url, job_id)  # on B, while it runs on A
    kinds = [k for k, _ in stream]
    assert kinds[-1] == "result" and set(kinds[:-1]) <= {"progress"}, kinds
    done_b = httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10).json()
    done_a = httpx.get(f"{a.url}/v1/jobs/{job_id}", timeout=10).json()
    assert done_b["status"] == "succeeded" and done_b["step"] == 12
    assert done_b["result"] == done_a["result"] == stream[-1][1]
    direct = httpx.post(f"{b.url}/generate", json=BODY, timeout=60).json()
    assert done_b["result"]["images"] == direct["images"]  # the same process, the same CPU: the same bytes
    # Only A ran it.
    assert metric_value(httpx.get(f"{b.url}/metrics").text, 'cfg_jobs_total{outcome="succeeded"}') == 0
    assert metric_value(httpx.get(f"{a.url}/metrics").text, 'cfg_jobs_total{outcome="succeeded"}') >= 1


def test_a_cancel_on_one_replica_stops_the_job_where_it_runs(fleet):
    a, b = fleet
    body = {**BODY, "num_images": 8, "steps": 200}
    job_id = httpx.post(f"{a.url}/v1/jobs", json=body, timeout=30).json()["id"]
    wait_job(b.url, job_id, lambda j: j["status"] == "running" and j["step"] >= 1)
    r = httpx.delete(f"{b.url}/v1/jobs/{job_id}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    # A hears it and takes the rows out of its batch: its engine holds nothing soon after, long before
    # 200 steps of 8 images would end.
    wait_for(lambda: metric_value(httpx.get(f"{a.url}/metrics").text, "cfg_requests_in_flight") == 0, 10, "abort on A")
    on_a = httpx.get(f"{a.url}/v1/jobs/{job_id}", timeout=10).json()
    assert on_a["status"] == "cancelled" and on_a["step"] < 200 and on_a["result"] is None
    assert httpx.delete(f"{a.url}/v1/jobs/{job_id}", timeout=10).status_code == 409
    assert metric_value(httpx.get(f"{a.url}/metrics").text, 'cfg_jobs_total{outcome="cancelled"}') == 1


def test_an_idempotency_key_holds_across_replicas(fleet):
    a, b = fleet
    key = {"Idempotency-Key": "fleet-7c1e"}
    first = httpx.post(f"{a.url}/v1/jobs", json=BODY, headers=key, timeout=30)
    again = httpx.post(f"{b.url}/v1/jobs", json=BODY, headers=key, timeout=30)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = httpx.post(f"{b.url}/v1/jobs", json={**BODY, "steps": 3}, headers=key, timeout=30)
    assert other.status_code == 422 and other.json()["detail"][0]["type"] == "idempotency_key_reused"


def test_with_redis_stopped_jobs_are_refused_and_generate_answers_and_a_restart_keeps_the_jobs(fleet, redis_server):
    a, b = fleet
    job_id = httpx.post(f"{a.url}/v1/jobs", json=BODY, timeout=30).json()["id"]
    finished = wait_job(b.url, job_id, lambda j: j["status"] == "succeeded")
    assert httpx.get(f"{a.url}/readyz").json()["job_store"] == {
        "url": redis_server.url,
        "reachable": True,
        "error": None,
    }
    redis_server.stop()
    try:
        r = httpx.post(f"{a.url}/v1/jobs", json=BODY, timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert f"the job store ({redis_server.url}) is unreachable" in r.json()["detail"]
        assert httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=30).status_code == 503
        ready = httpx.get(f"{a.url}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["job_store"]["reachable"] is False
        assert httpx.post(f"{a.url}/generate", json=BODY, timeout=60).status_code == 200
        assert metric_value(httpx.get(f"{a.url}/metrics").text, "cfg_job_store_errors_total") >= 1
    finally:
        redis_server.start()
    again = httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=30)
    assert again.status_code == 200 and again.json() == finished
    assert httpx.post(f"{b.url}/v1/jobs", json=BODY, timeout=30).status_code == 202


def test_right_after_a_redis_restart_the_first_reads_answer(fleet, redis_server):
    """The replicas' pooled connections are closed by the restarted server; the first read on each must
    reconnect and answer, not 503 (it did, once, in CI: redis-py's from_url retries nothing by default)."""
    a, b = fleet
    job_id = httpx.post(f"{a.url}/v1/jobs", json=BODY, timeout=30).json()["id"]
    finished = wait_job(b.url, job_id, lambda j: j["status"] == "succeeded")
    for replica in (a, b):  # a pooled connection on each replica
        assert httpx.get(f"{replica.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
    redis_server.stop()
    redis_server.start()
    for replica in (a, b):  # no request in between: the pool still holds the closed connections
        r = httpx.get(f"{replica.url}/v1/jobs/{job_id}", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json() == finished


def test_a_job_whose_replica_was_killed_is_failed_when_read_once_its_heartbeat_expires(fleet):
    """Last in this module: it kills replica A. Its job is not re-run (the shared backlog is not built):
    it is failed, with a message that says to submit it again, instead of staying `running` for ever."""
    a, b = fleet
    job_id = httpx.post(f"{a.url}/v1/jobs", json={**BODY, "num_images": 8, "steps": 200}, timeout=30).json()["id"]
    wait_job(b.url, job_id, lambda j: j["status"] == "running")
    a.proc.kill()  # SIGKILL: no drain, no last write
    a.proc.wait()
    assert httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "running"  # its heartbeat holds
    failed = wait_job(b.url, job_id, lambda j: j["status"] != "running", timeout=60)
    assert failed["status"] == "failed" and failed["result"] is None
    assert "stopped before it finished" in failed["error"]["detail"]
