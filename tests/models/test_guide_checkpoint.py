"""The autoguidance guide shipped beside the default model (model_store/fashion-mnist-guide, docs/autoguidance.md):
a smaller, shorter-trained UNet of the same task, which the service serves beside the default with the same
classes, and which denoises worse than the default (what autoguidance needs of it: a weaker version of the same
model). Real checkpoints, real app."""

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.main import create_app
from app.models import load_checkpoint
from research.data import DatasetMissingError, load_fashion_mnist
from tests.pngs import decode

GUIDE_PATH = DEFAULT_MODEL_PATH.parent / "fashion-mnist-guide"
pytestmark = pytest.mark.integration  # the shipped checkpoints themselves


@pytest.fixture(scope="module")
def guide():
    return load_checkpoint(GUIDE_PATH, "cpu")  # verifies the weights' sha256 against the manifest


def test_the_guide_is_a_smaller_model_of_the_same_classes_and_noise_schedule(guide, loaded):
    assert guide.manifest.class_names == loaded.manifest.class_names
    assert guide.manifest.null_label == loaded.manifest.null_label
    assert guide.manifest.image_size == loaded.manifest.image_size
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert guide.scheduler_config[key] == loaded.scheduler_config[key], key
    assert tuple(guide.unet.config.block_out_channels) == (16, 32, 64)
    assert tuple(loaded.unet.config.block_out_channels) == (32, 64, 128)
    size = sum(p.numel() for p in guide.unet.parameters())
    assert size < sum(p.numel() for p in loaded.unet.parameters()) / 3


def test_the_guide_denoises_worse_than_the_default_but_far_better_than_nothing(guide, loaded):
    try:
        images, labels = load_fashion_mnist("test")
    except DatasetMissingError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(0)
    x0, y = images[:256], labels[:256]
    t = torch.randint(50, 950, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    betas = torch.linspace(loaded.scheduler_config["beta_start"], loaded.scheduler_config["beta_end"], 1000)
    a = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

    def mse(model) -> float:
        with torch.no_grad():
            return float(((model.unet(x_t, t, class_labels=y).sample - noise) ** 2).mean())

    guide_mse, default_mse = mse(guide), mse(loaded)
    assert default_mse < guide_mse < 0.5, (default_mse, guide_mse)  # eps = 0 scores 1.0


def test_the_service_serves_the_guide_beside_the_default():
    settings = Settings(models="fashion-mnist-cfg,fashion-mnist-guide", warmup=False, request_timeout_s=120)
    with TestClient(create_app(settings)) as client:
        data = client.get("/v1/models").json()["data"]
        assert [m["name"] for m in data] == ["fashion-mnist-cfg", "fashion-mnist-guide"]
        assert data[1]["class_names"] == data[0]["class_names"] and data[1]["null_label"] == data[0]["null_label"]
        body = {"class_label": "Sneaker", "steps": 8, "seed": 3}
        r = client.post("/generate", json={**body, "model": "fashion-mnist-guide"})
        assert r.status_code == 200, r.text
        default = client.post("/generate", json=body).json()
        guided_by_guide, by_default = decode(r.json()["images"][0]), decode(default["images"][0])
        assert r.json()["model"] == "fashion-mnist-guide" and guided_by_guide.shape == by_default.shape == (28, 28)
        assert abs(guided_by_guide.astype(int) - by_default.astype(int)).max() >= 3  # another network drew it
