"""Step skipping, the step cache of kind "skip" (app/sampling/cache.py's SkipParams): on its cached steps a
request runs no row at all, and the sampler steps on each image's reused denoised estimate.

At high noise a diffusion model's denoised estimate x0 = (x - sigma eps) / alpha changes slowly from step to step
(it is close to the class's mean image), while eps, which carries the noise of x itself, does not. So a skipped
step does not reuse eps: it reuses x0, that of the image's last full step (order 0) or its first-order forecast
from the last two, x0_1 + (x0_1 - x0_0)(s - s1)/(s1 - s0) in steps (order 1; plain reuse where those two are more
than `interval` steps apart), and hands the sampler eps = (x - alpha x0) / sigma for the image's own x at the
skipped step. The sampler's own eps-to-x0 conversion then gives back exactly that x0, whatever the sampler: alpha
and sigma are each step's as the sampler converts (app/sampling/schedulers.py's step_sigmas: Karras's sigmas
exactly, not rounded to a training timestep). The estimate is the request's guided one, after its guidance's
combine, so any guidance method skips the same way; each image keeps its own, so an image's steps never depend
on what it was batched with. It enters no network: any model, any precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.sampling.cache import HeldTensors, SkipParams


class HeldDenoised(HeldTensors):
    """One run's skipped steps (known in advance from its sigmas) and the denoised estimates of its last two full
    steps, one row per image."""

    def __init__(self, params: SkipParams, sigmas: Sequence[float], step_sigmas: Sequence[float]) -> None:
        """sigmas: the run's sigmas, which the schedule's band reads (as deepcache's does); step_sigmas: each
        step's sigma as its sampler converts eps to x0."""
        self.params = params
        self.skipped = frozenset(i for i, full in enumerate(params.full_steps(sigmas)) if full != i)
        self._sigmas = tuple(step_sigmas)
        self._held: list[tuple[int, torch.Tensor]] = []

    def skips(self, step: int) -> bool:
        """Whether step `step` runs no row and steps on the held estimate."""
        return step in self.skipped

    def _alpha_sigma(self, step: int) -> tuple[float, float]:
        """x = alpha x0 + sigma eps at this step, in the model input's (variance-preserving) scale."""
        alpha = (1.0 + self._sigmas[step] ** 2) ** -0.5
        return alpha, self._sigmas[step] * alpha

    def keep(self, step: int, x: torch.Tensor, eps: torch.Tensor) -> None:
        """A full step's model input and guided eps: keep its denoised estimate (and the one before it)."""
        alpha, sigma = self._alpha_sigma(step)
        self._held = [*self._held[-1:], (step, (x - sigma * eps) / alpha)]

    def denoised(self, step: int) -> torch.Tensor:
        """The estimate a skipped step takes: the last full step's, or at order 1 its forecast."""
        if not self._held:
            raise RuntimeError(f"step {step} skips, and no full step kept a denoised estimate before it")
        s1, x1 = self._held[-1]
        if self.params.order == 0 or len(self._held) < 2 or s1 - self._held[0][0] > self.params.interval:
            return x1
        s0, x0 = self._held[0]
        return x1 + (x1 - x0) * ((step - s1) / (s1 - s0))

    def eps(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """A skipped step's eps for its model input x: the one whose denoised estimate is the held one."""
        alpha, sigma = self._alpha_sigma(step)
        return (x - alpha * self.denoised(step)) / sigma

    def clear(self) -> None:
        self._held = []

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self._held]
