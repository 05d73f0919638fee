"""The real server process (python -m app.serve) under concurrent clients, disconnects and SIGTERM."""

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import pytest

from app.sampling import DEFAULT_GUIDANCE, SampleRun, SampleSpec, sample
from tests.defaults import DEFAULT_CACHE
from tests.pngs import decode

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError


def open_request(url: str, body: dict) -> socket.socket:
    """POST /generate on a raw connection and leave it open: closing the socket is the client hanging up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = ["POST /generate HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    head.append(f"Content-Length: {len(data)}")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall("\r\n".join([*head, "", ""]).encode() + data)
    return sock


def test_concurrent_requests_get_their_own_class_and_seed(start_server, loaded, denoiser):
    server = start_server(max_batch_rows=32)

    def post(c):
        body = {"class_label": c, "seed": 100 + c, "steps": 6, "guidance_scale": 3, "sampler": "ddpm"}
        return httpx.post(f"{server.url}/generate", json=body, timeout=120).json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    for c, res in enumerate(results):
        assert res["class_label"] == c and res["seeds"] == [100 + c]
        # Batch invariance: the image equals the same request sampled alone, in-process.
        guidance = replace(DEFAULT_GUIDANCE, guidance_scale=3.0)  # the request's scale, the default schedule
        spec = SampleSpec(
            class_label=c, seeds=(100 + c,), steps=6, sampler="ddpm", guidance=guidance, cache=DEFAULT_CACHE
        )
        alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
        sample(denoiser, [alone])
        diff = np.abs(decode(res["images"][0]).astype(int) - alone.images()[0, :, :, 0].astype(int))
        assert diff.max() <= 1, f"class {c}: max pixel difference {diff.max()}"
    # The eight requests shared forwards: more than one request's rows per forward on average.
    rows = server.metric("cfg_engine_batch_rows_sum") / server.metric("cfg_engine_batch_rows_count")
    assert rows > 2.5
    assert server.metric("cfg_requests_total", 'outcome="ok"') == 8


def test_full_queue_gives_503_and_disconnects_cancel(start_server):
    server = start_server(max_batch_rows=32, max_queue=1, retry_after_s=7)
    big = {"class_label": 1, "num_images": 16, "steps": 200}  # takes all 32 rows for a long time

    # The clients hang up when the test says so, not on a client timeout: on a loaded machine a timer
    # could fire before the queue is full, or after the big request has finished.
    running = open_request(server.url, big)
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 1)
    waiting = open_request(server.url, {**big, "class_label": 2})
    wait_until(lambda: server.metric("cfg_queue_depth") == 1)

    r = httpx.post(f"{server.url}/generate", json={"class_label": 3, "steps": 2}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "7" and "queue full" in r.json()["detail"]
    assert server.metric("cfg_requests_total", 'outcome="rejected"') == 1

    running.close()
    waiting.close()
    wait_until(lambda: server.metric("cfg_requests_total", 'outcome="cancelled"') == 2)
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 0 and server.metric("cfg_queue_depth") == 0)
    # Every forward from here on holds only the next request's rows: none of the cancelled ones.
    steps, rows = server.metric("cfg_engine_step_duration_seconds_count"), server.metric("cfg_engine_batch_rows_sum")
    small = {
        "class_label": 3,
        "steps": 2,
        "guidance_scale": 3,
        "schedule": {"kind": "constant"},
        "cache": {"kind": "none"},
    }
    # two rows a step (no step cache: the default's would reuse the guidance difference at the second)
    assert httpx.post(f"{server.url}/generate", json=small, timeout=60).status_code == 200
    assert server.metric("cfg_engine_step_duration_seconds_count") == steps + 2, "compute continued after cancel"
    assert server.metric("cfg_engine_batch_rows_sum") == rows + 4


def test_sigterm_finishes_in_flight_requests_then_exits(start_server):
    server = start_server()
    result = {}

    def post():
        body = {"class_label": 4, "num_images": 4, "steps": 60, "seed": 1}
        result["r"] = httpx.post(f"{server.url}/generate", json=body, timeout=120)

    t = threading.Thread(target=post)
    t.start()
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 1)
    # The forward runs off the event loop: health and metrics answer while it computes.
    t0 = time.monotonic()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 5
    server.proc.send_signal(signal.SIGTERM)
    t.join()
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 4
    assert server.proc.wait(timeout=60) == 0  # a drained process exits 0 (app/serve.py)
    assert "engine stopped" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=5)


def test_sigterm_drains_running_and_queued_jobs(start_server):
    """A job's compute goes on through a graceful shutdown, as /generate's does: a client following a job's
    events (an open connection, which the server waits for) gets its result before the process exits."""
    server = start_server(max_batch_rows=32)
    # 32 rows at every step (a constant schedule) fill the batch: the next job waits.
    big = {"class_label": 4, "num_images": 16, "steps": 40, "seed": 1, "schedule": {"kind": "constant"}}
    running = httpx.post(f"{server.url}/v1/jobs", json=big, timeout=30).json()
    queued = httpx.post(f"{server.url}/v1/jobs", json={**big, "num_images": 2}, timeout=30).json()
    assert queued["status"] == "queued"
    finals: dict[str, str] = {}
    connected = threading.Semaphore(0)

    def follow(job_id: str) -> None:
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=120) as r:
            connected.release()
            for line in r.iter_lines():
                if line.startswith("event:"):
                    finals[job_id] = line.removeprefix("event:").strip()

    threads = [threading.Thread(target=follow, args=(job["id"],)) for job in (running, queued)]
    for t in threads:
        t.start()
    assert connected.acquire(timeout=30) and connected.acquire(timeout=30)
    assert httpx.get(f"{server.url}/v1/jobs/{running['id']}", timeout=10).json()["status"] == "running"
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert finals == {running["id"]: "result", queued["id"]: "result"}
    assert server.proc.wait(timeout=60) == 0
