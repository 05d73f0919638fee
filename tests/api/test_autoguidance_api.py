"""Autoguidance over HTTP: the real app serving the shipped default model and its guide
(CFG_MODELS=fashion-mnist-cfg,fashion-mnist-guide), its images equal to SampleRun's, the guide rows in the
metrics, and the 422s that name method.guide and the models that can guide."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.guidance import GuidanceMethod, GuidanceSchedule
from app.main import create_app
from app.models import load_checkpoint, unet_denoiser
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleSpec
from tests.defaults import DEFAULT_CACHE, skipped_steps
from tests.metrics import metric_value
from tests.pngs import response_images as images
from tests.sampled import sampled_alone

pytestmark = pytest.mark.integration  # the real checkpoints, the API equal to the library

MAIN, GUIDE = "fashion-mnist-cfg", "fashion-mnist-guide"
BOTH = f"{MAIN},{GUIDE}"


@pytest.fixture(scope="module")
def client():
    # channels_last off: the service's forward is then the library's, to the bit (on, images move by a grey level).
    settings = Settings(models=BOTH, warmup=False, request_timeout_s=300, channels_last=False, max_batch_rows=48)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def guide_denoiser():
    return unet_denoiser(load_checkpoint(DEFAULT_MODEL_PATH.parent / GUIDE, "cpu").unet)


def direct(loaded, denoiser, guide_denoiser, body: dict) -> np.ndarray:
    """The request's images from SampleRun with the real models, sampled alone."""
    method = body.get("method", {})
    fields = {k: v for k, v in method.items() if k != "kind"}
    schedule = body.get("schedule", {"kind": "constant"})
    guidance = GuidanceParams(
        body.get("guidance_scale", DEFAULT_GUIDANCE.guidance_scale),
        schedule=GuidanceSchedule(**{"start": 0.0, **schedule} if schedule["kind"] == "interval" else schedule),
        method=GuidanceMethod(method.get("kind", "cfg"), **fields),
    )
    seeds = tuple(body["seed"] + i for i in range(body.get("num_images", 1)))
    sampler = body.get("sampler", "dpmpp_2m_karras")
    spec = SampleSpec(body["class_label"], seeds, body["steps"], sampler, guidance, cache=DEFAULT_CACHE)
    return sampled_alone(loaded, denoiser, spec, guides={GUIDE: guide_denoiser})


def autoguided(**method) -> dict:
    return {"kind": "autoguidance", "guide": GUIDE, **method}


def test_an_autoguidance_request_draws_what_sampleruns_draws(client, loaded, denoiser, guide_denoiser):
    body = {
        "class_label": "Shirt",
        "seed": 12,
        "num_images": 2,
        "steps": 8,
        "guidance_scale": 2.0,
        "schedule": {"kind": "interval", "sigma_min": 0.25, "sigma_max": 5},
        "method": autoguided(scale=1.5, cfg=True),
        "return_trace": True,
    }
    r = client.post("/generate", json=body)
    got = images(r)
    assert r.json()["guidance"]["method"] == {"kind": "autoguidance", "guide": GUIDE, "scale": 1.5, "cfg": True}
    assert np.array_equal(got, direct(loaded, denoiser, guide_denoiser, {**body, "class_label": 6}))
    trace = r.json()["trace"]
    skipped = skipped_steps("dpmpp_2m_karras", 8)  # the default cache's: no row, so no norms either
    ran = [t for t in trace if t["step"] not in skipped]
    assert len(trace) == 8 and all(len(t["guide_diff_norm"]) == 2 for t in ran)
    assert all(t["guide_diff_norm"] is None for t in trace if t["step"] in skipped)
    assert any(t["diff_norm"] is None for t in ran) and any(t["diff_norm"] is not None for t in ran)


def test_models_lists_each_models_guides(client):
    data = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert data[MAIN]["guides"] == [GUIDE] and "autoguidance" in data[MAIN]["guidance_methods"]
    # The check is of the task (classes, null label, shape, noise schedule), not of which model is the weaker.
    assert data[GUIDE]["guides"] == [MAIN]


