"""app.sampling.batched on the real checkpoint: the requests it steps together draw exactly what diffusers'
own per-request step draws, whatever they are batched with, and the others keep their own path."""

import pytest
import torch
from diffusers import DDPMScheduler

from app.guidance import GuidanceMethod, GuidanceSchedule
from app.sampling import (
    DEFAULT_GUIDANCE,
    SAMPLERS,
    GuidanceParams,
    SampleRun,
    SampleSpec,
    denoise_step,
    make_scheduler,
)
from app.sampling import set_timesteps as set_steps
from app.sampling.batched import (
    NOISE_STD,
    ddim_table,
    ddim_update,
    ddpm_table,
    ddpm_update,
    dpmpp_2m_table,
    dpmpp_2m_update,
)
from app.sampling.run import steps_together


def make(loaded, spec: SampleSpec, per_request: bool = False) -> SampleRun:
    m = loaded.manifest
    run = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label)
    if per_request:
        run.table = None  # diffusers' step, one request at a time: the reference
    return run


def draw(denoiser, runs: list[SampleRun]) -> list[SampleRun]:
    while any(not r.done for r in runs):
        denoise_step(denoiser, [r for r in runs if not r.done])
    return runs


SPECS = [
    SampleSpec(class_label=3, seeds=(0, 1), steps=20),  # the default request
    SampleSpec(class_label=7, seeds=(5,), steps=8, sampler="dpmpp_2m", guidance=GuidanceParams(4.0)),
    SampleSpec(class_label=None, seeds=(9, 10), steps=6, sampler="dpmpp_2m_karras"),  # unconditional
    SampleSpec(
        class_label=1,
        seeds=(2,),
        steps=12,
        sampler="dpmpp_2m",
        guidance=GuidanceParams(5.0, GuidanceSchedule("cosine")),
        preview_every=4,
    ),
    SampleSpec(class_label=5, seeds=(4, 6), steps=10, sampler="ddim", guidance=GuidanceParams(7.5)),  # clips x0
    SampleSpec(class_label=8, seeds=(7, 11), steps=10, sampler="ddpm", guidance=GuidanceParams(7.5), preview_every=4),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=["default", "dpmpp_2m-s4", "unconditional", "cosine-previews", "ddim", "ddpm-previews"]
)
def test_a_request_stepped_together_draws_what_the_diffusers_step_draws(loaded, denoiser, spec):
    (together,) = draw(denoiser, [make(loaded, spec)])
    (alone,) = draw(denoiser, [make(loaded, spec, per_request=True)])
    assert together.table is not None
    assert torch.equal(together.latents, alone.latents)
    if spec.preview_every:
        assert together.preview.step == alone.preview.step == 8
        assert (together.preview.images == alone.preview.images).all()


def one_row_at_a_time(denoiser):
    """The real model, one row per forward: a row's eps then depends on that row alone, to the bit (a batched
    CPU convolution may pick another algorithm), so any batch dependence left comes from the step."""

    def forward(x, t, y):
        return torch.cat([denoiser(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])])

    return forward


def test_requests_stepped_together_do_not_depend_on_their_batch(loaded, denoiser):
    """Each of four different requests, drawn in one batch (at staggered starts, so rows of different steps,
    orders and scales share each tick) and with a per-request one beside them, equals itself drawn alone."""
    denoiser = one_row_at_a_time(denoiser)
    crowd = [make(loaded, spec) for spec in SPECS]
    crowd.append(make(loaded, SampleSpec(class_label=4, seeds=(3,), steps=5, sampler="euler_a")))
    active: list[SampleRun] = []
    for run in crowd:  # one more request joins at each tick
        active.append(run)
        denoise_step(denoiser, [r for r in active if not r.done])
    draw(denoiser, crowd)
    for run in crowd:
        (alone,) = draw(denoiser, [make(loaded, run.spec)])
        assert torch.equal(run.latents, alone.latents), run.spec
        # Done, it holds its own latents, not a view of a batch it no longer belongs to.
        assert run.latents.untyped_storage().nbytes() == run.latents.nbytes and run.x0_prev is None


