"""The guidance methods, CADS and the trace inside SampleRun, on the real shipped checkpoint."""

import pytest
import torch

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule, apg_combine, eps_to_x0, row_norm, x0_to_eps
from app.sampling import GuidanceParams, SampleRun, SampleSpec, denoise_step, sample

pytestmark = pytest.mark.integration

SHAPE = (1, 28, 28)
BATCH_ATOL = 1e-4
BATCH_RTOL = 1e-4

APG = GuidanceMethod(kind="apg", eta=0.0, momentum=-0.5, norm_threshold=2.0)
SIGMA_INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.5, sigma_max=8.0)

# One of every guidance option, each with a different sampler where it matters.
SETTINGS = {
    "cfg": (GuidanceParams(3.0), "dpmpp_2m"),
    "apg": (GuidanceParams(5.0, method=APG), "dpmpp_2m"),
    "apg-ddim-rescale": (GuidanceParams(5.0, method=APG, guidance_rescale=0.5), "ddim"),
    "cfg_zero_star": (GuidanceParams(3.0, method=GuidanceMethod(kind="cfg_zero_star")), "euler_a"),
    "cfg_zero_star-ddpm": (GuidanceParams(5.0, method=GuidanceMethod(kind="cfg_zero_star")), "ddpm"),
    "cads": (GuidanceParams(3.0, cads=Cads(tau1=0.5, tau2=0.9, noise_scale=0.5)), "ddpm"),
    # a second request of each kind, other settings and sampler: kinds must not leak into each other in one forward
    "cads-psi0": (GuidanceParams(4.0, cads=Cads(tau1=0.3, tau2=0.7, noise_scale=1.0, psi=0.0)), "dpmpp_2m"),
    "sigma-interval": (GuidanceParams(4.0, schedule=SIGMA_INTERVAL), "dpmpp_2m"),
    # attention guidance: its perturbed rows in the same forward, with CFG and alone
    "pag": (GuidanceParams(3.0, method=GuidanceMethod(kind="pag", scale=2.0)), "ddim"),
    "seg-alone": (GuidanceParams(3.0, method=GuidanceMethod(kind="seg", blur_sigma=2.0, cfg=False)), "dpmpp_2m"),
    "noise-sigma": (GuidanceParams(3.0, noise_level=0.3, noise_schedule="sigma"), "ddim"),
    "noise-guidance-cosine": (
        GuidanceParams(3.0, schedule=GuidanceSchedule("cosine", 1.0, 0.0), noise_level=0.3, noise_schedule="guidance"),
        "dpmpp_2m",
    ),
}


def make_run(loaded, denoiser, spec):
    return SampleRun(
        spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label, class_embedding=denoiser.class_embedding
    )


def spec_for(name, label=4, seeds=(21, 22), steps=8, trace=False):
    guidance, sampler = SETTINGS[name]
    return SampleSpec(
        class_label=label, seeds=seeds, steps=steps, sampler=sampler, guidance=guidance, return_trace=trace
    )


def drawn(loaded, denoiser, spec):
    run = make_run(loaded, denoiser, spec)
    sample(denoiser, [run])
    return run.latents


def test_every_method_is_batch_invariant(loaded, denoiser):
    """All settings in one shared batch (different methods, samplers and step counts) equal each alone."""
    specs = [spec_for(name, label=i % 10, seeds=(100 + i, 200 + i), steps=6 + i % 3) for i, name in enumerate(SETTINGS)]
    together = [make_run(loaded, denoiser, s) for s in specs]
    sample(denoiser, together)
    for name, spec, run in zip(SETTINGS, specs, together, strict=True):
        alone = drawn(loaded, denoiser, spec)
        assert torch.allclose(run.latents, alone, atol=BATCH_ATOL, rtol=BATCH_RTOL), name


