"""Classifier-free guidance: one Guider per method (a module each, registered in GUIDERS), the noise on
the condition (Conditioners: the seed's noise on eps and CADS), and guidance-weight schedules.

Adding a method: a module with a Guider subclass (its combine, and its state if any), one line in GUIDERS,
and its tests; for now also its fields in GuidanceMethod (params.py) and its request schema in
app/api/schemas.py, which are still shared by every method. The engine builds one guider per request
(make_guider), so a method's state never leaks between requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.guidance.apg import Apg, ApgOutput, apg_combine
from app.guidance.cfg import Cfg, cfg_combine, cfg_rows
from app.guidance.cfg_zero_star import CfgZeroStar, cfg_zero_star_combine
from app.guidance.conditioning import (
    NOISE_SCHEDULE_KINDS,
    Cads,
    CadsConditioner,
    Conditioner,
    ConditionNoise,
    NoiseScheduleKind,
    add_condition_noise,
    cads_condition,
    noise_factors,
)
from app.guidance.core import eps_to_x0, rescale_guidance, row_norm, sigma_of, x0_to_eps
from app.guidance.guider import GuidanceStep, Guided, Guider, RowsCombine
from app.guidance.params import GuidanceMethod
from app.guidance.schedules import SCHEDULE_KINDS, GuidanceSchedule, ScheduleKind

# Every guidance method, by the `kind` a request names it with.
GUIDERS: dict[str, type[Guider]] = {g.kind: g for g in (Cfg, Apg, CfgZeroStar)}
METHOD_KINDS: tuple[str, ...] = tuple(GUIDERS)


def make_guider(method: GuidanceMethod, scales: Sequence[float]) -> Guider:
    """A new guider for one request: its method's class, with the request's per-step scales."""
    try:
        cls = GUIDERS[method.kind]
    except KeyError:
        raise ValueError(f"unknown guidance method {method.kind!r}; choose one of {', '.join(METHOD_KINDS)}") from None
    return cls(method, scales)


__all__ = [
    "GUIDERS",
    "METHOD_KINDS",
    "NOISE_SCHEDULE_KINDS",
    "SCHEDULE_KINDS",
    "Apg",
    "ApgOutput",
    "Cads",
    "CadsConditioner",
    "Cfg",
    "CfgZeroStar",
    "ConditionNoise",
    "Conditioner",
    "GuidanceMethod",
    "GuidanceSchedule",
    "GuidanceStep",
    "Guided",
    "Guider",
    "NoiseScheduleKind",
    "RowsCombine",
    "ScheduleKind",
    "add_condition_noise",
    "apg_combine",
    "cads_condition",
    "cfg_combine",
    "cfg_rows",
    "cfg_zero_star_combine",
    "eps_to_x0",
    "make_guider",
    "noise_factors",
    "rescale_guidance",
    "row_norm",
    "sigma_of",
    "x0_to_eps",
]
