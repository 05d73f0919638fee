"""OpenAI's POST /v1/images/generations, run through the same engine path as /generate.

The prompt names a class, `n` is num_images, and the guidance settings come as extra body fields, validated
by /generate's own request model. Errors use OpenAI's shape, so its clients raise their own exception
classes (400 BadRequestError, 404 NotFoundError, 5xx InternalServerError) with a readable message."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable
from typing import Any, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.api.clients import API_KEY_HEADER, CLIENT_ID_HEADER, bearer_key, client_of
from app.api.convert import to_spec
from app.api.errors import ApiError, openai_error
from app.api.media import JSON, json_body, produces
from app.api.methods import served_method_error, with_default_cache
from app.api.responses import ImagesResponse, OpenAIError, refusals
from app.api.schemas import GenerateBody, Limits, build_generate_request
from app.api.service import Service, ServiceDep
from app.api.waiting import await_result, refusal, submit
from app.images import to_png_bytes

# /generate's fields taken as they are. Listed, not derived: a new /generate field (a trace, previews)
# may have no place in OpenAI's response, and is refused here until someone decides it has.
GUIDANCE_FIELDS = (
    "guidance_scale", "noise_level", "noise_schedule", "schedule", "method", "cads", "guidance_rescale",
    "steps", "sampler", "seed", "timeout_s",
)  # fmt: skip
# /generate's fields that this endpoint takes under OpenAI's name.
RENAMED = {"class_label": "prompt", "num_images": "n"}

# OpenAI's fields that ask for something a class-conditional model doesn't have: why each is refused.
NOT_APPLICABLE = {
    "quality": "steps and guidance_scale set the quality",
    "style": "the model has classes, not styles",
    "background": "the model draws its training data's backgrounds",
    "moderation": "the model can only draw its own classes",
    "output_compression": "images are lossless PNG",
    "complexity": "the model has classes, not prompts of varying complexity",
    "frame_count": "the model draws still images",
    "frame_duration_ms": "the model draws still images",
    "svg": "images are PNG",
}
# Accepted only at the value that asks for what the service does anyway.
NO_OP_VALUES = {
    "stream": (False, "this endpoint does not stream; POST /generate with Accept: text/event-stream does"),
    "partial_images": (0, "partial images need streaming, which this endpoint does not do"),
    "output_format": ("png", "images are PNG"),
}
# End-user identifiers for OpenAI's abuse monitoring: any string, unused here.
IDENTIFIERS = ("user", "safety_identifier")
OPENAI_FIELDS = {"prompt", "n", "model", "size", "response_format", *NOT_APPLICABLE, *NO_OP_VALUES, *IDENTIFIERS}
# "class N": N of at most 9 digits (longer ones are no index of any model, and int() refuses 4300 and more).
CLASS_INDEX = re.compile(r"class\s+([0-9]{1,9})", re.IGNORECASE)


class InvalidRequest(Exception):
    """A request refused before it reaches the engine, in OpenAI's terms."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise InvalidRequest("the request body is not valid JSON", None) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", None)
    return body


def check_openai_fields(body: dict[str, Any], service: Service, image_size: str) -> None:
    """Refuse what the service cannot honour; a null is a field not given, as in OpenAI's API."""
    for field, value in body.items():
        if value is None:
            continue
        if field in NOT_APPLICABLE:
            raise InvalidRequest(f"{field} does not apply to a class-conditional model: {NOT_APPLICABLE[field]}", field)
        if field in NO_OP_VALUES:
            accepted, why = NO_OP_VALUES[field]
            if type(value) is not type(accepted) or value != accepted:  # False == 0, so the types too
                raise InvalidRequest(f"{field} must be {json.dumps(accepted)} or absent: {why}", field)
        if field in IDENTIFIERS and not isinstance(value, str):
            raise InvalidRequest(f"{field} must be a string", field)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"model must be a string naming a served model: {', '.join(service.models)}", "model")
    if model is not None and model not in service.models:
        raise InvalidRequest(
            f"model {model!r} is not served here; this service serves {', '.join(map(repr, service.models))}",
            "model",
            status=404,
            code="model_not_found",
        )
    response_format = body.get("response_format")
    if response_format == "url":
        raise InvalidRequest("response_format 'url' is not supported: this service returns no URLs; use b64_json",
                             "response_format")  # fmt: skip
    if response_format not in (None, "b64_json"):
        raise InvalidRequest(f"response_format must be 'b64_json', got {response_format!r}", "response_format")
    size = body.get("size")
    if size is not None and size != image_size:
        raise InvalidRequest(f"size must be {image_size!r} (the model's image size), got {size!r}", "size")


