"""Fixtures of tiny diffusers checkpoints (tests/tiny_models.py builds them), imported into a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models import LoadedModel, load_checkpoint
from app.models.importer import import_model
from tests.tiny_models import imagenet_like_names, save_dit_pipeline


@pytest.fixture(scope="session")
def dit_source(tmp_path_factory) -> Path:
    """A DiT pipeline with 1000 classes (so DiTPipeline's hard-coded null label 1000 is the model's own) and
    ImageNet-style id2label."""
    return save_dit_pipeline(tmp_path_factory.mktemp("src") / "dit", 1000, imagenet_like_names(1000))


@pytest.fixture(scope="session")
def dit_checkpoint(dit_source, tmp_path_factory) -> Path:
    dst, _ = import_model(dit_source, "tiny-dit", tmp_path_factory.mktemp("store"))
    return dst


@pytest.fixture(scope="session")
def dit_loaded(dit_checkpoint) -> LoadedModel:
    return load_checkpoint(dit_checkpoint, "cpu")
