"""Autoguidance's guider (app/guidance/autoguidance.py): its combine on numbers worked out by hand, the branches
it asks for at each step, and its settings' validation."""

import pytest
import torch
from pydantic import ValidationError

from app.guidance import (
    Autoguidance,
    AutoguidanceMethod,
    GuidanceMethod,
    GuidanceStep,
    autoguidance_combine,
    eps_to_x0,
    make_guider,
    x0_to_eps,
)

COND = torch.tensor([[1.0, 2.0, -1.0]])
GUIDE = torch.tensor([[0.5, 1.0, -2.0]])
UNCOND = torch.tensor([[0.0, 4.0, -1.0]])
X = torch.tensor([[0.3, -0.7, 1.1]])


def step(scale: float, uncond: torch.Tensor | None, guide: torch.Tensor | None) -> GuidanceStep:
    others = {} if guide is None else {"guide": guide}
    return GuidanceStep(COND, COND if uncond is None else uncond, scale, X, 0.5, others)


def test_autoguidance_alone_is_the_guide_plus_w_times_the_difference():
    """w = 2: 2 c - g = [1.5, 3, 0]; w = 1.5: c + 0.5 (c - g) = [1.25, 2.5, -0.5] (Karras et al. 2024, eq. 2)."""
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=2.0), [1.0] * 3)
    assert torch.equal(guider.combine(step(1.0, None, GUIDE)).eps, torch.tensor([[1.5, 3.0, 0.0]]))
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=1.5), [1.0] * 3)
    assert torch.equal(guider.combine(step(1.0, None, GUIDE)).eps, torch.tensor([[1.25, 2.5, -0.5]]))


def test_without_cfg_the_unconditional_prediction_and_cfgs_scale_are_not_read():
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=2.0), [3.0] * 3)
    assert not guider.uses_cfg and not guider.needs_uncond(0)
    assert torch.equal(guider.combine(step(3.0, UNCOND, GUIDE)).eps, torch.tensor([[1.5, 3.0, 0.0]]))


def test_with_cfg_both_differences_add_up():
    """w = 2, s = 3: c + (c - g) + 2 (c - u) = [1 + 0.5 + 2, 2 + 1 - 4, -1 + 1 + 0] = [3.5, -1, 0]."""
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=2.0, cfg=True), [3.0] * 3)
    assert guider.uses_cfg
    assert torch.equal(guider.combine(step(3.0, UNCOND, GUIDE)).eps, torch.tensor([[3.5, -1.0, 0.0]]))
    # At a step where the schedule's s is 1 there is no unconditional branch: the guide's term alone.
    assert torch.equal(guider.combine(step(1.0, None, GUIDE)).eps, torch.tensor([[1.5, 3.0, 0.0]]))


def test_w_one_with_cfg_is_cfg():
    """No guide branch at w = 1: the combine is CFG's, c + (s - 1)(c - u) = u + s (c - u) = [3, -2, -1]."""
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=1.0, cfg=True), [3.0] * 3)
    assert guider.branches(0) == ("uncond",)
    assert torch.equal(guider.combine(step(3.0, UNCOND, None)).eps, torch.tensor([[3.0, -2.0, -1.0]]))


def test_the_combine_is_the_same_on_x0_predictions():
    """The weights of eps_c, eps_u and eps_g sum to 1, so combining the x0 predictions of the same x (the paper's
    D) and mapping back to eps gives the same eps."""
    a = 0.3
    on_eps = autoguidance_combine(COND, GUIDE, 2.5, UNCOND, 1.7)
    x0s = [eps_to_x0(X, e, a) for e in (COND, GUIDE, UNCOND)]
    on_x0 = x0_to_eps(X, autoguidance_combine(x0s[0], x0s[1], 2.5, x0s[2], 1.7), a)
    assert torch.allclose(on_eps, on_x0, atol=1e-5)


@pytest.mark.parametrize(
    ("scale", "cfg", "scales", "want"),
    [
        (2.0, False, [3.0, 1.0], [("guide",), ("guide",)]),
        (2.0, True, [3.0, 1.0], [("uncond", "guide"), ("guide",)]),
        (1.0, True, [3.0, 1.0], [("uncond",), ()]),
        (1.0, False, [3.0, 1.0], [(), ()]),
    ],
)
def test_branches_follow_w_and_the_schedule(scale, cfg, scales, want):
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=scale, cfg=cfg), scales)
    assert isinstance(guider, Autoguidance) and guider.guide_model == "g"
    assert [guider.branches(i) for i in range(len(scales))] == want
    assert [guider.needs_uncond(i) for i in range(len(scales))] == ["uncond" in b for b in want]


def test_the_trace_norm_is_the_distance_to_the_guide():
    guider = make_guider(GuidanceMethod("autoguidance", guide="g", scale=2.0), [1.0])
    norm = guider.combine(step(1.0, None, GUIDE)).norms["guide_diff_norm"]
    assert torch.allclose(norm, torch.tensor([(0.25 + 1.0 + 1.0) ** 0.5]))


def test_settings_need_a_guide_and_keep_w_in_range():
    with pytest.raises(ValidationError, match="guide"):
        AutoguidanceMethod()
    with pytest.raises(ValidationError, match="scale"):
        AutoguidanceMethod(guide="g", scale=-1)
    with pytest.raises(ValidationError, match="guide"):
        AutoguidanceMethod(guide="")
    assert AutoguidanceMethod(guide="g") == GuidanceMethod("autoguidance", guide="g", scale=2.0, cfg=False)
