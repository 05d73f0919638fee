"""Asynchronous jobs: submit now, follow the progress, fetch or cancel later.

POST /v1/jobs takes the /generate body and answers 202 with the job at once; the engine runs it as it
runs /generate's. A task per job waits for the engine and stores the result (the /generate JSON) or
the error in the job's record (app/api/job_store.py), where GET /v1/jobs/{id} finds it until it expires.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.errors import bounded_text
from app.api.job_store import JobRecord, StoreFullError
from app.api.media import EVENT_STREAM, JSON, json_body, produces
from app.api.responses import (
    ErrorDetail,
    JobConflict,
    JobResponse,
    RequestError,
    ValidationErrorBody,
    event_stream_content,
    json_errors,
    refusals,
)
from app.api.routes import (
    STREAM_HEADERS,
    ApiError,
    Service,
    ServiceDep,
    failure,
    preview_body,
    progress_events,
    refusal,
    result_body,
    sse,
    to_spec,
)
from app.api.schemas import Limits, build_generate_request
from app.engine import EngineClosedError

IdempotencyKey = Annotated[
    str | None,
    Header(max_length=255, description="a retried POST with the same key and body returns the same job"),
]


CANCELLED = ApiError(499, "the job was cancelled", "cancelled")


def job_body(service: Service, record: JobRecord) -> dict[str, Any]:
    job = record.job
    preview = job.run.preview
    return {
        "id": record.id,
        "status": record.status,
        "step": record.step,
        "steps": record.spec.steps,
        "queue_position": None if record.finished else service.model(job.model).engine.queue_position(job),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "preview": None if preview is None or record.finished else preview_body(preview),
        "result": record.result,
        "error": record.error,
    }


async def follow(service: Service, record: JobRecord) -> None:
    """Wait for the engine's job; store its result, or why it has none."""
    future = record.job.future
    await asyncio.wait({future})
    if future.cancelled():
        record.finish("cancelled", error=CANCELLED.event())
    elif future.exception() is not None:
        record.finish("failed", error=failure(future.exception()).event())  # type: ignore[arg-type]
    else:
        result = result_body(service, record.job.model, record.spec, future.result(), record.arrived)
        record.finish("succeeded", result=result)
    service.metrics.jobs.labels(outcome=record.outcome, model=record.job.model).inc()


def not_found(job_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"no job {bounded_text(job_id)!r}: unknown, or expired"}, status_code=404)


def final_event(record: JobRecord) -> str:
    if record.result is not None:
        return sse("result", record.result)
    return sse("error", record.error or {})


async def job_events(service: Service, record: JobRecord) -> AsyncIterator[str]:
    """`progress` events while the job runs, then one `result` or `error` (outcome `cancelled` if cancelled)."""
    if not record.finished:
        done = asyncio.get_running_loop().create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        record.on_finish(finished)
        async for event in progress_events(service.model(record.job.model).engine, record.job, done):
            yield event
    yield final_event(record)


# POST /v1/jobs's links: the job's id reaches the routes that take it (clients and the fuzz test follow them).
JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
    for name, operation in (("GetJob", "get_job"), ("JobEvents", "get_job_events"), ("CancelJob", "cancel_job"))
}
EVENTS = "`progress` events while the job runs, then one `result` or `error` (at once for a finished job)"
UNKNOWN_JOB: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "no such job: unknown, or expired"}
}


class EventStreamResponse(StreamingResponse):
    media_type = EVENT_STREAM  # for the document: the route sends server-sent events, not JSON


