"""One sampler step for many requests at once: plain CFG and the sampler's update over all their rows together.

Each request keeps its own diffusers scheduler (app/sampling/run.py), and stepping them one by one costs
some twenty small tensor operations per request: on a GPU, where the forward of this project's model takes
a millisecond or two, that Python dominates a tick (359 us per request-step on an H200, docs/benchmarks.md).
For the requests this module reproduces exactly, the step is instead a handful of operations over the
batch, whatever its size:

  - the guidance combine, eps_u + s * (eps_c - eps_u) (app.guidance.cfg_combine), with s per row;
  - DPM-Solver++ 2M (midpoint, epsilon prediction: the samplers dpmpp_2m and dpmpp_2m_karras) as diffusers'
    DPMSolverMultistepScheduler.step computes it, DDIM (eta 0, epsilon prediction, the clipped x0 and the
    eps recomputed from it: the sampler ddim) as DDIMScheduler.step does, and DDPM (epsilon prediction, a
    fixed variance: the sampler ddpm) as DDPMScheduler.step does, its noise drawn on the host by each image's
    own generator as diffusers draws it and queued to the device without a sync; each with its per-step
    scalars (sigma, alpha, the update's coefficients) taken from a table built once per (sampler, config,
    steps) with diffusers' own scalar operations and shared by every request of that schedule. Euler
    ancestral (its scheduler also scales the model's input by a step index it keeps) is not reproduced yet.

Every coefficient is a per-row value broadcast over the row's pixels, and every operation is elementwise or a
row gather, so a request's images do not depend on what it is batched with. The result equals diffusers' step
to the bit on the CPU (tests/sampling/test_batched.py) and, DPM-Solver++ so far, on an H200 (tests/test_cuda.py,
which checks DDIM and DDPM too on the next card).

Which requests: plain CFG (method cfg) with no condition noise, no rescale, no CADS, no trace (those keep
their per-request path); any of them may ask for previews.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from app.sampling.device import to_device
from app.sampling.schedulers import config_key, step_kwargs, timed_scheduler

if TYPE_CHECKING:
    from app.sampling.run import SampleRun

# Columns of a step table: the x0 conversion's sigma_t, alpha_t and 1 / alpha_t at the step's sigma, then the
# update x_t = A * x - B * x0 - C * (inv_r0 * (x0 - x0_prev)); C = inv_r0 = 0 at first-order steps.
SIGMA, ALPHA, INV_ALPHA, A, B, C, INV_R0 = range(7)


def dpmpp_2m_table(scheduler: SchedulerMixin) -> torch.Tensor | None:
    """(steps, 7) float32 coefficients of each step of a DPM-Solver++ 2M scheduler after set_timesteps,
    computed with the same scalar operations as its step(); None for any other scheduler or configuration."""
    if type(scheduler) is not DPMSolverMultistepScheduler:
        return None
    c = scheduler.config
    setup = (c.algorithm_type, c.solver_order, c.solver_type, c.prediction_type, c.thresholding)
    if setup != ("dpmsolver++", 2, "midpoint", "epsilon", False) or c.variance_type in ("learned", "learned_range"):
        return None
    steps = len(scheduler.timesteps)
    sigmas = scheduler.sigmas.to("cpu")
    rows = []

    def alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    zero = torch.zeros((), dtype=torch.float32)
    for i in range(steps):
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigmas[i])
        h = lambda_t - lambda_s0
        # As step(): first order at the first step and at the last (lower_order_final), second order between.
        final = i == steps - 1 and (
            c.euler_at_final or (c.lower_order_final and steps < 15) or c.final_sigmas_type == "zero"
        )
        a, b = sigma_t / sigma_s0, alpha_t * (torch.exp(-h) - 1.0)
        cc, inv_r0 = zero, zero
        if i > 0 and not final:
            _, _, lambda_s1 = alpha_sigma_lambda(sigmas[i - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            inv_r0 = 1.0 / r0
            cc = 0.5 * (alpha_t * (torch.exp(-h) - 1.0))
        rows.append(torch.stack([sigma_s0, alpha_s0, 1.0 / alpha_s0, a, b, cc, inv_r0]).float())
    return torch.stack(rows)


# Columns of a DDIM step table (eta 0): sqrt(1 - alpha_bar_t), sqrt(alpha_bar_t) and their reciprocals, the
# x0 clip range (inf without clipping), sqrt(alpha_bar_prev) and the direction's coefficient.
SQRT_BETA, SQRT_AB, INV_SQRT_AB, INV_SQRT_BETA, CLIP, SQRT_AB_PREV, DIRECTION = range(7)


def ddim_table(scheduler: SchedulerMixin, use_clipped_model_output: bool = False) -> torch.Tensor | None:
    """(steps, 7) float32 coefficients of each step of a DDIM scheduler after set_timesteps, as its step()
    computes them with eta 0 and use_clipped_model_output (the eps recomputed from the clipped x0: the sampler
    ddim's setting); None for any other scheduler or configuration."""
    if type(scheduler) is not DDIMScheduler or not use_clipped_model_output:
        return None
    c = scheduler.config
    if c.prediction_type != "epsilon" or c.thresholding:
        return None
    clip = torch.tensor(float(c.clip_sample_range) if c.clip_sample else float("inf"))
    rows = []
    for timestep in scheduler.timesteps.to("cpu"):
        prev_timestep = timestep - c.num_train_timesteps // scheduler.num_inference_steps
        alpha_prod_t = scheduler.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        std_dev_t = 0.0 * scheduler._get_variance(timestep, prev_timestep) ** (0.5)
        sqrt_beta, sqrt_ab = beta_prod_t ** (0.5), alpha_prod_t ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
        row = [sqrt_beta, sqrt_ab, 1.0 / sqrt_ab, 1.0 / sqrt_beta, clip, alpha_prod_t_prev ** (0.5), direction]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in row]))
    return torch.stack(rows)


