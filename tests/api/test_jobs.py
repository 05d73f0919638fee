"""The asynchronous jobs API (/v1/jobs), through the real app lifespan and the shipped checkpoint."""

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.metrics import metric_value
from tests.pngs import decode, same_images

pytestmark = pytest.mark.stand_in  # the subject is the API, not the model (tests/stand_in.py)

BODY = {"class_label": "sneaker", "num_images": 2, "steps": 6, "seed": 11}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False))) as c:
        yield c


def events(client, job_id: str) -> list[tuple[str, dict]]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        text = "".join(r.iter_text())
    out = []
    for chunk in filter(None, text.split("\n\n")):
        kind, data = chunk.split("\n", 1)
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def wait_for(client, job_id: str, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.02)
    raise TimeoutError(job)


def metric(client, line_start: str) -> float:
    return metric_value(client.get("/metrics").text, line_start)


def test_a_job_runs_to_the_same_result_as_generate(client):
    before = metric(client, 'cfg_jobs_total{outcome="succeeded"}')
    r = client.post("/v1/jobs", json=BODY)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["steps"] == 6 and job["result"] is None

    stream = events(client, job["id"])
    kinds = [k for k, _ in stream]
    assert kinds[-1] == "result" and kinds[:-1] == ["progress"] * (len(kinds) - 1)
    assert [d["step"] for k, d in stream if k == "progress"][-1] == 6

    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["step"] == 6 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["result"] == stream[-1][1]
    direct = client.post("/generate", json=BODY).json()
    assert same_images(done["result"]["images"], direct["images"]) and done["result"]["seeds"] == [11, 12]
    assert metric(client, 'cfg_jobs_total{outcome="succeeded"}') == before + 1

    # A finished job's events stream is its final event alone.
    assert events(client, job["id"]) == [("result", done["result"])]


@pytest.mark.parametrize(
    "body",
    [
        {"steps": 0},
        {"guidance_scale": 1e9},
        {"class_label": "unicorn"},
        {"schedule": {"kind": "cosin"}},
        {"preview_every": 2},
        {"num_images": 1, "colour": "red"},
    ],
)
def test_a_body_generate_rejects_gets_the_same_422(client, body):
    jobs, generate = client.post("/v1/jobs", json=body), client.post("/generate", json=body)
    assert jobs.status_code == generate.status_code == 422
    assert jobs.json() == generate.json()


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "a b", "a" * 300, "..%2F..%2Fetc"])
def test_an_unknown_or_malformed_id_is_404(client, job_id):
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/v1/jobs/{job_id}")
        assert r.status_code == 404 and r.json()["detail"]  # the slashes of the last one match no route at all
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 404


def test_delete_cancels_a_running_job_and_its_rows_leave_the_batch(client):
    engine = client.app.state.service.model().client
    before = metric(client, 'cfg_jobs_total{outcome="cancelled"}')
    job = client.post("/v1/jobs", json={"class_label": 1, "num_images": 4, "steps": 200, "seed": 1}).json()
    wait_for(client, job["id"], lambda j: j["step"] >= 2)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_requests == 0
    stopped_at = client.get(f"/v1/jobs/{job['id']}").json()
    time.sleep(0.2)
    after = client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "cancelled" and after["step"] == stopped_at["step"] < 200
    assert after["error"]["outcome"] == "cancelled" and after["result"] is None
    assert events(client, job["id"]) == [("error", after["error"])]
    assert metric(client, 'cfg_jobs_total{outcome="cancelled"}') == before + 1
    # Cancelling again: it has finished, as cancelled.
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409 and again.json()["status"] == "cancelled"


