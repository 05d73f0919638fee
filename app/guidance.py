"""Classifier-free guidance as pure tensor functions, and guidance-weight schedules over sampling steps.

Convention: the guidance scale s combines eps = eps_uncond + s * (eps_cond - eps_uncond).
s = 0 is the unconditional model, s = 1 the conditional model alone, s > 1 guidance.
Ho & Salimans (2022) write eps = (1 + w) * eps_cond - w * eps_uncond, so their w is s - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

ScheduleKind = Literal["constant", "linear", "cosine", "interval"]


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6 with w = s - 1)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def add_condition_noise(
    eps_cond: torch.Tensor, noise_level: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """eps_cond + noise_level * N(0, I), one generator per image (row). noise_level = 0 returns eps_cond."""
    if noise_level == 0:
        return eps_cond
    if generators is None:
        noise = torch.randn(eps_cond.shape, device=eps_cond.device, dtype=eps_cond.dtype)
    else:
        noise = torch.cat(
            [
                torch.randn((1, *eps_cond.shape[1:]), generator=g, device=g.device, dtype=eps_cond.dtype)
                for g in generators
            ]
        ).to(eps_cond.device)
    return eps_cond + noise_level * noise


def rescale_guidance(eps_cfg: torch.Tensor, eps_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale phi (Lin et al. 2023, sec. 3.4), computed by diffusers' rescale_noise_cfg:
    match the per-row std of eps_cond, then mix with the plain combine by phi."""
    if guidance_rescale == 0:
        return eps_cfg
    return rescale_noise_cfg(eps_cfg, eps_cond, guidance_rescale)


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale s_i varies over the sampling steps i = 0 .. N-1 (N = steps).

    constant: s_i = s
    linear:   s_i = s * (start + (end - start) * i / (N - 1))          (s_0 = s*start, s_{N-1} = s*end)
    cosine:   s_i = s * (end + (start - end) * 0.5 * (1 + cos(pi * i / N)))
              with start=1, end=min/max and s=max this is cosine annealing from max towards min;
              start < end gives the increasing variant.
    interval: s_i = s where start <= i / N < end, else 1 (no guidance): Kynkäänniemi et al. 2024,
              guidance applied in a limited interval of the trajectory (i / N = 0 is pure noise).
    """

    kind: ScheduleKind = "constant"
    start: float = 1.0
    end: float = 1.0

    def factor(self, i: int, num_steps: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            frac = i / (num_steps - 1) if num_steps > 1 else 0.0
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * i / num_steps))
        raise ValueError(f"factor() does not apply to schedule kind {self.kind!r}")

    def scale_at(self, guidance_scale: float, i: int, num_steps: int) -> float:
        if self.kind == "interval":
            return guidance_scale if self.start <= i / num_steps < self.end else 1.0
        return guidance_scale * self.factor(i, num_steps)

    def scales(self, guidance_scale: float, num_steps: int) -> list[float]:
        """The guidance scale of every step."""
        return [self.scale_at(guidance_scale, i, num_steps) for i in range(num_steps)]
