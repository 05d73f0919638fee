"""The conventions every guidance method shares, as pure tensor functions.

The guidance scale s combines eps = eps_uncond + s * (eps_cond - eps_uncond): s = 0 is the unconditional
model, s = 1 the conditional model alone, s > 1 guidance. Ho & Salimans (2022) write
eps = (1 + w) * eps_cond - w * eps_uncond, so their w is s - 1. Every function takes one request's rows;
tensors are (N, C, H, W) images or (N, D) embeddings.
"""

from __future__ import annotations

import math

import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg


def row_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row (image), shape (N,)."""
    return x.flatten(1).norm(dim=1)


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The denoised prediction D = (x - sqrt(1 - a) eps) / sqrt(a) of a VP model input x at alpha_bar a."""
    return (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The inverse of eps_to_x0: eps = (x - sqrt(a) D) / sqrt(1 - a)."""
    return (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)


def sigma_of(alpha_bar: float) -> float:
    """The noise level sigma = sqrt((1 - a) / a) of a VP timestep (Karras et al. 2022's sigma)."""
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def rescale_guidance(eps_cfg: torch.Tensor, eps_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale phi (Lin et al. 2023, sec. 3.4), computed by diffusers' rescale_noise_cfg:
    match the per-row std of eps_cond, then mix with the plain combine by phi."""
    if guidance_rescale == 0:
        return eps_cfg
    return rescale_noise_cfg(eps_cfg, eps_cond, guidance_rescale)