def test_several_autoguidance_and_cfg_requests_at_once_each_draw_what_they_draw_alone(
    client, loaded, denoiser, guide_denoiser
):
    """Four autoguidance requests (w, cfg, samplers, seeds differ) and two CFG requests sent at once share
    forwards; each equals its request sampled alone within a grey level (the service's forwards are batched:
    tests/engine/test_autoguidance_engine.py checks the bit-equal case). The guide's rows are counted under
    the guided model, one per image and step."""
    settings = [  # (class, seed, images, steps, sampler, guidance_scale, method)
        (1, 30, 3, 10, "dpmpp_2m_karras", 3.0, autoguided(scale=2.0)),
        (1, 40, 2, 9, "euler_a", 3.0, autoguided(scale=1.5)),
        (7, 50, 2, 10, "ddpm", 3.5, autoguided(scale=2.5, cfg=True)),
        (4, 60, 3, 8, "ddim", 2.0, autoguided(scale=3.0, cfg=True)),
        (4, 70, 3, 10, "dpmpp_2m_karras", 3.0, None),
        (2, 80, 2, 9, "euler_a", 2.0, None),
    ]
    keys = ("class_label", "seed", "num_images", "steps", "sampler", "guidance_scale", "method")
    bodies = [{k: v for k, v in zip(keys, s, strict=True) if v is not None} for s in settings]
    for body in bodies:
        body["schedule"] = {"kind": "constant"}
    before = client.get("/metrics").text
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/generate", json=b), bodies))
    after = client.get("/metrics").text

    def grown(key: str) -> float:
        return metric_value(after, key) - metric_value(before, key)

    # one per image and step, but the steps the default cache skips
    guide_rows = sum(
        b["num_images"] * (b["steps"] - len(skipped_steps(b["sampler"], b["steps"]))) for b in bodies if "method" in b
    )
    assert grown(f'cfg_engine_forward_rows_total{{kind="guide",model="{MAIN}"}}') == guide_rows
    assert grown(f'cfg_engine_forward_rows_total{{kind="guide",model="{GUIDE}"}}') == 0
    forwards = grown(f'cfg_engine_batch_rows_count{{model="{MAIN}"}}')
    rows = grown(f'cfg_engine_batch_rows_sum{{model="{MAIN}"}}') / forwards
    assert rows > 6, f"the requests hardly shared forwards ({rows:.1f} rows per forward)"
    for body, r in zip(bodies, responses, strict=True):
        diff = np.abs(images(r).astype(int) - direct(loaded, denoiser, guide_denoiser, body).astype(int)).max()
        assert diff <= 1, f"{json.dumps(body)}: max pixel difference {diff}"


@pytest.mark.parametrize(
    ("guide", "message"),
    [
        ("nope", "'nope' is not a served model; the models that can: fashion-mnist-guide"),
        (MAIN, "a model cannot guide itself; the models that can: fashion-mnist-guide"),
    ],
)
def test_a_guide_that_is_not_served_gets_422_naming_method_guide_and_the_models_that_can(client, guide, message):
    body = {"class_label": 3, "method": {"kind": "autoguidance", "guide": guide}}
    for path in ("/generate", "/v1/jobs"):
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", "method", "guide"] and error["msg"] == message and error["input"] == guide
    r = client.post("/v1/images/generations", json={"prompt": "Dress", "method": body["method"]})
    assert r.status_code == 400 and r.json()["error"]["message"] == f"method.guide: {message}"


def test_cads_with_a_guide_gets_422_naming_cads(client):
    body = {"class_label": 3, "method": autoguided(), "cads": {}}
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "cads"] and "cads does not combine with method autoguidance" in error["msg"]


def test_a_guide_in_the_store_but_not_served_gets_422():
    with TestClient(create_app(Settings(warmup=False))) as c:
        r = c.post("/generate", json={"class_label": 3, "method": autoguided()})
        assert c.get("/v1/models").json()["data"][0]["guides"] == []
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "method", "guide"]
    assert error["msg"] == "'fashion-mnist-guide' is not a served model; no served model can guide it"


def test_a_served_model_with_other_classes_cannot_guide(tmp_path):
    """A store with the default model and a copy of the guide whose class names are in another order: served
    side by side, the copy is not a guide of the default (its label 0 means another class)."""
    (tmp_path / MAIN).symlink_to(DEFAULT_MODEL_PATH)
    other = tmp_path / "other-classes"
    shutil.copytree(DEFAULT_MODEL_PATH.parent / GUIDE, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"], manifest["class_names"] = "other-classes", manifest["class_names"][::-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    settings = Settings(model_store=tmp_path, models=f"{MAIN},other-classes", warmup=False)
    with TestClient(create_app(settings)) as c:
        r = c.post("/generate", json={"class_label": 3, "method": autoguided(guide="other-classes")})
        data = c.get("/v1/models").json()["data"]
    assert [m["guides"] for m in data] == [[], []]
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "method", "guide"]
    assert error["msg"].startswith("other-classes cannot guide fashion-mnist-cfg: other class names: ['Ankle boot'")
    assert error["msg"].endswith("; no served model can guide it")
