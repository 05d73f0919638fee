"""Checkpoint loading: verify, build, move to device; importing diffusers folders into the model store; and the
attention perturbations a forward's rows may run with (attention.py)."""

from app.models.attention import (
    Perturbation,
    PerturbationError,
    PerturbationSupport,
    RowPerturbations,
    check_perturbation,
    perturbation_support,
)
from app.models.checkpoint import (
    CheckpointError,
    LoadedModel,
    Manifest,
    UNetDenoiser,
    build_dit,
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
from app.models.guides import guide_mismatch, guide_pairs
from app.models.labels import class_lookup, resolve_label
from app.models.latent import DiTDenoiser, ImageDecoder, decode_latents

__all__ = [
    "CheckpointError",
    "DiTDenoiser",
    "ImageDecoder",
    "LoadedModel",
    "Manifest",
    "Perturbation",
    "PerturbationError",
    "PerturbationSupport",
    "RowPerturbations",
    "UNetDenoiser",
    "build_dit",
    "build_unet",
    "check_perturbation",
    "class_lookup",
    "decode_latents",
    "guide_mismatch",
    "guide_pairs",
    "image_decoder",
    "load_checkpoint",
    "model_denoiser",
    "perturbation_support",
    "read_manifest",
    "resolve_label",
    "save_checkpoint",
    "sha256_file",
    "unet_denoiser",
    "verify_checkpoint",
]