def per_row(coefs: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The columns of a (rows, K) coefficient table, each shaped (rows, 1, ...) to broadcast over like's rows."""
    return coefs.reshape(*coefs.shape, *([1] * (like.dim() - 1))).unbind(1)


def clipped_x0(
    sample: torch.Tensor, eps: torch.Tensor, sqrt_beta: torch.Tensor, sqrt_ab: torch.Tensor, inv_sqrt_ab, clip
) -> torch.Tensor:
    """(sample - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar), clamped to +-clip, as DDIM's and DDPM's step()
    compute it. diffusers divides by a host scalar, which CUDA turns into a multiply by its reciprocal
    (ATen's div_true_kernel_cuda): the same here, so that each device draws what diffusers draws on it."""
    num = sample - sqrt_beta * eps
    return (num * inv_sqrt_ab if sample.is_cuda else num / sqrt_ab).clamp(-clip, clip)


def ddim_update(
    sample: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor | None, coefs: torch.Tensor, noise=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (eta 0, clipped x0, eps recomputed from it) for every row: (x_t, x0). x0_prev and noise
    are unused."""
    k = per_row(coefs, sample)
    x0 = clipped_x0(sample, eps, k[SQRT_BETA], k[SQRT_AB], k[INV_SQRT_AB], k[CLIP])
    num = sample - k[SQRT_AB] * x0
    eps = num * k[INV_SQRT_BETA] if sample.is_cuda else num / k[SQRT_BETA]
    return k[SQRT_AB_PREV] * x0 + k[DIRECTION] * eps, x0


# Columns of a DDPM step table: as DDIM's first three, the clip range, the posterior mean's coefficients of x0
# and of the sample, and the noise's (the posterior's standard deviation; 0 at the last step, which adds none).
DDPM_CLIP, X0_COEF, SAMPLE_COEF, NOISE_STD = range(3, 7)
DDPM_NOISE = {"fixed_small": 0.5, "fixed_large": 0.5, "fixed_small_log": 1.0}  # _get_variance's power in step()


def ddpm_table(scheduler: SchedulerMixin) -> torch.Tensor | None:
    """(steps, 7) float32 coefficients of each step of a DDPM scheduler after set_timesteps, as its step()
    computes them; None for any other scheduler or configuration (learned variances, thresholding)."""
    if type(scheduler) is not DDPMScheduler:
        return None
    c = scheduler.config
    if c.prediction_type != "epsilon" or c.thresholding or c.variance_type not in DDPM_NOISE:
        return None
    clip = torch.tensor(float(c.clip_sample_range) if c.clip_sample else float("inf"))
    rows = []
    for t in scheduler.timesteps.to("cpu"):
        prev_t = scheduler.previous_timestep(t)
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0_coef = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coef = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        std = scheduler._get_variance(t) ** DDPM_NOISE[c.variance_type] if t > 0 else torch.tensor(0.0)
        sqrt_beta, sqrt_ab = beta_prod_t ** (0.5), alpha_prod_t ** (0.5)
        row = [sqrt_beta, sqrt_ab, 1.0 / sqrt_ab, clip, x0_coef, sample_coef, std]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in row]))
    return torch.stack(rows)


def ddpm_update(
    sample: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor | None, coefs: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step for every row: (x_t, x0), the posterior's mean plus NOISE_STD times the row's noise (the
    noise its own generators drew, as step() draws it). x0_prev is unused."""
    k = per_row(coefs, sample)
    x0 = clipped_x0(sample, eps, k[SQRT_BETA], k[SQRT_AB], k[INV_SQRT_AB], k[DDPM_CLIP])
    return k[X0_COEF] * x0 + k[SAMPLE_COEF] * sample + k[NOISE_STD] * noise, x0


def dpmpp_2m_update(
    sample: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor, coefs: torch.Tensor, noise=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ 2M step for every row: (x_t, x0). coefs is (rows, 7), each row's step-table row;
    x0_prev is the row's x0 of its previous step (anything finite at a first-order step: C is 0 there).
    noise is unused."""
    k = per_row(coefs, sample)
    # diffusers divides by alpha_t, a host scalar: the CPU divides, CUDA multiplies by its reciprocal (clipped_x0).
    num = sample - k[SIGMA] * eps
    x0 = num * k[INV_ALPHA] if sample.is_cuda else num / k[ALPHA]
    d1 = k[INV_R0] * (x0 - x0_prev)
    return k[A] * sample - k[B] * x0 - k[C] * d1, x0


@dataclass(frozen=True)
class Solver:
    table: Callable[..., torch.Tensor | None]  # (scheduler, **the sampler's step kwargs) -> coefficients
    update: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (sample, eps, x0_prev, coefs, noise) -> (x_t, x0)
    history: bool = False  # whether the update reads the previous step's x0
    noise: bool = False  # whether it adds fresh noise, drawn from each request's generators (ancestral)


SOLVERS: dict[str, Solver] = {
    "dpmpp_2m": Solver(lambda scheduler, **_: dpmpp_2m_table(scheduler), dpmpp_2m_update, history=True),
    "ddim": Solver(ddim_table, ddim_update),
    "ddpm": Solver(lambda scheduler, **_: ddpm_table(scheduler), ddpm_update, noise=True),
}


@dataclass(frozen=True)
class StepTable:
    """A schedule's per-step coefficients for one of SOLVERS, on the host: each step's row as the float32
    values it holds, read as a list once here rather than at every step."""

    solver: str
    rows: tuple[list[float], ...]

    def __getitem__(self, step: int) -> list[float]:
        return self.rows[step]


def step_table(sampler: str, scheduler_config: dict[str, Any], steps: int) -> StepTable | None:
    """The sampler's step table at this many steps, for whichever of SOLVERS reproduces its scheduler (None:
    none does), built once per (sampler, config, steps) and shared (read-only) by every request that asks for
    it: ~20 scalar operations a step, off each request's path."""
    return _step_table(sampler, config_key(scheduler_config), steps)


@functools.lru_cache(maxsize=256)
def _step_table(sampler: str, scheduler_config_json: str, steps: int) -> StepTable | None:
    scheduler = timed_scheduler(sampler, scheduler_config_json, steps)
    for name, solver in SOLVERS.items():
        coefs = solver.table(scheduler, **step_kwargs(sampler))
        if coefs is not None:
            return StepTable(name, tuple(coefs.tolist()))
    return None


def cfg_rows(eps: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """app.guidance.cfg_combine over gathered rows: eps[uncond] + s * (eps[cond] - eps[uncond]), s per row.
    A row without an unconditional pass names its conditional row in both: eps_c + s * 0 = eps_c exactly."""
    eps_c, eps_u = eps.index_select(0, cond), eps.index_select(0, uncond)
    s = scales.reshape(-1, *([1] * (eps.dim() - 1)))
    return eps_u + s * (eps_c - eps_u)


def advance_together(runs: Sequence[SampleRun], eps: torch.Tensor, offsets: Sequence[int]) -> None:
    """Advance runs that have a step table (SampleRun.table) by one step, each solver's runs all at once.
    offsets[k] is where runs[k]'s rows start in eps, the shared forward's output (its conditional rows, then
    its unconditional)."""
    groups: dict[str, list[tuple[SampleRun, int]]] = {}
    for run, offset in zip(runs, offsets, strict=True):
        groups.setdefault(run.table.solver, []).append((run, offset))
    for name, members in groups.items():
        _advance(SOLVERS[name], members, eps)


def step_noise(run: SampleRun) -> torch.Tensor:
    """The noise a DDPM step adds to the run's images, on the host: one draw per image from its own generator,
    as diffusers' step draws it (randn_tensor with the generator list), or zeros at the step that adds none
    (t = 0), which draws nothing either."""
    shape = tuple(run.latents.shape)
    if run.table[run.step_index][NOISE_STD] == 0:
        return torch.zeros(shape, dtype=run.latents.dtype)
    return randn_tensor(shape, generator=run.generators, device=torch.device("cpu"), dtype=run.latents.dtype)


def _advance(solver: Solver, members: list[tuple[SampleRun, int]], eps: torch.Tensor) -> None:
    per_row: list[list[float]] = []  # cond index, uncond index, scale, then the step-table row
    for run, offset in members:
        n, i = run.spec.num_images, run.step_index
        guided = run.needs_uncond()
        scale = run.scales[i] if guided else 1.0
        coefs = run.table[i]
        per_row += [[offset + j, offset + j + (n if guided else 0), scale, *coefs] for j in range(n)]
    host = torch.tensor(per_row, dtype=torch.float32)
    table = to_device(host, eps.device)  # one copy, which does not wait: no host-device sync in the step
    cond, uncond = table[:, 0].long(), table[:, 1].long()
    eps_guided = cfg_rows(eps, cond, uncond, table[:, 2])
    runs = [run for run, _ in members]
    sample = torch.cat([r.latents for r in runs])
    x0_prev = None
    if solver.history:
        x0_prev = torch.cat([r.x0_prev if r.x0_prev is not None else torch.zeros_like(r.latents) for r in runs])
    noise = None
    if solver.noise:  # drawn on the host by each image's own generator, as diffusers' step draws it, and queued
        noise = to_device(torch.cat([step_noise(r) for r in runs]), eps.device)
    x_t, x0 = solver.update(sample, eps_guided.to(sample.dtype), x0_prev, table[:, 3:], noise)
    start = 0
    for run in runs:
        stop = start + run.spec.num_images
        run.x0_prev = x0[start:stop] if solver.history else None
        run.finish_step(x_t[start:stop], eps_guided[start:stop])
        if run.done:  # a finished request keeps its own latents, not a view holding the whole batch's alive
            run.latents, run.x0_prev = run.latents.clone(), None
        start = stop