def test_the_table_reproduces_every_step_of_the_scheduler(loaded):
    """Coefficients against the scheduler's own step on random inputs, one step at a time, both orders."""
    for sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
        for steps in (1, 2, 10, 20):
            sched = make_scheduler(sampler, loaded.scheduler_config)
            set_steps(sched, steps)
            table = dpmpp_2m_table(sched)
            assert table.shape == (steps, 7)
            g = torch.Generator().manual_seed(steps)
            x = torch.randn((2, 1, 28, 28), generator=g)
            x0_prev = torch.zeros_like(x)
            for i, t in enumerate(sched.timesteps):
                eps = torch.randn(x.shape, generator=g)
                want = sched.step(eps, t, x).prev_sample
                got, x0_prev = dpmpp_2m_update(x, eps, x0_prev, table[i].expand(2, -1))
                assert torch.equal(got, want), (sampler, steps, i)
                x = want
    for steps in (1, 2, 10, 20):  # DDIM at a scale that clips x0, with the eps recomputed from it
        sched = make_scheduler("ddim", loaded.scheduler_config)
        set_steps(sched, steps)
        table = ddim_table(sched, use_clipped_model_output=True)
        assert table.shape == (steps, 7) and ddim_table(sched) is None  # unclipped eps: not reproduced
        g = torch.Generator().manual_seed(steps)
        x = torch.randn((2, 1, 28, 28), generator=g)
        for i, t in enumerate(sched.timesteps):
            eps = 3 * torch.randn(x.shape, generator=g)
            want = sched.step(eps, t, x, use_clipped_model_output=True).prev_sample
            got, _ = ddim_update(x, eps, None, table[i].expand(2, -1))
            assert torch.equal(got, want), ("ddim", steps, i)
            x = want
    # DDPM: the noise each image's generator draws, added where t > 0: at every step with the sampler's trailing
    # spacing (its last step, t = 99 at 10 steps, adds noise of std 1e-10), all but the last (t = 0) with leading.
    for steps, spacing in [(1, "trailing"), (2, "trailing"), (10, "trailing"), (20, "trailing"), (10, "leading")]:
        sched = DDPMScheduler.from_config(loaded.scheduler_config, timestep_spacing=spacing)
        set_steps(sched, steps)
        table = ddpm_table(sched)
        assert table.shape == (steps, 7) and (table[:-1, NOISE_STD] > 0).all()
        assert (table[-1, NOISE_STD] == 0) == (spacing == "leading")
        g = torch.Generator().manual_seed(steps)
        x = torch.randn((2, 1, 28, 28), generator=g)
        for i, t in enumerate(sched.timesteps):
            eps = 3 * torch.randn(x.shape, generator=g)
            gens = [torch.Generator().manual_seed(100 * i + j) for j in range(2)]
            want = sched.step(eps, t, x, generator=gens).prev_sample
            gens = [torch.Generator().manual_seed(100 * i + j) for j in range(2)]
            noise = torch.cat([torch.randn((1, 1, 28, 28), generator=gen) for gen in gens])
            got, _ = ddpm_update(x, eps, None, table[i].expand(2, -1), noise)
            assert torch.equal(got, want), ("ddpm", steps, i)
            x = want


def test_which_requests_step_together(loaded):
    assert steps_together(SampleSpec(class_label=1, seeds=(0,), guidance=DEFAULT_GUIDANCE))
    for guidance in (
        GuidanceParams(3.0, noise_level=0.1),
        GuidanceParams(3.0, guidance_rescale=0.7),
        GuidanceParams(3.0, method=GuidanceMethod("apg")),
    ):
        assert not steps_together(SampleSpec(class_label=1, seeds=(0,), guidance=guidance))
    assert not steps_together(SampleSpec(class_label=1, seeds=(0,), return_trace=True))
    assert make(loaded, SampleSpec(class_label=1, seeds=(0,), sampler="euler_a")).table is None
    tables = {s: make(loaded, SampleSpec(class_label=1, seeds=(0,), sampler=s)).table for s in SAMPLERS}
    solvers = {s: t.solver for s, t in tables.items() if t is not None}
    assert solvers == {"dpmpp_2m": "dpmpp_2m", "dpmpp_2m_karras": "dpmpp_2m", "ddim": "ddim", "ddpm": "ddpm"}


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a", "ddpm"])
def test_requests_of_one_schedule_share_its_tensors_and_nothing_they_change(loaded, denoiser, sampler):
    """request_scheduler hands each request a copy of a cached prototype that shares its tensors: two requests
    of the same sampler and steps, stepped together by their own schedulers (the solver's history, the step
    index), each draw what they draw alone."""
    denoiser = one_row_at_a_time(denoiser)
    specs = [SampleSpec(class_label=c, seeds=(c,), steps=7, sampler=sampler) for c in (2, 8)]
    pair = draw(denoiser, [make(loaded, spec, per_request=True) for spec in specs])
    assert pair[0].scheduler is not pair[1].scheduler
    assert pair[0].scheduler.alphas_cumprod is pair[1].scheduler.alphas_cumprod  # shared, never written
    for run in pair:
        (alone,) = draw(denoiser, [make(loaded, run.spec, per_request=True)])
        assert torch.equal(run.latents, alone.latents)
