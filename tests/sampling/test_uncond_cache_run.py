"""The uncond cache (app/sampling/cache.py's GuidanceDeltas) inside SampleRun and denoise_step, on the shipped
checkpoint: the reused steps run no unconditional rows (counted) and guide with the held difference, several such
requests stepped together draw what each draws alone (the batched step and the step alone, every guidance method
that runs unconditional rows, CADS, the trace, previews, beside deepcache and plain requests), and a run's
differences are freed when it finishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.guidance import Cads, GuidanceMethod
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleSpec, denoise_step, sample
from app.sampling.cache import DeepCacheParams, UncondParams
from tests.sampling.test_cache_run import (
    alone,
    assert_freed_when_done,
    assert_the_batched_step_draws_the_run_s_own,
    make_run,
    staggered,
)

pytestmark = pytest.mark.integration  # the subject is the images: the shipped checkpoint

REUSE = UncondParams(every=3, order=1)


def rows_per_step(denoiser, run) -> list[int]:
    """Step the run alone to its end: the rows of each step's forward."""
    rows = []
    while not run.done:
        rows.append(denoise_step(denoiser, [run]))
    return rows


def test_a_reused_step_runs_no_unconditional_rows(loaded, denoiser):
    # The default request runs its unconditional rows on 7 of 20 steps (its guidance interval); every 3: on the
    # first of them, the fourth and the seventh. The other four run the conditional rows alone.
    spec = SampleSpec(3, (1, 2), 20, guidance=DEFAULT_GUIDANCE, cache=REUSE)
    run = make_run(loaded, denoiser, spec)
    guided = [i for i in range(20) if "uncond" in run._guider_branches(i)]
    assert len(guided) == 7
    ran = guided[::3]
    assert [i for i in range(20) if "uncond" in run.branches(i)] == ran
    want_rows = [4 if i in ran else 2 for i in range(20)]
    assert list(run.rows_profile()) == want_rows  # what admission counts, known in advance
    reused = []
    rows = []
    while not run.done:
        reused.append(run.reused_uncond_rows())
        rows.append(denoise_step(denoiser, [run]))
    assert rows == want_rows
    assert reused == [2 if i in guided and i not in ran else 0 for i in range(20)]


def test_a_reused_step_guides_with_the_held_difference(loaded, denoiser):
    # The trace's |eps_c - eps_u| per image: at order 0 a reused step's is the last step that ran its rows' (the
    # difference as it was); at order 1 it is the forecast d1 + (d1 - d0)(s - s1)/(s1 - s0), checked by hand
    # against the differences the run kept.
    spec = SampleSpec(3, (1, 2), 20, guidance=GuidanceParams(3.0), return_trace=True, cache=UncondParams(3, 0))
    run = make_run(loaded, denoiser, spec)
    sample(denoiser, [run])
    norms = [None if t.diff_norm is None else t.diff_norm.tolist() for t in run.trace]
    for i in range(20):
        if i % 3:
            assert norms[i] == pytest.approx(norms[i - i % 3], rel=1e-5), i  # eps_c - (eps_c - d): d to rounding
    assert norms[1] != pytest.approx(norms[3], rel=1e-3)  # and the held difference is really refreshed

    forecast = make_run(loaded, denoiser, SampleSpec(3, (1,), 20, guidance=GuidanceParams(3.0), cache=REUSE))
    kept: dict[int, torch.Tensor] = {}
    checked = 0
    while not forecast.done:
        i = forecast.step_index
        deltas = forecast.deltas
        assert deltas is not None
        if deltas.reuses(i) and len(kept) >= 2:
            (s0, d0), (s1, d1) = sorted(kept.items())[-2:]
            assert torch.allclose(deltas.delta(i), d1 + (d1 - d0) * ((i - s1) / (s1 - s0)))
            checked += 1
        denoise_step(denoiser, [forecast])
        if "uncond" in forecast.branches(i):
            kept[i] = deltas.tensors[-1]
    assert checked == 11  # the 13 reused steps (all but 0, 3, ..., 18), less the two before a second difference


def test_every_1_draws_the_images_of_no_cache_and_every_3_changes_them(loaded, denoiser):
    plain = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE))
    every_1 = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE, cache=UncondParams(1)))
    every_3 = alone(loaded, denoiser, SampleSpec(5, (4, 5), 20, guidance=DEFAULT_GUIDANCE, cache=REUSE))
    assert np.array_equal(plain, every_1)
    assert np.abs(plain - every_3).max() > 1  # the cache is really used


