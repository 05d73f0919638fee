"""The batched sampler against plain diffusers loops, on the real shipped checkpoint."""

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from app.guidance import GuidanceSchedule
from app.sampling import (
    SAMPLERS,
    GuidanceParams,
    SampleRun,
    SampleSpec,
    denoise_step,
    make_scheduler,
    sample,
    set_timesteps,
    to_uint8,
)

pytestmark = pytest.mark.integration

SHAPE = (1, 28, 28)
# Batched and unbatched convolutions round differently; this bounds the latent difference we accept
# (relative, since euler_a latents start at sigma_max of the training schedule).
BATCH_ATOL = 1e-4
BATCH_RTOL = 1e-4


def make_run(loaded, spec):
    return SampleRun(spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label)


def plain_diffusers_loop(loaded, sampler, steps, label, seeds, scale, with_uncond=True):
    """The textbook CFG loop: one scheduler, a scalar timestep, cat([x, x]) each step."""
    unet, null = loaded.unet, loaded.manifest.null_label
    scheduler = make_scheduler(sampler, loaded.scheduler_config)
    set_timesteps(scheduler, steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    x = randn_tensor((n, *SHAPE), generator=gens) * scheduler.init_noise_sigma
    cond = torch.full((n,), label, dtype=torch.long)
    uncond = torch.full((n,), null, dtype=torch.long)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            if with_uncond:
                eps_c, eps_u = unet(torch.cat([xin, xin]), t, class_labels=torch.cat([cond, uncond])).sample.chunk(2)
                eps = eps_u + scale * (eps_c - eps_u)
            else:
                eps = unet(xin, t, class_labels=cond).sample
            # DDIMPipeline's use_clipped_model_output: eps consistent with the clipped x0.
            kwargs = {"use_clipped_model_output": True} if sampler == "ddim" else {}
            x = scheduler.step(eps, t, x, generator=gens, **kwargs).prev_sample
    return x


def test_one_forward_over_2b_rows_equals_two_passes(loaded, denoiser):
    g = torch.Generator().manual_seed(0)
    b = 4
    x = torch.randn(b, *SHAPE, generator=g)
    t = torch.tensor([999, 700, 300, 20])
    cond = torch.tensor([0, 3, 7, 9])
    null = torch.full((b,), loaded.manifest.null_label)
    joint = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
    assert torch.allclose(joint[:b], denoiser(x, t, cond), atol=1e-5)
    assert torch.allclose(joint[b:], denoiser(x, t, null), atol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_batched_loop_matches_plain_diffusers_loop(loaded, denoiser, sampler):
    seeds = (11, 12)
    run = make_run(loaded, SampleSpec(class_label=5, seeds=seeds, steps=6, sampler=sampler))
    sample(denoiser, [run])
    want = plain_diffusers_loop(loaded, sampler, 6, 5, seeds, scale=3.0)
    assert torch.allclose(run.latents, want, atol=BATCH_ATOL, rtol=BATCH_RTOL), (run.latents - want).abs().max()


def test_scale_one_is_the_conditional_model_alone(loaded, denoiser):
    spec = SampleSpec(class_label=7, seeds=(3,), steps=6, sampler="ddim", guidance=GuidanceParams(guidance_scale=1.0))
    run = make_run(loaded, spec)
    assert run.rows_needed() == 1  # the unconditional rows are skipped
    sample(denoiser, [run])
    want = plain_diffusers_loop(loaded, "ddim", 6, 7, (3,), scale=1.0, with_uncond=False)
    assert torch.equal(run.latents, want)


def test_scale_zero_is_the_unconditional_model(loaded, denoiser):
    guided = make_run(loaded, SampleSpec(class_label=7, seeds=(3,), steps=6, guidance=GuidanceParams(0.0)))
    uncond = make_run(loaded, SampleSpec(class_label=None, seeds=(3,), steps=6))
    sample(denoiser, [guided])
    sample(denoiser, [uncond])
    assert torch.allclose(guided.latents, uncond.latents, atol=BATCH_ATOL, rtol=BATCH_RTOL)


def test_seeded_request_is_batch_invariant(loaded, denoiser):
    spec = SampleSpec(
        class_label=2,
        seeds=(42, 43),
        steps=8,
        sampler="euler_a",
        guidance=GuidanceParams(4.0, GuidanceSchedule("cosine", 1.0, 0.25), noise_level=0.3, guidance_rescale=0.5),
    )
    alone = make_run(loaded, spec)
    sample(denoiser, [alone])
    crowd = [
        make_run(loaded, SampleSpec(class_label=0, seeds=(1, 2, 3), steps=5, sampler="ddpm")),
        make_run(loaded, spec),
        make_run(loaded, SampleSpec(class_label=None, seeds=(9,), steps=12, sampler="dpmpp_2m")),
    ]
    sample(denoiser, crowd)
    assert torch.allclose(crowd[1].latents, alone.latents, atol=BATCH_ATOL, rtol=BATCH_RTOL)
    # Each image depends only on its own seed: image 1 alone equals image 1 of the pair.
    single = make_run(loaded, SampleSpec(**{**spec.__dict__, "seeds": (43,)}))
    sample(denoiser, [single])
    assert torch.allclose(single.latents[0], alone.latents[1], atol=BATCH_ATOL, rtol=BATCH_RTOL)


def test_different_requests_share_one_forward_per_step(loaded, denoiser):
    calls = []

    def counting(x, t, y):
        calls.append((x.shape[0], t.unique().numel()))
        return denoiser(x, t, y)

    runs = [
        make_run(loaded, SampleSpec(class_label=1, seeds=(1, 2), steps=4, sampler="ddim")),
        make_run(loaded, SampleSpec(class_label=4, seeds=(5,), steps=3, sampler="euler_a")),
        make_run(loaded, SampleSpec(class_label=None, seeds=(6,), steps=2, sampler="ddpm")),
    ]
    denoise_step(counting, runs[:1])  # the first run is one step ahead of the others
    rows = denoise_step(counting, runs)
    assert rows == 4 + 2 + 1 and calls[1] == (7, 2)  # one forward, rows at two different timesteps
    sample(counting, runs)
    assert [c[0] for c in calls] == [4, 7, 7, 6]  # runs leave the batch as they finish
    assert all(r.done for r in runs)


def test_weight_one_steps_skip_unconditional_rows(loaded, denoiser):
    spec = SampleSpec(
        class_label=3,
        seeds=(1,),
        steps=10,
        guidance=GuidanceParams(3.0, GuidanceSchedule("interval", 0.3, 0.6)),
    )
    run = make_run(loaded, spec)
    rows = []
    while not run.done:
        rows.append(denoise_step(denoiser, [run]))
    assert rows == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1]


def test_noise_level_changes_the_sample_reproducibly(loaded, denoiser):
    def draw(noise_level):
        run = make_run(
            loaded,
            SampleSpec(class_label=8, seeds=(5,), steps=5, guidance=GuidanceParams(3.0, noise_level=noise_level)),
        )
        sample(denoiser, [run])
        return run.latents

    base, noisy, again = draw(0.0), draw(0.5), draw(0.5)
    assert torch.equal(noisy, again)
    assert not torch.allclose(base, noisy, atol=1e-3)


UNCLIPPED_ONE_STEP = {("dpmpp_2m", 1), ("dpmpp_2m_karras", 1), ("euler_a", 1)}  # x0 at the first timestep: below
# Karras sigmas over 2 or 3 steps jump from sigma 158 straight to 0.01 or 5.9, so the amplified error of the
# first x0 prediction stays in the image (measured: 39% and 21% of pixels past 2); from 5 steps on they end
# like dpmpp_2m (none past 2, 0.1% past 1.5 at 5 steps). The API documents it; not a data-range case.
KARRAS_TOO_FEW = {("dpmpp_2m_karras", 2), ("dpmpp_2m_karras", 3)}


def overshoot_limit(sampler: str, steps: int) -> float:
    """How far past the data range [-1, 1] fewer than 1% of a sampler's pixels may end.

    Measured on the shipped checkpoint at seeds (1, 2): ddpm and ddim end inside [-1, 1] (they clip x0),
    and euler_a at 25 steps nearly (max 1.05); dpmpp_2m at 25 steps leaves 1.6% of pixels past 1.1 but
    none past 1.5 (max 1.26); with 2 or 3 steps dpmpp_2m and euler_a reach 1.4 to 1.9, none past 2. A
    sampler that mis-scales its noise or its last step ends at the noise's scale instead (std 1, or
    sigma_max = 158 for euler_a): 4.5% or more of the pixels past 2. The overshoot is clamped in the PNG.
    """
    if sampler in ("ddpm", "ddim") or steps > 3:
        return 1.5 if sampler.startswith("dpmpp_2m") else 1.1
    return 2.0


@pytest.mark.parametrize(
    "sampler, steps",
    [(s, n) for s in sorted(SAMPLERS) for n in (1, 2, 3, 25) if (s, n) not in UNCLIPPED_ONE_STEP | KARRAS_TOO_FEW],
)
def test_every_sampler_ends_in_the_data_range(loaded, denoiser, sampler, steps):
    run = make_run(loaded, SampleSpec(class_label=0, seeds=(1, 2), steps=steps, sampler=sampler))
    sample(denoiser, [run])
    assert run.latents.isfinite().all()
    limit = overshoot_limit(sampler, steps)
    assert (run.latents.abs() > limit).float().mean() < 0.01, run.latents.abs().max()


@pytest.mark.parametrize("sampler", sorted(s for s, _ in UNCLIPPED_ONE_STEP))
def test_one_unclipped_step_is_the_guided_x0_prediction(loaded, denoiser, sampler):
    """One step of a solver that does not clip ends at x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
    of the first timestep (DDIM, Song et al. 2021, eq. 12, with no step left to take). 1 / sqrt(alpha_bar)
    is about 158 there, so the model's error is amplified far past [-1, 1] (std 2.3 on the shipped
    checkpoint): these cases are checked against the formula, not the data range."""
    run = make_run(loaded, SampleSpec(class_label=0, seeds=(1, 2), steps=1, sampler=sampler,
                                      guidance=GuidanceParams(guidance_scale=3.0)))  # fmt: skip
    inp = run.model_input()
    # The model sees the seeded noise at unit variance, whatever scale the sampler keeps its latents in.
    noise = randn_tensor((2, *SHAPE), generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.allclose(inp.x[:2], noise, atol=1e-4, rtol=1e-4)
    eps_cond, eps_uncond = denoiser(inp.x, inp.timesteps, inp.class_labels).chunk(2)
    eps = eps_uncond + 3.0 * (eps_cond - eps_uncond)
    alpha_bar = run.scheduler.alphas_cumprod[int(inp.timesteps[0])]
    x = inp.x[:2]  # x_t, in the variance-preserving scale of the formula
    want = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    sample(denoiser, [run])
    assert torch.allclose(run.latents, want, atol=1e-3, rtol=1e-4), (run.latents - want).abs().max()
    assert want.std() > 1.5  # the amplified error: why the data range does not apply here


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_make_scheduler_gives_each_request_its_own_instance_equal_to_from_config(loaded, sampler):
    from app.sampling import make_scheduler, set_timesteps

    a, b = make_scheduler(sampler, loaded.scheduler_config), make_scheduler(sampler, loaded.scheduler_config)
    cls, overrides = SAMPLERS[sampler]
    assert a is not b and dict(a.config) == dict(cls.from_config(loaded.scheduler_config, **overrides).config)
    set_timesteps(a, 5)
    set_timesteps(b, 9)
    assert len(a.timesteps) == 5 and len(b.timesteps) == 9  # no state shared through the prototype
    assert len(make_scheduler(sampler, loaded.scheduler_config).timesteps) == 1000  # a fresh one is untouched


def test_karras_sampler_spaces_its_sigmas_by_rho_7(loaded):
    """dpmpp_2m_karras: Karras et al.'s sigma_i = (hi^(1/7) + i/(n-1) (lo^(1/7) - hi^(1/7)))^7 from the largest
    training sigma to the smallest, so more of its steps fall at low noise than dpmpp_2m's trailing spacing."""
    karras = make_run(loaded, SampleSpec(class_label=0, seeds=(1,), steps=20, sampler="dpmpp_2m_karras"))
    plain = make_run(loaded, SampleSpec(class_label=0, seeds=(1,), steps=20, sampler="dpmpp_2m"))
    sigmas = karras.scheduler.sigmas[:-1].double()  # the last is the final 0
    hi, lo = sigmas[0], sigmas[-1]
    ramp = torch.linspace(0, 1, 20, dtype=torch.float64)
    want = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, want, rtol=1e-3, atol=1e-4)
    assert sum(s < 1 for s in karras.sigmas) > sum(s < 1 for s in plain.sigmas)


@pytest.mark.parametrize("together", [True, False], ids=["batched", "per-request"])
def test_every_preview_is_the_x0_prediction_at_its_own_step(loaded, denoiser, together):
    """Each preview is the guided eps of its step mapped to x0 with that step's own alpha_bar (not the next
    step's), read against the formula at every step, not only the last."""
    spec = SampleSpec(class_label=5, seeds=(3, 4), steps=6, sampler="ddim", guidance=GuidanceParams(2.0),
                      preview_every=1)  # fmt: skip
    run = SampleRun(spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label, together=together)
    checked = 0
    while not run.done:
        inp = run.model_input() if run.table is None else None
        x = inp.x[:2] if inp is not None else run.latents  # DDIM's model input is its latents
        t = int(run.timesteps[run.step_index])
        eps_cond, eps_uncond = denoiser(torch.cat([x, x]), torch.full((4,), t), torch.tensor([5, 5, 10, 10])).chunk(2)
        eps = eps_uncond + 2.0 * (eps_cond - eps_uncond)
        alpha_bar = run.scheduler.alphas_cumprod[t]
        want = to_uint8((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt())
        denoise_step(denoiser, [run])
        if not run.done:
            assert run.preview.step == run.step_index
            assert np.abs(run.preview.images.astype(int) - want.astype(int)).max() <= 1, run.step_index
            checked += 1
    assert checked == 5
