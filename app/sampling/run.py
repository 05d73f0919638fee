"""One request's sampling state (SampleRun): its scheduler, latents, generators and guidance state.

Every step puts the conditional rows of all requests, and the rows of the branches their guidance takes
(unconditional rows, rows with perturbed attention), in ONE tensor, with per-row timesteps and labels, so
requests at different steps (and with different samplers) share a forward pass. Each request keeps its own
scheduler instance and its own generators (one per image), so an image never depends on what it was batched
with (as in NVlabs/edm's StackedRandomGenerator). Autoguidance's rows go through another network, the guide
model: one more forward per guide in the same step, over the conditional rows of the requests it guides.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch

from app.guidance import (
    Branch,
    CadsConditioner,
    Conditioner,
    ConditionNoise,
    GuidanceStep,
    eps_to_x0,
    guidance_scales,
    make_guider,
    noise_factors,
    rescale_guidance,
    row_norm,
)
from app.pixels import ImageDecoder, to_uint8
from app.rng import StackedRandom
from app.sampling.batched import step_table
from app.sampling.cache import CachePlan, GuidanceDeltas, SkipParams, make_row_cache, uncond_params
from app.sampling.device import to_device
from app.sampling.schedulers import (
    config_key,
    device_timesteps,
    request_scheduler,
    schedule_values,
    step_kwargs,
    step_sigmas,
    timed_scheduler,
)
from app.sampling.skip import HeldDenoised
from app.sampling.spec import (
    MAIN_BRANCHES,
    ClassEmbedding,
    ModelInput,
    Preview,
    SampleSpec,
    StepTrace,
    perturbation_of,
    steps_together,
)


class SampleRun:
    """A request's sampler state: scheduler instance, latents, generators, step index, and the guidance
    state that belongs to this request alone (APG's momentum buffer, the trace)."""

    def __init__(
        self,
        spec: SampleSpec,
        scheduler_config: dict,
        image_shape: tuple[int, int, int],
        null_label: int,
        device: torch.device | str = "cpu",
        class_embedding: ClassEmbedding | None = None,
        decode: ImageDecoder | None = None,
        together: bool = True,
    ) -> None:
        """decode maps samples (N, C, h, w) to uint8 images (N, H, W, C'): a latent model's VAE; the default
        reads the samples as pixels in [-1, 1]. together=False keeps the request on its own diffusers
        scheduler's step even where app.sampling.batched reproduces it (the reference, for tests and benches)."""
        device = torch.device(device)
        self.decode = decode or to_uint8
        g = spec.guidance
        self.spec = spec
        self.null_label = null_label
        key = config_key(scheduler_config)
        # Requests whose whole step app.sampling.batched reproduces (plain CFG, and each sampler on the schedulers
        # it reproduces: this project's all) are stepped there, all together. Decided once: a run never switches
        # paths. Such a run's scheduler is never stepped, only read: every request of its schedule shares one.
        batched = together and steps_together(spec)
        self.table = step_table(spec.sampler, key, spec.steps) if batched else None
        if self.table is not None:
            self.scheduler = timed_scheduler(spec.sampler, key, spec.steps)
            self.timesteps = device_timesteps(spec.sampler, key, spec.steps, device)
        else:
            self.scheduler = request_scheduler(spec.sampler, scheduler_config, spec.steps, device)
            self.timesteps = self.scheduler.timesteps
        self._step_kwargs = step_kwargs(spec.sampler)
        self.rng = StackedRandom(spec.seeds)
        # This runs in the event loop's thread while the engine's keeps the device busy: nothing here may wait
        # for the device (app/sampling/device.py), so the noise is drawn on the host and queued to it.
        latents = to_device(self.rng.randn(image_shape), device)
        self.latents = latents * self.scheduler.init_noise_sigma
        # alpha_bar and sigma of each step, on the host: the x0 mapping and the schedules use them.
        alpha_bars, sigmas = schedule_values(spec.sampler, key, spec.steps)
        self.alpha_bars, self.sigmas = list(alpha_bars), list(sigmas)
        self.scales = list(guidance_scales(g.schedule, g.guidance_scale, spec.steps, sigmas))
        self.guider = make_guider(g.method, self.scales)
        self.perturbation = perturbation_of(g.method)  # what the "perturbed" rows get, if the method has them
        self.noise_factors = noise_factors(g.noise_schedule, self.sigmas, self.scales, g.guidance_scale)
        self._num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.label = null_label if spec.class_label is None else spec.class_label
        self.conditioners = self._conditioners(class_embedding, device)
        self.scaled_input: torch.Tensor | None = None
        self.x0_prev: torch.Tensor | None = None  # the batched DPM-Solver++ 2M's history (its m1)
        self.trace: list[StepTrace] = []
        self.preview: Preview | None = None
        self.step_index = 0
        self.cache = None if spec.cache is None else make_row_cache(spec.cache, self.sigmas)
        # A skip cache's steps that run no row (app/sampling/skip.py).
        self.skip: HeldDenoised | None = None
        if isinstance(spec.cache, SkipParams):
            self.skip = HeldDenoised(spec.cache, self.sigmas, step_sigmas(spec.sampler, key, spec.steps))
        # A cache that reuses CFG's guidance difference on some guided steps, which then run no unconditional rows.
        self.deltas: GuidanceDeltas | None = None
        if (reuse := uncond_params(spec.cache)) is not None:
            guided = [i for i in range(spec.steps) if "uncond" in self._guider_branches(i) and not self.skips(i)]
            self.deltas = GuidanceDeltas(reuse, guided)
        self.shallow_rows = 0  # its rows that ran only the shallow path at its last step (a step cache's)

    def _conditioners(self, class_embedding: ClassEmbedding | None, device: torch.device) -> list[Conditioner]:
        """The request's noise on its condition: the seed's on eps_cond, CADS's on the class embedding."""
        g, n = self.spec.guidance, self.spec.num_images
        conditioners: list[Conditioner] = []
        if g.noise_level != 0:
            conditioners.append(ConditionNoise(g.noise_level, self.noise_factors, self.rng))
        if g.cads is not None and self.spec.class_label is not None:
            if class_embedding is None:
                raise ValueError("CADS needs the model's class embedding; this model does not expose one")
            y = class_embedding(self.spec.class_label).to(device).expand(n, -1)
            conditioners.append(CadsConditioner(g.cads, y, self.rng))
        return conditioners

    @property
    def done(self) -> bool:
        return self.step_index >= self.spec.steps

    def _guider_branches(self, i: int) -> tuple[Branch, ...]:
        """The guider's predictions at step i, without the unconditional one for a request without a class."""
        branches = self.guider.branches(i)
        return branches if self.spec.class_label is not None else tuple(b for b in branches if b != "uncond")

    def branches(self, i: int) -> tuple[Branch, ...]:
        """The predictions step i takes beside eps_cond, in their rows' order: the guider's, without the
        unconditional one where the request has no class or reuses its guidance difference at step i; none at
        a step it skips."""
        if self.skips(i):
            return ()
        branches = self._guider_branches(i)
        return tuple(b for b in branches if b != "uncond") if self.reuses_uncond(i) else branches

    def skips(self, i: int) -> bool:
        """Step i runs no row: a skip cache steps on the held denoised estimate (app/sampling/skip.py)."""
        return self.skip is not None and self.skip.skips(i)

    def skipped_eps(self) -> torch.Tensor:
        """A skipped step's eps, from the held denoised estimate and this step's model input."""
        if self.skip is None:
            raise RuntimeError("a run without a skip cache skips no step")
        return self.skip.eps(self.step_index, self._step_input())

    def reuses_uncond(self, i: int) -> bool:
        """Step i takes eps_uncond from the request's held guidance difference (an uncond cache) and runs no
        unconditional rows."""
        return self.deltas is not None and self.deltas.reuses(i)

    def reused_uncond_rows(self) -> int:
        """This step's unconditional rows not run because the request reuses its guidance difference."""
        return self.spec.num_images if self.reuses_uncond(self.step_index) else 0

    def uncond_estimate(self, eps_cond: torch.Tensor) -> torch.Tensor:
        """This step's unconditional prediction where it reuses the guidance difference: eps_cond - d."""
        if self.deltas is None:
            raise RuntimeError("a run without an uncond cache has no guidance difference to reuse")
        return eps_cond - self.deltas.delta(self.step_index)

    def keep_delta(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> None:
        """This step ran the unconditional rows: an uncond cache keeps their difference from the conditional."""
        if self.deltas is not None:
            self.deltas.keep(self.step_index, eps_cond - eps_uncond)

    def _guided(self, i: int) -> bool:
        """Step i runs the unconditional rows: where the guider needs them, and only with a class."""
        return "uncond" in self.branches(i)

    def needs_uncond(self) -> bool:
        return self._guided(self.step_index)

    def needs_perturbed(self) -> bool:
        """This step runs rows with perturbed attention (an attention-guidance method's)."""
        return "perturbed" in self.branches(self.step_index)

    def _main_rows(self, i: int) -> int:
        """Step i's rows in the main model's forward: the conditional rows and those of MAIN_BRANCHES."""
        if self.skips(i):
            return 0
        return self.spec.num_images * (1 + sum(b in MAIN_BRANCHES for b in self.branches(i)))

    def _guide_rows(self, i: int) -> int:
        """Step i's rows in the guide model's forward (autoguidance): the conditional rows again, or none."""
        return self.spec.num_images if "guide" in self.branches(i) else 0

    def skipped_uncond_rows(self) -> int:
        """This step's unconditional rows not run because CFG's weight here is exactly 1 (an interval schedule):
        none for a request without a class, or whose method does not use CFG (attention guidance or autoguidance
        without cfg never asks for them)."""
        guided = self.spec.class_label is not None and self.guider.uses_cfg
        i = self.step_index
        skipped = guided and not self.skips(i) and not self.needs_uncond() and self.scales[i] == 1.0
        return self.spec.num_images if skipped else 0

    def rows_needed(self) -> int:
        """This step's rows in the main model's forward."""
        return self._main_rows(self.step_index)

    def guide_rows_needed(self) -> int:
        """This step's rows in the guide model's forward."""
        return self._guide_rows(self.step_index)

    def tick_steps(self) -> list[int]:
        """The steps still to take that each take a tick of the engine's: the steps that run rows, and the last
        step where it runs none. An engine's tick first takes a request's steps that run no row (a skip cache's),
        then its next step that runs rows, in one forward with the others' (app/engine/engine.py)."""
        steps = range(self.step_index, len(self.scales))
        ticks = [i for i in steps if not self.skips(i)]
        if steps and self.skips(steps[-1]):
            ticks.append(steps[-1])
        return ticks

    def rows_profile(self) -> np.ndarray:
        """The main forward's rows at each tick still to take (tick_steps), known in advance from the weight
        schedule and the cache."""
        return np.array([self._main_rows(i) for i in self.tick_steps()], dtype=np.int64)

    def guide_rows_profile(self) -> np.ndarray:
        """The guide forward's rows at each tick still to take."""
        return np.array([self._guide_rows(i) for i in self.tick_steps()], dtype=np.int64)

    def admission_profile(self) -> np.ndarray:
        """The rows of each tick still to take, in every forward (main and guide): what admission counts
        against max_batch_rows. A guide row counts as a full row, though the shipped guide costs about a
        quarter of one: the bound then holds for each forward, and a compiled guide's buckets cover it."""
        return self.rows_profile() + self.guide_rows_profile()

    def row_kinds(self) -> tuple[str, ...]:
        """This step's kinds of rows in the main forward, in their order: the conditional, then MAIN_BRANCHES'."""
        return ("cond", *(b for b in self.branches(self.step_index) if b in MAIN_BRANCHES))

    def cache_plan(self) -> CachePlan | None:
        """This step's rows' branches and cached features (app/sampling/cache.py); None without a cache."""
        if self.cache is None:
            return None
        return self.cache.plan(self.step_index, self.row_kinds(), self.spec.num_images)

    def keep_cache(self, deep: tuple[torch.Tensor | None, ...], shallow: tuple[bool, ...]) -> None:
        """The step's forward gave these features (or states) for this run's rows, and ran these rows only on
        their shallow path (before advance)."""
        self.shallow_rows = sum(shallow)
        if self.cache is not None:
            self.cache.keep(self.step_index, deep)

    def release(self) -> None:
        """Free what the run holds beyond its latents: its cached features, guidance differences and denoised
        estimates (it finished, or left the engine)."""
        for held in (self.cache, self.deltas, self.skip):
            if held is not None:
                held.clear()

    def cached_bytes(self) -> int:
        """What its step cache holds: cached features or states, guidance differences, denoised estimates."""
        held = [c for c in (self.cache, self.deltas, self.skip) if c is not None]
        return sum(c.nbytes() for c in held)

    @functools.cached_property
    def _cond_labels(self) -> torch.Tensor:
        """The conditional rows' labels on the device, built at the first model_input: a batched run's rows
        come from app.sampling.batched.inputs_together, which never reads them."""
        return torch.full((self.spec.num_images,), self.label, dtype=torch.long, device=self.latents.device)

    @functools.cached_property
    def _null_labels(self) -> torch.Tensor:
        return torch.full((self.spec.num_images,), self.null_label, dtype=torch.long, device=self.latents.device)

    def model_input(self) -> ModelInput:
        t = self.timesteps[self.step_index]
        if self.table is not None:  # the batched step never calls the scheduler, whose step index stays put
            divisors = self.table.input_divisors
            x = self.latents if divisors is None else self.latents / divisors[self.step_index]
        else:
            x = self.scheduler.scale_model_input(self.latents, t)
        self.scaled_input = x
        if self.skips(self.step_index):
            return ModelInput(x=x[:0], timesteps=t.expand(0).to(x.device), class_labels=self._cond_labels[:0])
        delta = self._embed_delta(t)
        # The conditional rows, then each branch's: the null label's, and the conditional rows again (with CADS's
        # delta, if any) with perturbed attention.
        kinds = ["cond", *(b for b in self.branches(self.step_index) if b in MAIN_BRANCHES)]
        labels = self._cond_labels
        if len(kinds) > 1:
            x = torch.cat([x] * len(kinds))
            labels = torch.cat([self._null_labels if k == "uncond" else self._cond_labels for k in kinds])
            if delta is not None:
                delta = torch.cat([torch.zeros_like(delta) if k == "uncond" else delta for k in kinds])
        per_row = None
        if "perturbed" in kinds:
            if self.perturbation is None:
                raise ValueError(
                    f"method {self.spec.guidance.method.kind} asks for perturbed rows and has no perturbation"
                )
            n = self.spec.num_images
            per_row = tuple(self.perturbation if k == "perturbed" else None for k in kinds for _ in range(n))
        timesteps = t.expand(x.shape[0]).to(x.device)
        return ModelInput(x=x, timesteps=timesteps, class_labels=labels, embed_delta=delta, perturbed=per_row)

    def guide_input(self) -> ModelInput:
        """This step's rows for the guide model (autoguidance): the conditional rows' input and labels, after
        model_input has built them. No CADS delta: it is made for the main model's class embedding."""
        x = self._step_input()
        t = self.timesteps[self.step_index]
        return ModelInput(x=x, timesteps=t.expand(x.shape[0]).to(x.device), class_labels=self._cond_labels)

    def _embed_delta(self, timestep: torch.Tensor) -> torch.Tensor | None:
        """The conditioners' change to the conditional rows' class embedding at this step, or None where they
        add none. Reads the timestep on the host (a device sync on a GPU) only for a request with one."""
        embedders = [c for c in self.conditioners if c.embeds]
        if not embedders:
            return None
        t = float(timestep) / self._num_train_timesteps
        deltas = [d for c in embedders if (d := c.embed_delta(self.step_index, t)) is not None]
        return sum(deltas[1:], deltas[0]) if deltas else None

    def guided_eps(self, eps: torch.Tensor, others: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """This request's model output through its conditioners, its guider's combine and the rescale. eps: its
        rows of the main forward (conditional, then each main branch's); others: its other branches' outputs
        by name ("guide": its rows of the guide model's forward)."""
        n = self.spec.num_images
        i = self.step_index
        scale = self.scales[i]
        if self.skips(i):
            if self.spec.return_trace:
                self.trace.append(StepTrace(i, scale))
            return self.skipped_eps()
        branches = self.branches(i)
        eps_cond = eps[:n]
        for conditioner in self.conditioners:
            eps_cond = conditioner.eps_cond(i, eps_cond)
        reused = self.reuses_uncond(i)
        if not branches and not reused:
            if self.spec.return_trace:
                self.trace.append(StepTrace(i, scale))
            return eps_cond
        # Each main branch's rows follow the conditional ones, in the order model_input put them; the guide's
        # come from its own forward (others).
        main = [b for b in branches if b in MAIN_BRANCHES]
        preds: dict[str, torch.Tensor] = {b: eps[n * (k + 1) : n * (k + 2)] for k, b in enumerate(main)}
        uncond = "uncond" in preds
        eps_uncond = preds.pop("uncond", eps_cond)
        if uncond:
            self.keep_delta(eps_cond, eps_uncond)
        elif reused:
            eps_uncond, uncond = self.uncond_estimate(eps_cond), True
        # The combine reads CFG's scale only where the step has its unconditional rows.
        step = GuidanceStep(
            eps_cond,
            eps_uncond,
            scale if uncond else 1.0,
            self._step_input(),
            self.alpha_bars[i],
            others={**preds, **(others or {})},
        )
        guided = self.guider.combine(step)
        if self.spec.return_trace:
            diff_norm = row_norm(eps_cond - eps_uncond) if uncond else None
            self.trace.append(StepTrace(i, scale, diff_norm=diff_norm, **guided.norms))
        return rescale_guidance(guided.eps, eps_cond, self.spec.guidance.guidance_rescale)

    def advance(self, eps: torch.Tensor, others: Mapping[str, torch.Tensor] | None = None) -> None:
        """One sampler step, given the model's output for this request's rows of the shared batch (and of the
        guide's forward, in others)."""
        eps_guided = self.guided_eps(eps, others)
        out = self.scheduler.step(
            eps_guided,
            self.timesteps[self.step_index],
            self.latents,
            generator=self.rng.generators,
            **self._step_kwargs,
        )
        self.finish_step(out.prev_sample, eps_guided)

    def finish_step(self, latents: torch.Tensor, eps_guided: torch.Tensor) -> None:
        """The step's new latents, from this run's scheduler or from app.sampling.batched; a preview if due."""
        i = self.step_index
        if self.skip is not None and not self.skips(i):
            self.skip.keep(i, self._step_input(), eps_guided)
        self.latents = latents
        self.step_index += 1
        if self.done:
            self.release()
        if self._preview_due():
            x0 = eps_to_x0(self._step_input(), eps_guided, self.alpha_bars[i])
            self.preview = Preview(self.step_index, self.decode(x0))

    def _step_input(self) -> torch.Tensor:
        """This step's scaled model input, kept by model_input or app.sampling.batched.inputs_together."""
        if self.scaled_input is None:
            raise RuntimeError("a step's output came back before its model input was built")
        return self.scaled_input

    def _preview_due(self) -> bool:
        """Every preview_every steps, except the last: the finished images follow it at once."""
        every = self.spec.preview_every
        return every is not None and self.step_index % every == 0 and not self.done

    def images(self) -> np.ndarray:
        """The finished images as uint8, shape (N, H, W, C)."""
        return self.decode(self.latents)
