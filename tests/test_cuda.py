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
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, sample
from tests.pngs import decode, level_diff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_FP32_LEVELS = 2
CUDA_DEFAULT_LEVELS = 8


@pytest.fixture(scope="module")
def models():
    return {device: load_checkpoint(DEFAULT_MODEL_PATH, device) for device in ("cpu", "cuda")}


def draw(loaded, spec: SampleSpec) -> SampleRun:
    m = loaded.manifest
    run = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, device=loaded.device)
    sample(model_denoiser(loaded), [run])
    return run


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
