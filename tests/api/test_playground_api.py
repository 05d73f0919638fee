"""The playground's HTTP side: the page and its assets, and POST /v1/guidance/curve, whose numbers must be
those of a real SampleRun built from the same settings (through the real app lifespan and checkpoint)."""

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.guidance import GuidanceSchedule
from app.main import create_app
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, GuidanceParams, SampleRun, SampleSpec

pytestmark = pytest.mark.stand_in  # the subject is the API, not the model (tests/stand_in.py)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False))) as c:
        yield c


def direct_run(loaded, spec: SampleSpec) -> SampleRun:
    return SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)


# (request fields, the same settings as the engine's SampleSpec; class 7, seed 0)
CASES = {
    "default request": ({}, SampleSpec(7, (0,), 20, DEFAULT_SAMPLER, DEFAULT_GUIDANCE)),
    "interval ddim": (
        {"steps": 12, "sampler": "ddim", "guidance_scale": 4,
         "schedule": {"kind": "interval", "start": 0.1, "end": 0.9, "sigma_min": 0.5, "sigma_max": 8}},
        SampleSpec(7, (0,), 12, "ddim",
                   GuidanceParams(4.0, GuidanceSchedule("interval", 0.1, 0.9, sigma_min=0.5, sigma_max=8.0))),
    ),
    "linear euler_a": (
        {"steps": 7, "sampler": "euler_a", "guidance_scale": 5, "schedule": {"kind": "linear", "start": 0, "end": 1}},
        SampleSpec(7, (0,), 7, "euler_a", GuidanceParams(5.0, GuidanceSchedule("linear", 0.0, 1.0))),
    ),
    "cosine, noise after sigma": (
        {"steps": 9, "sampler": "ddpm", "guidance_scale": 2.5, "schedule": {"kind": "cosine", "start": 1, "end": 0.2},
         "noise_level": 0.3, "noise_schedule": "sigma"},
        SampleSpec(7, (0,), 9, "ddpm",
                   GuidanceParams(2.5, GuidanceSchedule("cosine", 1.0, 0.2), noise_level=0.3, noise_schedule="sigma")),
    ),
    "noise after guidance": (
        {"steps": 10, "guidance_scale": 3, "noise_level": 0.2, "noise_schedule": "guidance"},
        SampleSpec(7, (0,), 10, DEFAULT_SAMPLER, GuidanceParams(3.0, DEFAULT_GUIDANCE.schedule, 0.2, "guidance")),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_curve_equals_a_real_runs_scales(client, loaded, case):
    fields, spec = CASES[case]
    r = client.post("/v1/guidance/curve", json={"class_label": 7, "seed": 0, **fields})
    assert r.status_code == 200, r.text
    steps = r.json()["steps"]
    run = direct_run(loaded, spec)
    assert [s["step"] for s in steps] == list(range(spec.steps))
    assert [s["timestep"] for s in steps] == [int(t) for t in run.timesteps]
    assert [s["sigma"] for s in steps] == run.sigmas
    assert [s["scale"] for s in steps] == run.scales
    level = spec.guidance.noise_level
    assert [s["noise_level"] for s in steps] == [level * f for f in run.noise_factors]


def test_default_curve_guides_the_span_of_its_sigma_interval(client):
    # The default: s = 2.5 on sigma in (0.25, 5], each step weighted by the share of its noise span inside.
    steps = client.post("/v1/guidance/curve", json={}).json()["steps"]
    guided = [s for s in steps if s["scale"] != 1.0]
    assert len(steps) == 20 and len(guided) == 7  # README: the default guides 7 of its 20 steps
    assert all(1.0 < s["scale"] <= 2.5 for s in guided)
    sigmas = [s["sigma"] for s in steps][1:] + [0.0]  # each step's lower end
    inside = [s for s, lower in zip(steps, sigmas, strict=True) if 0.25 <= lower and s["sigma"] <= 5]
    assert inside and all(s["scale"] == pytest.approx(2.5) for s in inside)  # a span wholly inside: the whole s
    dose = sum((s["scale"] - 1) * (s["sigma"] - lower) for s, lower in zip(steps, sigmas, strict=True))
    assert dose == pytest.approx(1.5 * (5 - 0.25))  # the interval's own amount of guidance


@pytest.mark.parametrize(
    "fields, loc",
    [
        ({"guidance_scale": 31}, ["body", "guidance_scale"]),
        ({"schedule": {"kind": "interval", "sigma_min": 3, "sigma_max": 2}}, ["body", "schedule", "interval"]),
        ({"schedule": {"kind": "linear", "start": 11}}, ["body", "schedule", "linear", "start"]),
    ],
)
def test_curve_rejects_what_generate_rejects(client, fields, loc):
    curve = client.post("/v1/guidance/curve", json=fields)
    generate = client.post("/generate", json=fields)
    assert curve.status_code == generate.status_code == 422
    assert curve.json() == generate.json()
    assert [e["loc"] for e in curve.json()["detail"]] == [loc]


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for ref in ("static/playground.js", "static/playground.css"):
        assert f'"{ref}"' in page.text  # relative: the page works wherever the app is mounted
        asset = client.get(f"/{ref}")
        assert asset.status_code == 200 and asset.text
    assert "javascript" in client.get("/static/playground.js").headers["content-type"]
    assert "text/css" in client.get("/static/playground.css").headers["content-type"]


@pytest.mark.parametrize("path", ["/static/nothing.js", "/static/../api/playground.py", "/static/%2e%2e/main.py"])
def test_static_serves_nothing_outside_its_folder(client, path):
    assert client.get(path).status_code == 404


def test_only_the_curve_is_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/guidance/curve" in paths and "/" not in paths and not any(p.startswith("/static") for p in paths)
