"""A step cache (app/sampling/cache.py) inside SampleRun and denoise_step, on the shipped checkpoint: the deep
part runs only where the cache says (counted), several cached requests of the same kind stepped together draw what
each draws alone, with every sampler, guidance method, CADS, the trace and previews, and a run's features are
freed when it finishes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import numpy as np
import pytest

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, denoise_step, sample
from app.sampling.cache import DeepCacheParams
from tests.sampling.conftest import GUIDE

pytestmark = pytest.mark.integration  # the shipped UNet's features are what is cached

SHAPE = (1, 28, 28)
CACHE = DeepCacheParams(interval=3, branch=0)


def make_run(loaded, denoiser, spec: SampleSpec) -> SampleRun:
    m = loaded.manifest
    return SampleRun(spec, loaded.scheduler_config, SHAPE, m.null_label, class_embedding=denoiser.class_embedding)


def deep_calls_per_step(denoiser, run: SampleRun) -> list[list[int]]:
    """Step the run alone to its end: per step, the row counts of the mid block's calls (the deep part runs it
    once per forward, on its full rows)."""
    calls: list[int] = []
    handle = denoiser.unet.mid_block.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    per_step = []
    try:
        while not run.done:
            before = len(calls)
            denoise_step(denoiser, [run])
            per_step.append(calls[before:])
    finally:
        handle.remove()
    return per_step


def test_a_cached_step_runs_no_deep_layer_for_its_rows(loaded, denoiser):
    # Constant CFG: the conditional and unconditional rows run at every step, so at interval 3 both refresh at
    # steps 0, 3, 6 and 9, and steps between run the shallow path only: no call of the deep part at all.
    spec = SampleSpec(3, (1, 2), 10, "dpmpp_2m", GuidanceParams(3.0), cache=CACHE)
    per_step = deep_calls_per_step(denoiser, make_run(loaded, denoiser, spec))
    assert per_step == [[4], [], [], [4], [], [], [4], [], [], [4]]


def test_the_unconditional_rows_refresh_on_their_own_steps_across_a_guidance_interval(loaded, denoiser):
    # The default request runs its unconditional rows on 7 of 20 steps (its guidance interval): they run in full
    # at the first of them, whatever the conditional rows' cache holds, and then every third step.
    spec = SampleSpec(3, (1,), 20, guidance=DEFAULT_GUIDANCE, cache=CACHE)
    run = make_run(loaded, denoiser, spec)
    guided = [i for i in range(20) if "uncond" in run.branches(i)]
    assert len(guided) == 7
    per_step = [sum(calls) for calls in deep_calls_per_step(denoiser, run)]
    # Full steps every third step from step 0, for both kinds: the unconditional rows run in full at their first
    # step and at the full steps among theirs, and reuse features of the same step as the conditional ones.
    assert guided == list(range(guided[0], guided[0] + 7))
    want = [(i % 3 == 0) + (i in guided and (i == guided[0] or i % 3 == 0)) for i in range(20)]
    assert per_step == want


def test_interval_1_draws_the_images_of_no_cache(loaded, denoiser):
    plain = make_run(loaded, denoiser, SampleSpec(5, (4, 5), 8, guidance=DEFAULT_GUIDANCE))
    every = make_run(loaded, denoiser, SampleSpec(5, (4, 5), 8, guidance=DEFAULT_GUIDANCE, cache=DeepCacheParams(1)))
    sample(denoiser, [plain])
    sample(denoiser, [every])
    assert np.abs(plain.images().astype(int) - every.images().astype(int)).max() <= 1


def test_a_cache_changes_the_images_and_the_steps_it_reuses_cost_less(loaded, denoiser):
    plain = make_run(loaded, denoiser, SampleSpec(5, (4, 5), 8, guidance=DEFAULT_GUIDANCE))
    cached = make_run(loaded, denoiser, SampleSpec(5, (4, 5), 8, guidance=DEFAULT_GUIDANCE, cache=CACHE))
    sample(denoiser, [plain])
    sample(denoiser, [cached])
    assert np.abs(plain.images().astype(int) - cached.images().astype(int)).max() > 1  # the cache is really used


def staggered(loaded, denoiser, specs, guides=None) -> list[np.ndarray]:
    """The specs stepped together, each started a step after the one before (rows at different steps in every
    forward), until all are done: their images."""
    runs = [make_run(loaded, denoiser, s) for s in specs]
    active: list[SampleRun] = []
    for run in runs:
        active.append(run)
        denoise_step(denoiser, [r for r in active if not r.done], guides)
    while any(not r.done for r in runs):
        denoise_step(denoiser, [r for r in runs if not r.done], guides)
    return [r.images().astype(int) for r in runs]


def alone(loaded, denoiser, spec, guides=None) -> np.ndarray:
    run = make_run(loaded, denoiser, spec)
    sample(denoiser, [run], guides=guides)
    return run.images().astype(int)


def assert_freed_when_done(denoiser, run: SampleRun, held: Callable[[], list], count: int, nbytes: int) -> None:
    """After the run's first step its cache holds `count` tensors (held() lists them) of `nbytes` in all, counted
    by the run; stepped to its end, it holds none and every one of them is freed."""
    denoise_step(denoiser, [run])
    refs = [weakref.ref(t) for t in held()]
    assert len(refs) == count and run.cached_bytes() == nbytes
    while not run.done:
        denoise_step(denoiser, [run])
    gc.collect()
    assert held() == [] and run.cached_bytes() == 0 and all(ref() is None for ref in refs)


def assert_the_batched_step_draws_the_run_s_own(loaded, denoiser, spec: SampleSpec) -> None:
    """app.sampling.batched steps the spec with the others of its kind; SampleRun.advance is its own step through
    its guider (the reference: together=False). Both draw the same images, to a grey level."""
    batched = make_run(loaded, denoiser, spec)
    reference = SampleRun(spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label, together=False)
    assert batched.table is not None and reference.table is None
    sample(denoiser, [batched])
    sample(denoiser, [reference])
    assert np.abs(batched.images().astype(int) - reference.images().astype(int)).max() <= 1


INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.3, sigma_max=5.0)
CASES = {
    "default request": dict(guidance=DEFAULT_GUIDANCE),
    "euler_a": dict(sampler="euler_a", guidance=GuidanceParams(3.0)),
    "ddpm": dict(sampler="ddpm", guidance=GuidanceParams(3.0)),
    "ddim interval": dict(sampler="ddim", guidance=GuidanceParams(4.0, schedule=INTERVAL)),
    "apg": dict(guidance=GuidanceParams(5.0, method=GuidanceMethod("apg"))),
    "cfg_zero_star": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("cfg_zero_star"))),
    "pag": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("pag", scale=1.0))),
    "seg": dict(guidance=GuidanceParams(3.0, schedule=INTERVAL, method=GuidanceMethod("seg", scale=2.0))),
    "cads, noise, trace, previews": dict(
        guidance=GuidanceParams(3.0, noise_level=0.1, cads=Cads(tau1=0.3, tau2=0.7)),
        return_trace=True,
        preview_every=3,
    ),
    "autoguidance with cfg": dict(
        guidance=GuidanceParams(3.0, method=GuidanceMethod("autoguidance", guide=GUIDE, scale=1.5, cfg=True))
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_several_cached_requests_of_a_kind_draw_together_what_each_draws_alone(loaded, denoiser, guides, case):
    # Three requests of the kind (cached, other seeds and classes, one of 2 images), a request without a cache and
    # one cached at another branch: every forward mixes full and shallow rows, at different steps and branches.
    fields = CASES[case]
    specs = [
        SampleSpec(1, (11,), 8, cache=CACHE, **fields),
        SampleSpec(7, (12, 13), 8, cache=CACHE, **fields),
        SampleSpec(4, (14,), 8, cache=CACHE, **fields),
        SampleSpec(2, (15,), 8, guidance=DEFAULT_GUIDANCE),
        SampleSpec(9, (16,), 8, cache=DeepCacheParams(interval=2, branch=1), **fields),
    ]
    together = staggered(loaded, denoiser, specs, guides)
    for spec, images in zip(specs, together, strict=True):
        diff = np.abs(images - alone(loaded, denoiser, spec, guides)).max()
        assert diff <= 1, f"{case}, seeds {spec.seeds}: {diff} grey levels from the request alone"


def test_a_run_frees_its_features_when_it_finishes(loaded, denoiser):
    run = make_run(loaded, denoiser, SampleSpec(3, (1, 2), 6, guidance=GuidanceParams(3.0), cache=CACHE))
    denoise_step(denoiser, [run])
    assert run.cache is not None
    held = [weakref.ref(t) for t in run.cache.tensors]
    assert len(held) == 2  # the conditional and the unconditional rows' features
    while not run.done:
        denoise_step(denoiser, [run])
    gc.collect()
    assert run.cache.tensors == [] and all(ref() is None for ref in held)


def test_several_order_1_requests_draw_together_what_each_draws_alone_and_the_forecast_changes_them(loaded, denoiser):
    # A forecast is made per run from its own features: three such requests, one of 2 images, beside a plain one
    # and one reusing its features as they are.
    forecast = DeepCacheParams(interval=3, branch=0, order=1)
    specs = [
        SampleSpec(1, (21,), 10, guidance=DEFAULT_GUIDANCE, cache=forecast),
        SampleSpec(6, (22, 23), 10, guidance=DEFAULT_GUIDANCE, cache=forecast),
        SampleSpec(8, (24,), 10, sampler="euler_a", guidance=GuidanceParams(3.0), cache=forecast),
        SampleSpec(2, (25,), 10, guidance=DEFAULT_GUIDANCE),
        SampleSpec(3, (26,), 10, guidance=DEFAULT_GUIDANCE, cache=CACHE),
    ]
    together = staggered(loaded, denoiser, specs)
    for spec, images in zip(specs, together, strict=True):
        assert np.abs(images - alone(loaded, denoiser, spec)).max() <= 1, spec.seeds
    reuse = alone(loaded, denoiser, SampleSpec(1, (21,), 10, guidance=DEFAULT_GUIDANCE, cache=CACHE))
    assert np.abs(together[0] - reuse).max() > 1  # the forecast is not the plain reuse
