"""CFG-Zero* (Fan et al. 2025): the unconditional prediction scaled to best fit the conditional one."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

from app.guidance.cfg import cfg_combine
from app.guidance.guider import GuidanceStep, Guided, Guider, MethodParams


def cfg_zero_star_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, eq. 7): a * eps_u + s * (eps_c - a * eps_u), a = <eps_c, eps_u> / |eps_u|^2
    per row, the scale that best fits eps_u to eps_c (diffusers' cfg_zero_star_scale). No zero-init:
    that part is for flow models."""
    alpha = cfg_zero_star_scale(eps_cond.flatten(1), eps_uncond.flatten(1))
    alpha = alpha.view(-1, *([1] * (eps_cond.ndim - 1)))
    return cfg_combine(eps_cond, alpha * eps_uncond, guidance_scale)


class CfgZeroStarMethod(MethodParams):
    """CFG-Zero* (Fan et al. 2025): eps_u scaled by <eps_c, eps_u> / |eps_u|^2 per image before the combine."""

    kind: Literal["cfg_zero_star"] = "cfg_zero_star"


class CfgZeroStar(Guider):
    params_model = CfgZeroStarMethod

    def combine(self, step: GuidanceStep) -> Guided:
        return Guided(cfg_zero_star_combine(step.eps_cond, step.eps_uncond, step.scale))
