"""Guidance over HTTP: every guidance option reaches the sampler, and the trace comes back.

The API's images must equal those of SampleRun driven directly with the same settings and seeds, through
the real app lifespan and the shipped checkpoint."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.guidance import Cads, GuidanceMethod, GuidanceSchedule, method_fields
from app.main import create_app
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleSpec
from app.sampling.run import schedule_values
from app.sampling.schedulers import config_key
from tests.defaults import DEFAULT_CACHE
from tests.metrics import metric_value
from tests.pngs import decode
from tests.sampled import sampled_alone

pytestmark = pytest.mark.integration  # the API equal to the library

LABEL, SEED, STEPS, N = 3, 5, 6, 2

# (request fields, the same guidance as the engine's dataclasses)
CASES = {
    "scale": ({"guidance_scale": 5.0}, GuidanceParams(5.0)),
    "cosine": (
        {"guidance_scale": 5.0, "schedule": {"kind": "cosine", "start": 1, "end": 0.2}},
        GuidanceParams(5.0, schedule=GuidanceSchedule("cosine", 1.0, 0.2)),
    ),
    "linear": (
        {"guidance_scale": 4.0, "schedule": {"kind": "linear", "start": 0, "end": 1}},
        GuidanceParams(4.0, schedule=GuidanceSchedule("linear", 0.0, 1.0)),
    ),
    "interval-sigma": (
        {"guidance_scale": 5.0, "schedule": {"kind": "interval", "sigma_min": 0.5, "sigma_max": 10}},
        GuidanceParams(5.0, schedule=GuidanceSchedule("interval", 0.0, 1.0, sigma_min=0.5, sigma_max=10.0)),
    ),
    "interval-span": (
        {
            "guidance_scale": 5.0,
            "schedule": {"kind": "interval", "sigma_min": 0.5, "sigma_max": 10, "weighting": "span"},
        },
        GuidanceParams(
            5.0, schedule=GuidanceSchedule("interval", 0.0, 1.0, sigma_min=0.5, sigma_max=10.0, weighting="span")
        ),
    ),
    "noise": ({"guidance_scale": 3.0, "noise_level": 0.3}, GuidanceParams(3.0, noise_level=0.3)),
    "noise-sigma": (
        {"guidance_scale": 3.0, "noise_level": 0.3, "noise_schedule": "sigma"},
        GuidanceParams(3.0, noise_level=0.3, noise_schedule="sigma"),
    ),
    "rescale": ({"guidance_scale": 5.0, "guidance_rescale": 0.7}, GuidanceParams(5.0, guidance_rescale=0.7)),
    "apg": (
        {"guidance_scale": 5.0, "method": {"kind": "apg", "eta": 0.1, "momentum": -0.3, "norm_threshold": 1.5}},
        GuidanceParams(5.0, method=GuidanceMethod("apg", eta=0.1, momentum=-0.3, norm_threshold=1.5)),
    ),
    "cfg_zero_star": (
        {"guidance_scale": 5.0, "method": {"kind": "cfg_zero_star"}},
        GuidanceParams(5.0, method=GuidanceMethod("cfg_zero_star")),
    ),
    "cads": (
        {"guidance_scale": 3.0, "cads": {"tau1": 0.4, "tau2": 0.8, "noise_scale": 0.5, "psi": 0.5}},
        GuidanceParams(3.0, cads=Cads(tau1=0.4, tau2=0.8, noise_scale=0.5, psi=0.5)),
    ),
}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(request_timeout_s=120, warmup=False))) as c:
        yield c


def api_images(client, fields: dict) -> tuple[np.ndarray, dict]:
    body = {"class_label": LABEL, "seed": SEED, "steps": STEPS, "num_images": N, "sampler": "ddpm", **fields}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return np.stack([decode(b) for b in r.json()["images"]]), r.json()


def direct_images(loaded, denoiser, guidance: GuidanceParams, spec: SampleSpec | None = None) -> np.ndarray:
    return sampled_alone(
        loaded,
        denoiser,
        spec or SampleSpec(LABEL, tuple(SEED + i for i in range(N)), STEPS, "ddpm", guidance, cache=DEFAULT_CACHE),
    )


@pytest.fixture(scope="module")
def default_images(client):
    return api_images(client, {})[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_images_equal_the_sampler_driven_directly(client, loaded, denoiser, default_images, case):
    fields, guidance = CASES[case]
    # Each case's GuidanceParams starts from plain CFG with a constant schedule; the request says the same
    # (the default request's schedule is an interval).
    got, body = api_images(client, {"schedule": {"kind": "constant"}, **fields})
    want = direct_images(loaded, denoiser, guidance)
    # Same ops, same order: at most a rounding step of the uint8 conversion apart.
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, case
    # And the option did something: the default request draws other images.
    assert np.abs(got.astype(int) - default_images.astype(int)).max() >= 3, case
    assert body["guidance_scale"] == guidance.guidance_scale
    assert body["guidance"]["method"]["kind"] == guidance.method.kind


def test_default_request_uses_the_default_guidance(client, loaded, denoiser, default_images):
    assert np.abs(default_images.astype(int) - direct_images(loaded, denoiser, DEFAULT_GUIDANCE).astype(int)).max() <= 1


def test_response_echoes_the_guidance_settings(client):
    _, body = api_images(client, {**CASES["apg"][0], "schedule": {"kind": "interval", "sigma_max": 10}})
    assert body["guidance"]["method"] == {"kind": "apg", "eta": 0.1, "momentum": -0.3, "norm_threshold": 1.5}
    schedule = {"kind": "interval", "start": 0.0, "end": 1.0, "sigma_max": 10.0, "weighting": "step"}
    assert body["guidance"]["schedule"] == schedule
    assert body["guidance"]["cads"] is None and body["trace"] is None


def test_trace_per_step_with_apg_parts(client):
    fields = {**CASES["apg"][0], "schedule": {"kind": "interval", "sigma_max": 10}, "return_trace": True}
    _, body = api_images(client, fields)
    trace = body["trace"]
    assert [t["step"] for t in trace] == list(range(STEPS))
    guided = [t for t in trace if t["scale"] == 5.0]
    skipped = [t for t in trace if t["scale"] == 1.0]
    assert guided and skipped and len(guided) + len(skipped) == STEPS  # the first steps are above sigma 10
    for t in skipped:
        assert t["diff_norm"] is None and t["parallel_norm"] is None
    for t in guided:
        assert len(t["diff_norm"]) == N and all(v > 0 for v in t["diff_norm"])
        # The clamp bounds the APG difference: |par|^2 + |orth|^2 <= threshold^2.
        for par, orth in zip(t["parallel_norm"], t["orthogonal_norm"], strict=True):
            assert par**2 + orth**2 <= 1.5**2 + 1e-3


def test_progress_events_carry_the_trace(client):
    fields = {"class_label": 1, "seed": 2, "steps": 8, "guidance_scale": 4, "schedule": {"kind": "constant"}}
    fields["return_trace"] = True
    with client.stream("POST", "/generate", json=fields, headers={"Accept": "text/event-stream"}) as r:
        text = "".join(r.iter_text())
    chunks = [c for c in text.split("\n\n") if c.strip()]
    progress = [json.loads(c.split("data: ", 1)[1]) for c in chunks if c.startswith("event: progress")]
    result = json.loads(chunks[-1].split("data: ", 1)[1])
    streamed = [t for event in progress for t in event["trace"]]
    # Every step's entry arrives once, in order, and equals the final trace; an event carries the steps
    # taken since the one before it.
    assert streamed == result["trace"][: len(streamed)]
    assert all(len(e["trace"]) == e["step"] - prev["step"] for prev, e in zip(progress, progress[1:], strict=False))
    assert [t["scale"] for t in result["trace"]] == [4.0] * 8


def test_models_lists_the_guidance_options_and_the_default(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["guidance_methods"] == ["cfg", "apg", "cfg_zero_star", "pag", "seg"]  # no slg: a UNet; no guide served
    assert model["noise_schedules"] == ["constant", "sigma", "guidance"]
    # the playground builds its inputs from it: the methods this model runs
    assert model["guidance_method_fields"] == {
        k: v for k, v in method_fields().items() if k in model["guidance_methods"]
    }
    assert [f["name"] for f in model["guidance_method_fields"]["apg"]] == ["eta", "momentum", "norm_threshold"]
    default = model["default_guidance"]
    assert default["guidance_scale"] == DEFAULT_GUIDANCE.guidance_scale
    assert default["method"]["kind"] == DEFAULT_GUIDANCE.method.kind


def sent_at_once(bodies: list[dict], max_batch_rows: int) -> list[np.ndarray]:
    """Each body's images, all sent at once to a fresh app; they must have shared forwards (over 6 rows each)."""
    with TestClient(create_app(Settings(request_timeout_s=120, warmup=False, max_batch_rows=max_batch_rows))) as c:
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: c.post("/generate", json=b), bodies))
        metrics = c.get("/metrics").text
    rows = metric_value(metrics, "cfg_engine_batch_rows_sum") / metric_value(metrics, "cfg_engine_batch_rows_count")
    assert rows > 6, f"the requests hardly shared forwards ({rows:.1f} rows per forward)"
    for r in responses:
        assert r.status_code == 200, r.text
    return [np.stack([decode(b) for b in r.json()["images"]]) for r in responses]


