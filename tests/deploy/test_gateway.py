"""The real nginx gateway, on the compose config, in front of two real app replicas.

Each replica is `python -m app.serve` with the shipped checkpoint on the CPU; requests ask for few
steps. Whether a request reached a replica is read from that replica's own /metrics.
"""

from __future__ import annotations

import json

import httpx
import pytest

from .support import Replica, StubDNS, free_port

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

GENERATE = {
    "class_label": "Sneaker",
    "num_images": 1,
    "steps": 2,
    "sampler": "ddim",
    "guidance_scale": 3,
    "seed": 1,
}


def total(counters: list[dict[str, float]]) -> float:
    return sum(sum(c.values()) for c in counters)


def test_requests_spread_over_both_replicas(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    before = [r.counters() for r in replicas]
    for _ in range(4):
        response = httpx.post(f"{gateway.url}/generate", json=GENERATE, timeout=120)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
    after = [r.counters() for r in replicas]
    served = [a["ok"] - b["ok"] for a, b in zip(after, before, strict=True)]
    assert sum(served) == 4
    assert all(n >= 1 for n in served), f"ok requests per replica: {served}"


def test_png_and_model_list_pass_through(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    png = httpx.post(f"{gateway.url}/generate", json=GENERATE, headers={"Accept": "image/png"}, timeout=120)
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")
    models = httpx.get(f"{gateway.url}/v1/models", timeout=10)
    assert models.status_code == 200
    assert models.json()["data"][0]["name"] == "fashion-mnist-cfg"
    assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200


def test_invalid_request_gets_the_apps_own_answer(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    response = httpx.post(f"{gateway.url}/generate", json={**GENERATE, "steps": 0}, timeout=30)
    assert response.status_code == 422
    assert "steps" in response.text


def test_oversized_body_is_refused_before_any_replica(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    before = total([r.counters() for r in replicas])
    body = json.dumps({**GENERATE, "padding": "x" * 100_000})
    response = httpx.post(
        f"{gateway.url}/generate", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 64k"}
    assert total([r.counters() for r in replicas]) == before


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "//metrics", "/%6Detrics", "/metrics?x=1", "/docs"])
def test_metrics_stay_off_the_public_side(replicas: list[Replica], start_gateway, path: str) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    response = httpx.get(f"{gateway.url}{path}", timeout=10)
    assert response.status_code == 404
    assert "cfg_requests_total" not in response.text


def test_api_key_when_configured(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas], GATEWAY_API_KEY="test-key-0123")
    url = f"{gateway.url}/generate"
    missing = httpx.post(url, json=GENERATE, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["detail"] == "missing X-API-Key header"
    wrong = httpx.post(url, json=GENERATE, headers={"X-API-Key": "test-key-0124"}, timeout=30)
    assert wrong.status_code == 403
    # Map keywords and regular expressions must not stand in for the key.
    for guess in ("default", "~.*", "key:test-key-0123"):
        assert httpx.get(f"{gateway.url}/v1/models", headers={"X-API-Key": guess}, timeout=10).status_code == 403
    right = httpx.post(url, json=GENERATE, headers={"X-API-Key": "test-key-0123"}, timeout=120)
    assert right.status_code == 200
    assert httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code == 401
    # Health stays open for load balancers.
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200


def test_api_key_is_off_by_default(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    assert gateway.env["GATEWAY_API_KEY"] == ""
    for headers in ({}, {"X-API-Key": "anything"}):
        assert httpx.get(f"{gateway.url}/v1/models", headers=headers, timeout=10).status_code == 200


def test_rate_limit_answers_429(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas], GATEWAY_RATE_LIMIT="1r/m", GATEWAY_RATE_BURST="2")
    codes = [httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code for _ in range(5)]
    # One request at the rate plus a burst of two pass; the rest are refused at once.
    assert codes == [200, 200, 200, 429, 429]
    refused = httpx.post(f"{gateway.url}/generate", json=GENERATE, timeout=30)
    assert refused.status_code == 429
    assert refused.json() == {"detail": "rate limit exceeded"}
    assert refused.headers["Retry-After"] == "1"


def test_a_post_that_cannot_connect_goes_to_the_other_replica_once(replicas: list[Replica], start_gateway) -> None:
    """A replica that refuses the connection (dead, or restarting) never saw the request: the gateway
    passes it to the next one. A POST that was sent is never passed on: test_gateway_faults.py."""
    # Round robin starts with the first server: a port nobody listens on.
    live = replicas[0]
    dead = f"127.0.0.1:{free_port()}"
    gateway = start_gateway([dead, live.hostport])
    before = live.counters()
    first = httpx.post(f"{gateway.url}/generate", json=GENERATE, timeout=120)
    assert first.status_code == 200, first.text
    after = live.counters()
    assert after["ok"] == before["ok"] + 1 and sum(after.values()) == sum(before.values()) + 1
    assert f"upstream={dead}, {live.hostport} " in gateway.access_log()
    # With every replica down, the client gets the gateway's 502 at once.
    nobody = start_gateway([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    response = httpx.post(f"{nobody.url}/generate", json=GENERATE, timeout=60)
    assert response.status_code == 502
    assert response.json() == {"detail": "no replica could be reached"}


def test_replicas_found_through_the_resolver(replicas: list[Replica], start_gateway) -> None:
    """The compose path: GATEWAY_UPSTREAM=app:PORT looked up per request at GATEWAY_RESOLVER."""
    dns = StubDNS({"app"})
    try:
        port = replicas[1].hostport.split(":")[1]
        gateway = start_gateway(
            [replicas[0].hostport], GATEWAY_UPSTREAM=f"app:{port}", GATEWAY_RESOLVER=f"127.0.0.1:{dns.port}"
        )
        before = replicas[1].counters()["ok"]
        response = httpx.post(f"{gateway.url}/generate", json=GENERATE, timeout=120)
        assert response.status_code == 200, response.text
        assert replicas[1].counters()["ok"] == before + 1
        assert "app" in dns.queries
    finally:
        dns.close()


def stream_events(replicas: list[Replica], method: str, url: str, **kwargs) -> tuple[list[str], float]:
    """The event names of a server-sent event stream, and the requests running on the replicas when the
    first event arrived: held back by the gateway, it would only come once the request is done."""
    events: list[str] = []
    running_at_first_event = -1.0
    with httpx.stream(method, url, timeout=120, **kwargs) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                events.append(line.removeprefix("event:").strip())
                if running_at_first_event < 0:
                    running_at_first_event = sum(replica.gauge("cfg_requests_in_flight") for replica in replicas)
    return events, running_at_first_event


def test_progress_events_stream_through_unbuffered(replicas: list[Replica], start_gateway) -> None:
    gateway = start_gateway([r.hostport for r in replicas])
    headers = {"Accept": "text/event-stream"}
    events, running = stream_events(
        replicas, "POST", f"{gateway.url}/generate", json={**GENERATE, "steps": 30}, headers=headers
    )
    assert events[0] == "progress" and events[-1] == "result", events
    assert running == 1, "the first progress event arrived after the request had finished"


def test_jobs_through_the_gateway_reach_the_replica_that_holds_them(replicas: list[Replica], start_gateway) -> None:
    """A job lives in one replica's memory; round robin sends each GET to either replica, and the one without
    the job answers 404, which the gateway passes on to the next replica (proxy_next_upstream http_404)."""
    gateway = start_gateway([r.hostport for r in replicas], GATEWAY_API_KEY="test-key-0123")
    key = {"X-API-Key": "test-key-0123"}
    assert httpx.post(f"{gateway.url}/v1/jobs", json=GENERATE, timeout=30).status_code == 401
    created = httpx.post(f"{gateway.url}/v1/jobs", json={**GENERATE, "steps": 30}, headers=key, timeout=30)
    assert created.status_code == 202, created.text
    job_url = f"{gateway.url}{created.headers['location']}"
    assert httpx.get(job_url, timeout=10).status_code == 401
    events, running = stream_events(replicas, "GET", f"{job_url}/events", headers=key)
    assert events[0] == "progress" and events[-1] == "result", events
    assert running == 1, "the first progress event arrived after the job had finished"
    for _ in range(4):  # whichever replica round robin picks first
        job = httpx.get(job_url, headers=key, timeout=10)
        assert job.status_code == 200 and job.json()["status"] == "succeeded"
    assert httpx.delete(job_url, headers=key, timeout=10).status_code == 409
    missing = httpx.get(f"{gateway.url}/v1/jobs/{'0' * 32}", headers=key, timeout=10)
    assert missing.status_code == 404 and "no job" in missing.json()["detail"]
    # Each replica was asked for the unknown job once: the gateway stops when every replica has said 404.
    assert gateway.access_log().count(f"/v1/jobs/{'0' * 32}") == 1
