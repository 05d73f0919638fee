"""The shape of a guidance method: its settings model and its Guider, one Guider instance per request.

A method's settings are a small frozen pydantic model (MethodParams) with a `kind: Literal[...]`, its fields
with their ranges and descriptions, and no other fields: the engine takes it as a request's settings and the
API takes it as the request's `method` (app/api builds its union from the registry, app/guidance/registry.py).

A guider says at which steps it needs the unconditional rows and combines a step's conditional and
unconditional predictions into the guided eps. State that belongs to one request (APG's momentum) lives on
its instance, never on a shared object (diffusers' guiders are shared; these are not). A guider whose combine
is elementwise with a per-row scale may offer combine_rows, the same combine over the gathered rows of many
requests at once: the engine's batched step then uses it (app/sampling/batched.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, get_args

import torch
from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """A guidance method's settings: subclasses narrow kind to a Literal with that kind as its default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    kind: str


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
    """One request's guidance method, built from its settings (an instance of its params model); scales[i] is
    the guidance scale of step i (the weight schedule's). A subclass names its params model; its kind is the
    model's."""

    params_model: ClassVar[type[MethodParams]]
    kind: ClassVar[str]
    combine_rows: ClassVar[RowsCombine | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kinds = get_args(cls.params_model.model_fields["kind"].annotation)
        if len(kinds) != 1 or cls.params_model.model_fields["kind"].default != kinds[0]:
            raise TypeError(f"{cls.params_model.__name__}.kind must be a Literal of one kind, with it as its default")
        cls.kind = kinds[0]

    def __init__(self, params: MethodParams, scales: Sequence[float]) -> None:
        if not isinstance(params, self.params_model):
            raise TypeError(f"{type(self).__name__} takes {self.params_model.__name__}, got {type(params).__name__}")
        self.params = params
        self.scales = scales

    def needs_uncond(self, step: int) -> bool:
        """Step `step` runs the unconditional rows: not where its weight is exactly 1 (eps_cond alone)."""
        return self.scales[step] != 1.0

    def combine(self, step: GuidanceStep) -> Guided:
        raise NotImplementedError
