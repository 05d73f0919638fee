"""The attention-guidance methods' settings, branches and combine (app/guidance/attention.py), by hand."""

import math

import pytest
import torch
from pydantic import ValidationError

from app.guidance import (
    GuidanceMethod,
    GuidanceStep,
    PagMethod,
    SegMethod,
    SlgMethod,
    make_guider,
    method_kinds,
    perturbed_combine,
)

EPS_C = torch.tensor([[1.0, 2.0]])
EPS_U = torch.tensor([[0.0, 1.0]])
EPS_P = torch.tensor([[0.5, 3.0]])
NAN = torch.full((1, 2), math.nan)


def step(scale: float, eps_uncond: torch.Tensor = EPS_U, perturbed: torch.Tensor | None = EPS_P) -> GuidanceStep:
    others = {} if perturbed is None else {"perturbed": perturbed}
    return GuidanceStep(EPS_C, eps_uncond, scale, torch.zeros(1, 2), 0.5, others=others)


def test_the_combine_with_cfg_is_cfg_plus_the_step_away_from_the_perturbed_prediction():
    # eps_u + 3 (eps_c - eps_u) + 2 (eps_c - eps_p) = [0, 1] + 3 [1, 1] + 2 [0.5, -1.0] = [4, 2]
    assert torch.equal(perturbed_combine(EPS_C, EPS_U, EPS_P, 3.0, 2.0), torch.tensor([[4.0, 2.0]]))


def test_the_combine_alone_steps_from_the_conditional_prediction():
    # eps_c + 2 (eps_c - eps_p) = [1, 2] + [1, -2] = [2, 0]
    assert torch.equal(perturbed_combine(EPS_C, None, EPS_P, 3.0, 2.0), torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("kind", ["pag", "seg", "slg"])
def test_every_attention_method_is_registered_with_its_own_settings(kind):
    assert kind in method_kinds()
    method = GuidanceMethod(kind)
    assert type(method) is {"pag": PagMethod, "seg": SegMethod, "slg": SlgMethod}[kind]
    assert method.layers is None and method.cfg is True
    assert method.scale == (2.8 if kind == "slg" else 3.0)  # diffusers' SkipLayerGuidance; PAG's and SEG's papers


def test_the_guider_asks_for_the_unconditional_rows_only_where_cfg_guides():
    scales = [3.0, 1.0, 2.0]
    with_cfg = make_guider(GuidanceMethod("pag", scale=2.0), scales)
    assert [with_cfg.branches(i) for i in range(3)] == [
        ("uncond", "perturbed"),
        ("perturbed",),
        ("uncond", "perturbed"),
    ]
    assert [with_cfg.needs_uncond(i) for i in range(3)] == [True, False, True]
    alone = make_guider(GuidanceMethod("seg", cfg=False), scales)
    assert [alone.branches(i) for i in range(3)] == [("perturbed",)] * 3
    off = make_guider(GuidanceMethod("slg", scale=0.0), scales)  # strength 0: plain CFG, no perturbed rows
    assert [off.branches(i) for i in range(3)] == [("uncond",), (), ("uncond",)]


def test_the_guider_combines_as_the_formula_and_reports_the_perturbed_difference():
    guider = make_guider(GuidanceMethod("pag", scale=2.0), [3.0])
    guided = guider.combine(step(3.0))
    assert torch.equal(guided.eps, torch.tensor([[4.0, 2.0]]))
    assert torch.allclose(guided.norms["perturbed_norm"], torch.tensor([math.hypot(0.5, 1.0)]))


@pytest.mark.parametrize("cfg, scale", [(True, 1.0), (False, 3.0)])
def test_a_step_without_cfg_never_reads_the_unconditional_prediction(cfg, scale):
    """Where the step has no "uncond" branch (its CFG scale is 1, or cfg is off), what stands in its place is not
    read: NaN there leaves eps_c + s (eps_c - eps_p)."""
    guider = make_guider(GuidanceMethod("seg", scale=2.0, cfg=cfg), [scale])
    assert torch.equal(guider.combine(step(scale, eps_uncond=NAN)).eps, torch.tensor([[2.0, 0.0]]))


def test_a_request_without_a_class_is_guided_from_its_conditional_rows_exactly():
    """A request without a class has no unconditional rows: SampleRun passes eps_cond in their place, and the
    CFG part is then eps_c + w * 0, eps_c to the bit."""
    guider = make_guider(GuidanceMethod("pag", scale=2.0), [3.0])
    eps_c = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_p = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = guider.combine(GuidanceStep(eps_c, eps_c, 3.0, eps_c, 0.5, others={"perturbed": eps_p})).eps
    assert torch.equal(got, eps_c + 2.0 * (eps_c - eps_p))


def test_strength_zero_with_cfg_is_plain_cfg():
    guider = make_guider(GuidanceMethod("pag", scale=0.0), [3.0])
    assert torch.equal(guider.combine(step(3.0, perturbed=None)).eps, EPS_U + 3.0 * (EPS_C - EPS_U))


@pytest.mark.parametrize(
    "kind, fields, where",
    [
        ("pag", {"layers": []}, "layers"),
        ("pag", {"layers": [-1]}, "layers"),
        ("seg", {"blur_sigma": 0}, "blur_sigma"),
        ("seg", {"blur_sigma": math.inf}, "blur_sigma"),
        ("slg", {"scale": -1}, "scale"),
        ("slg", {"scale": 21}, "scale"),
        ("pag", {"blur_sigma": 2.0}, "blur_sigma"),  # seg's field only
        ("pag", {"eta": 0.5}, "eta"),  # another method's field
    ],
)
def test_settings_out_of_range_or_foreign_are_refused_naming_the_field(kind, fields, where):
    with pytest.raises(ValidationError) as info:
        GuidanceMethod(kind, **fields)
    assert where in {str(part) for e in info.value.errors() for part in e["loc"]}


def test_layers_from_json_are_a_hashable_tuple():
    method = PagMethod.model_validate({"kind": "pag", "layers": [0, 2]}, strict=True)
    assert method.layers == (0, 2)
    assert hash(method) == hash(PagMethod(layers=(0, 2)))
