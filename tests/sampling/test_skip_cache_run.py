"""The skip cache (app/sampling/skip.py) inside SampleRun and denoise_step, on the shipped checkpoint: a skipped
step runs no row (counted, and known in advance to admission), the sampler steps on exactly the held denoised
estimate (every sampler: its own x0 is read back), several such requests stepped together draw what each draws
alone (the batched step and the step alone, guidance methods, CADS, the trace, previews, the uncond cache beside
it), and a run's estimates are freed when it finishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.guidance import Cads, GuidanceMethod
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, denoise_step, sample
from app.sampling.cache import DeepCacheParams, SkipParams
from tests.sampling.conftest import GUIDE
from tests.sampling.test_cache_run import (
    alone,
    assert_freed_when_done,
    assert_the_batched_step_draws_the_run_s_own,
    make_run,
    staggered,
)

pytestmark = pytest.mark.integration  # the subject is the images: the shipped checkpoint

# The default request's 20 dpmpp_2m_karras steps have sigma 157, 119, 89, 65, 47, 34, 24, 16, 11, 7.3, ...: the
# kind's default band runs every step with sigma <= 10 in full, and at interval 3 steps 0, 3 and 6 before it.
SKIPPED = [1, 2, 4, 5, 7, 8]
GUIDED = range(9, 16)  # the default request's guidance interval


def test_a_skipped_step_runs_no_row_and_admission_knows_it_in_advance(loaded, denoiser):
    run = make_run(loaded, denoiser, SampleSpec(3, (1, 2), 20, guidance=DEFAULT_GUIDANCE, cache=SkipParams()))
    assert run.skip is not None and sorted(run.skip.skipped) == SKIPPED
    want = [0 if i in SKIPPED else 4 if i in GUIDED else 2 for i in range(20)]
    # admission counts ticks: an engine's tick takes a request's skipped steps before its next step that runs rows
    assert run.tick_steps() == [i for i in range(20) if i not in SKIPPED]
    assert list(run.rows_profile()) == [w for i, w in enumerate(want) if i not in SKIPPED]
    rows, skipped = [], []
    while not run.done:
        skipped.append(run.skips(run.step_index))
        rows.append(denoise_step(denoiser, [run]))
    assert rows == want
    assert skipped == [i in SKIPPED for i in range(20)]


def test_last_steps_that_skip_take_one_tick_with_no_row(loaded, denoiser):
    # No band, interval 3 over 8 steps: steps 0, 3 and 6 run rows; 7, the last, skips and closes the run's last tick
    run = make_run(loaded, denoiser, SampleSpec(3, (1,), 8, cache=SkipParams(interval=3, full_sigma_max=None)))
    assert run.tick_steps() == [0, 3, 6, 7] and list(run.rows_profile()) == [2, 2, 2, 0]
    while run.step_index < 7:
        denoise_step(denoiser, [run])
    assert run.tick_steps() == [7] and list(run.admission_profile()) == [0]


def test_a_step_no_request_runs_calls_no_forward(loaded, denoiser):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return denoiser(*args, **kwargs)

    runs = [
        make_run(loaded, denoiser, SampleSpec(c, (c,), 20, guidance=DEFAULT_GUIDANCE, cache=SkipParams()))
        for c in (1, 2)
    ]
    sample(counted, runs)
    assert len(calls) == 20 - len(SKIPPED) and 0 not in calls


def sampler_x0(run: SampleRun) -> list[torch.Tensor]:
    """Step the run alone to its end on its own diffusers scheduler, recording the denoised estimate the sampler
    itself converted eps to at each step (pred_original_sample; DPM-Solver's converted model output)."""
    seen: list[torch.Tensor] = []
    step = run.scheduler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        seen.append(run.scheduler.model_outputs[-1] if x0 is None else x0)
        return out

    run.scheduler.step = recording
    return seen


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "dpmpp_2m", "ddim", "ddpm", "euler_a"])
@pytest.mark.parametrize("order", [0, 1])
def test_a_skipped_step_steps_on_the_held_denoised_estimate(loaded, denoiser, sampler, order):
    # The sampler's own eps-to-x0 conversion of a skipped step's eps gives back the held estimate: the last full
    # step's (order 0) or the forecast from the last two, x1 + (x1 - x0)(s - s1)/(s1 - s0) (order 1), checked by
    # hand against the estimates the run kept. Holds only where the step's sigma is the sampler's own (Karras's
    # unrounded ones among them).
    cache = SkipParams(interval=3, full_sigma_max=2.0, order=order)
    spec = SampleSpec(4, (7, 8), 12, sampler=sampler, guidance=GuidanceParams(3.0), cache=cache)
    m = loaded.manifest
    run = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), m.null_label, together=False)
    assert run.skip is not None and run.skip.skipped
    x0 = sampler_x0(run)
    kept: dict[int, torch.Tensor] = {}
    wanted: dict[int, torch.Tensor] = {}
    while not run.done:
        i = run.step_index
        if run.skip.skips(i):
            (s1, x1), *before = sorted(kept.items(), reverse=True)[:2]
            wanted[i] = x1
            if order == 1 and before and s1 - before[0][0] <= cache.interval:
                s0, x0_before = before[0]
                wanted[i] = x1 + (x1 - x0_before) * ((i - s1) / (s1 - s0))
        denoise_step(denoiser, [run])
        if not run.skip.skips(i):
            kept[i] = run.skip.tensors[-1] if run.skip.tensors else x0[i]  # the last step releases its estimate
    assert wanted and all(run.skip.skips(i) for i in wanted)
    clip = loaded.scheduler_config.get("clip_sample") and sampler in ("ddim", "ddpm")  # their x0 is clipped to [-1, 1]
    for i, want in wanted.items():
        got = x0[i]
        want = want.clamp(-1, 1) if clip else want
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4, msg=f"{sampler} step {i}")


