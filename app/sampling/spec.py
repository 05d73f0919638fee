"""What a request asks for (SampleSpec, GuidanceParams), the denoiser's interface and its input (Denoiser,
ModelInput), and what a run reports (Preview, StepTrace): plain data, shared by the run, the forward step and
the engine. steps_together and perturbation_of read a spec: which step path it takes, what its perturbed rows get.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from app.guidance import (
    Branch,
    Cads,
    CfgMethod,
    GuidanceSchedule,
    MethodParams,
    NoiseScheduleKind,
    PerturbedMethod,
    guider_class,
)
from app.models.attention import Perturbation, RowPerturbations
from app.models.deepcache import RowsOut
from app.sampling.cache import CacheParams
from app.sampling.schedulers import (
    DEFAULT_SAMPLER,
)


class Denoiser(Protocol):
    """(x, timesteps, class_labels[, embed_delta], *, perturb=None) -> eps, all with the same leading row dimension.

    embed_delta, where given, is added to the class embedding of each row (CADS's condition noise); perturb gives
    chosen rows perturbed attention (app/models/attention.py). Each is passed only when a request in the batch
    uses it, so a three-argument callable also serves a batch without them."""

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        /,
        *args: torch.Tensor,
        perturb: RowPerturbations | None = None,
    ) -> torch.Tensor: ...


class CachingDenoiser(Denoiser, Protocol):
    """A Denoiser whose forward can reuse what it computed at earlier steps, row by row: kind "deepcache"
    (app/models/deepcache.py: settings[i] is row i's split depth, cached[i] its deep features) or "first_block"
    (app/models/first_block.py: settings[i] is row i's threshold, cached[i] its state). settings[i] None: the
    row caches nothing; cached[i] None: it runs in full, and what it would reuse comes back in the output's
    deep[i]."""

    def forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        /,
        *args: torch.Tensor,
        perturb: RowPerturbations | None = None,
        kind: str,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
    ) -> RowsOut: ...


# The branches whose rows ride in the main model's forward, after the request's conditional rows.
MAIN_BRANCHES: tuple[Branch, ...] = ("uncond", "perturbed")


# label -> the model's class embedding of that label, shape (D,).
ClassEmbedding = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class GuidanceParams:
    guidance_scale: float = 3.0
    schedule: GuidanceSchedule = field(default_factory=GuidanceSchedule)
    noise_level: float = 0.0
    noise_schedule: NoiseScheduleKind = "constant"
    guidance_rescale: float = 0.0
    method: MethodParams = field(default_factory=CfgMethod)  # a registered method's settings (app.guidance)
    cads: Cads | None = None

    def to_dict(self) -> dict:
        """Plain values all through (the method's settings are a pydantic model, which asdict leaves whole)."""
        cads = None if self.cads is None else self.cads.model_dump()
        return {**asdict(self), "method": self.method.model_dump(), "cads": cads}


# The guidance of a request that sets none: the API's defaults and research.generate's. GuidanceParams()
# itself stays plain CFG at s = 3 (research.evaluate's scale sweep and SampleSpec's default).
# CFG at s = 2.5 where 0.25 < sigma <= 5 (Kynkaanniemi et al. 2024), each step weighted by the share of its noise
# span inside the interval ("span"), so it guides the same amount, (s - 1)(5 - 0.25), at every step count and
# sampler (docs/guidance.md; 7 of dpmpp_2m_karras's 20 steps). Chosen again (issue 28) at n = 640 under both
# judges, docs/methods-table.md: accuracy 0.988 / 0.984 (s = 3: 0.995), precision 0.947 / 0.936, FID below
# constant s = 2's under both, mean grey 75.4 (real 72.6); it gives up some diversity (0.90x / 0.85x that of
# s = 1) and recall (ResNet 0.78 against 0.87), as every setting with s = 3's class fidelity there does. The
# earlier default, s = 3.5 on (0.25, 1.5] with "step" weighting, guided 3 of 20 steps and was barely guided to
# an independent classifier.
DEFAULT_GUIDANCE = GuidanceParams(
    guidance_scale=2.5,
    schedule=GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=5.0, weighting="span"),
)


@dataclass(frozen=True)
class SampleSpec:
    """What to draw: the engine's own request type, free of HTTP schemas."""

    class_label: int | None  # None: unconditional
    seeds: tuple[int, ...]  # one per image
    steps: int = 20
    sampler: str = DEFAULT_SAMPLER
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    return_trace: bool = False
    preview_every: int | None = None  # keep the x0 prediction as a preview every this many steps; None: no previews
    cache: CacheParams | None = None  # reuse features between steps (app/sampling/cache.py); None: off

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class ModelInput:
    x: torch.Tensor
    timesteps: torch.Tensor
    class_labels: torch.Tensor
    embed_delta: torch.Tensor | None = None  # (rows, D), CADS only
    perturbed: tuple[Perturbation | None, ...] | None = None  # per row, where some row is perturbed

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Preview:
    """The x0 prediction (the guided eps mapped to a clean image) after `step` of the run's steps."""

    step: int
    images: np.ndarray  # uint8 (N, H, W, C)


@dataclass(frozen=True)
class StepTrace:
    """What guidance did at one step, per image. The norms are None where the step skipped the
    unconditional rows (scale 1), the APG parts None for other methods. Tensors until read."""

    step: int
    scale: float
    diff_norm: torch.Tensor | None = None  # |eps_c - eps_u|
    parallel_norm: torch.Tensor | None = None  # APG: |dD_par|, in the x0 space it works in
    orthogonal_norm: torch.Tensor | None = None  # APG: |dD_orth|
    perturbed_norm: torch.Tensor | None = None  # attention guidance: |eps_c - eps_p|
    guide_diff_norm: torch.Tensor | None = None  # autoguidance: |eps_c - eps_guide|

    def to_dict(self) -> dict:
        def values(t: torch.Tensor | None) -> list[float] | None:
            return None if t is None else [round(v, 5) for v in t.tolist()]

        return {
            "step": self.step,
            "scale": self.scale,
            "diff_norm": values(self.diff_norm),
            "parallel_norm": values(self.parallel_norm),
            "orthogonal_norm": values(self.orthogonal_norm),
            "perturbed_norm": values(self.perturbed_norm),
            "guide_diff_norm": values(self.guide_diff_norm),
        }


def perturbation_of(method: MethodParams) -> Perturbation | None:
    """The perturbation an attention-guidance method's "perturbed" rows get; None for any other method."""
    if not isinstance(method, PerturbedMethod):
        return None
    blur_sigma = getattr(method, "blur_sigma", None)  # seg's; None: infinite
    return Perturbation(method.kind, method.layers, math.inf if blur_sigma is None else blur_sigma)  # type: ignore[arg-type]


def steps_together(spec: SampleSpec) -> bool:
    """Whether the request's guidance is one app.sampling.batched combines over the batch: a guider that offers
    combine_rows (CFG), with no condition noise, rescale, CADS or trace (its sampler decides the rest:
    app.sampling.batched.step_table)."""
    g = spec.guidance
    return (
        guider_class(g.method.kind).combine_rows is not None
        and g.noise_level == 0
        and g.guidance_rescale == 0
        and g.cads is None
        and not spec.return_trace
    )
