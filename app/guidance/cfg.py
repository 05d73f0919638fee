"""Classifier-free guidance (Ho & Salimans 2022): the combine every other method builds on."""

from __future__ import annotations

from typing import Literal

import torch

from app.guidance.guider import GuidanceStep, Guided, Guider, MethodParams


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6 with w = s - 1); s a number, or a
    tensor that broadcasts over the rows (one scale per row)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def cfg_rows(eps: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """cfg_combine over gathered rows of many requests: eps[uncond] + s * (eps[cond] - eps[uncond]), s per row.
    A row without an unconditional pass names its conditional row in both: eps_c + s * 0 = eps_c exactly."""
    s = scales.reshape(-1, *([1] * (eps.dim() - 1)))
    return cfg_combine(eps.index_select(0, cond), eps.index_select(0, uncond), s)


class CfgMethod(MethodParams):
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022)."""

    kind: Literal["cfg"] = "cfg"


class Cfg(Guider):
    params_model = CfgMethod
    combine_rows = staticmethod(cfg_rows)

    def combine(self, step: GuidanceStep) -> Guided:
        return Guided(cfg_combine(step.eps_cond, step.eps_uncond, step.scale))
