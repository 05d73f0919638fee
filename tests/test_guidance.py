import math

import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from pydantic import ValidationError

from app.guidance import (
    GUIDERS,
    Apg,
    ApgMethod,
    Cads,
    CfgMethod,
    GuidanceMethod,
    GuidanceSchedule,
    add_condition_noise,
    apg_combine,
    cads_condition,
    cfg_combine,
    cfg_zero_star_combine,
    eps_to_x0,
    make_guider,
    noise_factors,
    rescale_guidance,
    sigma_of,
    x0_to_eps,
)
from app.rng import StackedRandom


@pytest.fixture
def eps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)


def test_combine_endpoints(eps):
    cond, uncond = eps
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond, atol=1e-6)
    # Ho & Salimans: (1 + w) * cond - w * uncond with w = s - 1.
    w = 2.5
    assert torch.allclose(cfg_combine(cond, uncond, 1 + w), (1 + w) * cond - w * uncond, atol=1e-6)


def test_noise_level_zero_is_bit_identical(eps):
    cond, _ = eps
    assert add_condition_noise(cond, 0.0, StackedRandom((0, 1, 2))) is cond


def test_noise_level_reproducible_with_seed(eps):
    cond, _ = eps
    a = add_condition_noise(cond, 0.5, StackedRandom((1, 2, 3)))
    b = add_condition_noise(cond, 0.5, StackedRandom((1, 2, 3)))
    c = add_condition_noise(cond, 0.5, StackedRandom((4, 5, 6)))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The noise has the requested std.
    big = add_condition_noise(torch.zeros(4, 1, 64, 64), 0.5, StackedRandom(range(4)))
    assert abs(big.std().item() - 0.5) < 0.02


def test_noise_per_row_depends_only_on_its_generator(eps):
    cond, _ = eps
    together = add_condition_noise(cond, 1.0, StackedRandom((7, 8, 9)))
    alone = add_condition_noise(cond[1:2], 1.0, StackedRandom((8,)))
    assert torch.equal(together[1:2], alone)


def test_every_guidance_method_is_one_registered_guider():
    """The API's, the CLI's and the engine's methods all come from GUIDERS; each guider is built per request."""
    assert tuple(GUIDERS) == ("cfg", "apg", "cfg_zero_star", "pag", "seg", "slg", "autoguidance")
    assert all(kind == cls.kind == cls.params_model.model_fields["kind"].default for kind, cls in GUIDERS.items())
    assert GuidanceMethod("apg", eta=0.5) == ApgMethod(eta=0.5)
    guider = make_guider(ApgMethod(eta=0.5), [3.0, 1.0])
    assert type(guider) is Apg and guider.params.eta == 0.5 and guider.needs_uncond(0) and not guider.needs_uncond(1)
    kinds = "cfg, apg, cfg_zero_star, pag, seg, slg, autoguidance"
    with pytest.raises(ValueError, match=f"unknown guidance method 'sag'; choose one of {kinds}"):
        GuidanceMethod("sag")
    with pytest.raises(ValidationError, match="eta"):
        GuidanceMethod("cfg", eta=0.5)  # a field of another method
    with pytest.raises(TypeError, match="Apg takes ApgMethod, got CfgMethod"):
        Apg(CfgMethod(), [3.0])


def test_rescale_is_lin_et_als_formula_and_phi_zero_is_identity(eps):
    """Lin et al. 2023, eqs. 15-16, written out here (not the diffusers function rescale_guidance calls):
    x_rescaled = x_cfg * std(x_pos) / std(x_cfg) per image; x_final = phi x_rescaled + (1 - phi) x_cfg."""
    cond, uncond = eps
    cfg = cfg_combine(cond, uncond, 5.0)
    assert rescale_guidance(cfg, cond, 0.0) is cfg
    std_cond, std_cfg = cond.std(dim=(1, 2, 3), keepdim=True), cfg.std(dim=(1, 2, 3), keepdim=True)
    want = 0.7 * (cfg * std_cond / std_cfg) + 0.3 * cfg
    assert torch.allclose(rescale_guidance(cfg, cond, 0.7), want, atol=1e-6)
    full = rescale_guidance(cfg, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)


def test_constant_schedule():
    assert GuidanceSchedule("constant").scales(4.0, 5) == [4.0] * 5


