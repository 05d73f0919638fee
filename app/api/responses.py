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


def refusals(model: type[BaseModel] = ErrorDetail, body: bool = True) -> dict[int | str, dict[str, Any]]:
    """The 406, 413 and (for a route that takes a body) 415 every API route may answer, in model's shape."""
    out: dict[int | str, dict[str, Any]] = {
        406: {"model": model, "description": "the Accept header accepts none of the types this route sends"},
        413: {"model": model, "description": "the body is over CFG_MAX_BODY_BYTES"},
    }
    if body:
        out[415] = {"model": model, "description": "the body is not sent as application/json"}
    return out


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
