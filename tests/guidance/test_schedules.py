"""Guidance-weight schedules: the interval's two weightings, and how much guidance each applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.guidance import GuidanceSchedule
from app.sampling import SAMPLERS
from app.sampling.run import schedule_values
from app.sampling.schedulers import config_key

SCHEDULER_CONFIG = Path(__file__).resolve().parents[2] / "model_store/fashion-mnist-cfg/scheduler/scheduler_config.json"


def guided_amount(scales: list[float], sigmas: list[float]) -> float:
    """sum_i (s_i - 1) * (sigma_i - sigma_{i+1}), sigma_N = 0: about how far guidance moves x in all."""
    ends = [*sigmas[1:], 0.0]
    return sum((s - 1.0) * (a - b) for s, a, b in zip(scales, sigmas, ends, strict=True))


def test_span_weighting_gives_each_step_the_share_of_its_noise_span_inside_the_interval() -> None:
    span = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=1.5, weighting="span")
    sigmas = [10.0, 1.0, 0.5, 0.1]
    # Steps 10 -> 1 (0.5 of 9 inside), 1 -> 0.5 (all), 0.5 -> 0.1 (0.25 of 0.4), 0.1 -> 0 (none).
    assert span.scales(3.5, 4, sigmas) == pytest.approx([1 + 2.5 * 0.5 / 9, 3.5, 1 + 2.5 * 0.625, 1.0])
    assert span.scales(3.5, 4, sigmas)[3] == 1.0  # exactly 1: the step skips its uncond rows
    # "step" weighting, the default, guides a step in full where its own sigma is inside.
    step = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=1.5)
    assert step.scales(3.5, 4, sigmas) == [1.0, 3.5, 3.5, 1.0]


def test_span_weighting_respects_the_step_fraction_window_and_open_bounds() -> None:
    only_min = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.5, weighting="span")
    assert only_min.scales(3.0, 3, [4.0, 1.0, 0.25]) == pytest.approx([3.0, 1 + 2 * 0.5 / 0.75, 1.0])
    late_only = GuidanceSchedule("interval", start=0.5, end=1.0, weighting="span")
    assert late_only.scales(3.0, 4, [4.0, 2.0, 1.0, 0.5]) == [1.0, 1.0, 3.0, 3.0]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_span_weighting_guides_as_much_at_every_step_count_and_the_step_weighting_does_not(sampler: str) -> None:
    key = config_key(json.loads(SCHEDULER_CONFIG.read_text()))
    span = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=1.5, weighting="span")
    step = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=1.5)
    exact = (3.5 - 1) * (1.5 - 0.25)
    step_amounts = []
    for steps in (10, 15, 20, 30, 50):
        sigmas = list(schedule_values(sampler, key, steps)[1])
        assert guided_amount(span.scales(3.5, steps, sigmas), sigmas) == pytest.approx(exact)
        step_amounts.append(guided_amount(step.scales(3.5, steps, sigmas), sigmas))
    assert max(step_amounts) - min(step_amounts) > 0.1 * exact  # what the span weighting is for
