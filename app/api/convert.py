"""A validated request body as the engine's SampleSpec, and the guidance settings as a response echoes them."""

import secrets
from dataclasses import asdict
from typing import Any

from app.api.schemas import request_fields
from app.guidance import GuidanceSchedule
from app.sampling import GuidanceParams, SampleSpec
from app.sampling.cache import CACHE_PARAMS, CacheParams, cache_kind


def to_spec(body: Any) -> SampleSpec:
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - body.num_images)
    return SampleSpec(
        class_label=body.class_label,
        seeds=tuple(seed + i for i in range(body.num_images)),
        steps=body.steps,
        sampler=body.sampler,
        guidance=GuidanceParams(
            guidance_scale=body.guidance_scale,
            schedule=GuidanceSchedule(**body.schedule.model_dump()),
            noise_level=body.noise_level,
            noise_schedule=body.noise_schedule,
            guidance_rescale=body.guidance_rescale,
            method=body.method,  # the method's own settings model, as the guider takes it
            cads=body.cads,
        ),
        return_trace=body.return_trace,
        preview_every=(body.preview_every or max(1, body.steps // 10)) if body.preview else None,
        cache=cache_params(body.cache),
    )


def cache_params(cache: Any) -> CacheParams | None:
    """The engine's step cache of the body's `cache`."""
    params = None if cache is None else CACHE_PARAMS.get(cache.kind)
    return None if params is None else params(**cache.model_dump(exclude={"kind"}))


def cache_body(cache: CacheParams | None) -> dict[str, Any]:
    """The step cache a response echoes, as a request would send it."""
    return {"kind": "none"} if cache is None else {"kind": cache_kind(cache), **asdict(cache)}


def guidance_body(guidance: GuidanceParams) -> dict[str, Any]:
    """The guidance settings a response echoes, method and schedule as a request would send them."""
    return {
        "method": request_fields(guidance.method),
        "schedule": request_fields(guidance.schedule),
        "noise_level": guidance.noise_level,
        "noise_schedule": guidance.noise_schedule,
        "guidance_rescale": guidance.guidance_rescale,
        "cads": None if guidance.cads is None else guidance.cads.model_dump(),
    }
