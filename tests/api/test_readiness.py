"""Readiness and drain over real HTTP, against real server processes: the port opens at once, /readyz says
why the server is not ready (loading, warming up, draining), and new work gets 503 with Retry-After until
it is, while /healthz, /metrics and the docs keep answering."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_live import wait_until

pytestmark = pytest.mark.integration  # real server processes

BODY = {"class_label": 3, "steps": 2, "seed": 1}


def readyz(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/readyz", timeout=10)
    return r.status_code, r.json()


def assert_new_work_refused(url: str, phase: str) -> None:
    """Every call that needs the model gets 503 with Retry-After and a JSON detail naming the phase."""
    calls = [
        ("POST", "/generate", BODY),
        ("POST", "/v1/jobs", BODY),
        ("POST", "/v1/guidance/curve", BODY),
        ("POST", "/v1/images/generations", {"prompt": "Dress", "n": 1}),
        ("GET", "/v1/models", None),  # the playground's first call
    ]
    for method, path, body in calls:
        r = httpx.request(method, f"{url}{path}", json=body, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "7", (path, r.status_code, r.text)
        detail = r.json()["error"]["message"] if path == "/v1/images/generations" else r.json()["detail"]
        assert phase in detail, (path, detail)


def assert_the_rest_answers(url: str) -> None:
    """Liveness, metrics and the API's docs answer whatever the phase."""
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert "cfg_requests_total" in httpx.get(f"{url}/metrics", timeout=10).text
    assert "/generate" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert httpx.get(f"{url}/docs", timeout=10).status_code == 200


def test_the_port_opens_at_once_and_readyz_says_loading_then_warming_up_then_ready(launch_server, tmp_path: Path):
    # The startup is held at its load and at its warmup (tests/held_serve.py) until this test lets it go on.
    # Four rows: once released, the real warmup is four forwards.
    server = launch_server(
        "tests.held_serve", HOLD_DIR=str(tmp_path), CFG_RETRY_AFTER_S="7", CFG_MAX_BATCH_ROWS="4", CFG_MAX_IMAGES="2"
    )
    server.wait_listening()
    assert readyz(server.url) == (503, {"status": "not ready", "reason": "loading", "error": None})
    assert_new_work_refused(server.url, "loading")
    assert_the_rest_answers(server.url)

    (tmp_path / "load").touch()
    wait_until(lambda: readyz(server.url)[1]["reason"] == "warming up")
    assert readyz(server.url)[0] == 503
    assert_new_work_refused(server.url, "warming up")
    assert_the_rest_answers(server.url)

    (tmp_path / "warmup").touch()
    server.wait_ready()
    assert readyz(server.url) == (200, {"status": "ready"})
    assert httpx.post(f"{server.url}/generate", json=BODY, timeout=120).status_code == 200
    # The refused /generate and OpenAI calls were counted as rejected: two phases, two each.
    assert server.metric("cfg_requests_total", 'model="none",outcome="rejected"') == 2
    assert server.metric("cfg_requests_total", 'model="fashion-mnist-cfg",outcome="rejected"') == 2


def test_a_startup_that_fails_exits_with_status_1_and_says_why(launch_server, tmp_path: Path):
    server = launch_server("tests.held_serve", HOLD_DIR=str(tmp_path))
    server.wait_listening()
    (tmp_path / "load").write_text("fail")
    assert server.proc.wait(timeout=60) == 1
    assert "startup failed" in server.log() and "the test made this load fail" in server.log()


def test_sigterm_drains_with_the_port_open_then_exits_0(start_server):
    """While a long request finishes, /readyz says draining and new work gets 503 with Retry-After; then the
    request gets its images and the process exits 0."""
    server = start_server(warmup="false", max_batch_rows=16, max_images=8, retry_after_s=7)
    long: dict[str, httpx.Response] = {}

    def post_long() -> None:  # 8 images x 100 steps: seconds on an idle machine, a minute or more on a busy one
        body = {"class_label": 4, "num_images": 8, "steps": 100, "seed": 1}
        long["r"] = httpx.post(f"{server.url}/generate", json=body, timeout=300)

    thread = threading.Thread(target=post_long)
    thread.start()
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 1)
    server.proc.send_signal(signal.SIGTERM)

    wait_until(lambda: readyz(server.url)[0] == 503, timeout=10)
    assert readyz(server.url) == (503, {"status": "not ready", "reason": "draining", "error": None})
    assert_new_work_refused(server.url, "draining")
    assert_the_rest_answers(server.url)
    # All of that happened with the long request still in the batch.
    assert server.metric("cfg_requests_in_flight") == 1 and "r" not in long

    thread.join(timeout=300)
    assert long["r"].status_code == 200 and len(long["r"].json()["images"]) == 8
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "draining: new requests get 503; finishing 1 request(s)" in log and "engine stopped" in log


def test_a_drain_that_runs_out_of_time_fails_the_unfinished_request_with_503(start_server):
    server = start_server(warmup="false", drain_timeout_s=1)
    result: dict[str, httpx.Response] = {}

    def post_long() -> None:
        body = {"class_label": 4, "num_images": 16, "steps": 200, "seed": 1}
        result["r"] = httpx.post(f"{server.url}/generate", json=body, timeout=300)

    thread = threading.Thread(target=post_long)
    thread.start()
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 1)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    r = result["r"]
    assert r.status_code == 503 and "shut down before this finished" in r.json()["detail"], r.text
    assert server.proc.wait(timeout=60) == 0
    assert time.monotonic() - started < 60