def test_linear_schedule_exact_weights_both_directions():
    assert GuidanceSchedule("linear", start=1.0, end=0.0).scales(4.0, 5) == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert GuidanceSchedule("linear", start=0.25, end=1.0).scales(4.0, 4) == [1.0, 2.0, 3.0, 4.0]
    assert GuidanceSchedule("linear", start=0.5, end=0.0).scales(3.0, 1) == [1.5]


def test_cosine_schedule_is_cosine_annealing():
    n, s_max, s_min = 10, 7.5, 1.5
    got = GuidanceSchedule("cosine", start=1.0, end=s_min / s_max).scales(s_max, n)
    # The common cosine-annealing weight: min + (max - min) * 0.5 * (1 + cos(pi * i / N)).
    want = [s_min + (s_max - s_min) * 0.5 * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == s_max and all(a > b for a, b in zip(got, got[1:], strict=False))


def test_cosine_schedule_increasing_variant():
    got = GuidanceSchedule("cosine", start=0.0, end=1.0).scales(4.0, 4)
    assert got == pytest.approx(
        [
            0.0,
            4 * (1 - 0.5 * (1 + math.cos(math.pi / 4))),
            2.0,
            4 * (1 - 0.5 * (1 + math.cos(3 * math.pi / 4))),
        ]
    )
    assert all(a < b for a, b in zip(got, got[1:], strict=False))


def test_interval_schedule_guides_only_inside_window():
    assert GuidanceSchedule("interval", start=0.2, end=0.6).scales(5.0, 10) == [
        1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0,
    ]  # fmt: skip


def test_interval_in_sigma_guides_only_where_sigma_min_lt_sigma_le_sigma_max():
    sigmas = [80.0, 10.0, 5.0, 2.0, 0.3, 0.1]
    schedule = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.3, sigma_max=5.0)
    assert schedule.scales(4.0, 6, sigmas) == [1.0, 1.0, 4.0, 4.0, 1.0, 1.0]
    # Both windows apply: steps (i / N) and noise levels.
    both = GuidanceSchedule("interval", start=0.5, end=1.0, sigma_max=5.0)
    assert both.scales(4.0, 6, sigmas) == [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]
    # Without the run's sigmas every step in the step window may be guided (an upper bound on rows).
    assert schedule.scales(4.0, 6) == [4.0] * 6


