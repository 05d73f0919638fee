"""Attention guidance (pag, seg, slg) inside SampleRun and denoise_step: the perturbed rows ride in the one
forward after the request's conditional (and unconditional) rows, are counted, and leave every request's images
what they are alone."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule, perturbed_combine
from app.models.attention import Perturbation, RowPerturbations
from app.models.latent import DiTDenoiser
from app.sampling import GuidanceParams, SampleRun, SampleSpec, denoise_step, sample
from app.sampling.spec import steps_together
from tests.tiny_models import tiny_dit

SHAPE = (1, 28, 28)
INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.5, sigma_max=8.0)


def make_run(loaded, denoiser, spec: SampleSpec) -> SampleRun:
    m = loaded.manifest
    return SampleRun(spec, loaded.scheduler_config, SHAPE, m.null_label, class_embedding=denoiser.class_embedding)


def pag(**fields) -> GuidanceParams:
    return GuidanceParams(3.0, method=GuidanceMethod("pag", **fields))


def one_row_at_a_time(denoiser):
    """The real model, one row per forward, each row with its own CADS delta and perturbation: a row's eps then
    depends on that row alone, to the bit (a batched CPU convolution may pick another algorithm), so any batch
    dependence left comes from the sampling code."""

    def forward(x, t, y, *extra, perturb=None):
        rows = []
        for i in range(x.shape[0]):
            kwargs = {}
            if perturb is not None:
                groups = [(p, mask[i : i + 1]) for p, mask in perturb.groups if mask[i]]
                if groups:
                    kwargs["perturb"] = RowPerturbations(groups, 1)
            rows.append(denoiser(x[i : i + 1], t[i : i + 1], y[i : i + 1], *(e[i : i + 1] for e in extra), **kwargs))
        return torch.cat(rows)

    return forward


@pytest.mark.stand_in
def test_rows_are_counted_per_branch(loaded, denoiser):
    """3 rows per image with CFG, 2 alone or without a class, and 2 outside a CFG interval."""
    n = 2

    def profile(guidance, label=4, steps=8):
        return list(make_run(loaded, denoiser, SampleSpec(label, (1, 2), steps, "dpmpp_2m", guidance)).rows_profile())

    assert profile(pag()) == [3 * n] * 8
    assert profile(pag(cfg=False)) == [2 * n] * 8
    assert profile(pag(), label=None) == [2 * n] * 8
    assert profile(GuidanceParams(3.0, method=GuidanceMethod("seg", scale=0.0))) == [2 * n] * 8  # plain CFG
    interval = profile(GuidanceParams(3.0, schedule=INTERVAL, method=GuidanceMethod("seg")))
    assert set(interval) == {2 * n, 3 * n} and interval[0] == 2 * n  # the first step is above sigma_max


@pytest.mark.stand_in
def test_the_perturbed_rows_follow_the_conditional_and_unconditional_ones(loaded, denoiser):
    cads = Cads(tau1=0.1, tau2=0.2)  # full CADS noise at the first step: the perturbed rows carry its delta
    guidance = GuidanceParams(3.0, method=GuidanceMethod("seg", blur_sigma=2.0, layers=(0,)), cads=cads)
    run = make_run(loaded, denoiser, SampleSpec(4, (1, 2), 8, "dpmpp_2m", guidance))
    inp = run.model_input()
    null = loaded.manifest.null_label
    assert inp.class_labels.tolist() == [4, 4, null, null, 4, 4]
    assert all(torch.equal(inp.x[i], inp.x[i % 2]) for i in range(6))
    assert inp.perturbed == (None,) * 4 + (Perturbation("seg", (0,), 2.0),) * 2
    delta = inp.embed_delta
    assert torch.equal(delta[4:], delta[:2]) and not delta[:2].eq(0).all() and delta[2:4].eq(0).all()
    assert run.perturbation == Perturbation("seg", (0,), 2.0)
    # seg's null blur_sigma is the infinite blur
    infinite = make_run(loaded, denoiser, SampleSpec(4, (1,), 8, "ddim", GuidanceParams(method=GuidanceMethod("seg"))))
    assert infinite.perturbation == Perturbation("seg", None, math.inf)
    assert not steps_together(infinite.spec)  # stepped on its own path, not app.sampling.batched's


@pytest.mark.stand_in
def test_only_a_forward_with_perturbed_rows_gets_perturb(loaded, denoiser):
    """Ticks without a perturbed row keep their exact call: no perturb argument at all."""
    calls = []

    def recording(x, t, y, *extra, **kwargs):
        calls.append(kwargs)
        return denoiser(x, t, y, *extra, **kwargs)

    plain = make_run(loaded, denoiser, SampleSpec(1, (1,), 3, "ddim", GuidanceParams(3.0)))
    guided = make_run(loaded, denoiser, SampleSpec(2, (2,), 2, "ddim", pag()))
    sample(recording, [plain, guided])
    assert [sorted(c) for c in calls] == [["perturb"], ["perturb"], []]
    assert calls[0]["perturb"].rows == 2 + 3


def test_a_step_is_the_formula_over_the_forwards_rows(loaded, denoiser):
    """One step by hand: the forward's conditional, unconditional and perturbed rows, combined as
    eps_u + w (eps_c - eps_u) + s (eps_c - eps_p); the perturbed rows are the conditional rows' perturbed forward."""
    run = make_run(loaded, denoiser, SampleSpec(6, (3, 4), 8, "dpmpp_2m", pag(scale=2.0)))
    inp = run.model_input()
    eps = denoiser(inp.x, inp.timesteps, inp.class_labels, perturb=RowPerturbations.from_rows(inp.perturbed, "cpu"))
    eps_c, eps_u, eps_p = eps[:2], eps[2:4], eps[4:]
    assert torch.equal(run.guided_eps(eps), perturbed_combine(eps_c, eps_u, eps_p, 3.0, 2.0))
    alone = RowPerturbations.from_rows([Perturbation("pag")] * 2, "cpu")
    assert torch.allclose(eps_p, denoiser(inp.x[:2], inp.timesteps[:2], inp.class_labels[:2], perturb=alone), atol=1e-5)
    assert (eps_p - eps_c).abs().max() > 1e-3  # the perturbation changes the prediction


