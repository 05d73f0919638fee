"""Thin route handlers: validate, convert to the engine's SampleSpec, wait, encode."""

import asyncio
import base64
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.schemas import Limits, build_generate_request
from app.engine import Engine, EngineClosedError, JobResult, NonFiniteError, QueueFullError
from app.guidance import GuidanceSchedule
from app.images import make_grid, to_png_bytes
from app.metrics import Metrics
from app.sampling import GuidanceParams, SampleSpec

DISCONNECT_POLL_S = 0.25


@dataclass
class Service:
    """What the routes need, built by the lifespan and kept on app.state.service."""

    engine: Engine
    metrics: Metrics
    limits: Limits
    model_name: str
    models_info: dict[str, Any]
    request_timeout_s: float
    retry_after_s: int
    on_scrape: Callable[[], None] = lambda: None  # refreshes gauges read at scrape time
    ready: bool = False


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


class ClientGoneError(Exception):
    pass


def error(status: int, message: str, outcome: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "outcome": outcome}, status_code=status, headers=headers)


def to_spec(body: Any) -> SampleSpec:
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - body.num_images)
    schedule = body.schedule
    return SampleSpec(
        class_label=body.class_label,
        seeds=tuple(seed + i for i in range(body.num_images)),
        steps=body.steps,
        sampler=body.sampler,
        guidance=GuidanceParams(
            guidance_scale=body.guidance_scale,
            schedule=GuidanceSchedule(
                kind=schedule.kind, start=getattr(schedule, "start", 1.0), end=getattr(schedule, "end", 1.0)
            ),
            noise_level=body.noise_level,
            guidance_rescale=body.guidance_rescale,
        ),
    )


async def wait_for_job(future: asyncio.Future, request: Request, timeout_s: float) -> JobResult:
    """Wait for the engine, watching for the client going away and for the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_S, remaining))
        if done:
            return future.result()
        if await request.is_disconnected():
            raise ClientGoneError


def build_router(limits: Limits) -> APIRouter:
    router = APIRouter()
    GenerateRequest = build_generate_request(limits)

    @router.post(
        "/generate",
        responses={
            200: {
                "content": {"image/png": {}},
                "description": "JSON (default) or a PNG grid (Accept: image/png)",
            },
            422: {"description": "invalid request: the detail names the field and the allowed range"},
            500: {"description": "the sampler produced non-finite values"},
            503: {"description": "queue full (with Retry-After) or the service is draining"},
            504: {"description": "the request exceeded the server's timeout"},
        },
        summary="Draw images of a class with classifier-free guidance",
    )
    async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:  # type: ignore[valid-type]
        arrived = time.monotonic()
        metrics = service.metrics

        def fail(status: int, message: str, outcome: str, headers: dict[str, str] | None = None) -> Response:
            metrics.observe_request(outcome, time.monotonic() - arrived)
            return error(status, message, outcome, headers)

        spec = to_spec(body)
        try:
            job = service.engine.submit(spec)
        except QueueFullError as exc:
            return fail(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)})
        except EngineClosedError as exc:
            return fail(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)})
        try:
            result = await wait_for_job(job.future, request, service.request_timeout_s)
        except TimeoutError:
            service.engine.cancel(job)
            return fail(504, f"generation exceeded the {service.request_timeout_s:g} s timeout", "timeout")
        except ClientGoneError:
            service.engine.cancel(job)
            return fail(499, "client disconnected", "cancelled")
        except NonFiniteError as exc:
            return fail(500, f"sampling failed: {exc}; no image was produced", "error")
        except (asyncio.CancelledError, RuntimeError) as exc:
            service.engine.cancel(job)
            if isinstance(exc, asyncio.CancelledError):
                metrics.observe_request("cancelled", time.monotonic() - arrived)
                raise
            return fail(500, f"generation failed: {exc}", "error")

        total = time.monotonic() - arrived
        metrics.observe_request("ok", total)
        if "image/png" in request.headers.get("accept", ""):
            grid = make_grid(result.images, ncols=math.ceil(math.sqrt(len(result.images))))
            return Response(to_png_bytes(grid), media_type="image/png", headers={"X-Seeds": _seeds(spec)})
        names = limits.class_names
        return JSONResponse(
            {
                "model": service.model_name,
                "class_label": spec.class_label,
                "class_name": None if spec.class_label is None else names[spec.class_label],
                "num_images": spec.num_images,
                "steps": spec.steps,
                "sampler": spec.sampler,
                "guidance_scale": spec.guidance.guidance_scale,
                "images": [base64.b64encode(to_png_bytes(img)).decode() for img in result.images],
                "seeds": list(spec.seeds),
                "timings": {
                    "queue_wait_s": round(result.queue_wait_s, 4),
                    "compute_s": round(result.compute_s, 4),
                    "total_s": round(total, 4),
                },
            }
        )

    @router.get("/healthz", summary="Liveness: the process and its engine loop are running")
    async def healthz(service: ServiceDep) -> Response:
        if not service.engine.check_health():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/readyz", summary="Readiness: 503 until the model is warm, and while draining")
    async def readyz(service: ServiceDep) -> Response:
        if not (service.ready and service.engine.accepting and service.engine.check_health()):
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get("/v1/models", summary="The loaded model: classes, image size, samplers, limits")
    async def models(service: ServiceDep) -> dict[str, Any]:
        return service.models_info

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics(service: ServiceDep) -> Response:
        service.on_scrape()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _seeds(spec: SampleSpec) -> str:
    return ",".join(str(s) for s in spec.seeds)


def install_error_handlers(app: FastAPI) -> None:
    """Count invalid /generate requests; keep FastAPI's 422 body, which names the field and its range."""
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        service: Service | None = getattr(request.app.state, "service", None)
        if service is not None and request.url.path == "/generate":
            service.metrics.observe_request("invalid")
        return await request_validation_exception_handler(request, exc)
