import math

import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from app.guidance import GuidanceSchedule, add_condition_noise, cfg_combine, rescale_guidance


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
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert add_condition_noise(cond, 0.0, gens) is cond
    assert torch.equal(add_condition_noise(cond, 0.0, None), cond)


def test_noise_level_reproducible_with_seed_and_varies_without(eps):
    cond, _ = eps
    a = add_condition_noise(cond, 0.5, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b = add_condition_noise(cond, 0.5, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    c = add_condition_noise(cond, 0.5, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    d = add_condition_noise(cond, 0.5, None)
    e = add_condition_noise(cond, 0.5, None)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(d, e)
    # The noise has the requested std.
    big = add_condition_noise(torch.zeros(4, 1, 64, 64), 0.5, [torch.Generator().manual_seed(i) for i in range(4)])
    assert abs(big.std().item() - 0.5) < 0.02


def test_noise_per_row_depends_only_on_its_generator(eps):
    cond, _ = eps
    together = add_condition_noise(cond, 1.0, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = add_condition_noise(cond[1:2], 1.0, [torch.Generator().manual_seed(8)])
    assert torch.equal(together[1:2], alone)


def test_rescale_matches_diffusers_and_phi_zero_is_identity(eps):
    cond, uncond = eps
    cfg = cfg_combine(cond, uncond, 5.0)
    assert rescale_guidance(cfg, cond, 0.0) is cfg
    assert torch.allclose(rescale_guidance(cfg, cond, 0.7), rescale_noise_cfg(cfg, cond, 0.7))
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