def vec(*values):
    """A batch of one 'image' of shape (1, 1, len(values))."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_apg_hand_computed():
    d_cond, d_uncond = vec(2.0, 0.0), vec(1.0, 1.0)
    # dD = (1, -1); parallel to D_c = (1, 0), orthogonal = (0, -1).
    out = apg_combine(d_cond, d_uncond, 3.0, eta=0.0, momentum=0.0, norm_threshold=0.0)
    assert torch.allclose(out.pred, vec(2.0, -2.0))  # D_c + (s - 1) * dD_orth
    assert out.parallel_norm.tolist() == pytest.approx([1.0]) and out.orthogonal_norm.tolist() == pytest.approx([1.0])
    with_eta = apg_combine(d_cond, d_uncond, 3.0, eta=0.5, momentum=0.0, norm_threshold=0.0)
    assert torch.allclose(with_eta.pred, vec(3.0, -2.0))  # + (s - 1) * 0.5 * dD_par
    # The clamp: |dD| = sqrt(2) scaled to 1.
    clamped = apg_combine(d_cond, d_uncond, 3.0, eta=0.0, momentum=0.0, norm_threshold=1.0)
    assert torch.allclose(clamped.pred, vec(2.0, -math.sqrt(2)))
    # A norm below the threshold is left alone.
    assert torch.allclose(apg_combine(d_cond, d_uncond, 3.0, eta=0.0, momentum=0.0, norm_threshold=5.0).pred, out.pred)


def test_apg_momentum_averages_with_the_previous_difference():
    d_cond, d_uncond = vec(2.0, 0.0), vec(1.0, 1.0)
    first = apg_combine(d_cond, d_uncond, 3.0, eta=1.0, momentum=-0.5, norm_threshold=0.0)
    assert torch.allclose(first.running_diff, vec(1.0, -1.0))
    second = apg_combine(
        d_cond, d_uncond, 3.0, eta=1.0, momentum=-0.5, norm_threshold=0.0, running_diff=first.running_diff
    )
    # dD + momentum * previous = (1, -1) - 0.5 * (1, -1) = (0.5, -0.5); eta = 1 adds all of it.
    assert torch.allclose(second.running_diff, vec(0.5, -0.5))
    assert torch.allclose(second.pred, d_cond + 2.0 * vec(0.5, -0.5))


def test_apg_matches_diffusers_normalized_guidance_over_steps(eps):
    """diffusers' helper with use_original_formulation (the paper's D_c + (s - 1) * update)."""
    cond, uncond = eps
    buffer, running = MomentumBuffer(-0.5), None
    for step in range(3):
        c, u = cond * (1 + step), uncond - step
        want = normalized_guidance(c, u, 4.0 - 1, buffer, eta=0.2, norm_threshold=6.0, use_original_formulation=True)
        got = apg_combine(c, u, 4.0, eta=0.2, momentum=-0.5, norm_threshold=6.0, running_diff=running)
        running = got.running_diff
        assert torch.allclose(got.pred, want, atol=1e-5), step


def test_apg_with_eta_one_and_nothing_else_is_cfg(eps):
    cond, uncond = eps
    out = apg_combine(cond, uncond, 4.0, eta=1.0, momentum=0.0, norm_threshold=0.0)
    assert torch.allclose(out.pred, cfg_combine(cond, uncond, 4.0), atol=1e-5)


def test_x0_mapping_round_trips_and_commutes_with_cfg(eps):
    cond, uncond = eps
    x = torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    a = 0.3
    d_cond, d_uncond = eps_to_x0(x, cond, a), eps_to_x0(x, uncond, a)
    assert torch.allclose(d_cond, (x - math.sqrt(0.7) * cond) / math.sqrt(0.3))
    assert torch.allclose(x0_to_eps(x, d_cond, a), cond, atol=1e-5)
    # The map is affine in eps, so CFG on x0 is CFG on eps.
    assert torch.allclose(
        x0_to_eps(x, cfg_combine(d_cond, d_uncond, 3.0), a), cfg_combine(cond, uncond, 3.0), atol=1e-4
    )
    assert sigma_of(0.2) == pytest.approx(2.0)


def test_cfg_zero_star_hand_computed():
    cond, uncond = vec(1.0, 1.0), vec(2.0, 0.0)
    # a = <c, u> / |u|^2 = 2 / 4; a u = (1, 0); eps = a u + s (c - a u) = (1, 0) + 3 (0, 1).
    assert torch.allclose(cfg_zero_star_combine(cond, uncond, 3.0), vec(1.0, 3.0))
    # a is per row: a second row with its own projection.
    both = cfg_zero_star_combine(torch.cat([cond, vec(0.0, 2.0)]), torch.cat([uncond, vec(0.0, 1.0)]), 3.0)
    assert torch.allclose(both[1:], vec(0.0, 2.0))  # a = 2: a u = c, so the guidance term vanishes


def test_cads_gamma_is_the_papers_piecewise_linear_schedule():
    cads = Cads(tau1=0.6, tau2=0.9)
    assert [cads.gamma(t) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])


def test_cads_condition_hand_computed():
    y = torch.tensor([[1.0, 3.0]])
    n = torch.tensor([[2.0, -2.0]])
    assert cads_condition(y, 1.0, n, 0.25, 1.0) is y
    # gamma = 0.64: sqrt(g) y + s sqrt(1 - g) n = 0.8 (1, 3) + 0.25 * 0.6 * (2, -2) = (1.1, 2.1).
    raw = cads_condition(y, 0.64, n, 0.25, 0.0)
    assert torch.allclose(raw, torch.tensor([[1.1, 2.1]]))
    # psi = 1 rescales to y's mean (2) and std (sqrt(2)): (1.1, 2.1) has mean 1.6, std sqrt(0.5).
    rescaled = cads_condition(y, 0.64, n, 0.25, 1.0)
    assert torch.allclose(rescaled, torch.tensor([[1.0, 3.0]]), atol=1e-6)
    half = cads_condition(y, 0.64, n, 0.25, 0.5)
    assert torch.allclose(half, 0.5 * raw + 0.5 * rescaled)


def test_noise_factors():
    sigmas, scales = [8.0, 4.0, 1.0, 0.5], [3.0, 3.0, 1.5, 0.0]
    assert noise_factors("constant", sigmas, scales, 3.0) == [1.0] * 4
    assert noise_factors("sigma", sigmas, scales, 3.0) == [1.0, 0.5, 0.125, 0.0625]
    assert noise_factors("guidance", sigmas, scales, 3.0) == [1.0, 1.0, 0.5, 0.0]
    assert noise_factors("guidance", sigmas, scales, 0.0) == [0.0] * 4
    with pytest.raises(ValueError, match="constant, sigma, guidance"):
        noise_factors("cosine", sigmas, scales, 3.0)
