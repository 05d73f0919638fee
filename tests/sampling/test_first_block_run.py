"""First-Block Cache (app/sampling/cache.py's FirstBlockRows) inside SampleRun and denoise_step on a tiny DiT of
four blocks with random weights (a real DiT is gigabytes; the code path is the same): rows really skip and the
images change, several first_block requests of a kind stepped together draw what each draws alone, with
samplers, guidance methods (the perturbed ones through the every-row path), a guidance interval, CADS, the trace
and previews, and a run's states are freed when it finishes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from diffusers import DDIMScheduler

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.models.latent import DiTDenoiser
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, denoise_step, sample
from app.sampling.cache import FirstBlockParams, UncondParams
from tests.tiny_models import tiny_dit

SHAPE, NULL = (4, 8, 8), 10
CACHE = FirstBlockParams(threshold=0.2)
# Batched and unbatched matmuls round differently (tests/models/test_latent.py): on latents.
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def dit_denoiser():
    return DiTDenoiser(tiny_dit(NULL, num_layers=4).eval(), eps_channels=4)


@pytest.fixture(scope="module")
def config():
    return dict(DDIMScheduler(clip_sample=False).config)


def make_run(config, dit_denoiser, spec: SampleSpec) -> SampleRun:
    return SampleRun(spec, config, SHAPE, NULL, class_embedding=dit_denoiser.class_embedding)


def test_rows_skip_the_other_blocks_and_the_images_change(config, dit_denoiser):
    spec = SampleSpec(3, (1, 2), 12, "dpmpp_2m", GuidanceParams(4.0), cache=CACHE)
    run, plain = (
        make_run(config, dit_denoiser, spec),
        make_run(config, dit_denoiser, SampleSpec(3, (1, 2), 12, "dpmpp_2m")),
    )
    shallow = []
    while not run.done:
        denoise_step(dit_denoiser, [run])
        shallow.append(run.shallow_rows)
    sample(dit_denoiser, [plain])
    assert shallow[0] == 0 and sum(shallow) > 0  # the first step has nothing to compare with
    assert not torch.allclose(run.latents, plain.latents, atol=1e-2)


INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.3, sigma_max=5.0)
CASES = {
    "default request": dict(guidance=DEFAULT_GUIDANCE),
    "euler_a": dict(sampler="euler_a", guidance=GuidanceParams(3.0)),
    "ddim interval": dict(sampler="ddim", guidance=GuidanceParams(4.0, schedule=INTERVAL)),
    "apg": dict(guidance=GuidanceParams(5.0, method=GuidanceMethod("apg"))),
    "pag": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("pag", scale=1.0))),
    "slg": dict(guidance=GuidanceParams(3.0, method=GuidanceMethod("slg", scale=1.0))),
    "cads, noise, trace, previews": dict(
        guidance=GuidanceParams(3.0, noise_level=0.1, cads=Cads(tau1=0.3, tau2=0.7)),
        return_trace=True,
        preview_every=3,
    ),
}


def staggered(config, dit_denoiser, specs) -> list[SampleRun]:
    """The specs stepped together, each started a step after the one before, until all are done."""
    runs = [make_run(config, dit_denoiser, s) for s in specs]
    active: list[SampleRun] = []
    for run in runs:
        active.append(run)
        denoise_step(dit_denoiser, [r for r in active if not r.done])
    while any(not r.done for r in runs):
        denoise_step(dit_denoiser, [r for r in runs if not r.done])
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_several_first_block_requests_of_a_kind_draw_together_what_each_draws_alone(config, dit_denoiser, case):
    # Three requests of the kind (other seeds and classes, one of 2 images), one without a cache and one at another
    # threshold: every forward mixes rows that skip with rows that run in full, at different steps.
    fields = CASES[case]
    specs = [
        SampleSpec(1, (11,), 8, cache=CACHE, **fields),
        SampleSpec(7, (12, 13), 8, cache=CACHE, **fields),
        SampleSpec(4, (14,), 8, cache=CACHE, **fields),
        SampleSpec(2, (15,), 8, guidance=DEFAULT_GUIDANCE),
        SampleSpec(9, (16,), 8, cache=FirstBlockParams(threshold=0.5), **fields),
    ]
    together = staggered(config, dit_denoiser, specs)
    for spec, run in zip(specs, together, strict=True):
        alone = make_run(config, dit_denoiser, spec)
        sample(dit_denoiser, [alone])
        assert torch.allclose(run.latents, alone.latents, atol=ATOL, rtol=RTOL), f"{case}, seeds {spec.seeds}"


def test_a_run_frees_its_states_when_it_finishes(config, dit_denoiser):
    run = make_run(config, dit_denoiser, SampleSpec(3, (1, 2), 6, guidance=GuidanceParams(3.0), cache=CACHE))
    denoise_step(dit_denoiser, [run])
    assert run.cache is not None
    held = [weakref.ref(t) for t in run.cache.tensors]
    assert len(held) == 4  # each conditional and unconditional row its own state
    while not run.done:
        denoise_step(dit_denoiser, [run])
    gc.collect()
    assert run.cache.tensors == [] and all(ref() is None for ref in held)


def test_several_uncond_requests_on_a_dit_draw_together_what_each_draws_alone(config, dit_denoiser):
    # The uncond cache enters no network: on a DiT, alone and beside first_block (uncond_every), three requests of
    # each kind with other requests in the same forwards draw what each draws alone.
    reuse = UncondParams(every=3)
    paired = FirstBlockParams(threshold=0.2, uncond_every=2)
    specs = [
        SampleSpec(1, (21,), 9, guidance=GuidanceParams(3.0), cache=reuse),
        SampleSpec(6, (22, 23), 9, sampler="euler_a", guidance=GuidanceParams(3.0), cache=reuse),
        SampleSpec(8, (24,), 9, guidance=GuidanceParams(4.0, method=GuidanceMethod("apg")), cache=reuse),
        SampleSpec(2, (25,), 9, guidance=GuidanceParams(3.0), cache=paired),
        SampleSpec(3, (26, 27), 9, guidance=GuidanceParams(3.0), cache=paired),
        SampleSpec(5, (28,), 9, guidance=GuidanceParams(3.0), cache=paired),
        SampleSpec(4, (29,), 9, guidance=DEFAULT_GUIDANCE),
    ]
    together = staggered(config, dit_denoiser, specs)
    for spec, run in zip(specs, together, strict=True):
        alone = make_run(config, dit_denoiser, spec)
        sample(dit_denoiser, [alone])
        assert torch.allclose(run.latents, alone.latents, atol=ATOL, rtol=RTOL), spec.seeds
    plain = make_run(config, dit_denoiser, SampleSpec(1, (21,), 9, guidance=GuidanceParams(3.0)))
    sample(dit_denoiser, [plain])
    assert not torch.allclose(together[0].latents, plain.latents, atol=1e-2)  # the reuse is really used
