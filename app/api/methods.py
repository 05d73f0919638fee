"""Whether the served model can run a request's guidance method and step cache: the attention methods (pag, seg,
slg) need self-attention layers or transformer blocks that some models lack, and layer indices that the model has;
deepcache needs a UNet it can split, at a branch it has; first_block a DiT.

Read from the model's GET /v1/models entry (`attention_guidance`, written at load from
app.models.attention.perturbation_support, and `cache`), so this module knows nothing of torch. A body that passes its
schema and fails here gets a 422 in the schema's own error shape, naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from app.api.options import Cache
from app.api.service import Service
from app.guidance import MethodParams


def method_error(info: dict[str, Any], method: MethodParams) -> dict[str, Any] | None:
    """A validation error (FastAPI's shape: loc, msg, type, input) where the model of `info` cannot run `method`
    as asked; None where it can, or where the method needs nothing of the model."""
    support = info.get("attention_guidance", {}).get(method.kind)
    if support is None:
        return None
    model = info["id"]
    if not support["supported"]:
        runs = ", ".join(info["guidance_methods"])
        msg = f"method {method.kind} can't run on model {model}: {support['reason']}. {model} runs {runs}"
        return {"loc": ["body", "method", "kind"], "msg": msg, "type": "value_error", "input": method.kind}
    layers: tuple[int, ...] | None = getattr(method, "layers", None)
    names = support["layers"]
    bad = [i for i in layers or () if i >= len(names)]
    if bad:
        allowed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        msg = f"{method.kind} layers {bad} are not layers of model {model}, which has 0..{len(names) - 1} ({allowed})"
        return {"loc": ["body", "method", "layers"], "msg": msg, "type": "value_error", "input": list(layers or ())}
    return None


def cache_error(info: dict[str, Any], cache: Any) -> dict[str, Any] | None:
    """A validation error where the model of `info` cannot run the request's step cache (`cache`, the body's)."""
    if cache.kind == "none":
        return None
    model = info["id"]
    entry = info["cache"].get(cache.kind)
    if entry is None or entry["reason"] is not None:
        why = "it is not a kind this service has" if entry is None else entry["reason"]
        runs = ", ".join(info["cache"]["kinds"])
        msg = f"cache kind {cache.kind} can't run on model {model}: {why}. {model} runs {runs}"
        return {"loc": ["body", "cache", "kind"], "msg": msg, "type": "value_error", "input": cache.kind}
    if cache.kind == "deepcache" and cache.branch > entry["max_branch"]:
        msg = f"cache.branch must be 0..{entry['max_branch']} for model {model} (got {cache.branch})"
        return {"loc": ["body", "cache", "branch"], "msg": msg, "type": "value_error", "input": cache.branch}
    return None


CACHE_FIELD: TypeAdapter[Any] = TypeAdapter(Cache)


def with_default_cache(service: Service, body: Any) -> Any:
    """The body with its served model's default step cache (GET /v1/models: cache.default, from the checkpoint's
    manifest) where it names none; as it is while the model is not loaded (the request is refused as starting)."""
    served = service.models.get(body.model)
    if body.cache is not None or served is None:
        return body
    return body.model_copy(update={"cache": CACHE_FIELD.validate_python(served.info["cache"]["default"])})


def served_method_error(service: Service, body: Any) -> dict[str, Any] | None:
    """method_error, then cache_error, for the body's served model; None while it is not loaded (the request is
    refused as starting)."""
    served = service.models.get(body.model)
    if served is None:
        return None
    return method_error(served.info, body.method) or cache_error(served.info, body.cache)
