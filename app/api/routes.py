"""Thin route handlers: validate, convert to the engine's SampleSpec (convert.py), hand it to the model's engine
client and wait (waiting.py), encode (encoding.py) or stream (sse.py)."""

import math
import time
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.clients import ClientDep
from app.api.convert import to_spec
from app.api.encoding import result_body
from app.api.errors import ApiError
from app.api.media import EVENT_STREAM, JSON, PNG, json_body, produces
from app.api.methods import served_method_error, with_default_cache
from app.api.responses import RequestError, ValidationErrorBody, event_stream_content, json_errors, refusals
from app.api.schemas import GenerateResponse, Limits, build_generate_request
from app.api.service import ServiceDep
from app.api.sse import open_event_stream
from app.api.waiting import await_result, refusal, submit
from app.images import make_grid, to_png_bytes


def build_router(limits: Limits) -> APIRouter:
    router = APIRouter()
    if TYPE_CHECKING:  # the model is built per Limits at runtime: the type checker reads what routes use of it
        from app.api.schemas import GenerateBody as GenerateRequest
    else:
        GenerateRequest = build_generate_request(limits)

    @router.post(
        "/generate",
        responses={
            200: {
                "model": GenerateResponse,
                "content": {
                    PNG: {"schema": {"type": "string", "format": "binary"}},
                    **event_stream_content(),
                },
                "description": "JSON (the default); a PNG grid with Accept: image/png; with Accept: "
                "text/event-stream, server-sent `progress` events ({step, steps}) then one `result` "
                "(the JSON body) or `error` event",
            },
            422: {
                "model": ValidationErrorBody,
                "description": "invalid request: each error names the field and what it allows",
            },
            500: {"model": RequestError, "description": "the sampler produced non-finite values"},
            503: {
                "model": RequestError,
                "description": "queue full; the service is starting or draining; or, with timeout_s, the work ahead "
                "leaves no time to finish by then (with Retry-After)",
            },
            504: {"model": RequestError, "description": "the request exceeded its timeout_s or the server's timeout"},
            **refusals(),
        },
        dependencies=[Depends(json_body)],
        summary="Draw images of a class with classifier-free guidance",
    )
    async def generate(
        body: GenerateRequest,
        request: Request,
        service: ServiceDep,
        client: ClientDep,
        media_type: Annotated[str, Depends(produces(JSON, PNG, EVENT_STREAM))],
    ) -> Response:
        arrived = time.monotonic()
        body = with_default_cache(service, body)
        if (error := served_method_error(service, body)) is not None:
            raise RequestValidationError([error])  # the schema's 422: this model cannot run the method as asked
        spec = to_spec(body)
        model = body.model
        try:
            request_id = submit(
                service,
                model,
                spec,
                arrived,
                progress=media_type == EVENT_STREAM,
                priority=body.priority,
                client=client,
                timeout_s=body.timeout_s,
            )
            if media_type == EVENT_STREAM:
                return await open_event_stream(service, model, request_id, request, spec, arrived, body.timeout_s)
            result = await await_result(service, model, request_id, request, arrived, timeout_s=body.timeout_s)
        except ApiError as exc:
            return exc.response()
        if media_type == PNG:
            grid = make_grid(result.images, ncols=math.ceil(math.sqrt(len(result.images))))
            seeds = ",".join(str(s) for s in spec.seeds)
            return Response(to_png_bytes(grid), media_type=PNG, headers={"X-Seeds": seeds})
        return JSONResponse(result_body(service, model, spec, result, arrived))

    @router.get(
        "/healthz",
        responses={503: {"description": "the startup failed, or a model's engine loop did: restart the process"}},
        summary="Liveness: 200 while the process can serve",
    )
    async def healthz(service: ServiceDep) -> Response:
        """200 from the moment the port opens (loading and warming up included) until the process exits, unless
        the startup failed or a model's engine loop did: then 503 with the error."""
        if failures := service.failures():
            status = "startup failed" if service.startup_error else "engine stopped"
            return JSONResponse({"status": status, "error": "; ".join(failures)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get(
        "/readyz",
        responses={503: {"description": "not ready; `reason`: loading, warming up, draining or failed"}},
        summary="Readiness: 200 once the models are loaded and warm",
    )
    async def readyz(service: ServiceDep) -> Response:
        """503 with a `reason` while loading, warming up or draining, or after a failure; new requests get 503
        with Retry-After then too. With a Redis job store, `job_store` says whether it is reachable."""
        failures = service.failures()
        if service.phase != "ready" or failures:
            reason = "failed" if failures else service.phase
            error = "; ".join(failures) or None
            return JSONResponse({"status": "not ready", "reason": reason, "error": error}, status_code=503)
        if service.jobs.name == "memory":
            return JSONResponse({"status": "ready"})
        # A shared job store that can't be reached is reported, not a reason to stop serving: /generate
        # needs no store, so the replica stays in its load balancer (POST /v1/jobs answers 503 meanwhile).
        problem = await service.jobs.check()
        store = {"url": service.jobs.name, "reachable": problem is None, "error": problem}
        return JSONResponse({"status": "ready", "job_store": store})

    @router.get(
        "/v1/models",
        dependencies=[Depends(produces(JSON))],
        responses=refusals(body=False),
        summary="The served models: name, classes, image size, samplers, limits",
    )
    async def models(service: ServiceDep) -> Response:
        # As every call the playground makes: a client that reads this next asks for images.
        if (refused := refusal(service)) is not None:
            return refused.response()
        return JSONResponse(service.models_info)

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,  # for the document: the exposition format is text
        dependencies=[Depends(produces("text/plain"))],
        responses=json_errors(406, 413),
        summary="Prometheus metrics",
    )
    async def metrics(service: ServiceDep) -> Response:
        service.on_scrape()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
