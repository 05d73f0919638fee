"""Guidance from the model's own attention: steer each image away from the conditional prediction of rows whose
self-attention is perturbed (app/models/attention.py runs them in the same forward).

  pag  Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377): identity self-attention.
  seg  Smoothed energy guidance (Hong 2024, arXiv 2408.00760): queries blurred over the token grid.
  slg  Skip-layer guidance (Stable Diffusion 3.5; diffusers' SkipLayerGuidance): transformer blocks skipped.

The three differ only in the perturbation; their guidance is one formula, with or without CFG as the papers
combine them: eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p), w the request's guidance scale at the step
and s the method's own `scale`; without CFG (cfg false, or a step whose w is 1), eps = eps_c + s (eps_c - eps_p).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from app.guidance.cfg import cfg_combine
from app.guidance.core import row_norm
from app.guidance.guider import Branch, GuidanceStep, Guided, Guider, MethodParams

Layer = Annotated[int, Field(ge=0, le=1023)]


def perturbed_combine(
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor | None,
    eps_perturbed: torch.Tensor,
    guidance_scale: float,
    perturbed_scale: float,
) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u) + s (eps_c - eps_p) (Ahn et al. 2024, PAG with CFG; Hong 2024's SEG likewise);
    without eps_u, eps_c + s (eps_c - eps_p) (PAG alone). w: guidance_scale, s: perturbed_scale."""
    guided = eps_cond if eps_uncond is None else cfg_combine(eps_cond, eps_uncond, guidance_scale)
    return guided + perturbed_scale * (eps_cond - eps_perturbed)


class PerturbedMethod(MethodParams):
    """The settings every attention method shares: its strength, its layers, and whether CFG comes with it."""

    scale: float = Field(3.0, ge=0, le=20, description="s: the strength of the guidance away from eps_p (0: off)")
    layers: tuple[Layer, ...] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="indices of the layers to perturb (GET /v1/models: attention_guidance); null: the model's default",
    )
    cfg: bool = Field(
        True,
        description="combine with CFG at the request's guidance_scale and schedule (3 rows per image); "
        "false: eps_c + s (eps_c - eps_p) alone (2 rows per image)",
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        """A JSON list of layers is the tuple, in strict validation too (the research tools' settings files)."""
        return tuple(value) if isinstance(value, list) else value


class PagMethod(PerturbedMethod):
    """Perturbed-attention guidance (Ahn et al. 2024): eps_p from identity self-attention on the chosen layers;
    eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p)."""

    kind: Literal["pag"] = "pag"


class SegMethod(PerturbedMethod):
    """Smoothed energy guidance (Hong 2024): eps_p from queries blurred by a Gaussian of std blur_sigma over the
    token grid; eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p)."""

    kind: Literal["seg"] = "seg"
    # SEG's own limit: sigma above 9999 stands for infinity; null asks for it directly.
    blur_sigma: float | None = Field(
        None, gt=0, le=1e6, description="std of the query blur in tokens; above 9999, or null: infinite (mean query)"
    )


class SlgMethod(PerturbedMethod):
    """Skip-layer guidance (Stable Diffusion 3.5): eps_p with the chosen transformer blocks skipped (DiTs only);
    eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p)."""

    kind: Literal["slg"] = "slg"
    # diffusers' SkipLayerGuidance default strength.
    scale: float = Field(2.8, ge=0, le=20, description="s: the strength of the guidance away from eps_p (0: off)")


class PerturbedGuider(Guider):
    """The guider of every attention method: a "perturbed" branch wherever its scale is not 0, the "uncond"
    branch where it combines with CFG and the step's CFG scale is not 1."""

    params: PerturbedMethod

    def needs_uncond(self, step: int) -> bool:
        return self.params.cfg and self.scales[step] != 1.0

    def branches(self, step: int) -> tuple[Branch, ...]:
        uncond: tuple[Branch, ...] = ("uncond",) if self.needs_uncond(step) else ()
        return (*uncond, "perturbed") if self.params.scale != 0 else uncond

    def combine(self, step: GuidanceStep) -> Guided:
        # A step without CFG passes eps_cond as eps_uncond (GuidanceStep): it is not read then. A request without a
        # class keeps its CFG scale and gets no unconditional rows: eps_c + w * (eps_c - eps_c) is eps_c exactly.
        eps_uncond = step.eps_uncond if self.params.cfg and step.scale != 1.0 else None
        eps_perturbed = step.others.get("perturbed")
        if eps_perturbed is None:  # scale 0: CFG alone
            return Guided(step.eps_cond if eps_uncond is None else cfg_combine(step.eps_cond, eps_uncond, step.scale))
        eps = perturbed_combine(step.eps_cond, eps_uncond, eps_perturbed, step.scale, self.params.scale)
        return Guided(eps, {"perturbed_norm": row_norm(step.eps_cond - eps_perturbed)})


class Pag(PerturbedGuider):
    params_model = PagMethod


class Seg(PerturbedGuider):
    params_model = SegMethod


class Slg(PerturbedGuider):
    params_model = SlgMethod
