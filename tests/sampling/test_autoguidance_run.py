"""Autoguidance inside SampleRun and denoise_step, on the real shipped checkpoints: the default model guided by
model_store/fashion-mnist-guide."""

import pytest
import torch

from app.config import DEFAULT_MODEL_PATH
from app.guidance import GuidanceMethod, GuidanceSchedule, autoguidance_combine
from app.models import load_checkpoint, unet_denoiser
from app.sampling import GuidanceParams, SampleRun, SampleSpec, denoise_step, sample

pytestmark = pytest.mark.integration

SHAPE = (1, 28, 28)
GUIDE = "fashion-mnist-guide"
INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=5.0)


def autoguidance(scale: float, cfg: bool = False, guidance_scale: float = 3.0, **kw) -> GuidanceParams:
    method = GuidanceMethod("autoguidance", guide=GUIDE, scale=scale, cfg=cfg)
    return GuidanceParams(guidance_scale, method=method, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread for these tests: their forwards are of one to a few rows, and on the 2-core machine
    shared with other runs two OpenMP threads per forward took 100x longer (324 s against 3 s for the batch
    test). Both sides of every comparison run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def guide_denoiser():
    return unet_denoiser(load_checkpoint(DEFAULT_MODEL_PATH.parent / GUIDE, "cpu").unet)


def one_row_at_a_time(denoiser):
    """The model, one row per forward: a row's eps then depends on that row alone, to the bit. A batched CPU
    convolution may pick another algorithm for another row count (about 1e-5 apart), so a bit-equal comparison
    between batches of different sizes runs the forward this way; any difference left comes from the step."""

    def forward(x, t, y):
        return torch.cat([denoiser(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])])

    return forward


def make_run(loaded, spec):
    return SampleRun(spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label)


def drawn(loaded, denoiser, guides, spec):
    run = make_run(loaded, spec)
    sample(denoiser, [run], guides=guides)
    return run.latents


# Several autoguidance requests (different w, cfg on and off, schedules, samplers, seeds, steps, one without a
# class, one with the seed's condition noise) and plain CFG requests, all in the same forwards.
MIXED = [
    SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", autoguidance(2.0)),
    SampleSpec(3, (13,), 7, "euler_a", autoguidance(1.5)),
    SampleSpec(6, (14, 15), 9, "ddpm", autoguidance(2.0, cfg=True, schedule=INTERVAL)),
    SampleSpec(1, (16,), 6, "ddim", autoguidance(3.0, cfg=True, guidance_scale=2.0)),
    SampleSpec(None, (17, 18), 8, "dpmpp_2m", autoguidance(2.5)),
    SampleSpec(8, (19,), 8, "dpmpp_2m", autoguidance(2.0, noise_level=0.2)),
    SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", GuidanceParams(2.0)),
    SampleSpec(5, (20,), 7, "euler_a", GuidanceParams(3.0, schedule=INTERVAL)),
    SampleSpec(None, (21,), 6, "ddim", GuidanceParams(3.0)),
]


def test_several_autoguidance_and_cfg_requests_in_one_batch_each_draw_what_they_draw_alone(
    loaded, denoiser, guide_denoiser
):
    """Bit-equal, every request, with every forward (main and guide) run row by row (one_row_at_a_time)."""
    main, guides = one_row_at_a_time(denoiser), {GUIDE: one_row_at_a_time(guide_denoiser)}
    together = [make_run(loaded, spec) for spec in MIXED]
    guide_rows = []
    active = list(together)
    while active:
        guide_rows.append(sum(r.guide_rows_needed() for r in active))
        denoise_step(main, active, guides)
        active = [r for r in active if not r.done]
    assert guide_rows[0] == 2 + 1 + 2 + 1 + 2 + 1  # every autoguidance request's images, in one guide forward
    for i, (spec, run) in enumerate(zip(MIXED, together, strict=True)):
        alone = drawn(loaded, main, guides, spec)
        assert torch.equal(run.latents, alone), i


def test_autoguidance_changes_the_images_and_w_matters(loaded, denoiser, guide_denoiser):
    """Guards the test above against a guide that is silently not read."""
    guides = {GUIDE: guide_denoiser}
    spec = SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", autoguidance(1.0))
    unguided = drawn(loaded, denoiser, guides, spec)
    w2 = drawn(loaded, denoiser, guides, SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", autoguidance(2.0)))
    w3 = drawn(loaded, denoiser, guides, SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", autoguidance(3.0)))
    assert (w2 - unguided).abs().max() > 0.05 and (w3 - w2).abs().max() > 0.05
    plain = drawn(loaded, denoiser, guides, SampleSpec(3, (11, 12), 8, "dpmpp_2m_karras", GuidanceParams(1.0)))
    assert torch.allclose(unguided, plain, atol=1e-5)  # w = 1 without cfg: the conditional model alone


def test_a_guided_step_is_the_formula_over_both_models(loaded, denoiser, guide_denoiser):
    """One step by hand: the main model's conditional and unconditional rows, the guide's conditional rows at the
    same input, timestep and class, then eps_c + (w - 1)(eps_c - eps_g) + (s - 1)(eps_c - eps_u)."""
    run = make_run(loaded, SampleSpec(4, (3, 4), 6, "ddim", autoguidance(2.5, cfg=True, guidance_scale=3.0)))
    inp = run.model_input()
    assert inp.rows == 4 and inp.class_labels.tolist() == [4, 4, 10, 10]
    eps = denoiser(inp.x, inp.timesteps, inp.class_labels)
    guide_inp = run.guide_input()
    assert torch.equal(guide_inp.x, inp.x[:2]) and guide_inp.class_labels.tolist() == [4, 4]
    assert torch.equal(guide_inp.timesteps, inp.timesteps[:2])
    eps_guide = guide_denoiser(inp.x[:2], inp.timesteps[:2], inp.class_labels[:2])
    want = eps[:2] + 1.5 * (eps[:2] - eps_guide) + 2.0 * (eps[:2] - eps[2:])
    got = run.guided_eps(eps, {"guide": eps_guide})
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got, autoguidance_combine(eps[:2], eps_guide, 2.5, eps[2:], 3.0))


def test_rows_per_step_main_and_guide(loaded):
    """Autoguidance with CFG on an interval: the main forward takes the unconditional rows inside the interval
    only; the guide forward takes the conditional rows at every step. Admission counts both."""
    run = make_run(loaded, SampleSpec(6, (1, 2, 3), 10, "dpmpp_2m", autoguidance(2.0, cfg=True, schedule=INTERVAL)))
    inside = [0.25 < sigma <= 5.0 for sigma in run.sigmas]
    assert any(inside) and not all(inside)
    assert run.rows_profile().tolist() == [6 if i else 3 for i in inside]
    assert run.guide_rows_profile().tolist() == [3] * 10
    assert run.admission_profile().tolist() == [9 if i else 6 for i in inside]
    unconditional = make_run(loaded, SampleSpec(None, (1,), 4, "ddim", autoguidance(2.0, cfg=True)))
    assert unconditional.rows_profile().tolist() == [1] * 4 and unconditional.guide_rows_profile().tolist() == [1] * 4
    assert unconditional.skipped_uncond_rows() == 0


def test_a_run_whose_guide_is_not_given_fails_naming_it(loaded, denoiser):
    run = make_run(loaded, SampleSpec(3, (1,), 4, "ddim", autoguidance(2.0)))
    with pytest.raises(ValueError, match="the guide model 'fashion-mnist-guide' is not served"):
        denoise_step(denoiser, [run])
