"""Checkpoint loading: verify, build, move to device. Nothing else."""

from app.models.checkpoint import (
    CheckpointError,
    LoadedModel,
    Manifest,
    build_unet,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "Manifest",
    "build_unet",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
]
