"""Several models in one process: the shipped Fashion-MNIST UNet and an imported latent DiT side by side,
through the real app lifespan. The DiT is tiny and randomly initialised (tests/tiny_models.py: a real
DiT-XL/2 is gigabytes and nothing may be downloaded here); its code path is the real one."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.main import create_app
from app.models import image_decoder, load_checkpoint, model_denoiser
from app.models.importer import import_model
from app.sampling import DEFAULT_GUIDANCE, SampleRun, SampleSpec, sample
from tests.metrics import metric_value
from tests.pngs import decode, same_images
from tests.tiny_models import imagenet_like_names, save_dit_pipeline

MODELS = "fashion-mnist-cfg,tiny-dit"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(DEFAULT_MODEL_PATH, store / "fashion-mnist-cfg")
    source = save_dit_pipeline(tmp_path_factory.mktemp("src") / "dit", 1000, imagenet_like_names(1000))
    import_model(source, "tiny-dit", store)
    return store


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(Settings(model_store=store, models=MODELS, warmup=False))) as c:
        yield c


def test_the_models_are_listed_in_order_and_the_first_is_the_default(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["name"] for m in data] == ["fashion-mnist-cfg", "tiny-dit"]
    dit = data[1]
    assert dit["kind"] == "dit" and dit["image_shape"] == [3, 16, 16] and dit["latent_shape"] == [4, 8, 8]
    assert dit["null_label"] == 1000 and dit["class_names"][0] == "tench, Tinca tinca"
    assert dit["samplers"] == data[0]["samplers"] and dit["limits"] == data[0]["limits"]
    r = client.post("/generate", json={"class_label": "Sneaker", "steps": 2, "seed": 1})
    assert r.json()["model"] == "fashion-mnist-cfg" and decode(r.json()["images"][0]).shape == (28, 28)


def test_each_model_lists_its_step_cache_and_refuses_the_other_s_naming_why(client):
    unet, dit = client.get("/v1/models").json()["data"]
    assert unet["cache"]["kinds"] == ["none", "deepcache", "uncond", "skip"]
    assert unet["cache"]["deepcache"]["max_branch"] == 2
    assert dit["cache"]["kinds"] == ["none", "first_block", "uncond", "skip"]
    assert dit["cache"]["deepcache"]["max_branch"] is None
    assert dit["cache"]["first_block"] == {"reason": None}
    assert unet["cache"]["first_block"]["reason"].startswith("first_block skips a DiT's transformer blocks")
    body = {"model": "tiny-dit", "class_label": 1, "steps": 2, "cache": {"kind": "deepcache"}}
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "cache", "kind"]
    assert error["msg"] == (
        "cache kind deepcache can't run on model tiny-dit: deepcache splits a UNet at its levels, and this model "
        "has none. tiny-dit runs none, first_block, uncond, skip"
    )
    r = client.post("/generate", json={**body, "model": "fashion-mnist-cfg", "cache": {"kind": "first_block"}})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "cache", "kind"]
    assert "fashion-mnist-cfg runs none, deepcache, uncond, skip" in error["msg"]
    assert client.post("/generate", json={**body, "cache": {"kind": "none"}}).status_code == 200
    r = client.post("/generate", json={**body, "cache": {"kind": "first_block", "threshold": 0.2}})
    assert r.status_code == 200 and r.json()["cache"] == {
        "kind": "first_block",
        "threshold": 0.2,
        "uncond_every": 1,
        "uncond_order": 1,
    }, r.text


def test_a_latent_model_draws_rgb_images_at_the_vae_size_by_any_synonym(client):
    body = {"model": "tiny-dit", "class_label": "Tinca tinca", "num_images": 2, "steps": 4, "seed": 5}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "tiny-dit" and out["class_label"] == 0 and out["class_name"] == "tench, Tinca tinca"
    assert [decode(b).shape for b in out["images"]] == [(16, 16, 3)] * 2
    assert same_images(client.post("/generate", json={**body, "class_label": "TENCH"}).json()["images"], out["images"])


def test_an_unknown_model_or_a_class_of_another_model_is_a_422_naming_what_is_served(client):
    r = client.post("/generate", json={"model": "sdxl", "class_label": 1})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "model"] and "fashion-mnist-cfg" in error["msg"] and "tiny-dit" in error["msg"]
    r = client.post("/generate", json={"model": "tiny-dit", "class_label": "Sneaker"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "class_label"]
    assert "tench" in r.json()["detail"][0]["msg"]
    assert client.post("/generate", json={"model": "tiny-dit", "class_label": 1000}).status_code == 422


@pytest.mark.integration  # batch invariance
def test_concurrent_requests_to_both_models_match_each_sampled_alone(client, store):
    """Each model batches its own rows on the shared thread; the latent path's images (decoded by the VAE,
    batched over the requests that finish together) equal those of the request sampled alone."""
    dit_bodies = [{"model": "tiny-dit", "class_label": c, "num_images": 2, "steps": 6, "seed": c} for c in (1, 2, 3)]
    unet_body = {"class_label": 4, "num_images": 2, "steps": 6, "seed": 9}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: client.post("/generate", json=b).json(), [*dit_bodies, unet_body]))
    loaded = load_checkpoint(store / "tiny-dit", "cpu")
    m = loaded.manifest
    for body, result in zip(dit_bodies, results, strict=False):
        spec = SampleSpec(
            body["class_label"], seeds=(body["seed"], body["seed"] + 1), steps=6, guidance=DEFAULT_GUIDANCE
        )
        run = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, decode=image_decoder(loaded))
        sample(model_denoiser(loaded), [run])
        got = np.stack([decode(b) for b in result["images"]]).astype(int)
        assert np.abs(got - run.images().astype(int)).max() <= 1
    assert results[-1]["model"] == "fashion-mnist-cfg" and decode(results[-1]["images"][0]).shape == (28, 28)


@pytest.mark.integration  # batch invariance
def test_first_block_requests_in_flight_together_draw_what_each_draws_alone_and_are_counted(client):
    """Several first_block requests of the DiT (one at another threshold) and one without a cache, in flight at
    once: each draws what it draws alone, and the rows that skipped the DiT's other blocks are counted."""
    cache = {"kind": "first_block", "threshold": 0.3}
    bodies = [
        {"model": "tiny-dit", "class_label": c, "num_images": n, "steps": 12, "seed": c, "cache": cache}
        for c, n in ((1, 1), (2, 2), (3, 1))
    ]
    bodies.append({**bodies[0], "class_label": 4, "seed": 4, "cache": {"kind": "first_block", "threshold": 0.6}})
    bodies.append({"model": "tiny-dit", "class_label": 5, "num_images": 2, "steps": 12, "seed": 5})
    before = client.get("/metrics").text
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: client.post("/generate", json=b), bodies))
    after = client.get("/metrics").text
    for body, mine in zip(bodies, together, strict=True):
        single = client.post("/generate", json=body)
        assert mine.status_code == single.status_code == 200, (mine.text, single.text)
        got, want = (np.stack([decode(b) for b in r.json()["images"]]).astype(int) for r in (mine, single))
        assert np.abs(got - want).max() <= 1, body
    shallow = 'cfg_engine_path_rows_total{model="tiny-dit",path="shallow"}'
    assert metric_value(after, shallow) > metric_value(before, shallow)
    r = client.post("/generate", json={**bodies[0], "cache": {"kind": "first_block", "threshold": 0}})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "cache", "first_block", "threshold"] and "greater than 0" in error["msg"]


