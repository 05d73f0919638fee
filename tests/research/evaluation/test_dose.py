"""research.evaluation.dose: how much an interval guides, from the shipped checkpoint's scheduler config."""

import json

import pytest

from app.config import DEFAULT_MODEL_PATH
from app.guidance import GuidanceSchedule
from app.sampling import DEFAULT_GUIDANCE, SAMPLERS
from research.evaluation.dose import dose, main

CONFIG = json.loads((DEFAULT_MODEL_PATH / "scheduler" / "scheduler_config.json").read_text())
STEPS = range(10, 51, 5)


def test_span_weighting_guides_the_interval_s_own_amount_at_every_step_count_and_sampler():
    schedule = GuidanceSchedule("interval", 0.0, 1.0, sigma_min=0.25, sigma_max=1.5, weighting="span")
    for sampler in SAMPLERS:
        for steps in STEPS:
            got = dose(schedule, 3.5, sampler, CONFIG, steps)
            assert got.amount == pytest.approx(2.5 * 1.25, rel=1e-9), (sampler, steps)
            assert got.guided_steps >= 2


def test_step_weighting_guides_more_or_less_with_the_step_count():
    schedule = GuidanceSchedule("interval", 0.0, 1.0, sigma_min=0.25, sigma_max=1.5)
    amounts = [dose(schedule, 3.5, "dpmpp_2m_karras", CONFIG, steps).amount for steps in STEPS]
    assert min(amounts) < 0.6 * 3.125 and max(amounts) > 0.95 * 3.125
    # the earlier default request at its default sampler and steps: 3 guided steps, 2.22 of the interval's 3.125
    assert dose(schedule, 3.5, "dpmpp_2m_karras", CONFIG, 20).guided_steps == 3
    assert dose(schedule, 3.5, "dpmpp_2m_karras", CONFIG, 20).amount == pytest.approx(2.22, abs=0.01)


def test_the_default_request_guides_its_interval_s_amount_at_every_step_count_and_sampler():
    # s = 2.5 on (0.25, 5], span-weighted: 1.5 * 4.75 = 7.125 everywhere; 7 of dpmpp_2m_karras's 20 steps
    schedule, scale = DEFAULT_GUIDANCE.schedule, DEFAULT_GUIDANCE.guidance_scale
    for sampler in SAMPLERS:
        for steps in STEPS:
            assert dose(schedule, scale, sampler, CONFIG, steps).amount == pytest.approx(7.125, rel=1e-9)
    assert dose(schedule, scale, "dpmpp_2m_karras", CONFIG, 20).guided_steps == 7


def test_the_command_prints_both_weightings_of_every_sampler(capsys):
    assert main(["--steps", "10,20"]) == 0
    out = capsys.readouterr().out
    for sampler in SAMPLERS:
        assert f"| {sampler} | step |" in out and f"| {sampler} | span | 7.125 (" in out  # the default's
