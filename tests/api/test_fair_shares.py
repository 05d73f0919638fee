"""Fair shares between clients within a priority class, over the real HTTP app: one API key's flood of jobs does
not hold back another key's one job; a client's weight changes when its requests run, never their images; the
client headers and CFG_CLIENT_WEIGHTS are checked, and no API key reaches the metrics."""

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api.clients import key_client, weights_by_client
from app.config import Settings
from app.main import create_app
from tests.metrics import metric_value
from tests.pngs import decode

FLOOD_KEY, LONE_KEY = "flood-key-5f2c9a", "lone-key-81d0e4"


def images(body: dict) -> np.ndarray:
    return np.stack([decode(b) for b in body["images"]]).astype(int)


def finished(c: TestClient, job_ids: list[str], timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    jobs = []
    while time.monotonic() < deadline:
        jobs = [c.get(f"/v1/jobs/{i}").json() for i in job_ids]
        if all(j["status"] == "succeeded" for j in jobs):
            return jobs
        assert not any(j["status"] in ("failed", "cancelled") for j in jobs), jobs
        time.sleep(0.05)
    raise TimeoutError([j["status"] for j in jobs])


@pytest.mark.integration  # the real checkpoint's ticks set the pace the jobs run at
def test_a_key_flooding_with_jobs_does_not_hold_back_another_keys_one_job():
    # 4 rows per forward: two one-image jobs at a time. Eight from one key, then one from another.
    settings = Settings(warmup=False, max_batch_rows=4, max_images=2, request_timeout_s=300)
    body = {"num_images": 1, "steps": 12}
    with TestClient(create_app(settings)) as c:
        flood = [
            c.post("/v1/jobs", json={**body, "class_label": k, "seed": k}, headers={"X-API-Key": FLOOD_KEY}).json()
            for k in range(8)
        ]
        lone = c.post("/v1/jobs", json={**body, "class_label": 9, "seed": 9}, headers={"X-API-Key": LONE_KEY})
        assert lone.status_code == 202, lone.text
        jobs = finished(c, [j["id"] for j in flood] + [lone.json()["id"]])
        metrics = c.get("/metrics").text

    *flood_jobs, lone_job = jobs
    before = sorted(j["finished_at"] for j in flood_jobs if j["finished_at"] < lone_job["finished_at"])
    # Equal shares of the rows: the lone key's job takes the slot that frees first, so it finishes beside the
    # flood's 3rd (its 2nd and 3rd where the two first ones finish a tick apart). By arrival it would finish after
    # all 8. Tolerance: at most 3 of the flood's jobs finish before it.
    assert len(before) <= 3, f"{len(before)} of the flood's 8 jobs finished before the other key's one"
    # Each key shows in the per-client share as its hash, never as itself.
    for key in (FLOOD_KEY, LONE_KEY):
        label = f"key:{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        assert metric_value(metrics, f'cfg_client_row_share{{client="{label}",priority="batch"}}') > 0
        assert key not in metrics
    shares = [metric_value(metrics, f'cfg_client_row_share{{client="{key_client(k)}"}}') for k in (FLOOD_KEY, LONE_KEY)]
    assert shares[0] > shares[1] > 0  # of the rows of the last minute (8 jobs to 1 while the test takes under it)


@pytest.mark.integration  # batch invariance: the real checkpoint's images
def test_images_are_the_same_whatever_the_share_of_their_client():
    # Four guided requests of two images, two clients (one weighted 3), each with its own settings, sent at
    # once: they share forwards in an order the weights decide. Each equals the same request sent alone.
    settings = Settings(warmup=False, max_batch_rows=16, max_images=2, client_weights=f"{FLOOD_KEY}=3")
    bodies = [
        {"class_label": 1, "seed": 3, "guidance_scale": 3.0},
        {"class_label": 4, "seed": 8, "guidance_scale": 5.0, "sampler": "ddim"},
        {"class_label": 7, "seed": 13, "guidance_scale": 2.0, "schedule": {"kind": "linear", "start": 1, "end": 0.2}},
        {"class_label": 9, "seed": 21, "guidance_scale": 4.0, "sampler": "euler_a"},
    ]
    bodies = [{**b, "num_images": 2, "steps": 8} for b in bodies]
    headers = [{"X-API-Key": FLOOD_KEY}, {"X-Client-Id": "light"}, {"X-API-Key": FLOOD_KEY}, {"X-Client-Id": "light"}]
    with TestClient(create_app(settings)) as c:
        with ThreadPoolExecutor(len(bodies)) as pool:
            sent = zip(bodies, headers, strict=True)
            together = list(pool.map(lambda bh: c.post("/generate", json=bh[0], headers=bh[1]), sent))
        metrics = c.get("/metrics").text
        alone = [c.post("/generate", json=b) for b in bodies]  # one at a time, anonymous
    rows = metric_value(metrics, "cfg_engine_batch_rows_sum") / metric_value(metrics, "cfg_engine_batch_rows_count")
    assert rows > 4, f"the requests hardly shared forwards ({rows:.1f} rows per forward)"
    assert metric_value(metrics, 'cfg_client_row_share{client="id:light",priority="interactive"}') > 0
    for body, mine, single in zip(bodies, together, alone, strict=True):
        assert mine.status_code == 200 and single.status_code == 200, (mine.text, single.text)
        # Alone, its forwards hold 4 rows, not up to 16: within one grey level, as every batch-invariance test.
        diff = np.abs(images(mine.json()) - images(single.json())).max()
        assert diff <= 1, f"{body}: max pixel difference {diff} from the same request alone"


@pytest.mark.stand_in
def test_a_client_id_that_is_no_name_is_refused_naming_the_header():
    with TestClient(create_app(Settings(warmup=False))) as c:
        r = c.post("/generate", json={"class_label": 1, "steps": 2}, headers={"X-Client-Id": "no spaces, please"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["header", "X-Client-Id"], r.json()
        r = c.post("/v1/images/generations", json={"prompt": "class 1"}, headers={"X-Client-Id": "x" * 65})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Client-Id"
        assert "64" in r.json()["error"]["message"]
        ok = {"X-Client-Id": "team-b.batch@example.org"}
        assert c.post("/generate", json={"class_label": 1, "steps": 2}, headers=ok).status_code == 200


@pytest.mark.stand_in
def test_the_openai_route_tells_clients_apart_by_their_bearer_key_and_never_shows_it():
    # OpenAI's clients send their api_key as Authorization: Bearer; X-API-Key, where sent too, comes first.
    with TestClient(create_app(Settings(warmup=False))) as c:
        body = {"prompt": "class 1", "steps": 2}
        for key in (FLOOD_KEY, LONE_KEY):
            r = c.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        both = {"Authorization": "Bearer not-this-one", "X-API-Key": "this-one"}
        assert c.post("/v1/images/generations", json=body, headers=both).status_code == 200
        metrics = c.get("/metrics").text
    for key in (FLOOD_KEY, LONE_KEY, "this-one"):
        assert metric_value(metrics, f'cfg_client_row_share{{client="{key_client(key)}",priority="interactive"}}') > 0
        assert key not in metrics
    assert key_client("not-this-one") not in metrics and 'client="anonymous"' not in metrics


@pytest.mark.parametrize("weights", ["s3cret-key", "s3cret-key=0", "s3cret-key=-1", "s3cret-key=x", "=2", "a=1,a=2"])
def test_client_weights_that_do_not_parse_fail_at_startup_without_echoing_a_key(weights):
    with pytest.raises(ValidationError) as info:
        Settings(client_weights=weights)
    (error,) = info.value.errors()
    assert error["loc"] == ("client_weights",) and "CFG_CLIENT_WEIGHTS entry" in error["msg"]
    assert "s3cret" not in str(info.value)


def test_client_weights_parse_and_name_both_a_key_and_a_client_id():
    table = Settings(client_weights=" keyA=2 , team-b=0.5,").client_weight_table()
    assert table == {"keyA": 2.0, "team-b": 0.5}
    by_client = weights_by_client(table)
    assert by_client[key_client("keyA")] == 2.0 and by_client["id:team-b"] == 0.5
    assert key_client("keyA") == "key:" + hashlib.sha256(b"keyA").hexdigest()[:12]
