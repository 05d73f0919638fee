"""Latent models: the DiT adapted to the sampler's Denoiser signature, and the VAE decode of finished latents.

DiT (Peebles & Xie 2023) as diffusers holds it (DiTTransformer2DModel): every block's adaLN-Zero has its own
timestep-and-label embedder, and the final layer reuses block 0's. Checkpoints converted from the original DiT
copy its one y_embedder table into every block, so they share one class embedding, which CADS can perturb.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

import app.models.first_block as first_block
from app.models.deepcache import RowsOut
from app.models.denoiser import HookedDenoiser, Hooks
from app.pixels import ImageDecoder, to_uint8  # noqa: F401  (ImageDecoder: re-exported)


@torch.inference_mode()
def vae_decode(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float, batch_size: int = 8) -> torch.Tensor:
    """Latents (N, C, h, w) -> images in [-1, 1] (N, 3, H, W), float32, decoded batch_size at a time to
    bound the decoder's activation memory (a 256x256 decode holds ~1 GB per image at 512 channels)."""
    # As in DiTPipeline and the Stable Diffusion pipelines: the diffusion model sees latents * scaling_factor.
    chunks = [vae.decode(chunk.to(vae.dtype) / scaling_factor).sample for chunk in latents.split(batch_size)]
    return torch.cat(chunks).float().clamp(-1, 1)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float, batch_size: int = 8) -> np.ndarray:
    """Latents (N, C, h, w) -> uint8 images (N, H, W, 3) on the host. Runs the VAE: call it in the model's thread."""
    return to_uint8(vae_decode(vae, latents, scaling_factor, batch_size))


class DiTDenoiser(HookedDenoiser):
    """Adapt a DiT to the sampler's Denoiser signature: (x, timesteps, class_labels[, embed_delta]) -> eps.

    eps_channels, where given, keeps that many leading output channels: a DiT with a learned variance outputs
    2C channels, eps then the variance, and the variance is dropped, as DiTPipeline does. embed_delta (rows, D)
    is added to every block's class embedding by forward hooks held only for that call (CADS); all of a
    model's forwards run in one thread."""

    def __init__(self, transformer: DiTTransformer2DModel, eps_channels: int | None = None) -> None:
        self.transformer = transformer
        self.eps_channels = eps_channels
        embedders = [block.norm1.emb.class_embedder for block in transformer.transformer_blocks]
        self.label_embedders = embedders
        self.embedding_tables: list[torch.nn.Embedding] = [e.embedding_table for e in embedders]
        first = self.embedding_tables[0].weight
        self.shared_class_embedding = all(torch.equal(first, table.weight) for table in self.embedding_tables[1:])

    @property
    def network(self) -> DiTTransformer2DModel:
        return self.transformer

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        out = self.transformer(x.to(dtype), timestep=timesteps, class_labels=class_labels).sample
        if self.eps_channels is not None:
            out = out[:, : self.eps_channels]
        return out.to(x.dtype)

    def cache_support(self) -> dict[str, str | None]:
        support = super().cache_support()
        try:
            first_block.check_first_block(self.transformer)
        except first_block.FirstBlockError as exc:
            return {**support, "first_block": str(exc)}
        return {**support, "first_block": None}

    def _forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
        hooks: Hooks,
    ) -> RowsOut:
        """first_block: every block computes its own class embedding from the rows it is given, so CADS's delta
        (whose hook adds one row per row of the whole forward) makes every row run every block, as perturbed
        rows do."""
        thresholds = cast(Sequence[float | None], settings)
        out = first_block.forward_rows(
            self.transformer, x, timesteps, class_labels, thresholds, cached, all_rows=hooks.delta or hooks.perturb
        )
        eps = out.eps if self.eps_channels is None else out.eps[:, : self.eps_channels]
        return replace(out, eps=eps.to(x.dtype))

    @torch.inference_mode()
    def class_embedding(self, label: int) -> torch.Tensor:
        """The model's embedding of one class label, shape (D,). ValueError where the blocks' tables differ
        (a DiT not converted from one y_embedder): CADS's rescaling is defined for one embedding."""
        if not self.shared_class_embedding:
            raise ValueError("CADS needs one class embedding; this DiT has a different one in each block")
        return self.embedding_tables[0].weight[label].float().clone()
