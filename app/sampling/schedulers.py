"""The samplers: diffusers schedulers built from a checkpoint's scheduler config, one instance per request."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# "trailing" spacing starts every sampler at the last training timestep (Lin et al. 2023, table 2),
# which matters at the small step counts a service runs.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing"}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    ),
    "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
}


def make_scheduler(sampler: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler instance: its step index and history belong to one request."""
    try:
        cls, overrides = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls.from_config(scheduler_config, **overrides)