def test_several_cads_requests_in_one_tick_each_draw_what_they_draw_alone(loaded, denoiser):
    """Six CADS requests with different settings, classes and seeds, sent at once, share forwards (a request
    arrives while another's CADS forward runs) and each equals the same request sampled alone. Once, a
    request built during another's CADS forward read its class embedding through that forward's hook."""
    settings = [
        {"tau1": 0.6, "tau2": 0.9, "noise_scale": 0.25, "psi": 1.0},
        {"tau1": 0.4, "tau2": 0.8, "noise_scale": 0.5, "psi": 0.5},
        {"tau1": 0.2, "tau2": 0.95, "noise_scale": 0.1, "psi": 1.0},
        {"tau1": 0.5, "tau2": 0.7, "noise_scale": 1.0, "psi": 0.0},
        {"tau1": 0.0, "tau2": 1.0, "noise_scale": 0.3, "psi": 0.8},
        {"tau1": 0.6, "tau2": 0.9, "noise_scale": 0.25, "psi": 1.0},
    ]
    bodies = [
        {
            "class_label": k,
            "seed": 40 + 7 * k,
            "num_images": 3,
            "steps": 10,
            "guidance_scale": 3.0,
            "schedule": {"kind": "constant"},
            "cads": cads,
        }
        for k, cads in enumerate(settings)
    ]
    for body, got in zip(bodies, sent_at_once(bodies, max_batch_rows=48), strict=True):
        spec = SampleSpec(
            body["class_label"],
            tuple(body["seed"] + i for i in range(3)),
            10,
            guidance=GuidanceParams(3.0, cads=Cads(**body["cads"])),
            cache=DEFAULT_CACHE,
        )
        want = direct_images(loaded, denoiser, spec.guidance, spec)
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 1, f"class {body['class_label']}: max pixel difference {diff}"


