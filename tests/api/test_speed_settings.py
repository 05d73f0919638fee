"""CFG_PRECISION and CFG_COMPILE through the real app lifespan and the shipped checkpoint."""

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.models.fast import PrecisionError


def test_bf16_is_served_and_listed():
    with TestClient(create_app(Settings(device="cpu", precision="bf16", max_batch_rows=32))) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["precision"] == "bf16" and info["compile"] is False
        r = client.post("/generate", json={"class_label": 1, "num_images": 2, "steps": 4, "seed": 3})
        assert r.status_code == 200, r.text
        assert 'precision="bf16"' in client.get("/metrics").text


def test_default_precision_is_fp32():
    assert Settings().precision == "fp32" and Settings().compile is False


def test_fp16_on_the_cpu_fails_at_startup():
    app = create_app(Settings(device="cpu", precision="fp16", warmup=False))
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device.*use bf16 or fp32"):
        with TestClient(app):
            pass
