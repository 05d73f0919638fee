"""Guidance-weight schedules: the guidance scale of every sampling step."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

ScheduleKind = Literal["constant", "linear", "cosine", "interval"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
IntervalWeighting = Literal["step", "span"]
INTERVAL_WEIGHTINGS: tuple[IntervalWeighting, ...] = get_args(IntervalWeighting)


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale s_i varies over the sampling steps i = 0 .. N-1 (N = steps).

    constant: s_i = s
    linear:   s_i = s * (start + (end - start) * i / (N - 1))          (s_0 = s*start, s_{N-1} = s*end)
    cosine:   s_i = s * (end + (start - end) * 0.5 * (1 + cos(pi * i / N)))
              with start=1, end=min/max and s=max this is cosine annealing from max towards min;
              start < end gives the increasing variant.
    interval: s_i = s where start <= i / N < end and sigma_min < sigma_i <= sigma_max, else 1 (no
              guidance): Kynkäänniemi et al. 2024, guidance in a limited interval of noise levels
              (i / N = 0 is pure noise; a missing sigma bound is no bound). That is weighting "step".
              Weighting "span": s_i = 1 + (s - 1) * f_i, where f_i is the share of step i's noise span
              [sigma_{i+1}, sigma_i] (sigma_N = 0) inside (sigma_min, sigma_max]. A step moves x by
              about eps * (sigma_{i+1} - sigma_i), so the guidance the interval adds, sum of
              (s_i - 1) * (sigma_i - sigma_{i+1}), is then (s - 1) * (sigma_max - sigma_min) at any step count
              and sampler whose steps cover the interval; with "step" it depends on which steps land inside.
    """

    kind: ScheduleKind = "constant"
    start: float = 1.0
    end: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    weighting: IntervalWeighting = "step"

    def factor(self, i: int, num_steps: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            frac = i / (num_steps - 1) if num_steps > 1 else 0.0
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * i / num_steps))
        raise ValueError(f"factor() does not apply to schedule kind {self.kind!r}")

    def in_interval(self, i: int, num_steps: int, sigma: float | None) -> bool:
        if not self.start <= i / num_steps < self.end:
            return False
        if sigma is None:  # unknown noise level: the step may be guided
            return True
        above = self.sigma_min is None or sigma > self.sigma_min
        below = self.sigma_max is None or sigma <= self.sigma_max
        return above and below

    def scale_at(self, guidance_scale: float, i: int, num_steps: int, sigma: float | None = None) -> float:
        if self.kind == "interval":
            return guidance_scale if self.in_interval(i, num_steps, sigma) else 1.0
        return guidance_scale * self.factor(i, num_steps)

    def scales(self, guidance_scale: float, num_steps: int, sigmas: Sequence[float] | None = None) -> list[float]:
        """The guidance scale of every step. Without sigmas, a sigma interval counts every step as guided
        (an upper bound on the rows a request needs)."""
        if self.kind == "interval" and self.weighting == "span" and sigmas is not None:
            return [
                1.0 + (guidance_scale - 1.0) * self.span_share(sigmas[i], sigmas[i + 1] if i + 1 < num_steps else 0.0)
                if self.start <= i / num_steps < self.end
                else 1.0
                for i in range(num_steps)
            ]
        return [
            self.scale_at(guidance_scale, i, num_steps, None if sigmas is None else sigmas[i]) for i in range(num_steps)
        ]

    def span_share(self, sigma_from: float, sigma_to: float) -> float:
        """The share of the noise span [sigma_to, sigma_from] that lies in (sigma_min, sigma_max]."""
        high = sigma_from if self.sigma_max is None else min(sigma_from, self.sigma_max)
        low = sigma_to if self.sigma_min is None else max(sigma_to, self.sigma_min)
        if sigma_from <= sigma_to:  # a step that doesn't lower the noise: all or nothing, as "step" weighs it
            inside = (self.sigma_min is None or sigma_from > self.sigma_min) and (
                self.sigma_max is None or sigma_from <= self.sigma_max
            )
            return 1.0 if inside else 0.0
        return max(0.0, high - low) / (sigma_from - sigma_to)


@functools.lru_cache(maxsize=1024)
def guidance_scales(
    schedule: GuidanceSchedule, guidance_scale: float, steps: int, sigmas: tuple[float, ...]
) -> tuple[float, ...]:
    """GuidanceSchedule.scales, kept per (schedule, scale, steps, sigmas): the API's few settings recur."""
    return tuple(schedule.scales(guidance_scale, steps, sigmas))
