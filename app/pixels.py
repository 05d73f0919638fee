"""Samples as pixels: the model's output range [-1, 1] to uint8 images on the host."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# finished samples (N, C, h, w) -> uint8 images (N, H, W, C'): to_uint8, or a latent model's VAE decode
ImageDecoder = Callable[[torch.Tensor], np.ndarray]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W), as uint8 (N, H, W, C) on the host."""
    x = (x.float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
