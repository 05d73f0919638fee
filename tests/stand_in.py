"""The fast tier's stand-in for the shipped checkpoint: a checkpoint folder with the real one's interface (its
name, classes, null label, 1x28x28 samples and scheduler) whose UNet is tiny and seeded, so it is the same
model on every run. Its images are noise-like: tests whose subject is the model's numerics (bit-equal to
diffusers, batch invariance, the API equal to the library) stay on the real checkpoint (`integration`).

Tests opt in with the `stand_in` marker (docs/testing.md): the `loaded`, `denoiser` and `checkpoint_path`
fixtures then give the stand-in, and CFG_MODEL_STORE points at a store holding it, so `Settings()` serves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from app.config import DEFAULT_MODEL_PATH
from app.models import build_unet
from app.models.checkpoint import save_checkpoint

MANIFEST_FIELDS = ("name", "class_names", "null_label", "image_size", "in_channels", "prediction_type")


def save_stand_in(store: Path, real: Path = DEFAULT_MODEL_PATH, seed: int = 0) -> Path:
    """Write the stand-in as store/<the real checkpoint's folder name>; returns its folder."""
    manifest = json.loads((real / "manifest.json").read_text())
    scheduler = DDPMScheduler.from_config(json.loads((real / "scheduler" / "scheduler_config.json").read_text()))
    torch.manual_seed(seed)
    unet = build_unet(manifest["image_size"], len(manifest["class_names"]), block_out_channels=(8, 16))
    fields = {k: manifest[k] for k in MANIFEST_FIELDS}
    fields["training"] = {"stand_in": f"tests/stand_in.py: {real.name}'s interface, a seeded untrained UNet"}
    path = store / real.name
    save_checkpoint(path, unet, scheduler, fields)
    return path
