"""Named guidance settings for the guidance-methods table, and their JSON form.

A setting is a name, the samplers it is drawn with, and a GuidanceParams. The JSON form is what
`python -m research.evaluation.methods --extra` takes: the GuidanceParams fields at the top level, the nested
ones as objects, and every field optional but the name; a missing field takes the dataclass's default.

  {"name": "apg s=5 r=1", "guidance_scale": 5, "method": {"kind": "apg", "norm_threshold": 1.0}}
  {"name": "interval s=4", "guidance_scale": 4, "schedule": {"kind": "interval", "sigma_max": 5.0},
   "samplers": ["dpmpp_2m", "ddim"]}

samplers defaults to every sampler the table draws (--samplers); "cads" takes true (the defaults),
an object of Cads fields, or null; an interval schedule's start defaults to 0 (guided from the first
step, as in research.generate). "cache" takes the request's step cache, {"kind": "none"} (the default),
{"kind": "deepcache", "interval": 3, "branch": 0, "start": 0, "end": 1} for a UNet, or {"kind": "first_block",
"threshold": 0.1} for a DiT, or {"kind": "uncond", "every": 3, "order": 1} for any model (app/sampling/cache.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.guidance import (
    INTERVAL_WEIGHTINGS,
    NOISE_SCHEDULE_KINDS,
    SCHEDULE_KINDS,
    Cads,
    GuidanceMethod,
    GuidanceSchedule,
    MethodParams,
    guider_class,
    method_kinds,
)
from app.sampling import DEFAULT_SAMPLER, SAMPLERS, GuidanceParams
from app.sampling.cache import CACHE_PARAMS, CacheParams, cache_kind

REFERENCE_NAME = "cfg s=1"  # the row every other row of its sampler is divided by
SETTING_KEYS = ("name", "samplers", "cache")

# Allowed ranges (low, high; None: open) of the numeric fields, by (dataclass, field).
_RANGES: dict[tuple[type, str], tuple[float | None, float | None]] = {
    (GuidanceParams, "guidance_scale"): (0.0, None),
    (GuidanceParams, "noise_level"): (0.0, None),
    (GuidanceParams, "guidance_rescale"): (0.0, 1.0),
    (GuidanceSchedule, "sigma_min"): (0.0, None),
    (GuidanceSchedule, "sigma_max"): (0.0, None),
}
_CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (GuidanceParams, "noise_schedule"): NOISE_SCHEDULE_KINDS,
    (GuidanceSchedule, "kind"): SCHEDULE_KINDS,
    (GuidanceSchedule, "weighting"): INTERVAL_WEIGHTINGS,
}
# The nested dataclasses; "method" is nested too, as its kind's settings model (_method).
_NESTED: dict[str, type] = {"schedule": GuidanceSchedule}
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)


class SettingError(ValueError):
    """A guidance setting given as JSON that cannot be built; the message names the field."""


@dataclass(frozen=True)
class GuidanceSetting:
    name: str
    guidance: GuidanceParams
    samplers: tuple[str, ...] = ()  # empty: every sampler the table draws
    cache: CacheParams | None = None  # the step cache its images are drawn with


def default_settings() -> list[GuidanceSetting]:
    """The table of issue 13, item 6. Fields the issue leaves open (APG's eta, momentum and norm
    threshold, CADS's taus) take the dataclasses' defaults at call time."""
    # The service's default sampler too, so that a table drawn with it (--samplers) has the reference rows.
    both = tuple(dict.fromkeys((DEFAULT_SAMPLER, "dpmpp_2m", "ddim")))

    def setting(name: str, scale: float, samplers: tuple[str, ...] = ("dpmpp_2m",), **kw: Any) -> GuidanceSetting:
        return GuidanceSetting(name, GuidanceParams(guidance_scale=scale, **kw), samplers)

    apg, zero_star = GuidanceMethod(kind="apg"), GuidanceMethod(kind="cfg_zero_star")
    annealed = GuidanceSchedule(kind="cosine", start=1.0, end=0.0)
    increasing = GuidanceSchedule(kind="linear", start=0.0, end=1.0)
    interval = GuidanceSchedule(kind="interval", start=0.0, end=1.0, sigma_min=0.3, sigma_max=5.0)
    return [
        setting(REFERENCE_NAME, 1.0, both),
        setting("cfg s=2", 2.0),
        setting("cfg s=3", 3.0, both),
        setting("cfg s=5", 5.0, both),
        setting("apg s=3", 3.0, both, method=apg),
        setting("apg s=5", 5.0, both, method=apg),
        setting("apg s=7.5", 7.5, method=apg),
        setting("cfg-zero* s=3", 3.0, method=zero_star),
        setting("cfg-zero* s=5", 5.0, method=zero_star),
        setting("cosine 1->0 s=3", 3.0, schedule=annealed),
        setting("cosine 1->0 s=5", 5.0, schedule=annealed),
        setting("linear 0->1 s=3", 3.0, schedule=increasing),
        setting("linear 0->1 s=5", 5.0, schedule=increasing),
        setting("interval sigma 0.3-5 s=3", 3.0, schedule=interval),
        setting("interval sigma 0.3-5 s=5", 5.0, schedule=interval),
        setting("noise 0.1 s=3", 3.0, noise_level=0.1),
        setting("noise 0.3 s=3", 3.0, noise_level=0.3),
        setting("noise 0.3 sigma s=3", 3.0, noise_level=0.3, noise_schedule="sigma"),
        setting("cads s=3", 3.0, cads=Cads()),
        setting("cads s=5", 5.0, cads=Cads()),
        setting("rescale 0.7 s=3", 3.0, guidance_rescale=0.7),
        setting("rescale 0.7 s=5", 5.0, guidance_rescale=0.7),
    ]


# ---- JSON -> GuidanceSetting ---------------------------------------------------------------------------


def parse_setting(text: str) -> GuidanceSetting:
    """A GuidanceSetting from its JSON form (see the module docstring); SettingError names what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text}") from None
    return setting_from_dict(data)