def build_jobs_router(limits: Limits) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
    if TYPE_CHECKING:  # the model is built per Limits at runtime: the type checker reads what routes use of it
        from app.api.schemas import GenerateBody as GenerateRequest
    else:
        GenerateRequest = build_generate_request(limits)

    @router.post(
        "",
        status_code=202,
        operation_id="create_job",
        responses={
            202: {"model": JobResponse, "description": "the job, queued; Location: /v1/jobs/{id}", "links": JOB_LINKS},
            422: {
                "model": ValidationErrorBody,
                "description": "a body /generate would reject, or an Idempotency-Key reused with another body",
            },
            503: {
                "model": RequestError,
                "description": "the job store is full of unfinished jobs, the queue is full, or the service is "
                "starting or draining (with Retry-After)",
            },
            **refusals(),
        },
        dependencies=[Depends(json_body), Depends(produces(JSON))],
        summary="Submit a generation job (the /generate body); returns at once",
    )
    async def create_job(
        body: GenerateRequest,
        service: ServiceDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        arrived = time.monotonic()
        request_body = body.model_dump(mode="json")
        if idempotency_key is not None and (known := service.jobs.by_key(idempotency_key)) is not None:
            if known.body != request_body:
                msg = "Idempotency-Key was already used with a different body: use a new key for a new request"
                error = {"loc": ["header", "Idempotency-Key"], "msg": msg, "type": "idempotency_key_reused"}
                return JSONResponse({"detail": [error]}, status_code=422)
            return created(service, known, replayed=True)
        if (refused := refusal(service)) is not None:  # starting or draining
            service.metrics.jobs.labels(outcome="rejected", model=body.model).inc()
            return refused.response()
        try:
            service.jobs.reserve()
            # Jobs wait in the engine's queue beyond CFG_MAX_QUEUE: the store's max_jobs bounds them.
            job = service.model(body.model).engine.submit(to_spec(body), limit_queue=False)
        except (StoreFullError, EngineClosedError) as exc:
            service.metrics.jobs.labels(outcome="rejected", model=body.model).inc()
            return ApiError(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)}).response()
        record = JobRecord(
            id=service.jobs.new_id(),
            spec=job.spec,
            job=job,
            body=request_body,
            arrived=arrived,
            created_at=time.time(),
            idempotency_key=idempotency_key,
        )
        service.jobs.add(record)
        service.job_tasks.add(task := asyncio.create_task(follow(service, record), name=f"job-{record.id}"))
        task.add_done_callback(service.job_tasks.discard)
        return created(service, record)

    def created(service: Service, record: JobRecord, replayed: bool = False) -> JSONResponse:
        headers = {"Location": f"/v1/jobs/{record.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job_body(service, record), status_code=202, headers=headers)

    @router.get(
        "/{job_id}",
        operation_id="get_job",
        responses={200: {"model": JobResponse}, **UNKNOWN_JOB, **refusals(body=False)},
        dependencies=[Depends(produces(JSON))],
        summary="A job's status, progress, and its result once it has succeeded",
    )
    async def get_job(job_id: str, service: ServiceDep) -> Response:
        record = service.jobs.get(job_id)
        return not_found(job_id) if record is None else JSONResponse(job_body(service, record))

    @router.get(
        "/{job_id}/events",
        operation_id="get_job_events",
        response_class=EventStreamResponse,
        responses=json_errors(404, 406, 413, described={404: UNKNOWN_JOB[404]["description"]}),
        openapi_extra={"responses": {"200": {"description": EVENTS, "content": event_stream_content()}}},
        dependencies=[Depends(produces(EVENT_STREAM))],
        summary="Server-sent `progress` events, then one `result` or `error`",
    )
    async def get_job_events(job_id: str, service: ServiceDep) -> Response:
        record = service.jobs.get(job_id)
        if record is None:
            return not_found(job_id)
        return StreamingResponse(job_events(service, record), media_type="text/event-stream", headers=STREAM_HEADERS)

    @router.delete(
        "/{job_id}",
        operation_id="cancel_job",
        responses={
            200: {"model": JobResponse, "description": "the job, cancelled"},
            409: {"model": JobConflict, "description": "the job has already finished: succeeded, failed or cancelled"},
            **UNKNOWN_JOB,
            **refusals(body=False),
        },
        dependencies=[Depends(produces(JSON))],
        summary="Cancel a job: its rows leave the batch at the next tick",
    )
    async def cancel_job(job_id: str, service: ServiceDep) -> Response:
        record = service.jobs.get(job_id)
        if record is None:
            return not_found(job_id)
        if record.finished:
            detail = f"job {job_id} has already finished: {record.status}"
            return JSONResponse({"detail": detail, "status": record.status}, status_code=409)
        service.model(record.job.model).engine.cancel(record.job)
        record.finish("cancelled", error=CANCELLED.event())
        return JSONResponse(job_body(service, record))

    return router
