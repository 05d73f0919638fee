"""Request and response schemas. The request model is built per app, so the OpenAPI schema and the
422 errors show the configured limits and the loaded model's class names."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Protocol, Union, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.api.options import (
    SCHEDULE_MODELS,
    Cache,
    DeepCache,
    FirstBlockCache,
    NoCache,
    Schedule,
    SkipCache,
    UncondCache,
)
from app.guidance import Cads, GuidanceSchedule, MethodParams, method_models
from app.models.labels import resolve_label
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER

SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler_a")
Priority = Literal["interactive", "batch"]  # app/engine/policy.py's PRIORITIES
Sampler = Literal["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler_a"]


@dataclass(frozen=True)
class Limits:
    models: tuple[tuple[str, tuple[str, ...]], ...]  # (name, class names) per served model; the first: default
    max_images: int
    max_steps: int
    default_steps: int
    max_guidance_scale: float
    max_noise_level: float
    # Per served model, every other served model and why it cannot guide this one (None: it can guide it):
    # app.models.guide_pairs, for autoguidance's method.guide.
    guides: tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...] = ()
    max_timeout_s: float = 300.0  # CFG_REQUEST_TIMEOUT_S: the most a request's timeout_s may ask

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.models)

    def class_names(self, model: str | None = None) -> tuple[str, ...]:
        """The class names of a served model (the default model's without one)."""
        return dict(self.models)[model or self.models[0][0]]

    def guides_of(self, model: str) -> tuple[str, ...]:
        """The served models that can guide `model` (autoguidance)."""
        return tuple(name for name, why_not in dict(self.guides).get(model, ()) if why_not is None)

    def guide_refusal(self, model: str, guide: str) -> str | None:
        """Why `guide` cannot guide `model` (a 422's message, naming the models that can), or None."""
        others = dict(dict(self.guides).get(model, ()))
        if guide in others and others[guide] is None:
            return None
        allowed = self.guides_of(model)
        can = f"the models that can: {', '.join(allowed)}" if allowed else "no served model can guide it"
        if guide in others:
            return f"{guide} cannot guide {model}: {others[guide]}; {can}"
        if guide == model:
            return f"a model cannot guide itself; {can}"
        return f"{guide!r} is not a served model; {can}"


def method_union(models: tuple[type[MethodParams], ...]) -> Any:
    """The request's `method`: one of the registered methods' settings models, chosen by its kind."""
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007 (a Union of a runtime tuple)


def request_fields(value: GuidanceSchedule | MethodParams) -> dict[str, Any]:
    """The fields of an engine schedule or method that its kind's request schema has (None left out): what a
    request would send for it. Every response echoes two of them: kept per (frozen, hashable) value."""
    return dict(_request_fields(value))


@functools.lru_cache(maxsize=256)
def _request_fields(value: GuidanceSchedule | MethodParams) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, MethodParams):  # the method's settings are its request schema
        return tuple(value.model_dump(exclude_none=True).items())
    schema_fields = SCHEDULE_MODELS[value.kind].model_fields
    return tuple((k, v) for k, v in asdict(value).items() if k in schema_fields and v is not None)


def _schedule_default(value: GuidanceSchedule) -> Schedule:
    """The request schema's default built from the engine's dataclass default (one source: DEFAULT_GUIDANCE),
    validated once and copied for each request that leaves it out."""
    return cast(Schedule, _validated_default(value).model_copy())


@functools.lru_cache(maxsize=8)
def _validated_default(value: GuidanceSchedule) -> BaseModel:
    return SCHEDULE_MODELS[value.kind].model_validate(request_fields(value))


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
    guidance: dict[str, Any] = Field(description="the guidance settings used: method, schedule, noise, rescale, cads")
    cache: dict[str, Any] = Field(description="the step cache used (kind none: none)")
    trace: list[dict[str, Any]] | None = Field(
        None, description="with return_trace: per step the scale used and |eps_c - eps_u| per image (APG: its parts)"
    )
    images: list[str] = Field(description="base64-encoded PNGs")
    seeds: list[int] = Field(description="per-image seeds: seed=seeds[i], num_images=1 redraws image i")
    timings: Timings


