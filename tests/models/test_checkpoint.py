"""The shipped checkpoint: layout, verification and loading."""

import json
import shutil

import pytest
import torch

from app.models import CheckpointError, load_checkpoint, sha256_file, verify_checkpoint
from app.models.checkpoint import WEIGHTS_NAME

pytestmark = pytest.mark.integration  # the shipped checkpoint itself


def copy(checkpoint_path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint_path, dst)
    return dst


def test_shipped_checkpoint_loads_and_matches_its_manifest(checkpoint_path, loaded):
    m = loaded.manifest
    assert m.class_names[0] == "T-shirt/top" and m.num_classes == 10 and m.null_label == 10
    assert m.image_size == 28 and m.prediction_type == "epsilon"
    assert "Fashion-MNIST" in m.training["data"]
    assert 0.1 <= m.training["p_uncond"] <= 0.2
    weights = checkpoint_path / "unet" / WEIGHTS_NAME
    assert sha256_file(weights) == m.weights_sha256
    assert weights.stat().st_size <= 25 * 2**20
    assert loaded.unet.config.num_class_embeds == 11 and not loaded.unet.training
    assert loaded.scheduler_config["_class_name"] == "DDPMScheduler"
    # It answers: eps has the input's shape and is finite.
    eps = loaded.unet(torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), class_labels=torch.tensor([3, 10])).sample
    assert eps.shape == (2, 1, 28, 28) and eps.isfinite().all()


def test_tampered_weights_are_refused(checkpoint_path, tmp_path):
    ckpt = copy(checkpoint_path, tmp_path)
    weights = ckpt / "unet" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fail verification") as err:
        load_checkpoint(ckpt)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize(
    "relpath", ["manifest.json", "unet/config.json", "scheduler/scheduler_config.json", f"unet/{WEIGHTS_NAME}"]
)
def test_missing_file_is_named(checkpoint_path, tmp_path, relpath):
    ckpt = copy(checkpoint_path, tmp_path)
    (ckpt / relpath).unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        verify_checkpoint(ckpt)
    assert str(ckpt / relpath) in str(err.value)


def test_corrupt_manifest_is_named(checkpoint_path, tmp_path):
    ckpt = copy(checkpoint_path, tmp_path)
    (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify_checkpoint(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(CheckpointError, match="wrong fields"):
        verify_checkpoint(ckpt)


def test_weights_are_safetensors_not_pickles(checkpoint_path):
    assert not list(checkpoint_path.rglob("*.bin")) and not list(checkpoint_path.rglob("*.pt"))
    header = (checkpoint_path / "unet" / WEIGHTS_NAME).read_bytes()[:9]
    assert header[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header
