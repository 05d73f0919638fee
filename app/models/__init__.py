"""Checkpoint loading: verify, build, move to device; and importing diffusers folders into the model store."""

from app.models.checkpoint import (
    CheckpointError,
    LoadedModel,
    Manifest,
    UNetDenoiser,
    build_unet,
    image_decoder,
    load_checkpoint,
    model_denoiser,
    read_manifest,
    save_checkpoint,
    sha256_file,
    unet_denoiser,
    verify_checkpoint,
)
from app.models.labels import class_lookup, resolve_label
from app.models.latent import DiTDenoiser, ImageDecoder, decode_latents

__all__ = [
    "CheckpointError",
    "DiTDenoiser",
    "ImageDecoder",
    "LoadedModel",
    "Manifest",
    "UNetDenoiser",
    "build_unet",
    "class_lookup",
    "decode_latents",
    "image_decoder",
    "load_checkpoint",
    "model_denoiser",
    "read_manifest",
    "resolve_label",
    "save_checkpoint",
    "sha256_file",
    "unet_denoiser",
    "verify_checkpoint",
]
