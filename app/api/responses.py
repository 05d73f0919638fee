"""The response bodies the routes send, as models for the OpenAPI document only (the routes build their bodies
as dicts): a client, and the fuzz test (tests/api/test_fuzz.py), can hold each response to its schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.api.schemas import GenerateResponse


class ErrorDetail(BaseModel):
    """An error that names what was wrong and what is allowed."""

    detail: str


class RequestError(ErrorDetail):
    """A request that ended without images."""

    outcome: str = Field(description="rejected, timeout, cancelled or error, as counted in cfg_requests_total")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, then the field's path")
    msg: str = Field(description="what is wrong, and what is allowed")
    type: str
    input: Any = Field(None, description="the value refused, strings cut to 200 characters")
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]


class OpenAIErrorFields(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="the field at fault")
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorFields


class PreviewBody(BaseModel):
    step: int
    images: list[str] = Field(description="base64-encoded PNGs of the x0 prediction")


class JobError(BaseModel):
    status: int = Field(description="the HTTP status /generate would have answered")
    detail: str
    outcome: str


class JobResponse(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    step: int = Field(description="steps taken; a cancelled job's stays where it was cancelled")
    steps: int
    queue_position: int | None = Field(description="1 for the next job to start; null once started or finished")
    created_at: float = Field(description="Unix time")
    started_at: float | None
    finished_at: float | None
    preview: PreviewBody | None = Field(description="the newest preview while the job runs (with preview: true)")
    result: GenerateResponse | None = Field(description="the /generate body, once succeeded")
    error: JobError | None = Field(description="why the job has no result: failed or cancelled")


class JobConflict(ErrorDetail):
    status: str = Field(description="the job's status")


REFUSALS = {
    406: "the Accept header accepts none of the types this route sends",
    413: "the body is over CFG_MAX_BODY_BYTES",
    415: "the body is not sent as application/json",
}


def refusals(model: type[BaseModel] = ErrorDetail, body: bool = True) -> dict[int | str, dict[str, Any]]:
    """The 406, 413 and (for a route that takes a body) 415 every API route may answer, in model's shape."""
    return {status: {"model": model, "description": why} for status, why in REFUSALS.items() if body or status != 415}


def json_errors(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """ErrorDetail responses for a route whose own responses are not JSON (an event stream, the metrics text):
    FastAPI would document a model's schema under the route's media type, so these name the JSON schema
    themselves (its component is there: other routes answer ErrorDetail)."""
    schema = {"$ref": f"#/components/schemas/{ErrorDetail.__name__}"}
    why = {**REFUSALS, **(described or {})}
    return {s: {"description": why[s], "content": {"application/json": {"schema": schema}}} for s in statuses}


class ProgressEvent(BaseModel):
    step: int
    steps: int
    queued: bool
    status: Literal["queued", "running"]
    queue_position: int | None
    trace: list[dict[str, Any]] | None = Field(None, description="with return_trace: the steps since the last event")
    preview: PreviewBody | None = Field(None, description="with preview: the newest x0 prediction, when it changes")


def _component(model: type[BaseModel]) -> dict[str, Any]:
    """model's schema with its nested models as references to the document's components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def event_stream_content() -> dict[str, Any]:
    """A text/event-stream response's content: `progress` events, then one `result` (the /generate body) or
    `error`. `schema` describes one event, as OpenAPI before 3.2 reads it for a stream (3.2 names it
    itemSchema); an event's `data` is JSON, whose schema is its contentSchema."""

    def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "properties": {
                "event": {"const": name},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
            }
        }

    per_event = {
        "type": "object",
        "required": ["event", "data"],
        "oneOf": [
            event("progress", _component(ProgressEvent)),
            event("result", {"$ref": f"#/components/schemas/{GenerateResponse.__name__}"}),
            event("error", {"$ref": f"#/components/schemas/{JobError.__name__}"}),
        ],
    }
    return {"text/event-stream": {"schema": per_event}}


class GeneratedImage(BaseModel):
    b64_json: str = Field(description="a base64-encoded PNG")
    revised_prompt: str = Field(description="the class drawn, by its name")


class ImagesResponse(BaseModel):
    """OpenAI's images response, and the seeds (not OpenAI's): image i is redrawn with seed=seeds[i], n=1."""

    created: int
    data: list[GeneratedImage]
    output_format: Literal["png"]
    size: str
    seeds: list[int]
