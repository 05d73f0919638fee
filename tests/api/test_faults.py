"""A model that fails, through the real HTTP app (`with TestClient(app)`, lifespan and engine included).

Stand-in: the shipped checkpoint's real denoiser, wrapped so that one forward raises or returns NaN when
the test says so. A real network does not fail on demand; everything around it is the real service.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

import app.loading
from app.config import Settings
from app.main import create_app
from tests.metrics import metric_value

pytestmark = pytest.mark.stand_in  # the subject is the API, not the model (tests/stand_in.py)

FAULT = "injected fault: device lost"


class FaultyDenoiser:
    """The real denoiser, except for one forward: the first one after `arm()`, which raises or returns
    NaN. With `hold`, that forward first waits until `release()`, so the test can line requests up."""

    def __init__(self, real, kind: str, hold: bool = False) -> None:
        self.real, self.kind = real, kind
        self.armed = threading.Event()
        self.holding = threading.Event()  # set while the faulty forward waits for release()
        self._released = threading.Event()
        if not hold:
            self._released.set()

    def __getattr__(self, name: str):  # class_embedding and the like come from the real one
        return getattr(self.real, name)

    def arm(self) -> None:
        self.armed.set()

    def release(self) -> None:
        self._released.set()

    def __call__(self, x, t, labels, *args):
        eps = self.real(x, t, labels, *args)
        if not self.armed.is_set():
            return eps
        self.armed.clear()  # one faulty forward only
        self.holding.set()
        assert self._released.wait(timeout=300), "the test never released the faulty forward"
        if self.kind == "raise":
            raise RuntimeError(FAULT)
        return eps * float("nan")


@pytest.fixture
def faulty_app(monkeypatch) -> Iterator[Callable[..., tuple[TestClient, FaultyDenoiser]]]:
    """create_app with the faulty stand-in in place of the real denoiser; the client runs its lifespan."""
    made: list[FaultyDenoiser] = []
    real_factory = app.loading.model_denoiser

    def factory(loaded):
        made.append(FaultyDenoiser(real_factory(loaded), **options))
        return made[-1]

    options: dict = {}
    monkeypatch.setattr(app.loading, "model_denoiser", factory)
    clients: list[TestClient] = []

    def start(kind: str, hold: bool = False, **settings) -> tuple[TestClient, FaultyDenoiser]:
        options.update(kind=kind, hold=hold)
        client = TestClient(create_app(Settings(warmup=False, **settings)))
        client.__enter__()
        clients.append(client)
        return client, made[-1]

    yield start
    for model in made:
        model.release()  # a test that failed before releasing must not hold the shutdown
    for client in clients:
        client.__exit__(None, None, None)  # the lifespan's shutdown must pass after a failed engine too


def metric(client: TestClient, line_start: str) -> float:
    return metric_value(client.get("/metrics").text, line_start)


def wait_until(predicate: Callable[[], bool], timeout: float = 120) -> None:
    """Wait for a state the test caused; the bound only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def sse_events(text: str) -> list[tuple[str, dict]]:
    chunks = [c for c in text.split("\n\n") if c.strip()]
    return [(c.split("\n")[0].removeprefix("event: "), json.loads(c.split("data: ", 1)[1])) for c in chunks]


def test_an_engine_crash_fails_running_and_waiting_requests_and_health_says_why(faulty_app):
    # max_batch_rows=2: one image guided at every step (a constant schedule) fills the batch, so the second
    # request waits for rows.
    client, model = faulty_app("raise", hold=True, max_images=1, max_batch_rows=2, request_timeout_s=60)
    assert client.get("/healthz").json() == {"status": "ok"}
    responses: dict[str, object] = {}

    def running() -> None:  # with progress events: the error reaches the stream as an `error` event
        headers = {"Accept": "text/event-stream"}
        body = {"class_label": 1, "steps": 200, "seed": 1, "schedule": {"kind": "constant"}}
        with client.stream("POST", "/generate", json=body, headers=headers) as r:
            responses["running"] = (r.status_code, "".join(r.iter_text()))

    def waiting() -> None:
        responses["waiting"] = client.post("/generate", json={"class_label": 2, "steps": 5, "seed": 1})

    threads = [threading.Thread(target=running)]
    threads[0].start()
    wait_until(lambda: metric(client, "cfg_requests_in_flight") == 1)
    model.arm()  # the next forward fails, once the second request is queued behind the first
    threads.append(threading.Thread(target=waiting))
    threads[1].start()
    wait_until(lambda: metric(client, "cfg_queue_depth") == 1)
    assert model.holding.wait(timeout=120)
    model.release()
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a request hung after the engine failed"

    status, stream = responses["running"]
    events = sse_events(stream)
    assert status == 200 and events[0][0] == "progress" and events[-1][0] == "error", events
    assert events[-1][1]["status"] == 500 and FAULT in events[-1][1]["detail"]
    waited = responses["waiting"]
    assert waited.status_code == 500 and FAULT in waited.json()["detail"], waited.text
    assert metric(client, 'cfg_requests_total{outcome="error"}') == 2

    # The health endpoints say what happened; a load balancer takes the replica out.
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "engine stopped"
    assert health.json()["error"] == f"fashion-mnist-cfg: RuntimeError: {FAULT}"  # the model whose engine failed
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"] == f"fashion-mnist-cfg: RuntimeError: {FAULT}"
    # A new request is refused at once (503, as when draining), not queued behind a dead loop.
    late = client.post("/generate", json={"class_label": 3, "steps": 2})
    assert late.status_code == 503 and FAULT in late.json()["detail"] and "retry-after" in late.headers
    assert metric(client, 'cfg_requests_total{outcome="rejected"}') == 1


def test_a_non_finite_result_is_a_500_with_a_message_and_the_service_stays_up(faulty_app):
    client, model = faulty_app("nan")
    images = metric(client, "cfg_images_generated_total")
    model.arm()  # the next forward returns NaN: the first step of this request
    r = client.post("/generate", json={"class_label": 4, "num_images": 2, "steps": 4, "seed": 1})
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert "non-finite values in the latents at step 1" in detail and "no image was produced" in detail
    assert "images" not in r.json() and r.json()["outcome"] == "error"
    assert metric(client, 'cfg_requests_total{outcome="error"}') == 1
    assert metric(client, 'cfg_request_duration_seconds_count{outcome="error"}') == 1
    assert metric(client, "cfg_images_generated_total") == images
    # Only that request failed: the engine runs on, and the next request gets its images.
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").status_code == 200
    again = client.post("/generate", json={"class_label": 4, "num_images": 2, "steps": 4, "seed": 1})
    assert again.status_code == 200 and len(again.json()["images"]) == 2