CASES = {
    "default request": dict(guidance=DEFAULT_GUIDANCE),  # app.sampling.batched's step
    "euler_a constant": dict(sampler="euler_a", guidance=GuidanceParams(3.0)),
    "ddim order 0": dict(sampler="ddim", guidance=GuidanceParams(4.0), cache=UncondParams(every=2, order=0)),
    "apg": dict(guidance=GuidanceParams(5.0, method=GuidanceMethod("apg"))),  # each run's own step
    "cfg_zero_star": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("cfg_zero_star"))),
    "pag with cfg": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("pag", scale=1.0))),
    "with deepcache": dict(  # FasterCache's pairing: the early steps' deep features, and the guidance difference
        guidance=DEFAULT_GUIDANCE, cache=DeepCacheParams(interval=5, full_sigma_max=40, uncond_every=2)
    ),
    "cads, noise, trace, previews": dict(
        guidance=GuidanceParams(3.0, noise_level=0.1, cads=Cads(tau1=0.3, tau2=0.7)),
        return_trace=True,
        preview_every=3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_several_uncond_cached_requests_of_a_kind_draw_together_what_each_draws_alone(loaded, denoiser, case):
    # Three requests of the kind (other seeds and classes, one of 2 images), a plain request and a deepcache one:
    # every forward mixes rows that reuse their difference, rows that refresh it and rows of other requests.
    fields = {"cache": REUSE, **CASES[case]}
    specs = [
        SampleSpec(1, (11,), 10, **fields),
        SampleSpec(7, (12, 13), 10, **fields),
        SampleSpec(4, (14,), 10, **fields),
        SampleSpec(2, (15,), 10, guidance=DEFAULT_GUIDANCE),
        SampleSpec(9, (16,), 10, guidance=DEFAULT_GUIDANCE, cache=DeepCacheParams(interval=2)),
    ]
    together = staggered(loaded, denoiser, specs)
    for spec, images in zip(specs, together, strict=True):
        diff = np.abs(images - alone(loaded, denoiser, spec)).max()
        assert diff <= 1, f"{case}, seeds {spec.seeds}: {diff} grey levels from the request alone"


def test_deepcache_with_uncond_every_skips_both_the_deep_part_and_the_unconditional_rows(loaded, denoiser):
    # The default request with its 7 guided steps (9..15) run in full (sigma <= 40), every second of them without
    # unconditional rows, and its first 5 steps (sigma > 40) at interval 5: 1-4 on the shallow path.
    cache = DeepCacheParams(interval=5, full_sigma_max=40, uncond_every=2, uncond_order=1)
    run = make_run(loaded, denoiser, SampleSpec(3, (1,), 20, guidance=DEFAULT_GUIDANCE, cache=cache))
    assert run.deltas is not None and sorted(run.deltas.reused) == [10, 12, 14]
    shallow, rows = [], []
    while not run.done:
        rows.append(denoise_step(denoiser, [run]))
        shallow.append(run.shallow_rows)
    assert shallow == [0, 1, 1, 1, 1, *[0] * 15]
    assert rows == [2 if i in (9, 11, 13, 15) else 1 for i in range(20)]


def test_a_run_frees_its_differences_when_it_finishes_and_counts_them_while_it_runs(loaded, denoiser):
    run = make_run(loaded, denoiser, SampleSpec(3, (1, 2), 8, guidance=GuidanceParams(3.0), cache=REUSE))
    assert run.deltas is not None
    assert_freed_when_done(denoiser, run, lambda: run.deltas.tensors, 1, 2 * 28 * 28 * 4)  # one d of 2 images, fp32


def test_the_batched_step_and_the_run_s_own_step_draw_the_same_images(loaded, denoiser):
    # Both must reuse the same differences.
    assert_the_batched_step_draws_the_run_s_own(
        loaded, denoiser, SampleSpec(6, (31, 32), 20, guidance=DEFAULT_GUIDANCE, cache=REUSE)
    )


def test_uncond_cached_requests_of_different_settings_draw_together_what_each_draws_alone(loaded, denoiser):
    # Three uncond requests with their own every, order, seeds and scales in the same forwards (staggered, so
    # their reused and refreshing steps fall on different ticks), beside deepcache + uncond_every.
    specs = [
        SampleSpec(1, (21,), 12, guidance=GuidanceParams(3.0), cache=UncondParams(every=2, order=0)),
        SampleSpec(6, (22, 23), 12, guidance=GuidanceParams(4.5), cache=UncondParams(every=3, order=1)),
        SampleSpec(8, (24,), 12, guidance=DEFAULT_GUIDANCE, cache=UncondParams(every=4, order=1)),
        SampleSpec(3, (25,), 12, guidance=GuidanceParams(2.0), cache=DeepCacheParams(interval=3, uncond_every=2)),
    ]
    together = staggered(loaded, denoiser, specs)
    for spec, images in zip(specs, together, strict=True):
        diff = np.abs(images - alone(loaded, denoiser, spec)).max()
        assert diff <= 1, f"{spec.cache}, seeds {spec.seeds}: {diff} grey levels from the request alone"
