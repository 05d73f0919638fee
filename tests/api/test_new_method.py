"""A guidance method is one module plus its tests (docs/guidance-methods.md): a method defined here, in the test
module, and registered through app.guidance's registry with no other edit, is served end to end by POST
/generate (validated, documented in /openapi.json, listed by /v1/models, echoed, drawn as SampleRun draws it,
per request state and all), and is gone again once unregistered.

The method is a throwaway (CFG on a clamped difference with momentum), made up for this test: it is here to show
what a method needs, not to be used. The app, the engine and the checkpoint are the real ones."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import Field

from app.config import Settings
from app.guidance import GUIDERS, GuidanceStep, Guided, Guider, MethodParams, register_guider, unregister_guider
from app.main import create_app
from app.sampling import GuidanceParams, SampleSpec
from tests.defaults import DEFAULT_CACHE
from tests.pngs import response_images as images
from tests.sampled import sampled_alone

KIND = "clamped_test"
LABEL, STEPS, N = 3, 6, 2


class ClampedTestMethod(MethodParams):
    """eps_c + (s - 1) clamp(d, -limit, limit), d = eps_c - eps_u + momentum * the previous step's d."""

    kind: Literal["clamped_test"] = "clamped_test"
    limit: float = Field(0.05, gt=0, le=10, description="clamp of each element of the difference")
    momentum: float = Field(0.5, ge=0, le=1, description="weight of the previous step's difference (0: off)")


class ClampedTest(Guider):
    params_model = ClampedTestMethod
    params: ClampedTestMethod

    def __init__(self, params: ClampedTestMethod, scales: Sequence[float]) -> None:
        super().__init__(params, scales)
        self.previous: torch.Tensor | None = None  # this request's own, as APG's momentum

    def combine(self, step: GuidanceStep) -> Guided:
        diff = step.eps_cond - step.eps_uncond
        if self.previous is not None:
            diff = diff + self.params.momentum * self.previous
        self.previous = diff
        limit = self.params.limit
        return Guided(step.eps_cond + (step.scale - 1) * diff.clamp(-limit, limit))


# Served end to end by the real app on the real checkpoint.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client():
    register_guider(ClampedTest)
    try:
        with TestClient(create_app(Settings(request_timeout_s=120, warmup=False))) as c:
            yield c
    finally:
        unregister_guider(KIND)


def body(seed: int, **method: float) -> dict:
    return {
        "class_label": LABEL,
        "seed": seed,
        "steps": STEPS,
        "num_images": N,
        "sampler": "ddpm",
        "guidance_scale": 5.0,
        "schedule": {"kind": "constant"},
        "method": {"kind": KIND, **method},
    }


def direct_images(loaded, denoiser, seed: int, method: MethodParams) -> np.ndarray:
    guidance = GuidanceParams(5.0, method=method)
    return sampled_alone(
        loaded,
        denoiser,
        SampleSpec(LABEL, tuple(seed + i for i in range(N)), STEPS, "ddpm", guidance, cache=DEFAULT_CACHE),
    )


def test_a_method_registered_from_its_own_module_is_served_end_to_end(client, loaded, denoiser):
    # Three requests of the new method with different settings at once, sharing forwards: each draws what the
    # sampler draws for it alone, so its momentum is its own.
    settings = [{"limit": 0.05}, {"limit": 0.2, "momentum": 0.0}, {"limit": 0.02, "momentum": 1.0}]
    with ThreadPoolExecutor(len(settings)) as pool:
        responses = list(
            pool.map(lambda kv: client.post("/generate", json=body(11 + kv[0], **kv[1])), enumerate(settings))
        )
    for k, (fields, r) in enumerate(zip(settings, responses, strict=True)):
        want = direct_images(loaded, denoiser, 11 + k, ClampedTestMethod(**fields))
        assert np.abs(images(r).astype(int) - want.astype(int)).max() <= 1, fields
        # The response echoes the method's settings, its defaults filled in, as for the shipped methods.
        assert r.json()["guidance"]["method"] == {"kind": KIND, **ClampedTestMethod(**fields).model_dump()}
    # The method did something: plain CFG at the same seed draws other images.
    cfg = client.post("/generate", json={**body(11), "method": {"kind": "cfg"}})
    assert np.abs(images(responses[0]).astype(int) - images(cfg).astype(int)).max() >= 3


def test_the_new_methods_fields_are_validated_documented_and_listed(client):
    r = client.post("/generate", json=body(1, limit=0))
    assert r.status_code == 422
    assert any("limit" in map(str, e["loc"]) and "greater than 0" in e["msg"] for e in r.json()["detail"])
    r = client.post("/generate", json=body(1, eta=0.5))  # APG's field is not this method's
    assert r.status_code == 422 and any("eta" in map(str, e["loc"]) for e in r.json()["detail"])
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert (
        schemas["ClampedTestMethod"]["properties"]["limit"]["description"] == "clamp of each element of the difference"
    )
    assert schemas["ApgMethod"]["properties"]["norm_threshold"]["maximum"] == 1000  # the shipped ones stay
    methods = client.get("/v1/models").json()["data"][0]["guidance_methods"]
    assert methods == ["cfg", "apg", "cfg_zero_star", "pag", "seg", KIND]  # the UNet runs no slg; no guide served


def test_once_unregistered_the_method_is_unknown_and_the_422_names_the_others(client):
    unregister_guider(KIND)
    try:
        assert tuple(GUIDERS) == ("cfg", "apg", "cfg_zero_star", "pag", "seg", "slg", "autoguidance")
        with TestClient(create_app(Settings(request_timeout_s=60, warmup=False))) as fresh:
            r = fresh.post("/generate", json=body(1))
            assert r.status_code == 422
            msg = " ".join(e["msg"] for e in r.json()["detail"])
            assert "'cfg', 'apg', 'cfg_zero_star'" in msg and KIND in msg  # the tag it got, then the allowed ones
            assert "ClampedTestMethod" not in fresh.get("/openapi.json").json()["components"]["schemas"]
    finally:
        register_guider(ClampedTest)  # the module fixture unregisters it at the end
