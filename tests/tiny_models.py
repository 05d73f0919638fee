"""Tiny randomly initialised diffusers folders, built with diffusers' own constructors and save_pretrained:
a DiT pipeline (8x8x4 latents, a 16x16 RGB VAE) and class-conditional UNets. Real checkpoints of these
architectures are gigabytes and nothing may be downloaded here; the code paths are the same."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)

# ImageNet's first names as id2label writes them, and the two kinds of clash its 1000 names hold.
IMAGENET_HEAD = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark, man-eater"]


def tiny_dit(num_classes: int, learned_sigma: bool = True, seed: int = 0, num_layers: int = 2) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    # As diffusers' convert_dit_to_diffusers.py does: every block gets the original's one y_embedder table.
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    with torch.no_grad():
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.class_embedder.embedding_table.weight.copy_(table)
    return dit


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )


def save_dit_pipeline(path: Path, num_classes: int, id2label: dict[int, str] | None = None, **dit_kwargs) -> Path:
    """A DiTPipeline folder. save_pretrained does not write id2label (DiTPipeline keeps it out of its config);
    the Hub's DiT folders carry it in model_index.json, where from_pretrained reads it, so it is added there."""
    pipe = DiTPipeline(tiny_dit(num_classes, **dit_kwargs), tiny_vae(), DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(path)
    if id2label is not None:
        index = json.loads((path / "model_index.json").read_text())
        index["id2label"] = {str(k): v for k, v in id2label.items()}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def imagenet_like_names(count: int) -> dict[int, str]:
    return {i: IMAGENET_HEAD[i] if i < len(IMAGENET_HEAD) else f"class {i}, synonym {i}" for i in range(count)}


def tiny_unet(num_class_embeds: int | None, seed: int = 2, channels: int = 3, attention: bool = True) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        num_class_embeds=num_class_embeds,
        norm_num_groups=4,
        add_attention=attention,  # the mid block's self-attention
    )


def save_unet_pipeline(path: Path, num_class_embeds: int | None) -> Path:
    DDPMPipeline(tiny_unet(num_class_embeds), DDPMScheduler()).save_pretrained(path)
    return path
