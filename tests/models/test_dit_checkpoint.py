"""The small pixel-space DiT shipped beside the default model (model_store/fashion-mnist-dit, trained by
`python -m research.train --arch dit`): the transformer on which First-Block Cache's quality is judged
(docs/caching.md). Served beside the default with the same classes; a first_block request over HTTP skips rows
and moves the images further from the uncached ones as its threshold rises. Real checkpoint, real app."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.main import create_app
from app.models import load_checkpoint
from tests.metrics import metric_value
from tests.pngs import decode

DIT_PATH = DEFAULT_MODEL_PATH.parent / "fashion-mnist-dit"
pytestmark = pytest.mark.integration  # the shipped checkpoint itself


def test_the_dit_is_a_pixel_space_transformer_of_the_default_s_classes(loaded):
    dit = load_checkpoint(DIT_PATH, "cpu")  # verifies the weights' sha256 against the manifest
    assert dit.manifest.kind == "dit" and not dit.manifest.latent
    assert dit.manifest.class_names == loaded.manifest.class_names
    assert dit.manifest.null_label == loaded.manifest.null_label
    assert dit.manifest.sample_shape == loaded.manifest.sample_shape == (1, 28, 28)
    assert len(dit.transformer.transformer_blocks) == 6


def test_served_beside_the_default_first_block_skips_rows_and_its_threshold_sets_how_far_the_images_move():
    settings = Settings(models="fashion-mnist-cfg,fashion-mnist-dit", warmup=False)
    with TestClient(create_app(settings)) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["fashion-mnist-dit"]["cache"]["kinds"] == ["none", "first_block", "uncond", "skip"]
        drawn = {}
        for threshold in (None, 0.05, 0.3):
            body = {"model": "fashion-mnist-dit", "class_label": "Sneaker", "num_images": 4, "seed": 3}
            if threshold is not None:
                body["cache"] = {"kind": "first_block", "threshold": threshold}
            r = client.post("/generate", json=body, headers={"Accept": "application/json"})
            assert r.status_code == 200, r.text
            drawn[threshold] = np.stack([decode(image) for image in r.json()["images"]]).astype(float)
        metrics = client.get("/metrics").text
    shallow = metric_value(metrics, 'cfg_engine_path_rows_total{model="fashion-mnist-dit",path="shallow"}')
    assert shallow > 0  # rows skipped the blocks after the first
    near, far = (np.abs(drawn[t] - drawn[None]).mean() for t in (0.05, 0.3))
    assert 0 < near < far, (near, far)  # grey levels (docs/caching.md: PSNR 31 dB at 0.05, 17 dB at 0.3)