SPAN = {"kind": "interval", "sigma_min": 0.25, "sigma_max": 1.5, "weighting": "span"}


@pytest.mark.parametrize(("sampler", "steps"), [("dpmpp_2m_karras", 10), ("dpmpp_2m_karras", 30), ("ddim", 15)])
def test_span_weighting_guides_as_much_at_any_step_count_and_sampler(client, loaded, sampler, steps):
    """The guidance an interval adds, sum of (s_i - 1) (sigma_i - sigma_(i+1)), is (s - 1) (sigma_max - sigma_min)
    with weighting span, read from the trace of real requests; with weighting step it is not."""
    fields = {"guidance_scale": 3.5, "sampler": sampler, "steps": steps, "num_images": 1, "return_trace": True}
    doses = {}
    for weighting in ("span", "step"):
        _, body = api_images(client, {**fields, "schedule": {**SPAN, "weighting": weighting}})
        scales = [t["scale"] for t in body["trace"]]
        assert len(scales) == steps
        _, sigmas = schedule_values(sampler, config_key(loaded.scheduler_config), steps)
        ends = [*sigmas[1:], 0.0]
        doses[weighting] = sum((s - 1) * (hi - lo) for s, hi, lo in zip(scales, sigmas, ends, strict=True))
    assert doses["span"] == pytest.approx(2.5 * 1.25, rel=1e-6)
    assert abs(doses["step"] - 2.5 * 1.25) > 0.05, doses  # the steps that land inside decide it


def test_an_unknown_weighting_is_a_422_naming_the_allowed_values(client):
    r = client.post("/generate", json={"class_label": 1, "schedule": {**SPAN, "weighting": "area"}})
    assert r.status_code == 422
    error = r.json()["detail"][0]
    assert error["loc"][-1] == "weighting" and "'step' or 'span'" in error["msg"]


def test_several_span_weighted_requests_in_one_tick_each_draw_what_they_draw_alone(loaded, denoiser):
    """Five span-weighted requests (different scales, intervals, samplers, step counts, classes, seeds) and two
    plain ones, sent at once, share forwards; each equals the same request sampled alone."""
    cases = [
        (3.5, 0.25, 1.5, "dpmpp_2m_karras", 10),
        (2.0, 0.25, 5.0, "dpmpp_2m_karras", 10),
        (4.0, 0.1, 1.0, "dpmpp_2m_karras", 12),
        (3.0, 0.5, 3.0, "ddim", 10),
        (3.5, 0.25, 1.5, "ddim", 10),
    ]
    bodies = [
        {
            "class_label": k,
            "seed": 11 + 5 * k,
            "num_images": 3,
            "steps": steps,
            "sampler": sampler,
            "guidance_scale": s,
            "schedule": {"kind": "interval", "sigma_min": lo, "sigma_max": hi, "weighting": "span"},
        }
        for k, (s, lo, hi, sampler, steps) in enumerate(cases)
    ]
    bodies += [{"class_label": 7, "seed": 3, "num_images": 3, "steps": 10, "sampler": "ddim"}] * 2
    for body, got in zip(bodies, sent_at_once(bodies, max_batch_rows=64), strict=True):
        schedule = body.get("schedule")
        guidance = (
            GuidanceParams(body["guidance_scale"], schedule=GuidanceSchedule(start=0.0, end=1.0, **schedule))
            if schedule
            else DEFAULT_GUIDANCE
        )
        seeds = tuple(body["seed"] + i for i in range(3))
        spec = SampleSpec(body["class_label"], seeds, body["steps"], body["sampler"], guidance, cache=DEFAULT_CACHE)
        want = direct_images(loaded, denoiser, guidance, spec)
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 1, f"{body}: max pixel difference {diff}"
