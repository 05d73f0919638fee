"""Deadlines over the real HTTP app: a request whose timeout_s the work ahead of it in its class leaves no time to
meet, at the engine's measured pace, is refused at once with 503 and Retry-After, not timed out after waiting;
one that can meet it runs; timeout_s is bounded by CFG_REQUEST_TIMEOUT_S and is not for jobs."""

import time

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.metrics import metric_value


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.integration  # the pace is the real checkpoint's
def test_a_deadline_the_work_ahead_leaves_no_time_for_is_refused_at_once():
    # 4 rows per forward. Two batch jobs of 2 images and 200 steps (4 rows each, one at a time): 400 ticks of batch
    # work, at least 15 ms each on this CPU (6 s), minutes on a loaded one.
    # The warmup runs a forward at each row count first: no first forward of a shape (seconds on a loaded CPU) holds
    # the tick at which the refusal is sent.
    settings = Settings(warmup=True, max_batch_rows=4, max_images=2, request_timeout_s=60)
    with TestClient(create_app(settings)) as c:
        flood = [c.post("/v1/jobs", json={"class_label": k, "num_images": 2, "steps": 200, "seed": k}) for k in (1, 2)]
        assert all(r.status_code == 202 for r in flood)
        try:
            metrics = refusals(c)
        finally:  # not drained at the end: minutes of work
            for job in flood:
                c.delete(f"/v1/jobs/{job.json()['id']}")
    assert metric_value(metrics, "cfg_deadline_refusals_total") == 3
    assert metric_value(metrics, 'cfg_requests_total{outcome="rejected"}') == 3
    assert metric_value(metrics, 'cfg_requests_total{outcome="ok"}') == 2


def refusals(c: TestClient) -> str:
    """With the batch flood running: what is refused and what runs; the metrics then."""
    # The engine measures its pace from the ticks it runs.
    wait_until(lambda: metric_value(c.get("/metrics").text, "cfg_engine_step_duration_seconds_count") >= 3)

    # Interactive work is ahead of batch work: the batch flood leaves the batch for it, so it meets its deadline.
    r = c.post("/generate", json={"class_label": 3, "steps": 4, "timeout_s": 60})
    assert r.status_code == 200, r.text

    # A batch request behind the flood, with 3 s to finish: refused at once (at the end of the tick under way),
    # naming why, where waiting would have ended in a 504 after 3 s.
    body = {"class_label": 4, "num_images": 2, "steps": 200, "priority": "batch", "timeout_s": 3}
    t0 = time.monotonic()
    r = c.post("/generate", json=body)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert "timeout_s=3" in r.json()["detail"] and "batch work ahead" in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1
    assert elapsed < 3, f"refused after {elapsed:.2f} s: it waited out its deadline"
    # The same as a stream of events: refused with the status, not as a 200 whose only event is the error.
    r = c.post("/generate", json={**body, "seed": 1}, headers={"Accept": "text/event-stream"})
    assert r.status_code == 503 and "timeout_s=3" in r.json()["detail"], r.text
    assert int(r.headers["retry-after"]) >= 1
    # A stream whose deadline can be met opens and carries its events to the result.
    sse = {"Accept": "text/event-stream"}
    r = c.post("/generate", json={"class_label": 3, "steps": 4, "timeout_s": 60}, headers=sse)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    assert r.text.count("event: progress") >= 4 and "event: result" in r.text

    # An interactive request whose own 200 steps take longer than its second: refused on the OpenAI endpoint.
    t0 = time.monotonic()
    r = c.post("/v1/images/generations", json={"prompt": "class 5", "n": 2, "steps": 200, "timeout_s": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "rejected", r.text
    assert "timeout_s=1" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
    assert time.monotonic() - t0 < 1
    return c.get("/metrics").text


@pytest.mark.stand_in
def test_timeout_s_is_bounded_by_the_request_timeout_and_is_not_for_jobs():
    with TestClient(create_app(Settings(warmup=False, request_timeout_s=60))) as c:
        r = c.post("/generate", json={"class_label": 1, "steps": 2, "timeout_s": 61})
        assert r.status_code == 422
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", "timeout_s"] and "60" in error["msg"], error
        assert c.post("/generate", json={"class_label": 1, "steps": 2, "timeout_s": 0}).status_code == 422
        r = c.post("/v1/images/generations", json={"prompt": "class 1", "timeout_s": 61})
        assert r.status_code == 400 and r.json()["error"]["param"] == "timeout_s"
        r = c.post("/v1/jobs", json={"class_label": 1, "steps": 2, "timeout_s": 10})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "timeout_s"]
        # A deadline that can be met: the request runs (an idle engine, no work ahead).
        r = c.post("/generate", json={"class_label": 1, "steps": 2, "timeout_s": 60})
        assert r.status_code == 200, r.text
