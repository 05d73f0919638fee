"""Classifier-free guidance as pure tensor functions: the guidance methods, the condition noise
(the seed's eps noise and CADS), and guidance-weight schedules over sampling steps.

Convention: the guidance scale s combines eps = eps_uncond + s * (eps_cond - eps_uncond).
s = 0 is the unconditional model, s = 1 the conditional model alone, s > 1 guidance.
Ho & Salimans (2022) write eps = (1 + w) * eps_cond - w * eps_uncond, so their w is s - 1.
Every function takes one request's rows; tensors are (N, C, H, W) images or (N, D) embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import rescale_noise_cfg

ScheduleKind = Literal["constant", "linear", "cosine", "interval"]
MethodKind = Literal["cfg", "apg", "cfg_zero_star"]
NoiseScheduleKind = Literal["constant", "sigma", "guidance"]

METHOD_KINDS: tuple[str, ...] = MethodKind.__args__
NOISE_SCHEDULE_KINDS: tuple[str, ...] = NoiseScheduleKind.__args__


def _row_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row (image), shape (N,)."""
    return x.flatten(1).norm(dim=1)


# ---- combines -------------------------------------------------------------------------------------


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6 with w = s - 1)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def cfg_zero_star_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, eq. 7): a * eps_u + s * (eps_c - a * eps_u), a = <eps_c, eps_u> / |eps_u|^2
    per row, the scale that best fits eps_u to eps_c (diffusers' cfg_zero_star_scale). No zero-init:
    that part is for flow models."""
    alpha = cfg_zero_star_scale(eps_cond.flatten(1), eps_uncond.flatten(1))
    alpha = alpha.view(-1, *([1] * (eps_cond.ndim - 1)))
    return cfg_combine(eps_cond, alpha * eps_uncond, guidance_scale)


@dataclass(frozen=True)
class ApgOutput:
    pred: torch.Tensor  # the guided denoised prediction
    running_diff: torch.Tensor  # the momentum buffer after this step: the request keeps it
    parallel_norm: torch.Tensor  # |dD_par| per row, after momentum and the norm clamp
    orthogonal_norm: torch.Tensor  # |dD_orth| per row


def apg_combine(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    guidance_scale: float,
    *,
    eta: float,
    momentum: float,
    norm_threshold: float,
    running_diff: torch.Tensor | None = None,
) -> ApgOutput:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, Algorithm 1):
    D = D_c + (s - 1) * (dD_orth + eta * dD_par), where dD = D_c - D_u, averaged with momentum
    (dD + momentum * previous), clamped to norm_threshold (0: off), and split into its parts parallel and
    orthogonal to D_c. Meant for denoised (x0) predictions; eta = 1 without momentum or clamp is CFG."""
    diff = pred_cond - pred_uncond
    if running_diff is not None:
        diff = diff + momentum * running_diff
    running = diff
    dims = _row_dims(diff)
    if norm_threshold > 0:
        diff = diff * torch.clamp(norm_threshold / torch.linalg.vector_norm(diff, dim=dims, keepdim=True), max=1.0)
    unit = F.normalize(pred_cond.double(), dim=dims)
    parallel = (diff.double() * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = diff.double() - parallel
    update = (orthogonal + eta * parallel).to(diff.dtype)
    return ApgOutput(
        pred=pred_cond + (guidance_scale - 1) * update,
        running_diff=running,
        parallel_norm=row_norm(parallel).to(diff.dtype),
        orthogonal_norm=row_norm(orthogonal).to(diff.dtype),
    )


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


# ---- condition noise -----------------------------------------------------------------------------


def per_row_noise(shape: Sequence[int], generators: list[torch.Generator] | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) of shape (N, ...), row i drawn from generators[i] (so a row never depends on its batch)."""
    if generators is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=like.dtype) for g in generators]
    ).to(like.device)


def add_condition_noise(
    eps_cond: torch.Tensor, noise_level: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """eps_cond + noise_level * N(0, I), one generator per image (row). noise_level = 0 returns eps_cond."""
    if noise_level == 0:
        return eps_cond
    return eps_cond + noise_level * per_row_noise(eps_cond.shape, generators, eps_cond)


def noise_factors(
    kind: NoiseScheduleKind, sigmas: Sequence[float], scales: Sequence[float], guidance_scale: float
) -> list[float]:
    """The factor of noise_level at each step.

    constant: 1 (the seed's form: noise at every step, also the last ones, where nothing removes it);
    sigma:    sigma_i / sigma_0, following the sampler's noise level down to ~0 at the end;
    guidance: s_i / s, following the guidance schedule (no noise where there is no guidance).
    """
    if kind == "constant":
        return [1.0] * len(sigmas)
    if kind == "sigma":
        return [s / sigmas[0] for s in sigmas]
    if kind == "guidance":
        return [s / guidance_scale if guidance_scale else 0.0 for s in scales]
    raise ValueError(f"unknown noise schedule {kind!r}; choose one of {', '.join(NOISE_SCHEDULE_KINDS)}")


@dataclass(frozen=True)
class Cads:
    """Condition-annealed sampling (Sadat et al., ICLR 2024, arXiv 2310.17347): noise on the class
    embedding, full before tau2, annealed linearly to none at tau1 (t in [0, 1], 1 = pure noise)."""

    tau1: float = 0.6
    tau2: float = 0.9
    noise_scale: float = 0.25
    psi: float = 1.0

    def gamma(self, t: float) -> float:
        """gamma(t) of eq. 2: 1 (clean) for t <= tau1, 0 for t >= tau2, linear between."""
        if t <= self.tau1:
            return 1.0
        if t >= self.tau2:
            return 0.0
        return (self.tau2 - t) / (self.tau2 - self.tau1)


def cads_condition(y: torch.Tensor, gamma: float, noise: torch.Tensor, noise_scale: float, psi: float) -> torch.Tensor:
    """CADS (Sadat et al. 2024, eqs. 2-4): y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n, rescaled per row to
    y's mean and std and mixed back by psi. gamma = 1 returns y."""
    if gamma >= 1.0:
        return y
    y_hat = math.sqrt(gamma) * y + noise_scale * math.sqrt(1 - gamma) * noise
    if psi == 0:
        return y_hat
    mean, std = y.mean(dim=-1, keepdim=True), y.std(dim=-1, keepdim=True)
    rescaled = (y_hat - y_hat.mean(dim=-1, keepdim=True)) / y_hat.std(dim=-1, keepdim=True) * std + mean
    return psi * rescaled + (1 - psi) * y_hat


# ---- schedules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale s_i varies over the sampling steps i = 0 .. N-1 (N = steps).

    constant: s_i = s
    linear:   s_i = s * (start + (end - start) * i / (N - 1))          (s_0 = s*start, s_{N-1} = s*end)
    cosine:   s_i = s * (end + (start - end) * 0.5 * (1 + cos(pi * i / N)))
              with start=1, end=min/max and s=max this is cosine annealing from max towards min;
              start < end gives the increasing variant.
    interval: s_i = s where start <= i / N < end and sigma_min < sigma_i <= sigma_max, else 1 (no
              guidance): Kynkäänniemi et al. 2024, guidance in a limited interval of noise levels
              (i / N = 0 is pure noise; a missing sigma bound is no bound).
    """

    kind: ScheduleKind = "constant"
    start: float = 1.0
    end: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None

    def factor(self, i: int, num_steps: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            frac = i / (num_steps - 1) if num_steps > 1 else 0.0
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * i / num_steps))
        raise ValueError(f"factor() does not apply to schedule kind {self.kind!r}")

    def in_interval(self, i: int, num_steps: int, sigma: float | None) -> bool:
        if not self.start <= i / num_steps < self.end:
            return False
        if sigma is None:  # unknown noise level: the step may be guided
            return True
        above = self.sigma_min is None or sigma > self.sigma_min
        below = self.sigma_max is None or sigma <= self.sigma_max
        return above and below

    def scale_at(self, guidance_scale: float, i: int, num_steps: int, sigma: float | None = None) -> float:
        if self.kind == "interval":
            return guidance_scale if self.in_interval(i, num_steps, sigma) else 1.0
        return guidance_scale * self.factor(i, num_steps)

    def scales(self, guidance_scale: float, num_steps: int, sigmas: Sequence[float] | None = None) -> list[float]:
        """The guidance scale of every step. Without sigmas, a sigma interval counts every step as guided
        (an upper bound on the rows a request needs)."""
        return [
            self.scale_at(guidance_scale, i, num_steps, None if sigmas is None else sigmas[i]) for i in range(num_steps)
        ]


@dataclass(frozen=True)
class GuidanceMethod:
    """Which combine turns eps_cond and eps_uncond into the guided eps. The APG fields apply to apg."""

    kind: MethodKind = "cfg"
    eta: float = 0.0  # the paper's recommendation: drop the parallel part, which oversaturates
    momentum: float = -0.5  # the paper's negative momentum
    # |dD| is clamped per image, over all pixels in x0 space. SDXL's r = 15 does not carry over to 28x28
    # images in [-1, 1]: sweeps on the shipped model (docs/guidance.md) had FID fall as r fell from 16 to
    # 0.25 at s = 5 (2.7x to 0.96x that of s = 1), with accuracy 0.98-1.0 throughout.
    norm_threshold: float = 0.25