class GenerateBody(Protocol):
    """What the routes read of build_generate_request's model, for the type checker: that model is built per
    Limits at runtime (its `model` a Literal of the served names), which no static annotation can name."""

    model: str
    priority: Priority | None
    method: MethodParams
    cache: NoCache | DeepCache | FirstBlockCache | UncondCache | SkipCache | None
    timeout_s: float | None

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


def field_error(loc: tuple[str, ...], kind: str, message: str, value: Any) -> ValidationError:
    """A validation error at `loc` (a model validator's own is at the body's top): the 422 names the field."""
    error = PydanticCustomError(kind, "{reason}", {"reason": message})
    return ValidationError.from_exception_data("GenerateRequest", [InitErrorDetails(type=error, loc=loc, input=value)])


def build_generate_request(limits: Limits) -> type[BaseModel]:
    """The request model of POST /generate (and the routes that take its body) for these limits and the
    guidance methods registered now (app.guidance.GUIDERS)."""
    return _generate_request(limits, method_models())


@functools.cache  # one model per Limits and methods: every route that takes this body shares it (and its schema)
def _generate_request(limits: Limits, methods: tuple[type[MethodParams], ...]) -> type[BaseModel]:
    Method = method_union(methods)  # noqa: N806 (a type)
    kinds = [m.model_fields["kind"].default for m in methods]
    kind_list = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
    models = limits.model_names
    names = limits.class_names()
    class_doc = (
        "Class to draw: an index or a name of the model's classes (case-insensitive; each comma-separated "
        f"synonym names its class). {models[0]}: 0..{len(names) - 1} or {', '.join(names[:10])}"
        f"{', ...' if len(names) > 10 else ''}. null or missing draws unconditionally."
    )

    class GenerateRequest(BaseModel):
        """One generation request. eps = eps_uncond + s * (eps_cond - eps_uncond) at every step."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

        # First, so that class_label is read against this model's classes.
        model: Literal[models] = Field(  # type: ignore[valid-type]
            models[0], description=f"the served model to draw from: {', '.join(models)} (GET /v1/models)"
        )
        class_label: int | str | None = Field(None, description=class_doc, examples=[7, "Sneaker"])
        num_images: int = Field(1, ge=1, le=limits.max_images, description="images to draw")
        steps: int = Field(limits.default_steps, ge=1, le=limits.max_steps, description="sampling steps")
        sampler: Sampler = Field(
            DEFAULT_SAMPLER,
            description=f"default {DEFAULT_SAMPLER} (docs/steps.md). dpmpp_2m: DPM-Solver++ 2M; dpmpp_2m_karras: the "
            "same on Karras sigmas, denser at low noise (5 steps or more: with 2 or 3 it leaves noise in the image); "
            "ddpm: ancestral; ddim; euler_a: Euler ancestral",
        )
        guidance_scale: float = Field(
            DEFAULT_GUIDANCE.guidance_scale,
            ge=0,
            le=limits.max_guidance_scale,
            description="s: 0 unconditional, 1 conditional only, >1 guided (Ho & Salimans' w = s - 1)",
        )
        noise_level: float = Field(
            DEFAULT_GUIDANCE.noise_level,
            ge=0,
            le=limits.max_noise_level,
            description="std of Gaussian noise added to the conditional prediction before the combine",
        )
        noise_schedule: Literal["constant", "sigma", "guidance"] = Field(
            DEFAULT_GUIDANCE.noise_schedule,
            description="how noise_level varies over the steps: constant (every step), sigma (with the "
            "sampler's noise level, to ~0 at the end) or guidance (with the guidance schedule, s_i / s)",
        )
        schedule: Schedule = Field(
            default_factory=lambda: _schedule_default(DEFAULT_GUIDANCE.schedule),
            description="how the scale varies over the steps: constant, linear, cosine or interval",
        )
        method: Method = Field(  # type: ignore[valid-type]
            # Frozen: the one default instance serves every request that leaves method out.
            default_factory=lambda: DEFAULT_GUIDANCE.method,
            description=f"how eps_c and eps_u combine: {kind_list} (each kind's fields: its schema)",
        )
        cads: Cads | None = Field(
            DEFAULT_GUIDANCE.cads,
            description="condition-annealed sampling: noise on the class embedding early in sampling; null: off",
        )
        cache: Cache | None = Field(
            None,
            description="reuse work between steps for speed: none, deepcache (UNets), first_block (DiTs), "
            "uncond (any model: CFG's unconditional rows on fewer steps) or skip (any model: no row at all on "
            "some of the first steps, each image's denoised estimate reused); GET /v1/models lists "
            "each model's kinds and its default (cache.default, chosen by measuring that checkpoint), which a "
            "request without the field (or null) takes. It changes the images a little for a cut in compute "
            "(docs/caching.md)",
        )
        guidance_rescale: float = Field(
            DEFAULT_GUIDANCE.guidance_rescale,
            ge=0,
            le=1,
            description="phi of Lin et al. 2023: 0 off, 1 full std rescale to eps_cond",
        )
        return_trace: bool = Field(
            False, description="return per step the scale used and |eps_c - eps_u| per image (APG: its parts)"
        )
        seed: int | None = Field(None, ge=0, lt=2**31, description="image i uses seed + i; random when omitted")
        priority: Priority | None = Field(
            None,
            description="interactive: admitted before batch work, which leaves the batch for it at a step boundary "
            "and resumes later with the same images; batch: waits for interactive work. Default: interactive for "
            "/generate and /v1/images/generations, batch for /v1/jobs (docs/engine.md)",
        )
        timeout_s: float | None = Field(
            None,
            gt=0,
            le=limits.max_timeout_s,
            description=f"seconds the request may take, up to CFG_REQUEST_TIMEOUT_S ({limits.max_timeout_s:g}, the "
            "default); where the engine's measured pace says the work ahead of it in its class leaves no time to "
            "finish, it is refused at once with 503 and Retry-After instead of waiting (docs/engine.md). /generate "
            "and /v1/images/generations only: a job runs until it is done or cancelled",
        )
        preview: bool = Field(
            False, description="progress events carry the current x0 prediction as PNGs every preview_every steps"
        )
        preview_every: int | None = Field(
            None, ge=1, le=limits.max_steps, description="steps between previews (with preview); default steps // 10"
        )

        @model_validator(mode="after")
        def _served_guide(self) -> GenerateRequest:
            # A method's `guide` names the served model that guides this one (autoguidance).
            method: MethodParams = self.method
            guide = getattr(method, "guide", None)
            if guide is None:
                return self
            if (refusal := limits.guide_refusal(self.model, guide)) is not None:
                raise field_error(("method", "guide"), "guide_not_served", refusal, guide)
            if self.cads is not None:  # its noise is on the main model's class embedding, which the guide lacks
                message = f"cads does not combine with method {method.kind}: the guide has its own class embedding"
                raise field_error(("cads",), "cads_with_guide", message, self.cads.model_dump())
            return self

        @model_validator(mode="after")
        def _preview_every_needs_preview(self) -> GenerateRequest:
            if self.preview_every is not None and not self.preview:
                raise ValueError("preview_every needs preview: true")
            return self

        @field_validator("class_label", mode="before")
        @classmethod
        def _not_a_bool(cls, v: Any) -> Any:
            if isinstance(v, bool):
                raise ValueError("class_label must be a class index or a class name, not a boolean")
            return v

        @field_validator("class_label")
        @classmethod
        def _known_class(cls, v: int | str | None, info: ValidationInfo) -> int | str | None:
            if v is None or "model" not in info.data:  # no class, or an unknown model (its own error)
                return v
            return resolve_label(v, limits.class_names(info.data["model"]))

    return GenerateRequest
