"""The CUDA path, on the real checkpoint: where a GPU is (bench/gpu/run.sh runs this file on a lent device
machine), else skipped. CI and the project's CPU machines have no GPU, so nothing here runs there.

Stated tolerances, CPU against GPU for the same seed and settings (20 steps): with TF32 off (plain fp32
on both), at most CUDA_FP32_LEVELS grey levels apart at any pixel; with PyTorch's defaults (cuDNN may use
TF32 in convolutions), at most CUDA_DEFAULT_LEVELS. The noise is drawn on the host for every device
(app/sampling/run.py), so these compare the arithmetic alone.
"""

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.main import create_app
from app.models import load_checkpoint, model_denoiser
from app.models.fast import FastDenoiser, resolve_precision
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, sample
from tests.pngs import decode, level_diff

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.integration]

CUDA_FP32_LEVELS = 2
CUDA_DEFAULT_LEVELS = 8


@pytest.fixture(scope="module")
def models():
    return {device: load_checkpoint(DEFAULT_MODEL_PATH, device) for device in ("cpu", "cuda")}


def draw(loaded, spec: SampleSpec, per_request: bool = False, denoiser=None) -> SampleRun:
    m = loaded.manifest
    # per_request: diffusers' own step instead of app.sampling.batched's
    run = SampleRun(
        spec, loaded.scheduler_config, m.sample_shape, m.null_label, device=loaded.device, together=not per_request
    )
    sample(denoiser or model_denoiser(loaded), [run])
    return run


def inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, 1, 28, 28), generator=g).cuda()
    t = torch.randint(0, 1000, (rows,), generator=g).cuda()
    return x, t, torch.randint(0, 11, (rows,), generator=g).cuda()


def test_the_service_starts_on_cuda_and_draws():
    with TestClient(create_app(Settings(device="cuda", max_batch_rows=32))) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["device"].startswith("cuda")
        r = client.post("/generate", json={"class_label": 7, "num_images": 4, "seed": 1})
        assert r.status_code == 200, r.text
        images = [decode(b64) for b64 in r.json()["images"]]
        assert [im.shape for im in images] == [(28, 28)] * 4 and len({im.tobytes() for im in images}) == 4
        assert 'device="cuda' in client.get("/metrics").text


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
@pytest.mark.parametrize("tf32", [False, True])
def test_a_seed_draws_the_same_images_on_the_gpu_as_on_the_cpu(models, sampler, tf32):
    spec = SampleSpec(class_label=3, seeds=(0, 1, 2, 3), steps=20, sampler=sampler, guidance=DEFAULT_GUIDANCE)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        cpu, gpu = draw(models["cpu"], spec), draw(models["cuda"], spec)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    limit = CUDA_DEFAULT_LEVELS if tf32 else CUDA_FP32_LEVELS
    assert level_diff(cpu.images(), gpu.images()) <= limit


def test_a_request_is_batch_invariant_on_the_gpu(models):
    loaded = models["cuda"]
    spec = SampleSpec(class_label=2, seeds=(42, 43), steps=8, sampler="euler_a", guidance=GuidanceParams(4.0))
    alone = draw(loaded, spec)
    m = loaded.manifest
    crowd = [
        SampleRun(
            SampleSpec(class_label=c, seeds=(c, c + 1, c + 2), steps=8),
            loaded.scheduler_config,
            m.sample_shape,
            m.null_label,
            device="cuda",
        )  # fmt: skip
        for c in range(5)
    ]
    mine = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, device="cuda")
    sample(model_denoiser(loaded), [*crowd, mine])
    assert level_diff(alone.images(), mine.images()) <= 1


def test_cuda_graphs_replay_the_eager_forward(models):
    """Every bucket's captured graph gives the eager forward's eps (padding rows dropped), each call's output
    is its own (cloned out of the graph), and rows beyond the last bucket run uncaptured."""
    base = model_denoiser(models["cuda"])
    fast = FastDenoiser(base, torch.device("cuda"), cuda_graphs=True, max_rows=32)
    outs = {}
    for rows in (1, 3, 8, 32, 40):
        x, t, y = inputs(rows, seed=rows)
        with torch.inference_mode():
            want = base(x, t, y)
        outs[rows] = fast(x, t, y)
        assert outs[rows].shape == want.shape
        assert torch.allclose(outs[rows], want, atol=1e-4, rtol=1e-4), (rows, (outs[rows] - want).abs().max())
    assert sorted(fast._graphs) == [1, 4, 8, 32]  # 3 rows ran at bucket 4; 40 rows uncaptured
    x, t, y = inputs(8, seed=8)
    again = fast(x, t, y)
    assert torch.equal(again, outs[8]) and again.data_ptr() != outs[8].data_ptr()


