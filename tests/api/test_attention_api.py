"""Attention guidance over HTTP, through the real app lifespan and the shipped checkpoint: a pag or seg request
draws what SampleRun draws, its perturbed rows are counted in the metrics, and a method or layers the model
can't run get a 422 naming the field, the model and what it allows (never a 500, never a failed job later)."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.api.methods import method_error
from app.config import Settings
from app.guidance import GuidanceMethod
from app.loading import model_info
from app.main import create_app
from app.models.attention import perturbation_support
from app.sampling import GuidanceParams, SampleSpec
from tests.defaults import DEFAULT_CACHE, skipped_steps
from tests.metrics import metric_value
from tests.pngs import response_images as images
from tests.sampled import sampled_alone

pytestmark = pytest.mark.integration

LABEL, SEED, STEPS, N = 3, 5, 6, 2
MODEL = "fashion-mnist-cfg"
SUPPORTED = "cfg, apg, cfg_zero_star, pag, seg"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(request_timeout_s=120, warmup=False))) as c:
        yield c


def request(method: dict, **fields) -> dict:
    base = {"class_label": LABEL, "seed": SEED, "steps": STEPS, "num_images": N, "sampler": "ddpm"}
    return {**base, "guidance_scale": 3.0, "schedule": {"kind": "constant"}, "method": method, **fields}


def direct_images(loaded, denoiser, guidance: GuidanceParams) -> np.ndarray:
    return sampled_alone(
        loaded,
        denoiser,
        SampleSpec(LABEL, tuple(SEED + i for i in range(N)), STEPS, "ddpm", guidance, cache=DEFAULT_CACHE),
    )


@pytest.mark.parametrize(
    "method",
    [{"kind": "pag", "scale": 2.0}, {"kind": "seg", "blur_sigma": 1.5, "cfg": False, "layers": [0]}],
    ids=["pag", "seg-alone"],
)
def test_an_attention_request_draws_what_the_sampler_draws_and_counts_its_rows(client, loaded, denoiser, method):
    before = metric_value(client.get("/metrics").text, 'cfg_engine_forward_rows_total{kind="perturbed"}')
    r = client.post("/generate", json=request(method, return_trace=True))
    got = images(r)
    want = direct_images(loaded, denoiser, GuidanceParams(3.0, method=GuidanceMethod(**method)))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    cfg = images(client.post("/generate", json=request({"kind": "cfg"})))
    assert np.abs(got.astype(int) - cfg.astype(int)).max() >= 3  # the method did something
    body = r.json()
    echoed = {"scale": 3.0, "cfg": True, **method, "layers": method.get("layers")}
    assert body["guidance"]["method"] == {k: v for k, v in echoed.items() if v is not None}
    # Every step runs its perturbed rows but those the default cache skips (no row at all: no norms either).
    skipped = skipped_steps("ddpm", STEPS)
    ran = [t for t in body["trace"] if t["step"] not in skipped]
    assert all(len(t["perturbed_norm"]) == N for t in ran)
    assert all((t["diff_norm"] is None) == (not echoed["cfg"]) for t in ran)
    assert all(t["perturbed_norm"] is None for t in body["trace"] if t["step"] in skipped)
    after = metric_value(client.get("/metrics").text, 'cfg_engine_forward_rows_total{kind="perturbed"}')
    assert after - before == N * len(ran)


def test_models_say_which_attention_methods_each_model_runs(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["guidance_methods"] == SUPPORTED.split(", ")
    attention = model["attention_guidance"]
    for kind in ("pag", "seg"):
        assert attention[kind] == {
            "supported": True,
            "layers": ["mid_block.attentions.0"],
            "default_layers": [0],
            "reason": None,
        }
    assert attention["slg"]["supported"] is False and "has none" in attention["slg"]["reason"]


@pytest.mark.parametrize("path", ["/generate", "/v1/jobs"])
def test_a_method_the_model_cant_run_is_a_422_naming_the_model_and_its_methods(client, path):
    invalid = 'cfg_requests_total{outcome="invalid"}'
    before = metric_value(client.get("/metrics").text, invalid)
    r = client.post(path, json=request({"kind": "slg"}))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "method", "kind"]
    assert f"method slg can't run on model {MODEL}" in error["msg"] and "transformer blocks" in error["msg"]
    assert error["msg"].endswith(f"{MODEL} runs {SUPPORTED}")
    counted = metric_value(client.get("/metrics").text, invalid) - before
    assert counted == (1 if path == "/generate" else 0)  # the jobs API counts its own outcomes


def test_layers_out_of_range_are_a_422_naming_the_models_layers(client):
    r = client.post("/generate", json=request({"kind": "pag", "layers": [0, 4]}))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "method", "layers"] and error["input"] == [0, 4]
    assert error["msg"] == f"pag layers [4] are not layers of model {MODEL}, which has 0..0 (0: mid_block.attentions.0)"


def test_the_openai_endpoint_refuses_it_in_its_own_shape(client):
    r = client.post("/v1/images/generations", json={"prompt": "Dress", "method": {"kind": "slg"}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "method" and f"method slg can't run on model {MODEL}" in error["message"]


def test_under_int8_every_attention_method_is_refused(loaded):
    """int8's forward is a quantized graph that the hooks can't reach: the model's entry, as the service writes it
    at that precision, lists none of them and refuses each by name (built here without an int8 server: this CPU
    may have no int8 dot product)."""
    support = perturbation_support(loaded.network, "int8")
    info = model_info(Settings(), loaded.manifest, torch.device("cpu"), "int8", False, perturbations=support)
    # (autoguidance stays until the service pairs the model with its guides: app.loading.pair_guides)
    assert info["guidance_methods"] == ["cfg", "apg", "cfg_zero_star", "autoguidance"]
    for kind in ("pag", "seg", "slg"):
        error = method_error(info, GuidanceMethod(kind))
        assert error is not None and error["loc"] == ["body", "method", "kind"]
        assert "precision int8" in error["msg"] and error["msg"].endswith("runs cfg, apg, cfg_zero_star, autoguidance")
    assert method_error(info, GuidanceMethod("apg")) is None
