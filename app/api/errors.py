"""Error bodies the client can always read: bounded, encodable, and in the shape its endpoint promises.

Every error names what was wrong and what is allowed. A request's own values come back in some of them
(a 422 echoes the input it refused, a message may quote it); `echo` bounds them and makes them encodable,
so that no input, however long or whatever its characters, turns an error into a 500 or a huge body.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# The endpoint whose errors are OpenAI's {"error": {...}} (its clients read them); every other route's
# are {"detail": ...}, FastAPI's shape.
OPENAI_PATHS = frozenset({"/v1/images/generations"})

# Longest echoed string: an input's value, a message that quotes it, a field name. Long enough for any
# real field name or class name, short enough that an error never grows with the request.
ECHO_CHARS = 200


def bounded_text(text: str, limit: int = ECHO_CHARS) -> str:
    """text, its middle cut where it is longer than limit (the end of a message often says what is
    allowed), with characters UTF-8 cannot carry (a lone surrogate such as "\\ud800", which JSON's
    escapes can express) written as their escapes."""
    if len(text) > limit:
        half = limit // 2
        text = f"{text[:half]}...[{len(text) - 2 * half} characters cut]...{text[-half:]}"
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def echo(value: Any, limit: int = ECHO_CHARS) -> Any:
    """A JSON-ready value made safe to send back: strings (keys too) bounded and encodable, non-finite
    floats (pydantic reads NaN and Infinity, which JSON cannot carry) as strings, anything else as text."""
    if isinstance(value, str):
        return bounded_text(value, limit)
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {bounded_text(str(k), limit): echo(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [echo(v, limit) for v in value]
    return bounded_text(str(value), limit)


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A 422's list of pydantic errors (JSON-ready, from jsonable_encoder), each echoed safely; the message,
    which may list what is allowed, gets more room than the input it quotes."""
    return [{**echo(e), "msg": bounded_text(str(e.get("msg", "")), 4 * ECHO_CHARS)} for e in errors]


def union_kinds(openapi: dict[str, Any], path: str, method: str, loc: Sequence[Any]) -> list[str] | None:
    """The kinds the discriminated union at loc (["body", field, ...]) of the (method, path) operation's JSON body
    allows, in the OpenAPI document's order; None where loc is no such union there."""
    refs: dict[str, Any] = openapi.get("components", {}).get("schemas", {})

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref", "")
        return refs.get(ref.rsplit("/", 1)[-1], {}) if ref else node

    operation = openapi.get("paths", {}).get(path, {}).get(method.lower(), {})
    node = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    for part in loc[1:]:
        if node is None:
            return None
        node = resolved(node).get("properties", {}).get(part)
    for union in [node, *(node or {}).get("anyOf", [])]:
        mapping = (union or {}).get("discriminator", {}).get("mapping")
        if mapping:
            kind_of = {ref: kind for kind, ref in mapping.items()}
            return [kind_of[branch["$ref"]] for branch in union.get("oneOf", []) if branch.get("$ref") in kind_of]
    return None


def name_missing_kinds(request: Request, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's error for a union field given an object without its `kind` says only that it found no tag;
    this one names the field and the kinds it allows, as the error for an unknown kind does."""
    named = []
    for error in errors:
        loc = error.get("loc") or []
        if error.get("type") == "union_tag_not_found" and loc and loc[0] == "body":
            kinds = union_kinds(request.app.openapi(), request.url.path, request.method, loc)
            if kinds:
                field = ".".join(str(part) for part in loc[1:])
                allowed = ", ".join(f"'{kind}'" for kind in kinds)
                msg = f"{field}.kind is required: one of {allowed}"
                error = {**error, "msg": msg, "ctx": {**error.get("ctx", {}), "expected_tags": allowed}}
        named.append(error)
    return named


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """OpenAI's error shape, which its clients turn into their own exception classes."""
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": echo(message, 4 * ECHO_CHARS), "type": error_type, "param": echo(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(
    path: str, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error that belongs to no one field (a body too large, a media type refused), in path's shape."""
    if path in OPENAI_PATHS:
        return openai_error(status, message, code=code, headers=headers)
    return JSONResponse({"detail": echo(message, 4 * ECHO_CHARS)}, status_code=status, headers=headers)


class RequestRefused(Exception):
    """A request refused for what it is rather than what its fields hold: its media type (415) or the
    media types it accepts (406)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# Routes whose refused requests count as cfg_requests_total{outcome="invalid"} (the jobs API has its own metric).
COUNTED_PATHS = frozenset({"/generate"}) | OPENAI_PATHS


def count_invalid(request: Request) -> None:
    service = getattr(request.app.state, "service", None)  # None before the lifespan has built it
    if service is not None:
        service.metrics.observe_request("invalid")


def install_error_handlers(app: FastAPI) -> None:
    """422 with FastAPI's body, which names the field and its range, its echoed inputs bounded and encodable; a
    body that is no UTF-8 JSON gets the same 422; 406 and 415 name what is accepted. Refused /generate requests
    count as invalid (the OpenAI endpoint counts its own 400s)."""

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path == "/generate":
            count_invalid(request)
        errors = name_missing_kinds(request, jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": field_errors(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a JSON body it cannot decode (not UTF-8, nested past Python's recursion limit, a number
        # of 4300 digits and more) with a 400 that says only "There was an error parsing the body"; it is the
        # same client error as malformed JSON, which gets a 422 naming the body: give it that 422.
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
            msg = f"the body is not JSON in UTF-8: {exc.__cause__}"
            error = {"loc": ["body"], "msg": msg, "type": "json_invalid"}
            return await on_invalid(request, RequestValidationError([error]))
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestRefused)
    async def on_refused(request: Request, exc: RequestRefused) -> Response:
        if request.url.path in COUNTED_PATHS:
            count_invalid(request)
        return error_response(request.url.path, exc.status, exc.message, exc.code)


class ApiError(Exception):
    """A request that ends without images; the outcome is already recorded."""

    def __init__(self, status: int, message: str, outcome: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.headers = status, message, outcome, headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"detail": self.message, "outcome": self.outcome}, status_code=self.status, headers=self.headers
        )

    def event(self) -> dict[str, Any]:
        """The body of a stream's `error` event, and of a failed job's `error`."""
        return {"status": self.status, "detail": self.message, "outcome": self.outcome}
