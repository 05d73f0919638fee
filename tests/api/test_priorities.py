"""Priority classes over the real HTTP app: batch requests preempted for interactive ones at a step boundary resume
with the images they would have drawn unpreempted, and say so in their events; the field's defaults and errors."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.metrics import metric_value
from tests.pngs import decode

SSE = {"Accept": "text/event-stream"}


def sse_events(text: str) -> list[tuple[str, dict]]:
    chunks = [c for c in text.split("\n\n") if c.startswith("event: ")]
    return [(c.split("\n")[0].removeprefix("event: "), json.loads(c.split("data: ", 1)[1])) for c in chunks]


def images(body: dict) -> np.ndarray:
    return np.stack([decode(b) for b in body["images"]]).astype(int)


def stream_batch(c: TestClient, batch: list[dict], rows: int) -> tuple[list[threading.Thread], list[str]]:
    """Stream each batch request (SSE) from a thread of its own; return once the batch class has run `rows` rows.
    Join the threads, then each stream's text is in streams."""
    streams = [""] * len(batch)

    def stream(i: int) -> None:
        r = c.post("/generate", json=batch[i], headers=SSE)
        assert r.status_code == 200, r.text
        streams[i] = r.text

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while metric_value(c.get("/metrics").text, 'cfg_class_forward_rows_total{priority="batch"}') < rows:
        assert time.monotonic() < deadline, "the batch requests did not start"
        time.sleep(0.02)
    return threads, streams


@pytest.mark.integration  # the subject is the images: the shipped checkpoint
def test_preempted_batch_requests_resume_with_the_images_they_draw_unpreempted():
    # Two batch requests of 2 guided images fill the 8 rows; two interactive ones of 2 images each need 4 rows.
    batch = [
        {"class_label": 1, "num_images": 2, "steps": 12, "seed": 11, "guidance_scale": 3.0, "priority": "batch"},
        {"class_label": 7, "num_images": 2, "steps": 12, "seed": 23, "guidance_scale": 5.0, "sampler": "ddim",
         "schedule": {"kind": "linear", "start": 1.0, "end": 0.2}, "priority": "batch"},
    ]  # fmt: skip
    interactive = [
        {"class_label": 3, "num_images": 2, "steps": 4, "seed": 5, "guidance_scale": 2.0},
        {"class_label": 5, "num_images": 2, "steps": 4, "seed": 6, "guidance_scale": 4.0, "sampler": "ddpm"},
    ]
    settings = Settings(request_timeout_s=300, warmup=False, max_batch_rows=8, max_images=4)
    with TestClient(create_app(settings)) as c:
        threads, streams = stream_batch(c, batch, rows=16)  # both running, some steps in: 2 ticks of their 8 rows
        with ThreadPoolExecutor(2) as pool:
            fast = list(pool.map(lambda b: c.post("/generate", json=b), interactive))
        for t in threads:
            t.join(timeout=300)
        metrics = c.get("/metrics").text
        alone = [c.post("/generate", json=b) for b in batch + interactive]

    assert metric_value(metrics, "cfg_engine_preemptions_total") >= 1
    assert metric_value(metrics, 'cfg_class_latency_seconds_count{priority="interactive"}') == 2
    preempted = 0
    for text in streams:
        events = sse_events(text)
        assert events[-1][0] == "result", events[-1]
        changes = [e["event"] for kind, e in events if kind == "progress" and "event" in e]
        statuses = [e["status"] for kind, e in events if kind == "progress"]
        if changes:
            preempted += 1
            assert changes[0] == "preempted" and changes[-1] == "resumed" and len(changes) % 2 == 0, changes
            assert "preempted" in statuses
    assert preempted >= 1, "no batch request was preempted"
    # The same requests alone (never preempted, 4 rows per forward, not 8): within one grey level.
    got = [images(sse_events(s)[-1][1]) for s in streams]
    got += [images(r.json()) for r in fast]
    for body, mine, single in zip(batch + interactive, got, alone, strict=True):
        assert single.status_code == 200, single.text
        diff = np.abs(mine - images(single.json())).max()
        assert diff <= 1, f"{body}: max pixel difference {diff} from the same request unpreempted"


@pytest.mark.stand_in
def test_priority_names_its_allowed_values_and_jobs_default_to_batch():
    with TestClient(create_app(Settings(warmup=False))) as c:
        r = c.post("/generate", json={"class_label": 1, "steps": 2, "priority": "urgent"})
        assert r.status_code == 422
        assert "'interactive' or 'batch'" in r.text and "priority" in r.text
        assert c.post("/generate", json={"class_label": 1, "steps": 2}).status_code == 200
        job = c.post("/v1/jobs", json={"class_label": 1, "steps": 2}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        urgent_job = c.post("/v1/jobs", json={"class_label": 1, "steps": 2, "priority": "interactive"}).json()
        while c.get(f"/v1/jobs/{urgent_job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        metrics = c.get("/metrics").text
    assert metric_value(metrics, 'cfg_class_latency_seconds_count{priority="interactive"}') == 2
    assert metric_value(metrics, 'cfg_class_latency_seconds_count{priority="batch"}') == 1
    assert metric_value(metrics, 'cfg_class_queue_wait_seconds_count{priority="batch"}') == 1
