"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507):
guide the model with a weaker version of itself, read conditionally, instead of its unconditional prediction;
optionally beside classifier-free guidance on the request's own scale and schedule (docs/autoguidance.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from app.guidance.core import row_norm
from app.guidance.guider import Branch, GuidanceStep, Guided, Guider, MethodParams


def autoguidance_combine(
    eps_cond: torch.Tensor,
    eps_guide: torch.Tensor,
    guide_scale: float,
    eps_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """eps_c + (w - 1) (eps_c - eps_g) + (s - 1) (eps_c - eps_u).

    The first two terms are autoguidance's D_g + w (D_c - D_g) (Karras et al. 2024, eq. 2, with the guide's D_g
    in place of the unconditional one), the last is CFG's with s = 1 + w_cfg; without eps_uncond (or at s = 1)
    it is autoguidance alone. The weights of eps_c, eps_u and eps_g sum to 1, so the same combine on x0
    predictions of the same x gives the same step: it holds in eps or in D. Two weights span every linear mix
    of the two guiding predictions that the paper discusses (one total weight split between them)."""
    eps = eps_cond + (guide_scale - 1) * (eps_cond - eps_guide)
    if eps_uncond is not None and guidance_scale != 1.0:
        eps = eps + (guidance_scale - 1) * (eps_cond - eps_uncond)
    return eps


class AutoguidanceMethod(MethodParams):
    """Autoguidance (Karras et al. 2024): eps = eps_c + (w - 1) (eps_c - eps_guide), the guide another served
    model read with the request's class; with cfg, + (s_i - 1) (eps_c - eps_u) on the request's guidance_scale
    and schedule."""

    kind: Literal["autoguidance"] = "autoguidance"
    guide: str = Field(
        min_length=1,
        max_length=200,
        description="the served model that guides: a weaker model of the same classes and noise schedule "
        "(GET /v1/models lists each model's guides)",
    )
    # The prototype on the shipped pair: w = 1.5 and 2 gave the best FID and variety (docs/autoguidance.md).
    scale: float = Field(2.0, ge=0, le=20, description="w: eps_c + (w - 1) (eps_c - eps_guide); 1: no autoguidance")
    cfg: bool = Field(
        False,
        description="also classifier-free guidance with the request's guidance_scale and schedule; without it "
        "those two are not read",
    )


class Autoguidance(Guider):
    """One request's autoguidance: the guide's conditional prediction at every step where w != 1, and the main
    model's unconditional one where cfg is on and the schedule's s_i != 1."""

    params_model = AutoguidanceMethod
    params: AutoguidanceMethod

    def __init__(self, params: AutoguidanceMethod, scales: Sequence[float]) -> None:
        super().__init__(params, scales)
        self.guide_model = params.guide

    @property
    def uses_cfg(self) -> bool:
        return self.params.cfg

    def needs_uncond(self, step: int) -> bool:
        return self.params.cfg and self.scales[step] != 1.0

    def branches(self, step: int) -> tuple[Branch, ...]:
        uncond: tuple[Branch, ...] = ("uncond",) if self.needs_uncond(step) else ()
        return (*uncond, "guide") if self.params.scale != 1.0 else uncond

    def combine(self, step: GuidanceStep) -> Guided:
        eps_guide = step.others.get("guide")
        if eps_guide is None:  # w = 1: the guide's term is 0, so it is not run
            eps_guide = step.eps_cond
        cfg = self.params.cfg and step.scale != 1.0
        eps = autoguidance_combine(
            step.eps_cond, eps_guide, self.params.scale, step.eps_uncond if cfg else None, step.scale
        )
        return Guided(eps, {"guide_diff_norm": row_norm(step.eps_cond - eps_guide)})
