"""Noise on the condition, per request: the seed's noise on the conditional prediction, and CADS's noise on
the class embedding. Both are Conditioners, built per request with the request's own StackedRandom: one
may change the conditional rows' class embedding before a forward (embed_delta), the other the conditional
prediction after it (eps_cond); a step runs every conditioner of its request at both points."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.rng import StackedRandom

NoiseScheduleKind = Literal["constant", "sigma", "guidance"]
NOISE_SCHEDULE_KINDS: tuple[str, ...] = get_args(NoiseScheduleKind)


def add_condition_noise(eps_cond: torch.Tensor, noise_level: float, rng: StackedRandom) -> torch.Tensor:
    """eps_cond + noise_level * N(0, I), row i drawn by image i's generator. noise_level = 0 returns eps_cond."""
    if noise_level == 0:
        return eps_cond
    return eps_cond + noise_level * rng.randn_like(eps_cond)


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


class Cads(BaseModel):
    """Condition-annealed sampling (Sadat et al., ICLR 2024, arXiv 2310.17347): noise on the class embedding
    of the conditional rows, full where t >= tau2, annealed linearly to none at t <= tau1 (t = timestep / 1000,
    1 = pure noise). One model for the engine and the API (a request's `cads`): frozen, validated, hashable."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    tau1: float = Field(0.6, ge=0, le=1, description="no condition noise at t <= tau1")
    tau2: float = Field(0.9, ge=0, le=1, description="full condition noise at t >= tau2")
    noise_scale: float = Field(0.25, ge=0, le=10, description="s: std of the embedding noise")
    psi: float = Field(1.0, ge=0, le=1, description="mix of the rescaled embedding (1: fully rescaled)")

    @model_validator(mode="after")
    def _ordered(self) -> Cads:
        if self.tau1 > self.tau2:
            raise ValueError(f"cads.tau1 ({self.tau1:g}) must not exceed cads.tau2 ({self.tau2:g})")
        return self

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


class Conditioner:
    """One request's noise on its condition. step is the step's index, t its timestep as a fraction of the
    training timesteps (1 = pure noise)."""

    embeds: bool = False  # whether embed_delta may return a delta (its timestep is then read on the host)

    def embed_delta(self, step: int, t: float) -> torch.Tensor | None:
        """The change to the conditional rows' class embedding before the forward (None: none)."""
        return None

    def eps_cond(self, step: int, eps_cond: torch.Tensor) -> torch.Tensor:
        """The conditional prediction after the forward, before the guidance combine."""
        return eps_cond


class ConditionNoise(Conditioner):
    """The seed's form 2: eps_cond + noise_level * factor_i * N(0, I) (factors: noise_factors)."""

    def __init__(self, noise_level: float, factors: Sequence[float], rng: StackedRandom) -> None:
        self.noise_level, self.factors, self.rng = noise_level, factors, rng

    def eps_cond(self, step: int, eps_cond: torch.Tensor) -> torch.Tensor:
        return add_condition_noise(eps_cond, self.noise_level * self.factors[step], self.rng)


class CadsConditioner(Conditioner):
    """CADS on the request's class embedding y (N, D): the delta cads_condition(y) - y at each noisy step."""

    embeds = True

    def __init__(self, cads: Cads, class_embedding: torch.Tensor, rng: StackedRandom) -> None:
        self.cads, self.y, self.rng = cads, class_embedding, rng

    def embed_delta(self, step: int, t: float) -> torch.Tensor | None:
        gamma = self.cads.gamma(t)
        if gamma >= 1.0:
            return None
        noise = self.rng.randn_like(self.y)
        return cads_condition(self.y, gamma, noise, self.cads.noise_scale, self.cads.psi) - self.y
