"""Classifier-free guidance: one Guider per method (a module each, with its settings model, registered in
GUIDERS in registry.py), the noise on the condition (Conditioners: the seed's noise on eps and CADS), and
guidance-weight schedules.

Adding a method: a module with its settings model (a MethodParams) and its Guider (its combine, and its state
if any), one entry in GUIDERS, and its tests; the API, the engine and the research tools read it from the
registry (docs/guidance-methods.md). The engine builds one guider per request (make_guider), so a method's
state never leaks between requests.
"""

from __future__ import annotations

from app.guidance.apg import Apg, ApgMethod, ApgOutput, apg_combine
from app.guidance.attention import (
    Pag,
    PagMethod,
    PerturbedGuider,
    PerturbedMethod,
    Seg,
    SegMethod,
    Slg,
    SlgMethod,
    perturbed_combine,
)
from app.guidance.autoguidance import Autoguidance, AutoguidanceMethod, autoguidance_combine
from app.guidance.cfg import Cfg, CfgMethod, cfg_combine, cfg_rows
from app.guidance.cfg_zero_star import CfgZeroStar, CfgZeroStarMethod, cfg_zero_star_combine
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
from app.guidance.guider import Branch, GuidanceStep, Guided, Guider, MethodParams, RowsCombine
from app.guidance.registry import (
    GUIDERS,
    GuidanceMethod,
    form_fields,
    guider_class,
    make_guider,
    method_fields,
    method_kinds,
    method_models,
    register_guider,
    unregister_guider,
)
from app.guidance.schedules import (
    INTERVAL_WEIGHTINGS,
    SCHEDULE_KINDS,
    GuidanceSchedule,
    IntervalWeighting,
    ScheduleKind,
    guidance_scales,
)

__all__ = [
    "GUIDERS",
    "guidance_scales",
    "NOISE_SCHEDULE_KINDS",
    "INTERVAL_WEIGHTINGS",
    "IntervalWeighting",
    "SCHEDULE_KINDS",
    "Apg",
    "ApgMethod",
    "ApgOutput",
    "Autoguidance",
    "AutoguidanceMethod",
    "Branch",
    "Cads",
    "CadsConditioner",
    "Cfg",
    "CfgMethod",
    "CfgZeroStar",
    "CfgZeroStarMethod",
    "ConditionNoise",
    "Conditioner",
    "GuidanceMethod",
    "GuidanceSchedule",
    "GuidanceStep",
    "Guided",
    "Guider",
    "MethodParams",
    "NoiseScheduleKind",
    "Pag",
    "PagMethod",
    "PerturbedGuider",
    "PerturbedMethod",
    "RowsCombine",
    "ScheduleKind",
    "Seg",
    "SegMethod",
    "Slg",
    "SlgMethod",
    "add_condition_noise",
    "apg_combine",
    "autoguidance_combine",
    "cads_condition",
    "cfg_combine",
    "cfg_rows",
    "cfg_zero_star_combine",
    "eps_to_x0",
    "guider_class",
    "make_guider",
    "form_fields",
    "method_fields",
    "method_kinds",
    "method_models",
    "noise_factors",
    "perturbed_combine",
    "register_guider",
    "rescale_guidance",
    "row_norm",
    "sigma_of",
    "unregister_guider",
    "x0_to_eps",
]
