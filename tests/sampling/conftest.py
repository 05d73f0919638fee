"""The sampling tests' shared fixtures."""

from __future__ import annotations

import pytest

from app.config import DEFAULT_MODEL_PATH
from app.models import load_checkpoint, unet_denoiser

GUIDE = "fashion-mnist-guide"  # the shipped guide model (autoguidance)


@pytest.fixture(scope="module")
def guides():
    """The guide models autoguidance requests name, by name: the shipped one."""
    return {GUIDE: unet_denoiser(load_checkpoint(DEFAULT_MODEL_PATH.parent / GUIDE, "cpu").unet)}
