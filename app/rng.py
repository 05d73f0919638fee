"""Per-image randomness: one seeded generator per image, as NVlabs/edm's StackedRandomGenerator.

Every random draw of a request goes through its StackedRandom: the initial noise, the ancestral samplers'
noise, the condition noise on eps and CADS's noise on the class embedding. Row i of every draw comes from
image i's own generator, so an image depends on its seed and settings, never on what it is batched with.
The generators live on the host whatever the device, so a seed draws the same noise on a GPU as on the CPU
(diffusers' randn_tensor draws on the host and moves it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


class StackedRandom:
    """One torch.Generator per image, seeded from the image's seed."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, I) of shape (len(self), *shape) on the host, row i from generator i: the same draws as
        diffusers' randn_tensor with the generator list (and hence as a scheduler's step given it)."""
        return randn_tensor((len(self), *shape), generator=self.generators, device=torch.device("cpu"), dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, I) shaped as x (one row per image), drawn on the host and moved to x's device."""
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)
