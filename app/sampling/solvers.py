"""Each sampler's step as diffusers computes it, over many rows at once: a table of per-step scalars and an
update that broadcasts each row's scalars over its pixels (app.sampling.batched applies them to a batch).

  - DPM-Solver++ 2M (midpoint, epsilon prediction: the samplers dpmpp_2m and dpmpp_2m_karras), as
    DPMSolverMultistepScheduler.step;
  - DDIM (eta 0, epsilon prediction, the clipped x0 and the eps recomputed from it: the sampler ddim), as
    DDIMScheduler.step;
  - DDPM (epsilon prediction, a fixed variance: the sampler ddpm), as DDPMScheduler.step;
  - Euler ancestral (epsilon prediction: the sampler euler_a), as EulerAncestralDiscreteScheduler.step and its
    scale_model_input.

A table (steps, K) is computed once per (sampler, config, steps) from a scheduler after set_timesteps, with
diffusers' own scalar operations, so that each update is diffusers' step to the bit (tests/sampling/
test_solvers.py). The ancestral updates take the noise that each image's own generator draws, as diffusers
draws it. A table function returns None for a scheduler or configuration it does not reproduce (another
class, another prediction type, thresholding, learned variances): such requests keep their own scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Columns of a DPM-Solver++ 2M step table: the x0 conversion's sigma_t, alpha_t and 1 / alpha_t at the step's
# sigma, then the update x_t = A * x - B * x0 - C * (inv_r0 * (x0 - x0_prev)); C = inv_r0 = 0 at first-order steps.
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


# Columns of an Euler ancestral step table: sigma, its reciprocal, the step dt = sigma_down - sigma, and the
# noise's sigma_up, as float32 (diffusers computes them in float64, the sampler's sigmas, and each operation
# with the float32 sample casts its scalar to float32).
E_SIGMA, E_INV_SIGMA, E_DT, E_SIGMA_UP = range(4)


def euler_a_table(scheduler: SchedulerMixin) -> torch.Tensor | None:
    """(steps, 4) float32 coefficients of each step of an Euler ancestral scheduler after set_timesteps, as its
    step() computes them; None for any other scheduler or prediction type."""
    if type(scheduler) is not EulerAncestralDiscreteScheduler or scheduler.config.prediction_type != "epsilon":
        return None
    sigmas = scheduler.sigmas.to("cpu")
    rows = []
    for i in range(len(scheduler.timesteps)):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        sigma = sigma_from.float()
        rows.append(torch.stack([sigma, 1.0 / sigma, (sigma_down - sigma_from).float(), sigma_up.float()]))
    return torch.stack(rows)


def euler_a_input_divisors(scheduler: SchedulerMixin) -> list[float]:
    """What scale_model_input divides each step's input by, sqrt(sigma^2 + 1), in the sigmas' float64."""
    return [float((sigma**2 + 1) ** 0.5) for sigma in scheduler.sigmas.to("cpu")[: len(scheduler.timesteps)]]


def euler_a_update(
    sample: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor | None, coefs: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler ancestral step for every row: (x_t, x0): to sigma_down along the ODE's derivative, then
    sigma_up times the row's noise (drawn by its own generators, as step() draws it). x0_prev is unused."""
    k = per_row(coefs, sample)
    x0 = sample - k[E_SIGMA] * eps
    num = sample - x0
    derivative = num * k[E_INV_SIGMA] if sample.is_cuda else num / k[E_SIGMA]  # as clipped_x0's division
    return sample + derivative * k[E_DT] + noise * k[E_SIGMA_UP], x0


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
    noise: int | None = None  # the table's column of the noise's scale, for a step that adds fresh noise
    input_divisors: Callable[[SchedulerMixin], list[float]] | None = None  # scale_model_input's, where not 1


SOLVERS: dict[str, Solver] = {
    "dpmpp_2m": Solver(lambda scheduler, **_: dpmpp_2m_table(scheduler), dpmpp_2m_update, history=True),
    "ddim": Solver(ddim_table, ddim_update),
    "ddpm": Solver(lambda scheduler, **_: ddpm_table(scheduler), ddpm_update, noise=NOISE_STD),
    "euler_a": Solver(
        lambda scheduler, **_: euler_a_table(scheduler),
        euler_a_update,
        noise=E_SIGMA_UP,
        input_divisors=euler_a_input_divisors,
    ),
}
