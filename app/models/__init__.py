"""Checkpoint loading: verify, build, move to device. Nothing else."""

from app.models.checkpoint import (
    CheckpointError,
    LoadedModel,
    Manifest,
    build_unet,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    unet_denoiser,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "Manifest",
    "build_unet",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
    "unet_denoiser",
    "verify_checkpoint",
]
