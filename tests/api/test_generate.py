"""POST /generate and the other endpoints, through the real app lifespan and the shipped checkpoint."""

import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.models import CheckpointError
from app.sampling import DEFAULT_SAMPLER
from tests.defaults import skipped_steps
from tests.metrics import metric_value
from tests.pngs import decode

pytestmark = pytest.mark.integration  # the shipped model through the API


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(request_timeout_s=60))) as c:
        yield c


def metric(client, line_start: str) -> float:
    return metric_value(client.get("/metrics").text, line_start)


def test_generate_json(client):
    r = client.post("/generate", json={"class_label": "sneaker", "num_images": 2, "steps": 4, "seed": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class_label"] == 7 and body["class_name"] == "Sneaker"
    assert body["seeds"] == [9, 10] and body["num_images"] == 2 and body["sampler"] == DEFAULT_SAMPLER
    assert body["model"] == "fashion-mnist-cfg"
    assert set(body["timings"]) == {"queue_wait_s", "compute_s", "total_s"}
    images = [decode(b) for b in body["images"]]
    assert [im.shape for im in images] == [(28, 28), (28, 28)] and images[0].dtype == np.uint8
    again = client.post("/generate", json={"class_label": 7, "num_images": 1, "steps": 4, "seed": 10}).json()
    # seeds[i] redraws image i: alone it runs at other rows per forward, so to one grey level (README)
    assert int(np.abs(decode(again["images"][0]).astype(int) - images[1]).max()) <= 1


def test_generate_png_grid(client):
    r = client.post(
        "/generate",
        json={"class_label": 1, "num_images": 4, "steps": 3, "seed": 1},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(r.content))
    assert grid.size[0] > 2 * 28 and grid.size[1] > 2 * 28
    assert r.headers["x-seeds"] == "1,2,3,4"


def test_every_option_is_accepted(client):
    r = client.post(
        "/generate",
        json={
            "class_label": None,
            "steps": 3,
            "sampler": "euler_a",
            "guidance_scale": 5,
            "noise_level": 0.2,
            "guidance_rescale": 0.7,
            "schedule": {"kind": "interval", "start": 0.1, "end": 0.6},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["class_name"] is None and len(r.json()["seeds"]) == 1


@pytest.mark.parametrize(
    "patch, field, hint",
    [
        ({"class_label": "Jacket"}, "class_label", "known classes"),
        ({"class_label": 10}, "class_label", "0..9"),
        ({"num_images": 17}, "num_images", "16"),
        ({"num_images": 0}, "num_images", "1"),
        ({"steps": 0}, "steps", "1"),
        ({"steps": 201}, "steps", "200"),
        ({"guidance_scale": -1}, "guidance_scale", "0"),
        ({"guidance_scale": 31}, "guidance_scale", "30"),
        ({"noise_level": -0.1}, "noise_level", "0"),
        ({"guidance_rescale": 1.5}, "guidance_rescale", "1"),
        ({"sampler": "plms"}, "sampler", "ddim"),
        ({"schedule": {"kind": "warp"}}, "schedule", "constant"),
        ({"schedule": {"kind": "cosine", "gamma": 2}}, "gamma", "Extra"),
        ({"schedule": {"kind": "interval", "start": 0.8, "end": 0.2}}, "schedule", "must not exceed"),
        ({"schedule": {"kind": "interval", "sigma_min": 5, "sigma_max": 1}}, "schedule", "below sigma_max"),
        ({"schedule": {"kind": "interval", "sigma_max": -1}}, "sigma_max", "0"),
        ({"method": {"kind": "sag"}}, "method", "'cfg', 'apg', 'cfg_zero_star', 'pag', 'seg', 'slg'"),
        ({"method": {"kind": "pag", "layers": []}}, "layers", "at least 1"),
        ({"method": {"kind": "seg", "blur_sigma": 0}}, "blur_sigma", "greater than 0"),
        ({"method": {"kind": "apg", "eta": 2}}, "eta", "1"),
        ({"method": {"kind": "apg", "momentum": -3}}, "momentum", "-1"),
        ({"method": {"kind": "apg", "norm_threshold": -1}}, "norm_threshold", "0"),
        ({"method": {"kind": "cfg", "eta": 0.5}}, "eta", "Extra"),
        ({"cads": {"tau1": 0.9, "tau2": 0.5}}, "cads", "must not exceed"),
        ({"cads": {"noise_scale": 11}}, "noise_scale", "10"),
        ({"cads": {"psi": 2}}, "psi", "1"),
        ({"noise_schedule": "cosine"}, "noise_schedule", "'sigma'"),
        ({"return_trace": "maybe"}, "return_trace", "boolean"),
        ({"schedule": {"kind": "linear", "start": 11}}, "start", "10"),
        ({"seed": -5}, "seed", "0"),
        ({"colour": "red"}, "colour", "Extra"),
    ],
)
def test_invalid_requests_get_422_naming_field_and_range(client, patch, field, hint):
    r = client.post("/generate", json={"class_label": 0, "steps": 2, **patch})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(field in map(str, e["loc"]) and hint in e["msg"] for e in errors), errors


def test_malformed_json_is_422(client):
    r = client.post("/generate", content=b'{"class_label": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    model = client.get("/v1/models").json()["data"][0]
    assert model["name"] == "fashion-mnist-cfg" and model["image_size"] == 28
    assert model["class_names"][7] == "Sneaker" and model["null_label"] == 10
    assert model["samplers"] == ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler_a"]
    assert model["limits"]["max_images"] == 16
    # What a request that sets nothing gets: a client (the playground) shows these as the defaults.
    assert model["default_steps"] == Settings().default_steps == 20
    assert model["default_sampler"] == DEFAULT_SAMPLER == "dpmpp_2m_karras"  # docs/steps-karras.md
    assert client.get("/openapi.json").status_code == 200  # every router's schema renders


def test_metrics_count_requests(client):
    ok0 = metric(client, 'cfg_requests_total{outcome="ok"}')
    bad0 = metric(client, 'cfg_requests_total{outcome="invalid"}')
    img0 = metric(client, "cfg_images_generated_total")
    steps0 = metric(client, "cfg_engine_step_duration_seconds_count")
    client.post("/generate", json={"class_label": 3, "num_images": 3, "steps": 5})
    client.post("/generate", json={"class_label": 3, "steps": -1})
    assert metric(client, 'cfg_requests_total{outcome="ok"}') == ok0 + 1
    assert metric(client, 'cfg_requests_total{outcome="invalid"}') == bad0 + 1
    assert metric(client, "cfg_images_generated_total") == img0 + 3
    # a tick per step, but a step the default cache skips (a `skip` step, here step 1) takes no tick of its own
    ticks = 5 - len(skipped_steps(DEFAULT_SAMPLER, 5))
    assert ticks == 4 and metric(client, "cfg_engine_step_duration_seconds_count") == steps0 + ticks
    text = client.get("/metrics").text
    assert 'cfg_request_duration_seconds_bucket{le="120.0",model="fashion-mnist-cfg",outcome="ok"}' in text
    assert "cfg_queue_wait_seconds_count" in text and "cfg_engine_batch_rows_bucket" in text
    assert 'cfg_model_info{device="cpu",model="fashion-mnist-cfg"' in text and "cfg_device_memory_bytes" in text


def test_request_latency_is_recorded(client):
    """One observation per request in the latency histograms, of the request's own duration."""
    key = 'cfg_request_duration_seconds_{}{{outcome="ok"}}'
    count0, sum0 = metric(client, key.format("count")), metric(client, key.format("sum"))
    waits0 = metric(client, "cfg_queue_wait_seconds_count")
    started = time.monotonic()
    r = client.post("/generate", json={"class_label": 5, "steps": 3, "seed": 2})
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    timings = r.json()["timings"]
    assert metric(client, key.format("count")) == count0 + 1
    recorded = metric(client, key.format("sum")) - sum0
    # Arrival to response: at least the compute, at most what the client waited (timings are rounded).
    assert timings["compute_s"] - 1e-3 <= recorded <= min(timings["total_s"] + 1e-3, elapsed)
    assert recorded > 0
    assert metric(client, "cfg_queue_wait_seconds_count") == waits0 + 1


def test_openapi_documents_fields_ranges_and_formulas(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    req = schemas["GenerateRequest"]["properties"]
    for name in ("class_label", "num_images", "steps", "sampler", "guidance_scale", "noise_level",
                 "schedule", "guidance_rescale", "seed"):  # fmt: skip
        assert req[name].get("description"), name
    assert req["num_images"]["maximum"] == 16 and req["steps"]["maximum"] == 200
    assert "cos(pi * i / N)" in schemas["CosineSchedule"]["description"]
    assert "i / (N - 1)" in schemas["LinearSchedule"]["description"]
    assert "Kynk" in schemas["IntervalSchedule"]["description"]


def test_timeout_gives_504_and_the_job_leaves_the_batch():
    with TestClient(create_app(Settings(request_timeout_s=0.3, warmup=False))) as c:
        r = c.post("/generate", json={"class_label": 1, "num_images": 16, "steps": 200})
        assert r.status_code == 504 and "timeout" in r.json()["detail"]
        assert metric(c, 'cfg_requests_total{outcome="timeout"}') == 1
        assert metric(c, 'cfg_request_duration_seconds_count{outcome="timeout"}') == 1
        assert metric(c, 'cfg_request_duration_seconds_sum{outcome="timeout"}') >= 0.29
        # Its rows leave at the next tick: the engine goes idle long before the job's 200 steps.
        deadline = time.monotonic() + 120  # a bound on a state, not a timing window
        while metric(c, "cfg_requests_in_flight") + metric(c, "cfg_queue_depth") > 0:
            assert time.monotonic() < deadline, "the timed-out job is still in the batch"
            time.sleep(0.05)
        assert metric(c, "cfg_engine_step_duration_seconds_count") < 200
        assert metric(c, "cfg_images_generated_total") == 0


def test_missing_or_corrupt_checkpoint_stops_startup_naming_the_file(tmp_path, checkpoint_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        create_app(Settings(model_path=tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(checkpoint_path), str(bad)], check=True)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "app.serve", "--port", "1"],
        env={"CFG_MODEL_PATH": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(weights) in lines[0] and "sha256" in lines[0], proc.stderr


def test_event_stream_reports_progress_then_the_result(client):
    events = []
    with client.stream(
        "POST",
        "/generate",
        json={"class_label": 2, "steps": 12, "seed": 4},
        headers={"Accept": "text/event-stream"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for block in r.iter_text():
            events.append(block)
    text = "".join(events)
    chunks = [c for c in text.split("\n\n") if c.strip()]
    kinds = [c.split("\n")[0].removeprefix("event: ") for c in chunks]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "progress" in kinds
    progress = [json.loads(c.split("data: ", 1)[1]) for c in chunks if c.startswith("event: progress")]
    # One event per step: the job's state before its first step, then after each one; a job that was
    # still queued when the stream began has a second step-0 event, when it starts running.
    steps = [p["step"] for p in progress]
    assert steps in (list(range(13)), [0, *range(13)]) and {p["steps"] for p in progress} == {12}
    assert [p["status"] for p in progress[-12:]] == ["running"] * 12 and progress[-1]["queue_position"] is None
    body = json.loads(chunks[-1].split("data: ", 1)[1])
    assert body["class_label"] == 2 and body["seeds"] == [4] and len(body["images"]) == 1


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"guidance_scale": NaN}', "guidance_scale"),
        ('{"noise_level": Infinity}', "noise_level"),
        ('{"schedule": {"kind": "cosine", "end": -Infinity}}', "end"),
        ('{"class_label": true}', "class_label"),
        ('{"steps": 2.5}', "steps"),
        ("[1, 2]", "body"),
    ],
)
def test_non_finite_and_mistyped_values_are_422_not_500(client, raw, field):
    r = client.post("/generate", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"])


def test_the_model_is_loaded_in_the_engine_thread_not_the_event_loop(monkeypatch):
    # Any torch compute in the event loop's thread gives OpenMP a second team of threads, which
    # makes it sleep between parallel regions and slows every forward (app/engine/engine.py).
    import threading

    import app.loading

    threads = []
    real_load = app.loading.load_checkpoint

    def recording_load(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app.loading, "load_checkpoint", recording_load)
    with TestClient(create_app(Settings(warmup=False))) as c:
        assert c.get("/readyz").status_code == 200
    assert len(threads) == 1 and threads[0].startswith("engine-forward")


def test_forward_rows_are_counted_by_kind_and_skipped_rows_show(client):
    """The default request guides only where 0.25 < sigma <= 5 (span-weighted: every step whose noise span
    reaches into it): 7 of dpmpp_2m_karras's 20 steps are guided and the other 13 skip the unconditional rows.
    Its default step cache (skip interval 5, uncond every 3) runs no row at 7 of those 13 (steps 1-4 and 6-8,
    sigma > 10), runs the unconditional rows on 3 of the 7 guided steps (the 1st, 4th and 7th) and reuses the
    guidance difference on 4; /metrics says so."""
    names = (
        'cfg_engine_forward_rows_total{kind="conditional"}',
        'cfg_engine_forward_rows_total{kind="unconditional"}',
        "cfg_engine_skipped_uncond_rows_total",
        "cfg_engine_reused_uncond_rows_total",
        "cfg_engine_skipped_step_images_total",
    )
    before = [metric(client, n) for n in names]
    r = client.post("/generate", json={"class_label": 4, "num_images": 2, "steps": 20, "seed": 3})
    assert r.status_code == 200
    after = [metric(client, n) for n in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2 * 13, 2 * 3, 2 * 6, 2 * 4, 2 * 7]
