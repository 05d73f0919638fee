"""The shape of a guidance method: its settings model and its Guider, one Guider instance per request.

A method's settings are a small frozen pydantic model (MethodParams) with a `kind: Literal[...]`, its fields
with their ranges and descriptions, and no other fields: the engine takes it as a request's settings and the
API takes it as the request's `method` (app/api builds its union from the registry, app/guidance/registry.py).

A guider says which predictions each step needs beside the conditional one (its branches: the main model's
unconditional rows, rows of the main model with perturbed attention, or the conditional rows through another
served model, the guide) and combines them into the guided eps. State that belongs to one request (APG's
momentum) lives on its instance, never on a shared object (diffusers' guiders are shared; these are not). A
guider whose combine is elementwise with a per-row scale may offer combine_rows, the same combine over the
gathered rows of many requests at once: the engine's batched step then uses it (app/sampling/batched.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
from pydantic import BaseModel, ConfigDict

# A prediction a step may need beside eps_cond: the main model's unconditional rows, its perturbed rows (attention
# guidance), or the request's conditional rows through the guide model (autoguidance).
Branch = Literal["uncond", "perturbed", "guide"]


class MethodParams(BaseModel):
    """A guidance method's settings: subclasses narrow kind to a Literal with that kind as its default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    kind: str


@dataclass(frozen=True)
class GuidanceStep:
    """What a combine reads at one step of one request: the predictions, the step's scale, and the model input x
    at that step's alpha_bar (for methods that work on the x0 prediction). eps_uncond is the unconditional
    prediction; a step without an "uncond" branch passes eps_cond there, and its combine must not read it
    (SampleRun then passes scale 1: CFG's scale is not in effect). others holds the step's other branches by
    name ("perturbed", "guide")."""

    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor
    scale: float
    x: torch.Tensor
    alpha_bar: float
    others: Mapping[str, torch.Tensor] = field(default_factory=dict)


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
    guide_model: str | None = None  # the served model a "guide" branch runs through (autoguidance)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "params_model", None) is None:  # a base its methods share: each of them names its model
            return
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

    @property
    def uses_cfg(self) -> bool:
        """Whether the combine reads CFG's scale (the request's guidance_scale and schedule): a method that guides
        by other means alone does not (autoguidance without cfg), and skips no unconditional rows at weight 1."""
        return True

    def branches(self, step: int) -> tuple[Branch, ...]:
        """The predictions step `step` needs beside eps_cond, in the order their rows follow the request's
        conditional rows (a "guide" branch's rows go through the guide model's forward instead)."""
        return ("uncond",) if self.needs_uncond(step) else ()

    def combine(self, step: GuidanceStep) -> Guided:
        raise NotImplementedError
