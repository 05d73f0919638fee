"""The shape of a guidance method: one Guider instance per request, built from its settings.

A guider says at which steps it needs the unconditional rows and combines a step's conditional and
unconditional predictions into the guided eps. State that belongs to one request (APG's momentum) lives on
its instance, never on a shared object (diffusers' guiders are shared; these are not). A guider whose combine
is elementwise with a per-row scale may offer combine_rows, the same combine over the gathered rows of many
requests at once: the engine's batched step then uses it (app/sampling/batched.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from app.guidance.params import GuidanceMethod


@dataclass(frozen=True)
class GuidanceStep:
    """What a combine reads at one step of one request: the two predictions, the step's scale, and the model
    input x at that step's alpha_bar (for methods that work on the x0 prediction)."""

    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor
    scale: float
    x: torch.Tensor
    alpha_bar: float


@dataclass(frozen=True)
class Guided:
    """A combine's result: the guided eps, and per-image norms a method reports for the trace."""

    eps: torch.Tensor
    norms: dict[str, torch.Tensor] = field(default_factory=dict)


class RowsCombine(Protocol):
    def __call__(
        self, eps: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor: ...


class Guider:
    """One request's guidance method, built from its settings (a GuidanceMethod of this kind); scales[i] is
    the guidance scale of step i (the weight schedule's)."""

    kind: ClassVar[str]
    combine_rows: ClassVar[RowsCombine | None] = None

    def __init__(self, method: GuidanceMethod, scales: Sequence[float]) -> None:
        self.method = method
        self.scales = scales

    def needs_uncond(self, step: int) -> bool:
        """Step `step` runs the unconditional rows: not where its weight is exactly 1 (eps_cond alone)."""
        return self.scales[step] != 1.0

    def combine(self, step: GuidanceStep) -> Guided:
        raise NotImplementedError
