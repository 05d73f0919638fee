"""The request's options that are discriminated unions on `kind` (the guidance `schedule`, the step `cache`): one
pydantic model per kind, each field with its range, so that a 422 names the allowed kinds and values. New options
take this shape (docs/api.md). app/api/schemas.py builds the request model from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.guidance import IntervalWeighting


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConstantSchedule(Strict):
    """s_i = guidance_scale at every step."""

    kind: Literal["constant"] = "constant"


class LinearSchedule(Strict):
    """s_i = guidance_scale * (start + (end - start) * i / (N - 1)), i = 0 .. N-1 over N steps."""

    kind: Literal["linear"]
    start: float = Field(1.0, ge=0, le=10, description="factor of guidance_scale at the first step")
    end: float = Field(0.0, ge=0, le=10, description="factor of guidance_scale at the last step")


class CosineSchedule(Strict):
    """s_i = guidance_scale * (end + (start - end) * 0.5 * (1 + cos(pi * i / N))).
    start=1, end=min/max is cosine annealing from max (= guidance_scale) towards min;
    start < end is the increasing variant."""

    kind: Literal["cosine"]
    start: float = Field(1.0, ge=0, le=10, description="factor of guidance_scale at step 0")
    end: float = Field(0.0, ge=0, le=10, description="factor the cosine decays towards at step N")


class IntervalSchedule(Strict):
    """s_i = guidance_scale where start <= i / N < end and sigma_min < sigma_i <= sigma_max, else 1 (no
    guidance); i / N = 0 is pure noise. Kynkäänniemi et al. 2024, guidance in a limited interval of
    noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar), read from the request's own scheduler."""

    kind: Literal["interval"]
    start: float = Field(0.0, ge=0, le=1, description="fraction of the trajectory where guidance starts")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the trajectory where guidance stops")
    sigma_min: float | None = Field(None, ge=0, le=1000, description="no guidance at sigma <= sigma_min")
    sigma_max: float | None = Field(None, ge=0, le=1000, description="no guidance at sigma > sigma_max")
    weighting: IntervalWeighting = Field(
        "step",
        description="step: the whole scale on each step whose sigma lies in the interval (how much a request is "
        "guided then depends on which steps land inside); span: each step's scale weighted by the share of its "
        "noise span inside the interval, the same guidance at every step count and sampler",
    )

    @model_validator(mode="after")
    def _ordered(self) -> IntervalSchedule:
        if self.start > self.end:
            raise ValueError(f"schedule.start ({self.start:g}) must not exceed schedule.end ({self.end:g})")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"schedule.sigma_min ({self.sigma_min:g}) must be below sigma_max ({self.sigma_max:g})")
        return self


Schedule = Annotated[ConstantSchedule | LinearSchedule | CosineSchedule | IntervalSchedule, Field(discriminator="kind")]


class NoCache(Strict):
    """No step cache: every row runs the whole network at every step."""

    kind: Literal["none"] = "none"


def uncond_fields() -> tuple[Any, Any]:
    """deepcache's and first_block's uncond_every and uncond_order: with uncond_every > 1 they run with the uncond
    cache (FasterCache pairs the two)."""
    every = Field(
        1, ge=1, le=10, description="with an uncond cache: the guided steps run the unconditional rows every this many"
    )
    return every, Field(1, ge=0, le=1, description="the uncond cache's order (kind uncond's order)")


class _CachedSteps(Strict):
    """The steps deepcache and skip reuse work on: a full step every `interval` steps, the steps between cached;
    every step in full outside [start, end), fractions of the steps, and where full_sigma_min < sigma <=
    full_sigma_max (docs/caching.md)."""

    interval: int = Field(3, ge=1, le=10, description="a full step every this many steps (1: no reuse)")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps before which every step is full")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps from which every step is full")
    full_sigma_min: float | None = Field(
        None, ge=0, le=1000, description="every step with full_sigma_min < sigma <= full_sigma_max runs in full"
    )
    full_sigma_max: float | None = Field(
        None, ge=0, le=1000, description="the band's top (null: no bound; both null: no band)"
    )
    order: int = Field(0, ge=0, le=1, description="0: reuse what the last full step computed; 1: forecast it")
    uncond_every: int
    uncond_order: int
    uncond_every, uncond_order = uncond_fields()

    @model_validator(mode="after")
    def _ordered(self) -> _CachedSteps:
        if self.start > self.end:
            raise ValueError(f"cache.start ({self.start:g}) must not exceed cache.end ({self.end:g})")
        low, high = self.full_sigma_min, self.full_sigma_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"cache.full_sigma_min ({low:g}) must be below cache.full_sigma_max ({high:g})")
        return self


class DeepCache(_CachedSteps):
    """DeepCache (Ma et al. 2024), for UNets: a full step every `interval` steps caches the features that enter
    the up path at depth `branch`; the steps between run only the shallow path and reuse them (order 0) or
    forecast them from the last two (order 1). Each kind of row (conditional, unconditional, perturbed) keeps its
    own features."""

    kind: Literal["deepcache"]
    branch: int = Field(
        0,
        ge=0,
        le=8,
        description="split depth: 0 is the shallowest (the cheapest cached step); GET /v1/models "
        "lists each model's branches",
    )


class SkipCache(_CachedSteps):
    """Step skipping, for any model: the steps between full ones run no row at all; each image's denoised
    estimate is that of its last full step (order 0) or forecast from the last two (order 1). By default only
    steps with sigma above 10, the first ones from pure noise, may skip (docs/caching.md)."""

    kind: Literal["skip"]
    full_sigma_max: float | None = Field(
        10.0, ge=0, le=1000, description="the band's top (null: no bound; both null: no band)"
    )


class FirstBlockCache(Strict):
    """First-Block Cache, for DiTs: each row runs the first transformer block, and where that block's residual
    changed by less than `threshold` (relative, mean absolute) since the row's last full step, skips the other
    blocks and reuses their residual from that step (docs/caching.md)."""

    kind: Literal["first_block"]
    threshold: float = Field(
        0.1, gt=0, le=1, description="the first block's relative residual change below which a row skips the rest"
    )
    uncond_every: int
    uncond_order: int
    uncond_every, uncond_order = uncond_fields()


class UncondCache(Strict):
    """CFG-Cache (FasterCache, Lv et al. 2025), for any model: the unconditional rows run on the first guided step
    and every `every`-th after it; the guided steps between take eps_uncond = eps_cond - d, d the guidance
    difference of the last steps that ran them (docs/caching.md)."""

    kind: Literal["uncond"]
    every: int = Field(
        3, ge=1, le=10, description="the guided steps run the unconditional rows every this many (1: no reuse)"
    )
    order: int = Field(
        1, ge=0, le=1, description="0: reuse the last guidance difference; 1: forecast it from the last two"
    )


Cache = Annotated[NoCache | DeepCache | FirstBlockCache | UncondCache | SkipCache, Field(discriminator="kind")]


def by_kind(*models: type[BaseModel]) -> dict[str, type[BaseModel]]:
    return {get_args(m.model_fields["kind"].annotation)[0]: m for m in models}


SCHEDULE_MODELS = by_kind(ConstantSchedule, LinearSchedule, CosineSchedule, IntervalSchedule)
CACHE_MODELS = by_kind(NoCache, DeepCache, FirstBlockCache, UncondCache, SkipCache)
