"""CFG_PRECISION, CFG_CHANNELS_LAST and CFG_COMPILE through the real app lifespan and the shipped checkpoint."""

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.models.fast import PrecisionError
from app.models.precision import cpu_has_int8_dot
from tests.pngs import level_diff

pytestmark = pytest.mark.integration  # precisions and layouts of the real model


def test_bf16_is_served_and_listed():
    with TestClient(create_app(Settings(device="cpu", precision="bf16", max_batch_rows=32))) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["precision"] == "bf16" and info["compile"] is False
        r = client.post("/generate", json={"class_label": 1, "num_images": 2, "steps": 4, "seed": 3})
        assert r.status_code == 200, r.text
        assert 'precision="bf16"' in client.get("/metrics").text


def test_default_precision_is_fp32():
    assert Settings().precision == "fp32" and Settings().compile is False and Settings().channels_last is True


def test_cuda_graphs_are_on_by_default_and_apply_on_a_gpu_only():
    """CFG_CUDA_GRAPHS defaults on; on the CPU the model is served uncaptured and /v1/models says so
    (tests/test_cuda.py serves them on a GPU)."""
    assert Settings().cuda_graphs is True
    with TestClient(create_app(Settings(device="cpu", max_batch_rows=32, warmup=False))) as client:
        assert client.get("/v1/models").json()["data"][0]["cuda_graphs"] is False


def test_channels_last_puts_the_unet_in_nhwc_and_changes_no_image():
    body = {"class_label": 4, "num_images": 2, "steps": 5, "seed": 8, "schedule": {"kind": "constant"}}
    served = {}
    for channels_last in (True, False):
        with TestClient(create_app(Settings(device="cpu", channels_last=channels_last, max_batch_rows=32))) as client:
            assert client.get("/v1/models").json()["data"][0]["channels_last"] is channels_last
            denoiser = client.app.state.service.model().client.engine.denoiser
            conv = denoiser.denoiser.unet.down_blocks[0].resnets[0].conv1.weight
            assert denoiser.channels_last is channels_last
            assert conv.is_contiguous(memory_format=torch.channels_last) is channels_last
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
            served[channels_last] = r.json()["images"]
    # NHWC sums in another order: the same images to one grey level.
    assert all(level_diff(a, b) <= 1 for a, b in zip(served[True], served[False], strict=True))


def test_fp16_on_the_cpu_fails_at_startup():
    app = create_app(Settings(device="cpu", precision="fp16", warmup=False))
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device.*use bf16 or fp32"):
        with TestClient(app):
            pass


@pytest.mark.skipif(not cpu_has_int8_dot(), reason="this CPU has no int8 dot products: int8 is refused here")
def test_int8_is_served_compiled_and_batch_invariant():
    """CFG_PRECISION=int8: calibrated and compiled by the warmup, listed, and a seed's image the same alone or
    batched with another (static activation scales)."""
    with TestClient(create_app(Settings(device="cpu", precision="int8", max_batch_rows=4, max_images=2))) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["precision"] == "int8" and info["compile"] is True
        denoiser = client.app.state.service.model().client.engine.denoiser
        assert denoiser._int8 is not None and denoiser.buckets == (2, 4)  # quantized by the warmup
        body = {"class_label": 7, "steps": 6, "seed": 21}
        one = client.post("/generate", json={**body, "num_images": 1})
        two = client.post("/generate", json={**body, "num_images": 2})
        assert one.status_code == two.status_code == 200, one.text + two.text
        assert level_diff(one.json()["images"][0], two.json()["images"][0]) <= 1
        assert 'precision="int8"' in client.get("/metrics").text
