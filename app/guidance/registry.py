"""Every guidance method, by the kind a request names it with: the one place that maps a kind to its settings
model and its Guider. The API's `method` union, its 422s, GET /v1/models' list, the engine's guider and the
research tools' flags are all read from here, so a method is its module, one entry in GUIDERS, and its tests
(docs/guidance-methods.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from app.guidance.apg import Apg
from app.guidance.attention import Pag, Seg, Slg
from app.guidance.autoguidance import Autoguidance
from app.guidance.cfg import Cfg
from app.guidance.cfg_zero_star import CfgZeroStar
from app.guidance.guider import Guider, MethodParams

# kind -> Guider (its params_model is the method's settings). The order is the API's and /v1/models'.
GUIDERS: dict[str, type[Guider]] = {g.kind: g for g in (Cfg, Apg, CfgZeroStar, Pag, Seg, Slg, Autoguidance)}


def register_guider(guider: type[Guider]) -> None:
    """Serve `guider` under its kind from now on (an app built after this takes it in its request schema)."""
    if guider.kind in GUIDERS:
        raise ValueError(f"guidance method {guider.kind!r} is already registered")
    GUIDERS[guider.kind] = guider


def unregister_guider(kind: str) -> None:
    """Stop serving the method `kind` (apps built before keep their request schema)."""
    del GUIDERS[kind]


def method_kinds() -> tuple[str, ...]:
    return tuple(GUIDERS)


def method_models() -> tuple[type[MethodParams], ...]:
    """Each registered method's settings model, in GUIDERS' order."""
    return tuple(g.params_model for g in GUIDERS.values())


def guider_class(kind: str) -> type[Guider]:
    try:
        return GUIDERS[kind]
    except KeyError:
        raise ValueError(f"unknown guidance method {kind!r}; choose one of {', '.join(GUIDERS)}") from None


def GuidanceMethod(kind: str = "cfg", **fields: Any) -> MethodParams:  # noqa: N802 (reads as the settings' type)
    """The settings of guidance method `kind`: its params model, validated (pydantic's ValidationError names
    a field out of its range or foreign to the method; ValueError an unknown kind)."""
    return guider_class(kind).params_model(kind=kind, **fields)


def make_guider(method: MethodParams, scales: Sequence[float]) -> Guider:
    """A new guider for one request: its method's class, with the request's per-step scales."""
    return guider_class(method.kind)(method, scales)


def method_fields() -> dict[str, list[dict[str, Any]]]:
    """Each method's settings as a form builds its inputs (GET /v1/models, the playground): per kind, its fields
    in declaration order, each with name, type (JSON Schema's: number, integer, boolean, string, array),
    default, and where its model declares them minimum, maximum, enum, items (an array's item type),
    nullable and description. `kind` itself is left out."""
    return {kind: form_fields(guider.params_model) for kind, guider in GUIDERS.items()}


def form_fields(settings: type[BaseModel]) -> list[dict[str, Any]]:
    """A settings model's fields as a form builds its inputs (method_fields; the step caches' in GET /v1/models):
    in declaration order, `kind` left out."""
    properties = settings.model_json_schema()["properties"].items()
    return [_field(name, prop) for name, prop in properties if name != "kind"]


def _field(name: str, prop: dict[str, Any]) -> dict[str, Any]:
    variants = prop.get("anyOf", [prop])
    concrete = [v for v in variants if v.get("type") != "null"]
    kind = concrete[0] if len(concrete) == 1 else {}
    field: dict[str, Any] = {"name": name, "type": kind.get("type", "string"), "default": prop.get("default")}
    for key in ("minimum", "maximum", "enum"):
        if key in kind:
            field[key] = kind[key]
    if "exclusiveMinimum" in kind:
        field["minimum"] = kind["exclusiveMinimum"]
    if "exclusiveMaximum" in kind:
        field["maximum"] = kind["exclusiveMaximum"]
    if "items" in kind:
        field["items"] = kind["items"].get("type", "string")
    if len(concrete) < len(variants):
        field["nullable"] = True
    if "description" in prop:
        field["description"] = prop["description"]
    return field