def test_auto_precision_is_fp16_on_a_gpu():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_the_service_replays_cuda_graphs_at_fp16_and_draws():
    with TestClient(create_app(Settings(device="cuda", precision="auto", max_batch_rows=32))) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["cuda_graphs"] is True and info["precision"] == "fp16"
        r = client.post("/generate", json={"class_label": 5, "num_images": 3, "seed": 2})
        assert r.status_code == 200, r.text
        assert len({decode(b64).tobytes() for b64 in r.json()["images"]}) == 3


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "ddim", "ddpm", "euler_a"])
def test_batched_steps_draw_what_the_diffusers_step_draws_on_the_gpu(models, sampler):
    """app.sampling.batched against diffusers' per-request step, both on the GPU, the same forwards: equal to
    the bit, as on the CPU (tests/sampling/test_batched.py). DDIM and DDPM at s = 7.5 clip their x0; the
    ancestral samplers' noise is drawn on the host by each image's generator on both paths."""
    guidance = DEFAULT_GUIDANCE if sampler == "dpmpp_2m_karras" else GuidanceParams(7.5)
    spec = SampleSpec(class_label=6, seeds=(0, 1, 2), steps=20, sampler=sampler, guidance=guidance)
    together, alone = draw(models["cuda"], spec), draw(models["cuda"], spec, per_request=True)
    assert together.table is not None and level_diff(together.images(), alone.images()) == 0
    assert torch.equal(together.latents, alone.latents), (together.latents - alone.latents).abs().max()


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "ddim", "ddpm", "euler_a"])
def test_the_default_request_steps_without_a_host_device_sync(models, sampler):
    """torch.cuda.set_sync_debug_mode('error') over 20 steps of four requests, graphs replayed: the step loop
    neither waits for the card nor makes it wait (reading the finished images is the caller's)."""
    loaded = models["cuda"]
    m = loaded.manifest
    fast = FastDenoiser(model_denoiser(loaded), torch.device("cuda"), cuda_graphs=True, max_rows=16)
    draw(loaded, SampleSpec(class_label=0, seeds=(0, 1, 2, 3), steps=20, sampler=sampler), denoiser=fast)
    runs = [
        SampleRun(SampleSpec(class_label=c, seeds=(c,), steps=20, sampler=sampler), loaded.scheduler_config,
                  m.sample_shape, m.null_label, device="cuda")
        for c in range(4)
    ]  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(fast, runs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.done and r.latents.isfinite().all() for r in runs)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a", "ddim", "ddpm"])
def test_building_a_request_does_not_wait_for_the_gpu(models, sampler):
    """A request's SampleRun is built in the event loop's thread while the engine's keeps the GPU busy: its
    timesteps and noise are queued to the card (app/sampling/device.py), not copied with a stream sync that
    would hold the event loop for the forwards queued before it."""
    loaded = models["cuda"]
    m = loaded.manifest
    spec = SampleSpec(class_label=1, seeds=(0, 1), steps=20, sampler=sampler, guidance=DEFAULT_GUIDANCE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert run.timesteps.is_cuda and run.latents.is_cuda
    sample(model_denoiser(loaded), [run])
    assert run.latents.isfinite().all()


def test_autoguidance_replays_the_guides_cuda_graphs_and_draws_what_its_eager_forward_draws():
    """The default model guided by its guide, both served on the GPU: the guide's rows run through the guide's
    own captured graphs (warmed up as a served model), and the images equal those of the eager forwards (CUDA
    graphs off) within CUDA_FP32_LEVELS. Not run yet: no GPU was lent to the session that wrote it."""
    method = {"kind": "autoguidance", "guide": "fashion-mnist-guide", "scale": 2.0, "cfg": True}
    body = {"class_label": 6, "num_images": 3, "seed": 4, "guidance_scale": 2.0, "method": method}
    images = {}
    for graphs in (True, False):
        settings = Settings(device="cuda", models="fashion-mnist-cfg,fashion-mnist-guide", cuda_graphs=graphs)
        with TestClient(create_app(settings)) as client:
            info = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            assert info["fashion-mnist-guide"]["cuda_graphs"] is graphs
            assert info["fashion-mnist-cfg"]["guides"] == ["fashion-mnist-guide"]
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
            images[graphs] = r.json()["images"]
            rows = client.get("/metrics").text
            assert 'cfg_engine_forward_rows_total{kind="guide",model="fashion-mnist-cfg"} 60.0' in rows  # 3 x 20
    assert max(level_diff(a, b) for a, b in zip(images[True], images[False], strict=True)) <= CUDA_FP32_LEVELS
