"""The request's step cache over the real HTTP app: its 422s name the allowed values, GET /v1/models lists each
model's kinds, responses echo it; with the shipped checkpoint, `{"kind": "none"}` draws today's images, several
cached requests in flight together draw what each draws alone, the metrics count the shallow rows, and cached
batch requests preempted for interactive ones resume with the images they draw unpreempted."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.api.test_jobs import wait_for
from tests.api.test_priorities import images, sse_events, stream_batch
from tests.metrics import metric_value

DEEPCACHE = {"kind": "deepcache", "interval": 3, "branch": 0}
UNCOND = {"kind": "uncond", "every": 3, "order": 1}
SKIP = {"kind": "skip", "interval": 3}
# the shipped checkpoint's manifest's default_cache, measured for it (docs/caching.md), and as requests echo it
MANIFEST_DEFAULT = {"kind": "skip", "interval": 5, "uncond_every": 3}
SHIPPED_DEFAULT = {
    "kind": "skip",
    "interval": 5,
    "start": 0.0,
    "end": 1.0,
    "full_sigma_min": None,
    "full_sigma_max": 10.0,
    "order": 0,
    "uncond_every": 3,
    "uncond_order": 1,
}


def error_of(response) -> dict:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    return error


@pytest.mark.stand_in
def test_the_cache_field_names_its_kinds_and_ranges_and_the_model_s_branches():
    with TestClient(create_app(Settings(warmup=False))) as c:
        entry = c.get("/v1/models").json()["data"][0]["cache"]
        assert entry["kinds"] == ["none", "deepcache", "uncond", "skip"] and entry["deepcache"]["reason"] is None
        deepest = entry["deepcache"]["max_branch"]
        assert deepest >= 1

        error = error_of(c.post("/generate", json={"cache": {"kind": "teacache"}}))
        assert error["loc"][:2] == ["body", "cache"] and "'none', 'deepcache'" in error["msg"]
        assert "'uncond'" in error["msg"]
        error = error_of(c.post("/generate", json={"cache": {**UNCOND, "every": 0}}))
        assert error["loc"] == ["body", "cache", "uncond", "every"] and "greater than or equal to 1" in error["msg"]
        error = error_of(c.post("/generate", json={"cache": {**UNCOND, "order": 2}}))
        assert error["loc"] == ["body", "cache", "uncond", "order"] and "less than or equal to 1" in error["msg"]
        out = c.post("/generate", json={"class_label": 1, "steps": 4, "seed": 1, "cache": {"kind": "uncond"}}).json()
        assert out["cache"] == UNCOND  # the defaults, echoed
        error = error_of(c.post("/generate", json={"cache": {**DEEPCACHE, "interval": 0}}))
        assert (
            error["loc"] == ["body", "cache", "deepcache", "interval"] and "greater than or equal to 1" in error["msg"]
        )
        error = error_of(c.post("/generate", json={"cache": {**DEEPCACHE, "start": 0.8, "end": 0.2}}))
        assert "cache.start (0.8) must not exceed cache.end (0.2)" in error["msg"]
        error = error_of(c.post("/generate", json={"cache": {**DEEPCACHE, "branch": deepest + 1}}))
        assert error["loc"] == ["body", "cache", "branch"]
        assert error["msg"] == f"cache.branch must be 0..{deepest} for model fashion-mnist-cfg (got {deepest + 1})"
        job = c.post("/v1/jobs", json={"cache": {**DEEPCACHE, "branch": deepest + 1}})  # jobs check it too
        assert error_of(job)["loc"] == ["body", "cache", "branch"]
        openai = c.post("/v1/images/generations", json={"prompt": "Sneaker", "cache": {**DEEPCACHE, "branch": 9}})
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "cache"

        body = {"class_label": 1, "steps": 4, "seed": 1, "cache": {**DEEPCACHE, "start": 0.25}}
        out = c.post("/generate", json=body).json()
        assert out["cache"] == {
            "kind": "deepcache",
            "interval": 3,
            "branch": 0,
            "start": 0.25,
            "end": 1.0,
            "full_sigma_min": None,
            "full_sigma_max": None,
            "order": 0,
            "uncond_every": 1,
            "uncond_order": 1,
        }
        out = c.post("/generate", json={"class_label": 1, "steps": 4, "seed": 1, "cache": {"kind": "skip"}}).json()
        assert out["cache"] == {  # the defaults, echoed: only steps with sigma > 10 may skip
            "kind": "skip",
            "interval": 3,
            "start": 0.0,
            "end": 1.0,
            "full_sigma_min": None,
            "full_sigma_max": 10.0,
            "order": 0,
            "uncond_every": 1,
            "uncond_order": 1,
        }
        error = error_of(c.post("/generate", json={"cache": {**SKIP, "interval": 11}}))
        assert error["loc"] == ["body", "cache", "skip", "interval"] and "less than or equal to 10" in error["msg"]
        error = error_of(c.post("/generate", json={"cache": {**SKIP, "full_sigma_min": 20}}))
        assert "cache.full_sigma_min (20) must be below cache.full_sigma_max (10)" in error["msg"]
        band = {**DEEPCACHE, "full_sigma_min": 5, "full_sigma_max": 1}
        error = error_of(c.post("/generate", json={"cache": band}))
        assert "cache.full_sigma_min (5) must be below cache.full_sigma_max (1)" in error["msg"]
        # A request without the field takes the model's default (its manifest's; this stand-in's names none)
        assert entry["default"] == {"kind": "none"}
        assert c.post("/generate", json={"class_label": 1, "steps": 2}).json()["cache"] == entry["default"]


@pytest.mark.integration  # the subject is the images: the shipped checkpoint
def test_cached_requests_in_flight_together_draw_what_each_draws_alone_and_are_counted():
    bodies = [
        {"class_label": c, "num_images": n, "steps": 20, "seed": 40 + c, "cache": DEEPCACHE}
        for c, n in ((1, 1), (4, 2), (7, 1), (9, 2))
    ]
    bodies.append({"class_label": 5, "steps": 20, "seed": 3, "cache": {**DEEPCACHE, "branch": 1, "interval": 2}})
    # the uncond cache's requests (the default request's 7 guided steps: 4 of them reuse) beside them
    bodies += [
        {"class_label": c, "num_images": n, "steps": 20, "seed": 60 + c, "cache": UNCOND} for c, n in ((3, 1), (6, 2))
    ]
    # and the skip cache's (the default request's steps 1, 2, 4, 5, 7 and 8 run no row)
    bodies += [
        {"class_label": c, "num_images": n, "steps": 20, "seed": 80 + c, "cache": SKIP} for c, n in ((0, 2), (8, 1))
    ]
    plain = {"class_label": 2, "num_images": 2, "steps": 20, "seed": 8, "cache": {"kind": "none"}}
    with TestClient(create_app(Settings(warmup=False, max_batch_rows=32))) as c:
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            together = list(pool.map(lambda b: c.post("/generate", json=b), [*bodies, plain]))
        metrics = c.get("/metrics").text
        # the shipped checkpoint's default, measured for it (docs/caching.md) and named in its manifest
        assert c.get("/v1/models").json()["data"][0]["cache"]["default"] == MANIFEST_DEFAULT
        alone = [c.post("/generate", json=b) for b in bodies]
        none = c.post("/generate", json=plain)
        without = c.post("/generate", json={k: v for k, v in plain.items() if k != "cache"})
        default = c.post("/generate", json={**plain, "cache": SHIPPED_DEFAULT})
    shallow = metric_value(metrics, 'cfg_engine_path_rows_total{model="fashion-mnist-cfg",path="shallow"}')
    full = metric_value(metrics, 'cfg_engine_path_rows_total{model="fashion-mnist-cfg",path="full"}')
    assert shallow > 0 and full > 0
    assert full + shallow == metric_value(metrics, 'cfg_engine_batch_rows_sum{model="fashion-mnist-cfg"}')
    assert metric_value(metrics, 'cfg_engine_reused_uncond_rows_total{model="fashion-mnist-cfg"}') == 4 * (1 + 2)
    assert metric_value(metrics, 'cfg_engine_skipped_step_images_total{model="fashion-mnist-cfg"}') == 6 * (2 + 1)
    # The conditional rows each request ran (a skipped step runs none), and every row of the forwards by kind.
    cond = metric_value(metrics, 'cfg_engine_forward_rows_total{kind="conditional",model="fashion-mnist-cfg"}')
    uncond = metric_value(metrics, 'cfg_engine_forward_rows_total{kind="unconditional",model="fashion-mnist-cfg"}')
    assert cond == 20 * (6 + 1 + 3 + 2) + (20 - 6) * 3  # deepcache, its branch 1, uncond, none; skip
    assert uncond > 0 and cond + uncond == full + shallow
    for body, mine, single in zip(bodies, together[:-1], alone, strict=True):
        assert mine.status_code == single.status_code == 200, (mine.text, single.text)
        diff = np.abs(images(mine.json()) - images(single.json())).max()
        assert diff <= 1, f"{body}: {diff} grey levels from the same request alone"
    # A request without the field takes the model's default cache (skip, interval 5, uncond every 3): the images of
    # that cache named.
    # {"kind": "none"} runs every row in full: other images, the same alone as beside the cached requests.
    assert np.array_equal(images(without.json()), images(default.json()))
    assert np.abs(images(none.json()) - images(without.json())).max() > 1
    assert np.abs(images(none.json()) - images(together[-1].json())).max() <= 1


@pytest.mark.integration  # the subject is the images: the shipped checkpoint
@pytest.mark.parametrize(
    "cache", [DEEPCACHE, UNCOND, {**SKIP, "interval": 2, "full_sigma_max": 1}], ids=["deepcache", "uncond", "skip"]
)
def test_cached_batch_requests_preempted_for_interactive_ones_resume_with_their_unpreempted_images(cache):
    # Two cached batch requests of 2 guided images fill the 8 rows; an interactive one of 2 images needs 4. A
    # preempted run keeps what its cache holds (cached features, guidance differences, denoised estimates; counted
    # in its preempted state) and resumes with it.
    batch = [
        {"class_label": 1, "num_images": 2, "steps": 14, "seed": 11, "guidance_scale": 3.0, "priority": "batch",
         "cache": cache},
        {"class_label": 7, "num_images": 2, "steps": 14, "seed": 23, "guidance_scale": 3.0, "priority": "batch",
         "cache": cache},
    ]  # fmt: skip
    interactive = {"class_label": 3, "num_images": 2, "steps": 4, "seed": 5, "guidance_scale": 2.0}
    settings = Settings(request_timeout_s=300, warmup=False, max_batch_rows=8, max_images=4)
    with TestClient(create_app(settings)) as c:
        threads, streams = stream_batch(c, batch, rows=24)  # both running, 3 ticks in
        assert c.post("/generate", json=interactive).status_code == 200
        for t in threads:
            t.join(timeout=300)
        preemptions = metric_value(c.get("/metrics").text, "cfg_engine_preemptions_total")
        alone = [c.post("/generate", json=b) for b in batch]
    assert preemptions >= 1
    for body, text, single in zip(batch, streams, alone, strict=True):
        events = sse_events(text)
        assert events[-1][0] == "result", events[-1]
        diff = np.abs(images(events[-1][1]) - images(single.json())).max()
        assert diff <= 1, f"{body}: {diff} grey levels from the same request unpreempted"


@pytest.mark.integration  # the shipped checkpoint's manifest names the default
def test_a_job_without_a_cache_is_stored_and_drawn_with_the_model_s_default():
    body = {"class_label": 4, "steps": 8, "seed": 31}
    with TestClient(create_app(Settings(warmup=False))) as c:
        job = c.post("/v1/jobs", json=body).json()
        done = wait_for(c, job["id"], lambda j: j["status"] == "succeeded")
        named = c.post("/generate", json={**body, "cache": SHIPPED_DEFAULT}).json()
        none = c.post("/generate", json={**body, "cache": {"kind": "none"}}).json()
    assert done["result"]["cache"] == SHIPPED_DEFAULT
    assert np.array_equal(images(done["result"]), images(named))
    assert np.abs(images(done["result"]) - images(none)).max() > 1
