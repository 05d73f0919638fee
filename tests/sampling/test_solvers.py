"""app.sampling.solvers against diffusers' own step, one step at a time on random inputs: each sampler's table
and update reproduce the scheduler's step() to the bit, at 1, 2, 10 and 20 steps."""

import pytest
import torch
from diffusers import DDPMScheduler

from app.sampling import make_scheduler
from app.sampling import set_timesteps as set_steps
from app.sampling.solvers import (
    E_SIGMA_UP,
    NOISE_STD,
    ddim_table,
    ddim_update,
    ddpm_table,
    ddpm_update,
    dpmpp_2m_table,
    dpmpp_2m_update,
    euler_a_input_divisors,
    euler_a_table,
    euler_a_update,
)

pytestmark = pytest.mark.integration  # bit-equal to diffusers' step

STEPS = (1, 2, 10, 20)


def start(steps: int) -> tuple[torch.Generator, torch.Tensor]:
    g = torch.Generator().manual_seed(steps)
    return g, torch.randn((2, 1, 28, 28), generator=g)


def image_noise(step: int) -> tuple[list[torch.Generator], torch.Tensor]:
    """Two images' generators for diffusers' step, and the noise the same generators draw for the update."""
    seeds = [100 * step + j for j in range(2)]
    noise = torch.cat([torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(s)) for s in seeds])
    return [torch.Generator().manual_seed(s) for s in seeds], noise


def assert_every_step_is_the_schedulers(sched, table, update, eps_scale: float = 1.0, **step_kwargs) -> None:
    """Each step of update (with the solver's history, and the ancestral noise that each image's generator
    draws for diffusers' step) equals sched.step to the bit, on random samples and model outputs."""
    g, x = start(len(sched.timesteps))
    x0_prev = torch.zeros_like(x)
    divisors = euler_a_input_divisors(sched) if update is euler_a_update else None
    for i, t in enumerate(sched.timesteps):
        if divisors is not None:
            assert torch.equal(x / divisors[i], sched.scale_model_input(x, t)), i
        eps = eps_scale * torch.randn(x.shape, generator=g)
        gens, noise = image_noise(i)
        want = sched.step(eps, t, x, generator=gens, **step_kwargs).prev_sample
        got, x0_prev = update(x, eps, x0_prev, table[i].expand(2, -1), noise)
        assert torch.equal(got, want), i
        x = want


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_karras"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_is_the_schedulers_step_at_both_orders(loaded, sampler, steps):
    sched = make_scheduler(sampler, loaded.scheduler_config)
    set_steps(sched, steps)
    table = dpmpp_2m_table(sched)
    assert table.shape == (steps, 7)
    assert_every_step_is_the_schedulers(sched, table, dpmpp_2m_update)


@pytest.mark.parametrize("steps", STEPS)
def test_ddim_is_the_schedulers_step_with_the_clipped_x0(loaded, steps):
    """At a scale that clips x0, with the eps recomputed from it (the sampler ddim's setting)."""
    sched = make_scheduler("ddim", loaded.scheduler_config)
    set_steps(sched, steps)
    table = ddim_table(sched, use_clipped_model_output=True)
    assert table.shape == (steps, 7) and ddim_table(sched) is None  # unclipped eps: not reproduced
    assert_every_step_is_the_schedulers(sched, table, ddim_update, eps_scale=3, use_clipped_model_output=True)


@pytest.mark.parametrize("steps, spacing", [*((n, "trailing") for n in STEPS), (10, "leading")])
def test_ddpm_is_the_schedulers_step_with_its_noise(loaded, steps, spacing):
    """The noise each image's generator draws, added where t > 0: at every step with the sampler's trailing
    spacing (its last step, t = 99 at 10 steps, adds noise of std 1e-10), all but the last (t = 0) with leading."""
    sched = DDPMScheduler.from_config(loaded.scheduler_config, timestep_spacing=spacing)
    set_steps(sched, steps)
    table = ddpm_table(sched)
    assert table.shape == (steps, 7) and (table[:-1, NOISE_STD] > 0).all()
    assert (table[-1, NOISE_STD] == 0) == (spacing == "leading")
    assert_every_step_is_the_schedulers(sched, table, ddpm_update, eps_scale=3)


@pytest.mark.parametrize("steps", STEPS)
def test_euler_ancestral_is_the_schedulers_input_scaling_and_step(loaded, steps):
    """With the float64 sigmas app.sampling.set_timesteps keeps; sigma_up is 0 at the last step."""
    sched = make_scheduler("euler_a", loaded.scheduler_config)
    set_steps(sched, steps)
    table, divisors = euler_a_table(sched), euler_a_input_divisors(sched)
    assert table.shape == (steps, 4) and len(divisors) == steps and table[-1, E_SIGMA_UP] == 0
    assert_every_step_is_the_schedulers(sched, table, euler_a_update)


def test_other_schedulers_and_settings_are_not_reproduced(loaded):
    ddpm = DDPMScheduler.from_config(loaded.scheduler_config, variance_type="learned_range")
    set_steps(ddpm, 4)
    assert ddpm_table(ddpm) is None
    v_pred = make_scheduler("euler_a", {**loaded.scheduler_config, "prediction_type": "v_prediction"})
    set_steps(v_pred, 4)
    assert euler_a_table(v_pred) is None and dpmpp_2m_table(v_pred) is None and ddim_table(v_pred, True) is None