def prompt_error(class_names: tuple[str, ...]) -> InvalidRequest:
    names, last = ", ".join(class_names), len(class_names) - 1
    return InvalidRequest(f"prompt must be a class name ({names}) or 'class N' with N in 0..{last}", "prompt")


def to_generate_fields(
    body: dict[str, Any], generate_fields: Iterable[str], class_names: tuple[str, ...]
) -> dict[str, Any]:
    """The request as /generate's fields: prompt -> class_label, n -> num_images, guidance fields as they are."""
    for field in body:
        if field in RENAMED:
            raise InvalidRequest(f"{field} is not a field of this endpoint; use {RENAMED[field]}", field)
        if field in generate_fields and field not in GUIDANCE_FIELDS and field not in OPENAI_FIELDS:
            raise InvalidRequest(f"{field} is not a field of this endpoint; POST /generate has it", field)
        if field not in OPENAI_FIELDS and field not in GUIDANCE_FIELDS:
            raise InvalidRequest(
                f"unknown field {field!r}: this endpoint takes OpenAI's prompt, n, model, size, response_format, "
                f"user, output_format and the guidance fields {', '.join(GUIDANCE_FIELDS)}",
                field,
            )
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise prompt_error(class_names)
    n = body.get("n")
    if isinstance(n, bool):  # pydantic would read true as 1
        raise InvalidRequest("n must be an integer", "n")
    index = CLASS_INDEX.fullmatch(prompt.strip())
    fields = {k: v for k, v in body.items() if k in GUIDANCE_FIELDS or (k == "model" and v is not None)}
    return {**fields, "class_label": int(index[1]) if index else prompt, "num_images": 1 if n is None else n}


def validate(generate_request: type[BaseModel], fields: dict[str, Any], class_names: tuple[str, ...]) -> BaseModel:
    """/generate's own validation: the same ranges and discriminated unions, in OpenAI's error shape."""
    try:
        return generate_request.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors()
        loc = errors[0]["loc"]
        param = RENAMED.get(str(loc[0]), str(loc[0])) if loc else None
        if param == "prompt":
            raise prompt_error(class_names) from None
        raise InvalidRequest("; ".join(error_text(e) for e in errors), param) from None


def error_text(error: Any) -> str:
    """One pydantic error as /generate's 422 would name it: the field's path, then the message."""
    message = error["msg"].removeprefix("Value error, ")
    path = ".".join(RENAMED.get(str(part), str(part)) for part in error["loc"])
    return f"{path}: {message}" if path else message


def served_size(service: Service, model: str | None) -> str:
    height, width = service.model(model).image_hw
    return f"{width}x{height}"


