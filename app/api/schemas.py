"""Request and response schemas. The request model is built per app, so the OpenAPI schema and the
422 errors show the configured limits and the loaded model's class names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.sampling import DEFAULT_SAMPLER

SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp_2m", "euler_a")
Sampler = Literal["ddim", "ddpm", "dpmpp_2m", "euler_a"]


@dataclass(frozen=True)
class Limits:
    class_names: tuple[str, ...]
    max_images: int
    max_steps: int
    default_steps: int
    max_guidance_scale: float
    max_noise_level: float


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConstantSchedule(_Schedule):
    """s_i = guidance_scale at every step."""

    kind: Literal["constant"] = "constant"


class LinearSchedule(_Schedule):
    """s_i = guidance_scale * (start + (end - start) * i / (N - 1)), i = 0 .. N-1 over N steps."""

    kind: Literal["linear"]
    start: float = Field(1.0, ge=0, le=10, description="factor of guidance_scale at the first step")
    end: float = Field(0.0, ge=0, le=10, description="factor of guidance_scale at the last step")


class CosineSchedule(_Schedule):
    """s_i = guidance_scale * (end + (start - end) * 0.5 * (1 + cos(pi * i / N))).
    start=1, end=min/max is cosine annealing from max (= guidance_scale) towards min;
    start < end is the increasing variant."""

    kind: Literal["cosine"]
    start: float = Field(1.0, ge=0, le=10, description="factor of guidance_scale at step 0")
    end: float = Field(0.0, ge=0, le=10, description="factor the cosine decays towards at step N")


class IntervalSchedule(_Schedule):
    """s_i = guidance_scale where start <= i / N < end, else 1 (no guidance); i / N = 0 is pure noise.
    Kynkäänniemi et al. 2024, guidance in a limited interval."""

    kind: Literal["interval"]
    start: float = Field(..., ge=0, le=1, description="fraction of the trajectory where guidance starts")
    end: float = Field(..., ge=0, le=1, description="fraction of the trajectory where guidance stops")


Schedule = Annotated[ConstantSchedule | LinearSchedule | CosineSchedule | IntervalSchedule, Field(discriminator="kind")]


class Timings(BaseModel):
    queue_wait_s: float = Field(description="time before the request's first forward")
    compute_s: float = Field(description="time from the first forward to the last")
    total_s: float = Field(description="time from arrival to response")


class GenerateResponse(BaseModel):
    model: str
    class_label: int | None
    class_name: str | None
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    images: list[str] = Field(description="base64-encoded PNGs")
    seeds: list[int] = Field(description="per-image seeds: seed=seeds[i], num_images=1 redraws image i")
    timings: Timings


def build_generate_request(limits: Limits) -> type[BaseModel]:
    names = limits.class_names
    lookup = {n.lower(): i for i, n in enumerate(names)}
    class_doc = (
        f"Class to draw: an index 0..{len(names) - 1} or a name ({', '.join(names)}; case-insensitive). "
        "null or missing draws unconditionally."
    )

    class GenerateRequest(BaseModel):
        """One generation request. eps = eps_uncond + s * (eps_cond - eps_uncond) at every step."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        class_label: int | str | None = Field(None, description=class_doc, examples=[7, "Sneaker"])
        num_images: int = Field(1, ge=1, le=limits.max_images, description="images to draw")
        steps: int = Field(limits.default_steps, ge=1, le=limits.max_steps, description="sampling steps")
        sampler: Sampler = Field(
            DEFAULT_SAMPLER,
            description="dpmpp_2m (DPM-Solver++ 2M; the default: the shipped model's best FID, see "
            "docs/quality.md), ddpm (ancestral), ddim or euler_a (Euler ancestral)",
        )
        guidance_scale: float = Field(
            3.0,
            ge=0,
            le=limits.max_guidance_scale,
            description="s: 0 unconditional, 1 conditional only, >1 guided (Ho & Salimans' w = s - 1)",
        )
        noise_level: float = Field(
            0.0,
            ge=0,
            le=limits.max_noise_level,
            description="std of Gaussian noise added to the conditional prediction before the combine",
        )
        schedule: Schedule = Field(
            default_factory=ConstantSchedule,
            description="how the scale varies over the steps: constant, linear, cosine or interval",
        )
        guidance_rescale: float = Field(
            0.0, ge=0, le=1, description="phi of Lin et al. 2023: 0 off, 1 full std rescale to eps_cond"
        )
        seed: int | None = Field(None, ge=0, lt=2**31, description="image i uses seed + i; random when omitted")

        @field_validator("class_label", mode="before")
        @classmethod
        def _not_a_bool(cls, v: Any) -> Any:
            if isinstance(v, bool):
                raise ValueError(f"class_label must be an index 0..{len(names) - 1} or a class name, not a boolean")
            return v

        @field_validator("class_label")
        @classmethod
        def _known_class(cls, v: int | str | None) -> int | None:
            if v is None:
                return None
            if isinstance(v, int):
                if not 0 <= v < len(names):
                    raise ValueError(f"class index must be in 0..{len(names) - 1}")
                return v
            if v.strip().lower() in lookup:
                return lookup[v.strip().lower()]
            if v.strip().isdigit():
                return cls._known_class(int(v.strip()))
            raise ValueError(f"unknown class {v!r}; known classes: {', '.join(names)}")

    return GenerateRequest