def test_a_cancelled_job_keeps_the_step_it_was_cancelled_at_and_never_passes_its_steps(client):
    """A tick under way when DELETE lands still steps the job; that step is not the job's: from then on the job
    reads the step DELETE answered with (it read one more, the step the tick under way took)."""
    engine = client.app.state.service.model().client
    constant = {"schedule": {"kind": "constant"}}  # every step runs both halves: ticks long enough to land in
    for seed in range(3):
        body = {"class_label": 1, "num_images": 8, "steps": 60, "seed": seed, **constant}
        job = client.post("/v1/jobs", json=body).json()
        wait_for(client, job["id"], lambda j: j["step"] >= 2)
        cancelled = client.delete(f"/v1/jobs/{job['id']}").json()
        deadline = time.monotonic() + 30
        while engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        after = client.get(f"/v1/jobs/{job['id']}").json()
        assert after["status"] == "cancelled" and after["step"] == cancelled["step"] <= after["steps"] == 60


def test_a_queued_job_reports_its_place_and_can_be_cancelled_before_it_starts(client):
    # 16 images x 2 rows at every step (a constant schedule) fill the 32 rows a forward may hold: the next waits.
    constant = {"schedule": {"kind": "constant"}}
    big = client.post("/v1/jobs", json={"class_label": 1, "num_images": 16, "steps": 200, "seed": 1, **constant})
    big = big.json()
    wait_for(client, big["id"], lambda j: j["status"] == "running")
    small = client.post("/v1/jobs", json={"class_label": 2, "steps": 4, "seed": 1}).json()
    assert small["status"] == "queued" and small["queue_position"] == 1 and small["started_at"] is None
    assert client.delete(f"/v1/jobs/{small['id']}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{big['id']}").status_code == 200
    small = client.get(f"/v1/jobs/{small['id']}").json()
    assert small["status"] == "cancelled" and small["started_at"] is None and small["step"] == 0


def test_delete_on_a_succeeded_job_is_409(client):
    job = client.post("/v1/jobs", json={**BODY, "steps": 2}).json()
    wait_for(client, job["id"], lambda j: j["status"] == "succeeded")
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and r.json()["status"] == "succeeded" and "already finished" in r.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_an_idempotency_key_returns_the_same_job(client):
    store = client.app.state.service.jobs
    key = {"Idempotency-Key": "retry-7f3a"}
    first = client.post("/v1/jobs", json={**BODY, "seed": None}, headers=key)
    count = len(store)
    again = client.post("/v1/jobs", json={**BODY, "seed": None}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert len(store) == count
    other = client.post("/v1/jobs", json={**BODY, "steps": 3}, headers=key)
    assert other.status_code == 422
    [error] = other.json()["detail"]  # a 422 like every other: the field, and what to do
    assert error["loc"] == ["header", "Idempotency-Key"] and "different body" in error["msg"]
    assert client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "k" * 256}).status_code == 422


def test_previews_carry_the_x0_prediction_every_k_steps_and_change_nothing(client):
    job = client.post("/v1/jobs", json={**BODY, "steps": 10, "preview": True, "preview_every": 3}).json()
    stream = events(client, job["id"])
    previews = [d["preview"] for k, d in stream if k == "progress" and "preview" in d]
    assert [p["step"] for p in previews] == [3, 6, 9]
    for p in previews:
        assert [decode(img).shape for img in p["images"]] == [(28, 28), (28, 28)]
    # The last preview (x0 predicted one step before the end) is close to the final image.
    final = [decode(img).astype(float) for img in stream[-1][1]["images"]]
    last = [decode(img).astype(float) for img in previews[-1]["images"]]
    assert all(np.abs(f - p).mean() < 20 for f, p in zip(final, last, strict=True))
    # Previews are read from the run, never fed back: the images equal those of a run without them.
    plain = client.post("/generate", json={**BODY, "steps": 10}).json()
    assert same_images(stream[-1][1]["images"], plain["images"])
    # The default interval: steps // 10; /generate's stream carries them too.
    with client.stream(
        "POST", "/generate", json={**BODY, "steps": 20, "preview": True}, headers={"Accept": "text/event-stream"}
    ) as r:
        text = "".join(r.iter_text())
    steps = [json.loads(c.split("data: ", 1)[1])["preview"]["step"] for c in text.split("\n\n") if '"preview"' in c]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18]


