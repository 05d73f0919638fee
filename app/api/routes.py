"""Thin route handlers: validate, convert to the engine's SampleSpec, wait, encode."""

import asyncio
import base64
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.media import EVENT_STREAM, JSON, PNG, json_body, produces
from app.api.responses import RequestError, ValidationErrorBody, event_stream_content, json_errors, refusals
from app.api.schemas import GenerateResponse, Limits, build_generate_request, request_fields
from app.api.service import Service, ServiceDep
from app.engine import Engine, EngineClosedError, Job, JobResult, NonFiniteError, QueueFullError
from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.images import make_grid, to_png_bytes
from app.sampling import GuidanceParams, Preview, SampleSpec


class ClientGoneError(Exception):
    pass


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
        """The body of a stream's `error` event."""
        return {"status": self.status, "detail": self.message, "outcome": self.outcome}


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
            method=GuidanceMethod(**body.method.model_dump()),
            cads=None if body.cads is None else Cads(**body.cads.model_dump()),
        ),
        return_trace=body.return_trace,
        preview_every=(body.preview_every or max(1, body.steps // 10)) if body.preview else None,
    )


def guidance_body(guidance: GuidanceParams) -> dict[str, Any]:
    """The guidance settings a response echoes, method and schedule as a request would send them."""
    return {
        "method": request_fields(guidance.method),
        "schedule": request_fields(guidance.schedule),
        "noise_level": guidance.noise_level,
        "noise_schedule": guidance.noise_schedule,
        "guidance_rescale": guidance.guidance_rescale,
        "cads": None if guidance.cads is None else asdict(guidance.cads),
    }


def refusal(service: Service) -> ApiError | None:
    """The 503 (with Retry-After) for new work while the service is starting or draining; None once ready."""
    reason = service.refusal()
    if reason is None:
        return None
    return ApiError(503, reason, "rejected", {"Retry-After": str(service.retry_after_s)})


def submit(service: Service, model: str, spec: SampleSpec, arrived: float) -> Job:
    if (refused := refusal(service)) is not None:
        service.metrics.observe_request("rejected", time.monotonic() - arrived, model)
        raise refused
    try:
        return service.model(model).engine.submit(spec)
    except (QueueFullError, EngineClosedError) as exc:
        service.metrics.observe_request("rejected", time.monotonic() - arrived, model)
        raise ApiError(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)}) from exc


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the ASGI server's `http.disconnect` message).

    The body has been read by then, so the next message is the disconnect: an event, not a poll, so a
    waiting request costs the event loop nothing while the forward uses the CPU."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_result(service: Service, job: Job, request: Request, arrived: float) -> JobResult:
    """Wait for the engine, watching the deadline and the client; map every ending to an outcome."""
    deadline = arrived + service.request_timeout_s
    engine = service.model(job.model).engine

    def observe(outcome: str, seconds: float) -> None:
        service.metrics.observe_request(outcome, seconds, job.model)

    gone = asyncio.ensure_future(client_gone(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, timeout=deadline - time.monotonic(),
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if job.future in done:
            result = job.future.result()
            observe("ok", time.monotonic() - arrived)
            return result
        if gone in done:
            raise ClientGoneError
        raise TimeoutError
    except TimeoutError:
        engine.cancel(job)
        observe("timeout", time.monotonic() - arrived)
        raise ApiError(504, f"generation exceeded the {service.request_timeout_s:g} s timeout", "timeout") from None
    except (ClientGoneError, asyncio.CancelledError) as exc:
        engine.cancel(job)
        observe("cancelled", time.monotonic() - arrived)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(499, "client disconnected", "cancelled") from None
    except RuntimeError as exc:  # NonFiniteError included
        engine.cancel(job)
        observe("error", time.monotonic() - arrived)
        raise failure(exc) from None
    finally:
        gone.cancel()


def failure(exc: RuntimeError) -> ApiError:
    """The error of a job that the engine failed: non-finite latents, or the engine loop itself."""
    if isinstance(exc, NonFiniteError):
        return ApiError(500, f"sampling failed: {exc}; no image was produced", "error")
    if isinstance(exc, EngineClosedError):  # still unfinished when a drain ran out of time: try another replica
        return ApiError(503, str(exc), "error")
    return ApiError(500, f"generation failed: {exc}", "error")


def result_body(service: Service, model: str, spec: SampleSpec, result: JobResult, arrived: float) -> dict[str, Any]:
    names = service.limits.class_names(model)
    return {
        "model": model,
        "class_label": spec.class_label,
        "class_name": None if spec.class_label is None else names[spec.class_label],
        "num_images": spec.num_images,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "guidance_scale": spec.guidance.guidance_scale,
        "guidance": guidance_body(spec.guidance),
        "trace": result.trace,
        "images": [base64.b64encode(to_png_bytes(img)).decode() for img in result.images],
        "seeds": list(spec.seeds),
        "timings": {
            "queue_wait_s": round(result.queue_wait_s, 4),
            "compute_s": round(result.compute_s, 4),
            "total_s": round(time.monotonic() - arrived, 4),
        },
    }


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def preview_body(preview: Preview) -> dict[str, Any]:
    return {"step": preview.step, "images": [base64.b64encode(to_png_bytes(img)).decode() for img in preview.images]}


# A stream quiet this long gets an SSE comment, so that no proxy's read timeout closes it (a long queue).
KEEPALIVE_S = 15.0


async def progress_events(engine: Engine, job: Job, until: asyncio.Future) -> AsyncIterator[str]:
    """`progress` events as the job's steps advance or its place in the queue changes, until `until` is
    done: the step, the queue position, the trace entries of the steps taken since the last event, and
    the newest preview."""
    spec = job.spec
    last = None
    traced = 0  # trace entries sent so far
    previewed = None  # step of the last preview sent
    sent = time.monotonic()
    while not until.done():
        step, steps = job.progress
        position = engine.queue_position(job)
        if (step, position) != last:
            last = (step, position)
            event: dict[str, Any] = {
                "step": step,
                "steps": steps,
                "queued": job.queued,
                "status": "queued" if job.queued else "running",
                "queue_position": position,
            }
            if spec.return_trace:
                new = job.run.trace[traced:step]
                traced += len(new)
                event["trace"] = [t.to_dict() for t in new]
            preview = job.run.preview
            if preview is not None and preview.step != previewed:
                previewed = preview.step
                event["preview"] = preview_body(preview)
            yield sse("progress", event)
            sent = time.monotonic()
        elif time.monotonic() - sent >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            sent = time.monotonic()
        # A queued job takes no steps: look at its place in the queue every second.
        await asyncio.wait(
            {until, job.next_step()}, timeout=1.0 if job.queued else KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
        )


async def progress_stream(
    service: Service, job: Job, request: Request, spec: SampleSpec, arrived: float
) -> AsyncIterator[str]:
    """Server-sent events: `progress` as the steps advance, then one `result` or `error`."""
    waiter = asyncio.ensure_future(await_result(service, job, request, arrived))
    try:
        async for event in progress_events(service.model(job.model).engine, job, waiter):
            yield event
        try:
            yield sse("result", result_body(service, job.model, spec, waiter.result(), arrived))
        except ApiError as exc:
            yield sse("error", exc.event())
    finally:
        waiter.cancel()


# nginx passes each write of a response with this header on at once, whatever its location's buffering.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
                "description": "queue full, or the service is starting or draining (with Retry-After)",
            },
            504: {"model": RequestError, "description": "the request exceeded the server's timeout"},
            **refusals(),
        },
        dependencies=[Depends(json_body)],
        summary="Draw images of a class with classifier-free guidance",
    )
    async def generate(
        body: GenerateRequest,
        request: Request,
        service: ServiceDep,
        media_type: Annotated[str, Depends(produces(JSON, PNG, EVENT_STREAM))],
    ) -> Response:
        arrived = time.monotonic()
        spec = to_spec(body)
        try:
            job = submit(service, body.model, spec, arrived)
            if media_type == EVENT_STREAM:
                stream = progress_stream(service, job, request, spec, arrived)
                return StreamingResponse(stream, media_type=EVENT_STREAM, headers=STREAM_HEADERS)
            result = await await_result(service, job, request, arrived)
        except ApiError as exc:
            return exc.response()
        if media_type == PNG:
            grid = make_grid(result.images, ncols=math.ceil(math.sqrt(len(result.images))))
            seeds = ",".join(str(s) for s in spec.seeds)
            return Response(to_png_bytes(grid), media_type=PNG, headers={"X-Seeds": seeds})
        return JSONResponse(result_body(service, body.model, spec, result, arrived))

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
        with Retry-After then too."""
        failures = service.failures()
        if service.phase != "ready" or failures:
            reason = "failed" if failures else service.phase
            error = "; ".join(failures) or None
            return JSONResponse({"status": "not ready", "reason": reason, "error": error}, status_code=503)
        return JSONResponse({"status": "ready"})

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