# Several requests of each attention kind, with different settings, seeds, samplers and step counts, beside plain
# CFG (stepped by app.sampling.batched) and CADS requests.
CROWD = [
    SampleSpec(1, (10, 11), 5, "dpmpp_2m", pag(scale=2.0)),
    SampleSpec(3, (12,), 4, "ddim", pag(scale=4.0, cfg=False)),
    SampleSpec(None, (13,), 4, "euler_a", pag(scale=1.5)),  # unconditional: eps_u + s (eps_u - eps_p)
    SampleSpec(5, (15,), 5, "dpmpp_2m", GuidanceParams(4.0, schedule=INTERVAL, method=GuidanceMethod("pag"))),
    SampleSpec(2, (16, 17), 5, "ddpm", GuidanceParams(3.0, method=GuidanceMethod("seg", blur_sigma=1.0))),
    SampleSpec(7, (18,), 4, "dpmpp_2m", GuidanceParams(2.0, method=GuidanceMethod("seg", scale=5.0, cfg=False))),
    SampleSpec(4, (19,), 5, "dpmpp_2m", GuidanceParams(3.0, method=GuidanceMethod("seg", blur_sigma=3.0))),
    SampleSpec(0, (21,), 5, "dpmpp_2m", GuidanceParams(3.0)),  # plain CFG: the batched path
    SampleSpec(6, (24,), 5, "ddpm", GuidanceParams(3.0, cads=Cads(tau1=0.4, tau2=0.9, noise_scale=0.5))),
    # attention guidance with CADS: the perturbed rows carry the conditional rows' noisy class embedding
    SampleSpec(8, (26,), 5, "dpmpp_2m", GuidanceParams(3.0, method=GuidanceMethod("pag", scale=2.5), cads=Cads())),
]


