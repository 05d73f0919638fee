"""app.sampling.batched on the real checkpoint: the requests it steps together draw exactly what diffusers'
own per-request step draws, whatever they are batched with, and the others keep their own path."""

import pytest
import torch

from app.guidance import GuidanceMethod, GuidanceSchedule
from app.sampling import (
    DEFAULT_GUIDANCE,
    SAMPLERS,
    GuidanceParams,
    SampleRun,
    SampleSpec,
    denoise_step,
)
from app.sampling.batched import inputs_together
from app.sampling.spec import steps_together

pytestmark = pytest.mark.integration  # bit-equal to diffusers' step


def make(loaded, spec: SampleSpec, per_request: bool = False) -> SampleRun:
    m = loaded.manifest
    # per_request: diffusers' step, one request at a time: the reference
    return SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, together=not per_request)


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
    SampleSpec(class_label=2, seeds=(12, 13), steps=9, sampler="euler_a", guidance=GuidanceParams(4), preview_every=4),
]
IDS = ["default", "dpmpp_2m-s4", "unconditional", "cosine-previews", "ddim", "ddpm-previews", "euler_a-previews"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
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
    """Each of SPECS (every sampler), drawn in one batch (at staggered starts, so rows of different steps,
    orders and scales share each tick) and with a per-request one beside them, equals itself drawn alone."""
    denoiser = one_row_at_a_time(denoiser)
    crowd = [make(loaded, spec) for spec in SPECS]
    per_request = GuidanceParams(3.0, noise_level=0.2)  # condition noise: stepped by its own scheduler
    crowd.append(make(loaded, SampleSpec(class_label=4, seeds=(3,), steps=5, guidance=per_request)))
    active: list[SampleRun] = []
    for run in crowd:  # one more request joins at each tick
        active.append(run)
        denoise_step(denoiser, [r for r in active if not r.done])
    draw(denoiser, crowd)
    for run in crowd:
        (alone,) = draw(denoiser, [make(loaded, run.spec)])
        assert torch.equal(run.latents, alone.latents), run.spec
        # Done, it holds its own latents, not a view of a batch it no longer belongs to.
        if run.table is not None:
            assert run.latents.untyped_storage().nbytes() == run.latents.nbytes
            assert run.x0_prev is None and run.scaled_input is None


def test_which_requests_step_together(loaded):
    assert steps_together(SampleSpec(class_label=1, seeds=(0,), guidance=DEFAULT_GUIDANCE))
    for guidance in (
        GuidanceParams(3.0, noise_level=0.1),
        GuidanceParams(3.0, guidance_rescale=0.7),
        GuidanceParams(3.0, method=GuidanceMethod("apg")),
    ):
        assert not steps_together(SampleSpec(class_label=1, seeds=(0,), guidance=guidance))
    assert not steps_together(SampleSpec(class_label=1, seeds=(0,), return_trace=True))
    tables = {s: make(loaded, SampleSpec(class_label=1, seeds=(0,), sampler=s)).table for s in SAMPLERS}
    solvers = {s: t.solver for s, t in tables.items() if t is not None}
    assert solvers == {"dpmpp_2m": "dpmpp_2m", "dpmpp_2m_karras": "dpmpp_2m", "ddim": "ddim", "ddpm": "ddpm",
                       "euler_a": "euler_a"}  # fmt: skip


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


def test_rows_built_together_are_each_runs_own_model_input(loaded, denoiser):
    """inputs_together (the forward's rows of all runs with a step table, built at once) against each run's own
    model_input, concatenated in the same order: the same x, timesteps and labels, to the bit, with Euler's
    scaled input, unguided steps (the interval's s = 1) and unconditional runs in the mix."""
    specs = [
        SampleSpec(class_label=3, seeds=(0, 1), steps=20),  # the default: guided only inside its interval
        SampleSpec(class_label=2, seeds=(5,), steps=9, sampler="euler_a", guidance=GuidanceParams(4)),
        SampleSpec(class_label=None, seeds=(9,), steps=6, sampler="ddpm"),
        SampleSpec(class_label=7, seeds=(4, 6, 8), steps=10, sampler="ddim", guidance=GuidanceParams(7.5)),
    ]
    runs = [make(loaded, spec) for spec in specs]
    for _ in range(5):
        denoise_step(denoiser, runs)
        x, t, y = inputs_together(runs)
        scaled = [r.scaled_input for r in runs]
        own = [r.model_input() for r in runs]
        assert torch.equal(x, torch.cat([i.x for i in own]))
        timesteps = torch.cat([i.timesteps for i in own])
        assert torch.equal(t, timesteps) and t.dtype == timesteps.dtype
        assert torch.equal(y, torch.cat([i.class_labels for i in own]))
        assert all(torch.equal(a, r.scaled_input) for a, r in zip(scaled, runs, strict=True))
    assert {r.needs_uncond() for r in runs} == {True, False}


def test_runs_stepped_together_share_one_scheduler_and_never_step_it(loaded, denoiser):
    """A batched run only reads its scheduler (timesteps, alphas, the input scaling's sigmas): every request of
    a schedule shares the cached one, which stays as set_timesteps left it however many requests it served."""
    specs = [SampleSpec(class_label=c, seeds=(c,), steps=6, sampler=s) for c in (1, 2) for s in ("dpmpp_2m", "euler_a")]
    runs = [make(loaded, spec) for spec in specs]
    assert runs[0].scheduler is runs[2].scheduler and runs[1].scheduler is runs[3].scheduler
    states = [{k: v for k, v in vars(r.scheduler).items() if not torch.is_tensor(v)} for r in runs[:2]]
    before = [repr(state) for state in states]
    draw(denoiser, runs)
    after = [repr({k: v for k, v in vars(r.scheduler).items() if not torch.is_tensor(v)}) for r in runs[:2]]
    assert after == before
    assert runs[0].scheduler.step_index is None and runs[0].scheduler.model_outputs == [None, None]
    alone = make(loaded, specs[0], per_request=True)  # the per-request path still gets its own copy to step
    assert alone.scheduler is not runs[0].scheduler