@pytest.mark.parametrize(
    "guidance",
    [
        {"method": {"kind": "apg"}, "guidance_scale": 5},
        {"method": {"kind": "cfg_zero_star"}},
        {"schedule": {"kind": "cosine", "start": 1, "end": 0}, "noise_level": 0.2, "noise_schedule": "sigma"},
        {"cads": {}, "guidance_rescale": 0.7, "sampler": "euler_a"},
        {"sampler": "ddpm", "return_trace": True, "preview": True, "preview_every": 2},
        {"method": {"kind": "slg", "layers": [0, 1]}, "schedule": {"kind": "constant"}},  # a DiT's blocks
        {"method": {"kind": "pag", "cfg": False}, "return_trace": True},
    ],
)
def test_guidance_methods_schedules_noise_and_samplers_work_on_the_latent_model(client, guidance):
    body = {"model": "tiny-dit", "class_label": 7, "num_images": 2, "steps": 4, "seed": 3, **guidance}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    images = [decode(b) for b in r.json()["images"]]
    assert [i.shape for i in images] == [(16, 16, 3)] * 2 and not np.array_equal(images[0], images[1])


def test_jobs_openai_and_metrics_carry_the_model(client):
    job = client.post("/v1/jobs", json={"model": "tiny-dit", "class_label": 1, "steps": 4, "preview": True}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        text = "".join(r.iter_text())
    assert '"preview"' in text and "event: result" in text
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["result"]["model"] == "tiny-dit" and decode(done["result"]["images"][0]).shape == (16, 16, 3)

    r = client.post("/v1/images/generations", json={"model": "tiny-dit", "prompt": "goldfish", "steps": 2})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "16x16" and r.json()["data"][0]["revised_prompt"].startswith("goldfish")
    wrong = client.post("/v1/images/generations", json={"model": "nope", "prompt": "goldfish"})
    assert wrong.status_code == 404 and "tiny-dit" in wrong.json()["error"]["message"]

    text = client.get("/metrics").text
    for model in ("fashion-mnist-cfg", "tiny-dit"):
        assert metric_value(text, f'cfg_requests_total{{outcome="ok",model="{model}"}}') >= 1
        assert metric_value(text, f'cfg_engine_step_duration_seconds_count{{model="{model}"}}') >= 1
        assert metric_value(text, f'cfg_model_info{{model="{model}"}}') == 1
    assert metric_value(text, 'cfg_jobs_total{outcome="succeeded",model="tiny-dit"}') == 1


def test_cfg_model_path_still_serves_one_checkpoint_alone(store):
    settings = Settings(model_path=store / "tiny-dit", warmup=False)
    assert settings.model_paths() == [store / "tiny-dit"]
    with TestClient(create_app(settings)) as c:
        assert [m["name"] for m in c.get("/v1/models").json()["data"]] == ["tiny-dit"]
        assert c.post("/generate", json={"class_label": 0, "steps": 2}).json()["model"] == "tiny-dit"


def test_two_checkpoints_of_one_name_or_a_bad_models_list_fail_at_startup(store):
    with pytest.raises(ValueError, match="distinct"):
        Settings(models="tiny-dit,tiny-dit")
    with pytest.raises(ValueError, match="distinct"):
        Settings(models="tiny-dit,")


def test_each_model_is_loaded_and_adapted_in_the_compute_thread(store, monkeypatch):
    """No torch op may run in the event loop's thread: it gives OpenMP a second team of threads, which then
    sleep between parallel regions (app/engine/engine.py). A DiT's adapter compares its blocks' class tables;
    built in the event loop, it made the imported DiT-S/2 serve 19% slower than DiTPipeline (docs/benchmarks.md)."""
    import threading

    import app.loading

    calls = []

    def recording(name, real):
        def call(*args, **kwargs):
            calls.append((name, threading.current_thread().name))
            return real(*args, **kwargs)

        return call

    for name in ("load_checkpoint", "model_denoiser"):
        monkeypatch.setattr(app.loading, name, recording(name, getattr(app.loading, name)))
    with TestClient(create_app(Settings(model_store=store, models=MODELS, warmup=False))) as c:
        assert c.get("/readyz").status_code == 200
    assert sorted(name for name, _ in calls) == ["load_checkpoint"] * 2 + ["model_denoiser"] * 2
    assert all(thread.startswith("engine-forward") for _, thread in calls), calls


def test_each_model_lists_the_attention_methods_it_runs_and_the_other_refuses_slg(client):
    """The DiT runs slg on its transformer blocks, the UNet does not: each model's entry says so, and the 422
    names the model asked for."""
    unet, dit = client.get("/v1/models").json()["data"]
    assert dit["guidance_methods"][-3:] == ["pag", "seg", "slg"] and "slg" not in unet["guidance_methods"]
    assert dit["attention_guidance"]["slg"]["layers"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert dit["attention_guidance"]["pag"]["default_layers"] == [1]
    r = client.post("/generate", json={"model": "fashion-mnist-cfg", "class_label": 1, "method": {"kind": "slg"}})
    assert r.status_code == 422 and "model fashion-mnist-cfg" in r.json()["detail"][0]["msg"]
    r = client.post("/generate", json={"model": "tiny-dit", "class_label": 1, "method": {"kind": "slg", "layers": [2]}})
    assert r.status_code == 422 and "0..1 (0: transformer_blocks.0, 1: transformer_blocks.1)" in r.text