def build_openai_router(limits: Limits) -> APIRouter:
    router = APIRouter()
    GenerateRequest = build_generate_request(limits)
    generate_fields = set(GenerateRequest.model_fields)
    if missing := set(GUIDANCE_FIELDS) - generate_fields:
        raise RuntimeError(f"/generate no longer has {sorted(missing)}: update GUIDANCE_FIELDS")

    def read_request(raw: bytes, service: Service) -> GenerateBody:
        body = parse_json_object(raw)
        model = body.get("model")
        model = model if isinstance(model, str) and model in service.models else None
        check_openai_fields(body, service, served_size(service, model))
        class_names = limits.class_names(model)
        fields = to_generate_fields(body, generate_fields, class_names)
        return cast(GenerateBody, validate(GenerateRequest, fields, class_names))  # an instance of GenerateRequest

    @router.post(
        "/v1/images/generations",
        openapi_extra={"requestBody": request_body_doc(limits, GenerateRequest)},
        responses={
            200: {"model": ImagesResponse},
            400: {
                "model": OpenAIError,
                "description": "invalid or inapplicable field: OpenAI's error shape, `param` names the field",
            },
            404: {"model": OpenAIError, "description": "`model` is not a served model (code model_not_found)"},
            500: {"model": OpenAIError, "description": "the sampler produced non-finite values"},
            503: {
                "model": OpenAIError,
                "description": "queue full, or the service is starting or draining (with Retry-After)",
            },
            504: {"model": OpenAIError, "description": "the request exceeded the server's timeout"},
            **refusals(OpenAIError),
        },
        # 406 and 415 in OpenAI's shape too (app/api/errors.py picks it by path).
        dependencies=[Depends(json_body), Depends(produces(JSON))],
        summary="OpenAI-compatible image generation: the prompt names a class",
    )
    async def generations(request: Request, service: ServiceDep) -> Response:
        arrived = time.monotonic()
        if (refused := refusal(service)) is not None:  # starting (the served sizes are not known yet) or draining
            service.metrics.observe_request("rejected")
            return openai_error(refused.status, refused.message, code=refused.outcome, headers=refused.headers)
        try:
            validated = read_request(await request.body(), service)
        except InvalidRequest as exc:
            service.metrics.observe_request("invalid")
            return openai_error(exc.status, exc.message, exc.param, exc.code)
        validated = with_default_cache(service, validated)
        if (error := served_method_error(service, validated)) is not None:
            service.metrics.observe_request("invalid")
            return openai_error(400, error["msg"], error["loc"][1])
        try:
            api_key = request.headers.get(API_KEY_HEADER) or bearer_key(request.headers.get("Authorization"))
            client = client_of(api_key, request.headers.get(CLIENT_ID_HEADER))
        except ValueError as exc:
            service.metrics.observe_request("invalid")
            return openai_error(400, str(exc), CLIENT_ID_HEADER)
        spec = to_spec(validated)
        timeout_s = validated.timeout_s
        try:
            request_id = submit(
                service, validated.model, spec, arrived, priority=validated.priority, client=client, timeout_s=timeout_s
            )
            result = await await_result(service, validated.model, request_id, request, arrived, timeout_s=timeout_s)
        except ApiError as exc:
            return openai_error(exc.status, exc.message, code=exc.outcome, headers=exc.headers)
        # The prompt names a class (to_generate_fields): never unconditional here.
        name = None if spec.class_label is None else limits.class_names(validated.model)[spec.class_label]
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [
                    {"b64_json": base64.b64encode(to_png_bytes(image)).decode(), "revised_prompt": name}
                    for image in result.images
                ],
                "output_format": "png",
                "size": served_size(service, validated.model),
                "seeds": list(spec.seeds),  # not OpenAI's: image i is redrawn with seed=seeds[i], n=1
            }
        )

    return router


def request_body_doc(limits: Limits, generate_request: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body: the body is read by hand, so that every error is in OpenAI's shape. The
    guidance fields are /generate's own schemas (their models are in the document's components)."""
    names = limits.class_names()
    generate_schema = generate_request.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = {
        "prompt": {
            "type": "string",
            "anyOf": [{"enum": list(names)}, {"pattern": "^class [0-9]+$"}],
            "description": f"a class name ({', '.join(names)}; case-insensitive, synonyms too) or 'class N'",
            "examples": [names[-1], "class 0"],
        },
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_images, "default": 1},
        "model": {
            "enum": list(limits.model_names),
            "description": "a served model's name (default: the first); others get 404",
        },
        "size": {"type": "string", "description": "the model's image size as 'WxH'; others get 400"},
        "response_format": {"enum": ["b64_json"], "default": "b64_json"},
        "output_format": {"enum": ["png"], "default": "png"},
        "stream": {"enum": [False], "default": False, "description": NO_OP_VALUES["stream"][1]},
        "partial_images": {"enum": [0], "default": 0, "description": NO_OP_VALUES["partial_images"][1]},
        **{name: {"type": "string", "description": "accepted and unused"} for name in IDENTIFIERS},
        **{name: generate_schema["properties"][name] for name in GUIDANCE_FIELDS},
    }
    description = (
        f"The guidance fields are POST /generate's, with the same ranges. Refused with 400: "
        f"{', '.join(NOT_APPLICABLE)} (null is taken as absent), and unknown fields."
    )
    schema = {
        "type": "object",
        "required": ["prompt"],
        "properties": properties,
        "additionalProperties": False,
        "description": description,
    }
    return {"required": True, "content": {"application/json": {"schema": schema}}}