def test_interval_1_draws_the_images_of_no_cache_and_the_default_changes_them_a_little(loaded, denoiser):
    plain = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE))
    interval_1 = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE, cache=SkipParams(1)))
    skipping = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE, cache=SkipParams()))
    assert np.array_equal(plain, interval_1)
    assert np.abs(plain - skipping).max() > 1  # the cache is really used
    assert np.abs(plain - skipping).mean() < 3  # and at the default's steps, close to the images without it


# Many skipped steps, guided ones among them (a constant scale guides every step): every step with sigma > 1
# alternates between full and skipped.
SKIP = SkipParams(interval=2, full_sigma_max=1.0)
CASES = {
    "default request": dict(guidance=DEFAULT_GUIDANCE),  # app.sampling.batched's step
    "euler_a constant": dict(sampler="euler_a", guidance=GuidanceParams(3.0)),
    "ddim order 1": dict(
        sampler="ddim", guidance=GuidanceParams(4.0), cache=SkipParams(2, full_sigma_max=1.0, order=1)
    ),
    "with uncond every 2": dict(guidance=GuidanceParams(3.0), cache=SkipParams(2, full_sigma_max=1.0, uncond_every=2)),
    "apg": dict(guidance=GuidanceParams(5.0, method=GuidanceMethod("apg"))),  # each run's own step
    "pag with cfg": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("pag", scale=1.0))),
    "autoguidance with cfg": dict(
        guidance=GuidanceParams(3.0, method=GuidanceMethod("autoguidance", guide=GUIDE, scale=1.5, cfg=True))
    ),
    "cads, noise, trace, previews": dict(
        guidance=GuidanceParams(3.0, noise_level=0.1, cads=Cads(tau1=0.3, tau2=0.7)),
        return_trace=True,
        preview_every=3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_several_skipping_requests_of_a_kind_draw_together_what_each_draws_alone(loaded, denoiser, guides, case):
    # Three requests of the kind (other seeds and classes, one of 2 images), a plain request and a deepcache one,
    # each started a step after the one before: forwards mix requests that skip the step with requests that run.
    fields = {"cache": SKIP, **CASES[case]}
    specs = [
        SampleSpec(1, (11,), 10, **fields),
        SampleSpec(7, (12, 13), 10, **fields),
        SampleSpec(4, (14,), 10, **fields),
        SampleSpec(2, (15,), 10, guidance=DEFAULT_GUIDANCE),
        SampleSpec(9, (16,), 10, guidance=DEFAULT_GUIDANCE, cache=DeepCacheParams(interval=2)),
    ]
    together = staggered(loaded, denoiser, specs, guides)
    for spec, images in zip(specs, together, strict=True):
        diff = np.abs(images - alone(loaded, denoiser, spec, guides)).max()
        assert diff <= 1, f"{case}, seeds {spec.seeds}: {diff} grey levels from the request alone"


def test_skipping_requests_of_different_settings_draw_together_what_each_draws_alone(loaded, denoiser):
    # Four skip requests with their own interval, band, order, uncond cache, sampler, seeds and images in the same
    # forwards (staggered, so one skips a step while another runs it), beside a plain request.
    specs = [
        SampleSpec(1, (41,), 12, guidance=DEFAULT_GUIDANCE, cache=SkipParams(3)),
        SampleSpec(6, (42, 43), 12, guidance=DEFAULT_GUIDANCE, cache=SkipParams(5, uncond_every=2)),
        SampleSpec(8, (44,), 12, "euler_a", GuidanceParams(3.0), cache=SkipParams(2, full_sigma_max=1, order=1)),
        SampleSpec(3, (45, 46), 12, "ddim", GuidanceParams(4.0), cache=SkipParams(4, 0.2, full_sigma_min=0.5)),
        SampleSpec(2, (47,), 12, guidance=DEFAULT_GUIDANCE),
    ]
    runs = [make_run(loaded, denoiser, spec) for spec in specs[:4]]
    assert len({r.skip.skipped for r in runs if r.skip is not None}) == 4  # each skips steps of its own
    together = staggered(loaded, denoiser, specs)
    for spec, images in zip(specs, together, strict=True):
        diff = np.abs(images - alone(loaded, denoiser, spec)).max()
        assert diff <= 1, f"seeds {spec.seeds}: {diff} grey levels from the request alone"


def test_the_batched_step_and_the_run_s_own_step_draw_the_same_images(loaded, denoiser):
    spec = SampleSpec(6, (31, 32), 20, guidance=DEFAULT_GUIDANCE, cache=SkipParams(uncond_every=2))
    assert_the_batched_step_draws_the_run_s_own(loaded, denoiser, spec)


def test_a_run_frees_its_estimates_when_it_finishes_and_counts_them_while_it_runs(loaded, denoiser):
    cache = SkipParams(uncond_every=2)
    run = make_run(loaded, denoiser, SampleSpec(3, (1, 2), 20, guidance=DEFAULT_GUIDANCE, cache=cache))
    assert run.skip is not None
    assert_freed_when_done(denoiser, run, lambda: run.skip.tensors, 1, 2 * 28 * 28 * 4)  # an x0 of 2 images, fp32


def test_the_uncond_cache_beside_it_counts_only_the_guided_steps_that_run(loaded, denoiser):
    # A constant scale guides every step; the guided steps that skip run no unconditional rows, so the uncond
    # cache's schedule (every 2nd guided step runs them) counts the steps that run only.
    cache = SkipParams(2, full_sigma_max=1.0, uncond_every=2)
    run = make_run(loaded, denoiser, SampleSpec(3, (1,), 10, guidance=GuidanceParams(3.0), cache=cache))
    assert run.skip is not None and run.deltas is not None
    ran = [i for i in range(10) if not run.skip.skips(i)]
    assert len(ran) < 10 and sorted(run.deltas.reused) == ran[1::2]
    sample(denoiser, [run])
    assert run.done