def setting_from_dict(data: object) -> GuidanceSetting:
    if not isinstance(data, dict):
        raise SettingError(f"expected a JSON object with at least a name, got {json.dumps(data)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SettingError('"name" is required: a non-empty string, e.g. "apg s=5 r=1"')
    name = name.strip()
    if any(c in name for c in ",|`\n"):
        raise SettingError(f"{name!r}: a name cannot contain a comma, '|', '`' or a newline")
    where = f"setting {name!r}"
    guidance = _build(GuidanceParams, {k: v for k, v in data.items() if k not in SETTING_KEYS}, where)
    samplers = _samplers(data["samplers"], where) if "samplers" in data else ()
    return GuidanceSetting(name, guidance, samplers, _cache(data.get("cache"), f"{where}: cache"))


def _cache(value: object, where: str) -> CacheParams | None:
    """A step cache from its JSON form: null or {"kind": "none"}, or {"kind": one of CACHE_PARAMS, ...its
    fields}."""
    if value is None:
        return None
    kinds = CACHE_PARAMS
    if not isinstance(value, dict) or value.get("kind") not in ("none", *kinds):
        expected = ", ".join(f'{{"kind": "{k}", ...}}' for k in kinds)
        raise SettingError(f'{where}: expected {{"kind": "none"}} or {expected}, got {json.dumps(value)}')
    if value["kind"] == "none":
        if len(value) > 1:
            raise SettingError(f"{where}: kind none takes no other field, got {json.dumps(value)}")
        return None
    params = kinds[value["kind"]]
    fields_ = {k: v for k, v in value.items() if k != "kind"}
    known = [f.name for f in fields(params)]
    for key, v in fields_.items():
        if key not in known:
            raise SettingError(f"{where}: unknown field {key!r}; expected one of kind, {', '.join(known)}")
        integer = key in ("interval", "branch")
        if v is None and key.startswith("full_sigma"):
            continue
        if isinstance(v, bool) or not isinstance(v, int if integer else int | float):
            raise SettingError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    try:
        return params(**fields_)
    except ValueError as exc:
        raise SettingError(f"{where}: {exc}") from None


def _samplers(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SettingError(f"{where}: samplers must be a non-empty list of sampler names, got {json.dumps(value)}")
    unknown = [v for v in value if v not in SAMPLERS]
    if unknown:
        raise SettingError(f"{where}: unknown sampler(s) {unknown}; choose from {', '.join(sorted(SAMPLERS))}")
    return tuple(dict.fromkeys(value))


def _build(cls: type, values: object, where: str) -> Any:
    """cls(**values) after checking every key, type, choice and range; missing fields take their defaults."""
    if not isinstance(values, dict):
        raise SettingError(f"{where}: expected an object of {cls.__name__} fields, got {json.dumps(values)}")
    known = [f.name for f in fields(cls)]
    extra_keys = list(SETTING_KEYS) if cls is GuidanceParams else []
    for key in values:
        if key not in known:
            raise SettingError(f"{where}: unknown field {key!r}; expected one of {', '.join(extra_keys + known)}")
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    kwargs = {key: _value(cls, key, value, defaults.get(key), f"{where}: {key}") for key, value in values.items()}
    if cls is GuidanceSchedule and kwargs.get("kind") == "interval" and "start" not in kwargs:
        kwargs["start"] = 0.0
    built = cls(**kwargs)
    _check_consistent(built, where)
    return built


def _method(values: object, where: str) -> MethodParams:
    """A method's settings model from its JSON form: kind (default cfg) and the fields of its kind, validated
    with the ranges its model declares (the API's)."""
    if not isinstance(values, dict):
        raise SettingError(
            f"{where}: expected an object of GuidanceMethod fields (a kind and its fields), got {json.dumps(values)}"
        )
    kind = values.get("kind", "cfg")  # as GuidanceMethod() and the API's default method kind
    kinds = method_kinds()
    if kind not in kinds:
        raise SettingError(f"{where}: kind must be one of {', '.join(kinds)}, got {json.dumps(kind)}")
    return _validated(guider_class(kind).params_model, values, where)


def _validated(model: type[BaseModelT], values: object, where: str) -> BaseModelT:
    """A pydantic settings model (a method's, CADS's) from its JSON form, with the ranges it declares (the
    API's) and no coercion ("5" is not 5)."""
    if not isinstance(values, dict):
        raise SettingError(f"{where}: expected an object of {model.__name__} fields, got {json.dumps(values)}")
    known = list(model.model_fields)
    for key in values:
        if key not in known:
            raise SettingError(f"{where}: unknown field {key!r}; expected one of {', '.join(known)}")
    try:
        return model.model_validate(values, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(map(str, error["loc"])) or "value"
        raise SettingError(f"{where}: {field}: {error['msg']}, got {json.dumps(error['input'])}") from None


def _value(cls: type, key: str, value: object, default: object, where: str) -> object:
    if cls is GuidanceParams and key == "method":
        return _method(value, where)
    if cls is GuidanceParams and key in (*_NESTED, "cads"):
        if key == "cads" and value in (None, False):
            return None
        if key == "cads" and value is True:
            return Cads()
        if key == "cads":
            return _validated(Cads, value, where)
        return _build(_NESTED[key], value, where)
    choices = _CHOICES.get((cls, key))
    if choices is not None:
        if value not in choices:
            raise SettingError(f"{where} must be one of {', '.join(choices)}, got {json.dumps(value)}")
        return value
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingError(f"{where} must be a finite number, got {json.dumps(value)}")
    low, high = _RANGES.get((cls, key), (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
        raise SettingError(f"{where} must be {bounds}, got {value:g}")
    return float(value)


def _check_consistent(built: object, where: str) -> None:
    if isinstance(built, GuidanceSchedule):
        lo, hi = built.sigma_min, built.sigma_max
        if lo is not None and hi is not None and lo >= hi:
            raise SettingError(f"{where}: sigma_min ({lo:g}) must be below sigma_max ({hi:g})")
        if built.kind == "interval" and not 0 <= built.start < built.end <= 1:
            raise SettingError(f"{where}: an interval needs 0 <= start < end <= 1, got {built.start:g}, {built.end:g}")


# ---- GuidanceSetting -> JSON ---------------------------------------------------------------------------


def setting_to_dict(setting: GuidanceSetting) -> dict[str, Any]:
    """The JSON form of a setting, with only the fields that differ from GuidanceParams()'s (a nested
    object whole where it differs): what --extra takes to draw it again."""
    out: dict[str, Any] = {"name": setting.name}
    default = GuidanceParams()
    for f in fields(GuidanceParams):
        value = getattr(setting.guidance, f.name)
        if value != getattr(default, f.name) or f.name == "guidance_scale":
            if isinstance(value, BaseModel):  # a method's settings, CADS's
                value = value.model_dump()
            out[f.name] = asdict(value) if f.name in _NESTED and value is not None else value
    if setting.samplers:
        out["samplers"] = list(setting.samplers)
    if setting.cache is not None:
        out["cache"] = {"kind": cache_kind(setting.cache), **asdict(setting.cache)}
    return out


# ---- which rows a table draws --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the table: a setting drawn with one sampler."""

    setting: GuidanceSetting
    sampler: str

    @property
    def label(self) -> str:
        return f"{self.setting.name} ({self.sampler})"


def choose_settings(only: Sequence[str] | None, extras: Sequence[GuidanceSetting] = ()) -> list[GuidanceSetting]:
    """The default settings named in only (all where None), in the default order, then the extras."""
    defaults = default_settings()
    known = [s.name for s in defaults]
    if only is not None:
        unknown = [name for name in only if name not in known]
        if unknown:
            raise SettingError(f"unknown setting(s) {unknown}; the defaults are: {', '.join(known)}")
        defaults = [s for s in defaults if s.name in only]
    names = [s.name for s in extras]
    taken = sorted({n for n in names if n in known or names.count(n) > 1})
    if taken:
        raise SettingError(f"extra setting name(s) {taken} already taken; give each extra setting a name of its own")
    return [*defaults, *extras]


def table_rows(settings: Sequence[GuidanceSetting], samplers: Sequence[str]) -> list[Row]:
    """A row per setting and sampler (of samplers, where the setting lists it or lists none), grouped by
    sampler in the order of samplers. Each sampler with a row gets the CFG s=1 reference row first, chosen or not."""
    reference = next(s for s in default_settings() if s.name == REFERENCE_NAME)
    rows = []
    for sampler in samplers:
        group = [s for s in settings if sampler in s.samplers or not s.samplers]
        if group and not any(s.name == REFERENCE_NAME for s in group):
            group.insert(0, reference)
        rows += [Row(s, sampler) for s in group]
    return rows