def test_every_option_changes_the_images(loaded, denoiser):
    """Guards the tests above against options that are silently ignored: each differs from plain CFG
    (an ignored option gives exactly the same latents; CFG-Zero* moves them least: ~0.03 on earlier weights,
    0.009 on the 1500-step continuation of issue 10, whose conditional and unconditional eps agree more)."""
    base = {
        sampler: drawn(loaded, denoiser, SampleSpec(4, (21, 22), 8, sampler, GuidanceParams(3.0)))
        for sampler in ("dpmpp_2m", "ddim", "euler_a", "ddpm")
    }
    for name in SETTINGS:
        if name == "cfg":
            continue
        got = drawn(loaded, denoiser, spec_for(name))
        assert (got - base[SETTINGS[name][1]]).abs().max() > 0.002, name


def test_apg_keeps_its_momentum_per_request(loaded, denoiser):
    """Two APG requests in one batch each keep their own buffer: the same as each alone (no shared guider)."""
    a = make_run(loaded, denoiser, spec_for("apg", label=1, seeds=(5,)))
    b = make_run(loaded, denoiser, spec_for("apg", label=8, seeds=(6,)))
    sample(denoiser, [a, b])
    assert a.guider.running_diff is not b.guider.running_diff
    assert torch.allclose(a.latents, drawn(loaded, denoiser, spec_for("apg", label=1, seeds=(5,))), atol=BATCH_ATOL)
    assert torch.allclose(b.latents, drawn(loaded, denoiser, spec_for("apg", label=8, seeds=(6,))), atol=BATCH_ATOL)


def test_apg_step_equals_the_formula_on_the_x0_prediction(loaded, denoiser):
    """One step by hand: eps -> x0 with the run's alpha_bar, APG, back to eps, then the scheduler."""
    spec = spec_for("apg", seeds=(3,))
    run = make_run(loaded, denoiser, spec)
    inp = run.model_input()
    eps = denoiser(inp.x, inp.timesteps, inp.class_labels)
    x, a = inp.x[:1], run.alpha_bars[0]
    method = spec.guidance.method
    out = apg_combine(
        eps_to_x0(x, eps[:1], a),
        eps_to_x0(x, eps[1:], a),
        5.0,
        eta=method.eta,
        momentum=method.momentum,
        norm_threshold=method.norm_threshold,
    )
    assert torch.allclose(run.guided_eps(eps), x0_to_eps(x, out.pred, a), atol=1e-5)
    alphas_cumprod = run.scheduler.alphas_cumprod
    assert a == pytest.approx(float(alphas_cumprod[int(run.timesteps[0])]))


def test_cads_is_reproducible_for_a_seed_and_only_noises_early_steps(loaded, denoiser):
    spec = spec_for("cads", seeds=(7, 8))
    first, again = drawn(loaded, denoiser, spec), drawn(loaded, denoiser, spec)
    assert torch.equal(first, again)
    other_seeds = drawn(loaded, denoiser, spec_for("cads", seeds=(9, 10)))
    assert not torch.allclose(first, other_seeds, atol=1e-3)
    # The noise is on the conditional rows' embedding at t > tau1 only.
    run = make_run(loaded, denoiser, spec)
    deltas = []
    while not run.done:
        inp = run.model_input()
        deltas.append(inp.embed_delta)
        run.advance(
            denoiser(inp.x, inp.timesteps, inp.class_labels, *([] if inp.embed_delta is None else [inp.embed_delta]))
        )
    t = run.timesteps.float() / 1000
    for step, delta in enumerate(deltas):
        if t[step] <= spec.guidance.cads.tau1:
            assert delta is None, step
        else:
            assert delta is not None and delta[:2].abs().sum() > 0 and delta[2:].abs().sum() == 0, step


def test_cads_with_tau1_one_is_plain_cfg(loaded, denoiser):
    plain = drawn(loaded, denoiser, SampleSpec(4, (21, 22), 8, "ddpm", GuidanceParams(3.0)))
    off = GuidanceParams(3.0, cads=Cads(tau1=1.0, tau2=1.0))
    assert torch.equal(drawn(loaded, denoiser, SampleSpec(4, (21, 22), 8, "ddpm", off)), plain)


def test_sigma_interval_skips_unconditional_rows_outside_it(loaded, denoiser):
    run = make_run(loaded, denoiser, spec_for("sigma-interval", seeds=(1,), steps=10))
    rows = []
    while not run.done:
        rows.append(denoise_step(denoiser, [run]))
    want = [2 if 0.5 < sigma <= 8.0 else 1 for sigma in run.sigmas]
    assert rows == want and 1 in rows and 2 in rows