def test_the_store_is_bounded_full_of_unfinished_jobs_is_503_and_finished_jobs_expire():
    with TestClient(create_app(Settings(warmup=False, max_jobs=2, job_ttl_s=1.0, max_queue=0))) as client:
        long = {"class_label": 3, "steps": 200}
        a = client.post("/v1/jobs", json=long).json()
        b = client.post("/v1/jobs", json=long).json()  # beyond max_queue=0: the store bounds jobs, not the queue
        full = client.post("/v1/jobs", json=long)
        assert full.status_code == 503 and full.headers["retry-after"] and "unfinished" in full.json()["detail"]
        assert metric(client, 'cfg_jobs_total{outcome="rejected"}') == 1
        assert metric(client, 'cfg_jobs_stored{state="unfinished"}') == 2
        client.delete(f"/v1/jobs/{a['id']}")
        c = client.post("/v1/jobs", json={"class_label": 3, "steps": 2})
        assert c.status_code == 202  # room made by dropping the finished (cancelled) job
        assert client.get(f"/v1/jobs/{a['id']}").status_code == 404
        client.delete(f"/v1/jobs/{b['id']}")
        wait_for(client, c.json()["id"], lambda j: j["status"] == "succeeded")
        time.sleep(1.1)
        assert client.get(f"/v1/jobs/{c.json()['id']}").status_code == 404  # past CFG_JOB_TTL_S


@pytest.mark.slow
def test_thousands_of_jobs_keep_the_store_at_its_bound():
    with TestClient(create_app(Settings(warmup=False, max_jobs=100))) as client:
        store = client.app.state.service.jobs
        ids, most = [], 0
        while len(ids) < 2000:
            r = client.post("/v1/jobs", json={"class_label": len(ids) % 10, "steps": 1, "seed": len(ids)})
            if r.status_code == 503:  # a hundred unfinished: wait for the engine
                time.sleep(0.01)
                continue
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            most = max(most, len(store))
        assert most == 100
        wait_for(client, ids[-1], lambda j: j["status"] == "succeeded")
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert client.get(f"/v1/jobs/{ids[-1]}").json()["result"]["seeds"] == [1999]


def read_events(text: str) -> list[dict]:
    return [json.loads(chunk.split("data: ", 1)[1]) for chunk in text.split("\n\n") if chunk.startswith("event:")]


def test_an_event_stream_that_reads_a_job_late_still_tells_each_preemption_and_resumption():
    """The stream reads the job when it wakes; a preemption and its resumption both before it wakes (a short one,
    or a busy event loop) are told as the two events they were, in order, and a stream opened later replays none."""
    from app.api.job_store import Job
    from app.api.jobs import ProgressCursor
    from app.engine.outputs import Progress
    from app.sampling import SampleSpec

    job = Job(id="j", spec=SampleSpec(1, (1,), 10), model="m", request_id="r", body={}, arrived=0.0, created_at=0.0)
    cursor = ProgressCursor()

    def step(n: int, preempted: bool = False) -> None:
        job.update(Progress("r", n, 10, 2 if preempted else None, 0.0, preempted=preempted))

    step(1)
    assert [e.get("event") for e in read_events(cursor.event(job))] == [None]
    step(2, preempted=True)
    step(2)  # resumed before the stream woke
    events = read_events(cursor.event(job))
    assert [(e.get("event"), e["status"]) for e in events] == [("preempted", "preempted"), ("resumed", "running")]
    step(3, preempted=True)
    assert [e["event"] for e in read_events(cursor.event(job))] == ["preempted"]
    step(4)
    step(4, preempted=True)
    step(5)  # resumed, preempted again and resumed: three changes in one read
    assert [e["event"] for e in read_events(cursor.event(job))] == ["resumed", "preempted", "resumed"]
    assert cursor.event(job) is None and job.preemptions == 3
    assert [e.get("event") for e in read_events(ProgressCursor().event(job))] == [None]  # a new stream: no replay
