"""One request's sampling state, and one denoiser call shared by many requests.

Every step puts the conditional and unconditional rows of all requests in ONE tensor, with
per-row timesteps and labels, so requests at different steps (and with different samplers)
share a forward pass. Each request keeps its own scheduler instance and its own generators
(one per image), so an image never depends on what it was batched with (as in NVlabs/edm's
StackedRandomGenerator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from app.guidance import GuidanceSchedule, add_condition_noise, cfg_combine, rescale_guidance
from app.sampling.schedulers import DEFAULT_SAMPLER, make_scheduler, set_timesteps

# (x, timesteps, class_labels) -> eps, all with the same leading row dimension.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GuidanceParams:
    guidance_scale: float = 3.0
    schedule: GuidanceSchedule = field(default_factory=GuidanceSchedule)
    noise_level: float = 0.0
    guidance_rescale: float = 0.0


@dataclass(frozen=True)
class SampleSpec:
    """What to draw: the engine's own request type, free of HTTP schemas."""

    class_label: int | None  # None: unconditional
    seeds: tuple[int, ...]  # one per image
    steps: int = 20
    sampler: str = DEFAULT_SAMPLER
    guidance: GuidanceParams = field(default_factory=GuidanceParams)

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class ModelInput:
    x: torch.Tensor
    timesteps: torch.Tensor
    class_labels: torch.Tensor

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class SampleRun:
    """A request's sampler state: scheduler instance, latents, generators and step index."""

    def __init__(
        self,
        spec: SampleSpec,
        scheduler_config: dict,
        image_shape: tuple[int, int, int],
        null_label: int,
        device: torch.device | str = "cpu",
    ) -> None:
        device = torch.device(device)
        self.spec = spec
        self.null_label = null_label
        self.scheduler = make_scheduler(spec.sampler, scheduler_config)
        set_timesteps(self.scheduler, spec.steps, device)
        self.timesteps = self.scheduler.timesteps
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in spec.seeds]
        n = spec.num_images
        latents = randn_tensor((n, *image_shape), generator=self.generators, device=device)
        self.latents = latents * self.scheduler.init_noise_sigma
        self.scales = spec.guidance.schedule.scales(spec.guidance.guidance_scale, spec.steps)
        label = null_label if spec.class_label is None else spec.class_label
        self._cond_labels = torch.full((n,), label, dtype=torch.long, device=device)
        self._null_labels = torch.full((n,), null_label, dtype=torch.long, device=device)
        self.step_index = 0

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    def needs_uncond(self) -> bool:
        """The unconditional rows are skipped where the weight is exactly 1, or there is no class."""
        return self.spec.class_label is not None and self.scales[self.step_index] != 1.0

    def rows_needed(self) -> int:
        return self.spec.num_images * (2 if self.needs_uncond() else 1)

    def model_input(self) -> ModelInput:
        t = self.timesteps[self.step_index]
        x = self.scheduler.scale_model_input(self.latents, t)
        labels = self._cond_labels
        if self.needs_uncond():
            x = torch.cat([x, x])
            labels = torch.cat([self._cond_labels, self._null_labels])
        timesteps = t.expand(x.shape[0]).to(x.device)
        return ModelInput(x=x, timesteps=timesteps, class_labels=labels)

    def guided_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """Apply the condition noise, the combine and the rescale to this request's model output."""
        g = self.spec.guidance
        n = self.spec.num_images
        eps_cond = add_condition_noise(eps[:n], g.noise_level, self.generators)
        if eps.shape[0] == n:
            return eps_cond
        eps_cfg = cfg_combine(eps_cond, eps[n:], self.scales[self.step_index])
        return rescale_guidance(eps_cfg, eps_cond, g.guidance_rescale)

    def advance(self, eps: torch.Tensor) -> None:
        """One sampler step, given the model's output for this request's rows of the shared batch."""
        t = self.timesteps[self.step_index]
        out = self.scheduler.step(self.guided_eps(eps), t, self.latents, generator=self.generators)
        self.latents = out.prev_sample
        self.step_index += 1

    def images(self) -> np.ndarray:
        """The finished images as uint8, shape (N, H, W, C)."""
        x = (self.latents.clamp(-1, 1) + 1) * 127.5
        return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def denoise_step(denoiser: Denoiser, runs: Sequence[SampleRun]) -> int:
    """ONE forward over the rows of all runs, then each run advances its own sampler. Returns rows."""
    inputs = [r.model_input() for r in runs]
    eps = denoiser(
        torch.cat([i.x for i in inputs]),
        torch.cat([i.timesteps for i in inputs]),
        torch.cat([i.class_labels for i in inputs]),
    )
    offset = 0
    for run, inp in zip(runs, inputs, strict=True):
        run.advance(eps[offset : offset + inp.rows])
        offset += inp.rows
    return offset


def sample(denoiser: Denoiser, runs: Sequence[SampleRun], on_step: Callable[[], None] | None = None) -> None:
    """Step all runs together until each is done; runs drop out as they finish.

    on_step, if given, is called after each forward (a progress bar's update, say)."""
    active = [r for r in runs if not r.done]
    while active:
        denoise_step(denoiser, active)
        active = [r for r in active if not r.done]
        if on_step is not None:
            on_step()