def test_attention_requests_in_one_tick_each_draw_what_they_draw_alone(loaded, denoiser):
    """Every request of CROWD, joining one per tick (rows of different steps, kinds and settings share each
    forward), equals itself drawn alone, to the bit."""
    forward = one_row_at_a_time(denoiser)
    crowd = [make_run(loaded, denoiser, spec) for spec in CROWD]
    active: list[SampleRun] = []
    perturbed_ticks = 0
    for run in crowd:
        active.append(run)
        live = [r for r in active if not r.done]
        perturbed_ticks += any(r.needs_perturbed() for r in live)
        denoise_step(forward, live)
    sample(forward, crowd)
    assert perturbed_ticks == len(CROWD)
    for run in crowd:
        alone = make_run(loaded, denoiser, run.spec)
        sample(forward, [alone])
        assert torch.equal(run.latents, alone.latents), run.spec


def test_the_attention_settings_change_the_images(loaded, denoiser):
    """Guards the test above against settings silently ignored: each draws other images than plain CFG and than
    the others."""

    def drawn(guidance, sampler="dpmpp_2m"):
        run = make_run(loaded, denoiser, SampleSpec(4, (21, 22), 8, sampler, guidance))
        sample(denoiser, [run])
        return run.latents

    images = {
        "cfg": drawn(GuidanceParams(3.0)),
        "pag": drawn(pag()),
        "pag-strong": drawn(pag(scale=6.0)),
        "pag-alone": drawn(pag(cfg=False)),
        "seg": drawn(GuidanceParams(3.0, method=GuidanceMethod("seg"))),
        "seg-blur1": drawn(GuidanceParams(3.0, method=GuidanceMethod("seg", blur_sigma=1.0))),
    }
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (images[a] - images[b]).abs().max() > 0.01, (a, b)


@pytest.fixture(scope="module")
def dit_denoiser():
    return DiTDenoiser(tiny_dit(10, learned_sigma=False, num_layers=3).eval())


def test_skip_layer_guidance_runs_on_a_dit_and_each_request_draws_what_it_draws_alone(dit_denoiser):
    """slg (and pag) on a DiT (a tiny random one: no DiT checkpoint is shipped), several requests of different
    blocks and strengths in one forward, each equal to itself alone."""
    config = DDPMScheduler(num_train_timesteps=1000).config
    shape, null = (4, 8, 8), 10

    def run_of(spec):
        return SampleRun(spec, config, shape, null, class_embedding=dit_denoiser.class_embedding)

    specs = [
        SampleSpec(1, (1, 2), 5, "ddim", GuidanceParams(3.0, method=GuidanceMethod("slg"))),
        SampleSpec(2, (3,), 5, "ddim", GuidanceParams(3.0, method=GuidanceMethod("slg", layers=(0, 2), scale=4.0))),
        SampleSpec(3, (4,), 4, "dpmpp_2m", GuidanceParams(2.0, method=GuidanceMethod("slg", cfg=False))),
        SampleSpec(4, (5,), 5, "ddim", GuidanceParams(3.0, method=GuidanceMethod("pag", layers=(2,)))),
        SampleSpec(5, (6,), 5, "ddim", GuidanceParams(3.0)),
    ]
    forward = one_row_at_a_time(dit_denoiser)
    together = [run_of(s) for s in specs]
    sample(forward, together)
    plain = run_of(SampleSpec(1, (1, 2), 5, "ddim", GuidanceParams(3.0)))
    sample(forward, [plain])
    assert (together[0].latents - plain.latents).abs().max() > 1e-3  # the skipped block changed something
    for run in together:
        alone = run_of(run.spec)
        sample(forward, [alone])
        assert torch.equal(run.latents, alone.latents), run.spec