def test_trace_has_one_entry_per_step_with_the_scale_and_the_difference_norm(loaded, denoiser):
    spec = spec_for("sigma-interval", seeds=(1, 2), steps=10, trace=True)
    run = make_run(loaded, denoiser, spec)
    first = run.model_input()
    eps = denoiser(first.x, first.timesteps, first.class_labels)
    sample(denoiser, [run])
    assert len(run.trace) == 10 and [t.step for t in run.trace] == list(range(10))
    assert [t.scale for t in run.trace] == run.scales
    for entry in run.trace:
        guided = entry.scale != 1.0
        assert (entry.diff_norm is not None) == guided
        assert entry.parallel_norm is None and entry.orthogonal_norm is None  # not APG
        if guided:
            assert entry.diff_norm.shape == (2,)
    if run.trace[0].diff_norm is not None:
        assert torch.allclose(run.trace[0].diff_norm, row_norm(eps[:2] - eps[2:]))
    # The first step is at sigma ~157, outside the interval: a no-uncond step has no norm.
    assert run.trace[0].scale == 1.0 and run.trace[0].to_dict()["diff_norm"] is None


def test_apg_trace_parts_add_up_to_the_clamped_difference(loaded, denoiser):
    spec = spec_for("apg", seeds=(1, 2), steps=6, trace=True)
    run = make_run(loaded, denoiser, spec)
    sample(denoiser, [run])
    assert len(run.trace) == 6
    for entry in run.trace:
        total = (entry.parallel_norm**2 + entry.orthogonal_norm**2).sqrt()
        assert (total <= APG.norm_threshold + 1e-4).all()  # the clamp bounds |dD|
        assert entry.diff_norm is not None and entry.scale == 5.0
    # Early steps (high sigma) are clamped: |dD| = sigma * |d eps| is far above the threshold there.
    assert torch.allclose(
        (run.trace[0].parallel_norm ** 2 + run.trace[0].orthogonal_norm ** 2).sqrt(), torch.tensor(2.0)
    )


def test_no_trace_unless_asked(loaded, denoiser):
    run = make_run(loaded, denoiser, spec_for("apg", steps=3))
    sample(denoiser, [run])
    assert run.trace == []


@pytest.mark.parametrize("noise_schedule", ["constant", "sigma"])
def test_noise_schedule_sets_the_noise_added_at_each_step(loaded, denoiser, noise_schedule):
    """The std of the noise on eps_cond is noise_level * the schedule's factor: 1 at every step (constant), or
    sigma_i / sigma_0 (~0.001 at the last of 10 steps with sigma)."""
    guidance = GuidanceParams(3.0, noise_level=1.0, noise_schedule=noise_schedule)
    run = make_run(loaded, denoiser, SampleSpec(None, (5,), 10, "ddim", guidance))
    for step in (0, 9):
        run.step_index = step
        added = run.guided_eps(torch.zeros(1, *SHAPE))  # unconditional: eps_cond plus the noise alone
        want = 1.0 if noise_schedule == "constant" else run.sigmas[step] / run.sigmas[0]
        assert added.std().item() == pytest.approx(want, rel=0.1), step


def test_embed_delta_reaches_the_class_embedding(loaded, denoiser):
    """CADS's path into the model: adding e(null) - e(c) to class c's embedding is the null class's forward,
    row by row; a zero delta leaves the forward as it was."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *SHAPE, generator=g), torch.tensor([700, 300])
    labels, null = torch.tensor([3, 8]), loaded.manifest.null_label
    e_null = denoiser.class_embedding(null)
    delta = torch.stack([e_null - denoiser.class_embedding(3), torch.zeros_like(e_null)])
    got = denoiser(x, t, labels, delta)
    assert torch.allclose(got[:1], denoiser(x[:1], t[:1], torch.tensor([null])), atol=1e-4)
    assert torch.allclose(got[1:], denoiser(x[1:], t[1:], labels[1:]), atol=1e-5)
