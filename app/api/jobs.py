"""Asynchronous jobs: submit now, follow the progress, fetch or cancel later.

POST /v1/jobs takes the /generate body and answers 202 with the job at once; the engine runs it as it
runs /generate's. A task per job waits for the engine and stores the result (the /generate JSON) or
the error in the job (app/api/job_store.py), where GET /v1/jobs/{id} finds it until it expires.

In memory (the default) the replica that takes the POST runs the job. A store that queues jobs (Redis) only
adds it there: a replica whose engine has room takes it from the shared backlog and runs it (`EngineRunner`).
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.clients import ClientDep
from app.api.convert import to_spec
from app.api.encoding import preview_body, progress_body, result_body
from app.api.errors import ApiError, bounded_text
from app.api.job_store import Job, StoreFullError, StoreUnavailableError, new_job_id
from app.api.media import EVENT_STREAM, JSON, json_body, produces
from app.api.methods import served_method_error, with_default_cache
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
from app.api.schemas import Limits, build_generate_request
from app.api.service import Service, ServiceDep
from app.api.sse import KEEPALIVE, KEEPALIVE_S, STREAM_HEADERS, sse
from app.api.waiting import failure, refusal
from app.engine import EngineClosedError, Finished, Progress

IdempotencyKey = Annotated[
    str | None,
    Header(max_length=255, description="a retried POST with the same key and body returns the same job"),
]


CANCELLED = ApiError(499, "the job was cancelled", "cancelled")


def job_body(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "step": job.step,
        "steps": job.spec.steps,
        "queue_position": None if job.finished else job.queue_position,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "preview": None if job.preview is None or job.finished else preview_body(job.preview),
        "result": job.result,
        "error": job.error,
    }


async def follow(service: Service, job: Job) -> None:
    """Read the job's engine request to its end: its progress into the job, then its result, or why it has none."""
    client = service.model(job.model).client
    async for output in client.stream(job.request_id):
        if job.handed_on:
            return  # another replica runs it now
        if isinstance(output, Progress):
            job.update(output)
        elif isinstance(output, Finished):
            job.finish("succeeded", result=result_body(service, job.model, job.spec, output, job.arrived))
        elif output.kind == "cancelled":
            job.finish("cancelled", error=CANCELLED.event())
        elif output.kind == "closed" and await release(service, job):
            return  # the drain ran out of time: another replica runs it
        else:
            job.finish("failed", error=failure(output, service.retry_after_s).event())
        await service.jobs.saved(job)
    service.metrics.jobs.labels(outcome=job.outcome, model=job.model).inc()


async def release(service: Service, job: Job) -> bool:
    try:
        return await service.jobs.release(job)
    except StoreUnavailableError:
        return False  # the job fails here: the store keeps that end once it is back (saved retries it)


def keep_following(service: Service, job: Job) -> None:
    service.job_tasks.add(task := asyncio.create_task(follow(service, job), name=f"job-{job.id}"))
    task.add_done_callback(service.job_tasks.discard)


class EngineRunner:
    """The jobs a shared backlog hands this replica, run on its engines (a JobRunner)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def room(self) -> list[str]:
        """The models whose engine has rows free by its row budget (Engine.free_rows), while ready."""
        if not self.service.ready:
            return []
        return [name for name, served in self.service.models.items() if served.client.free_rows > 0]

    def run(self, job: Job) -> None:
        client = self.service.model(job.model).client
        priority = job.body.get("priority") or "batch"  # a job is batch work unless its body says otherwise
        request_id = client.add(job.spec, progress=True, limit_queue=False, priority=priority, client=job.client)
        job.request_id = request_id
        job.abort = lambda: client.abort(request_id)
        keep_following(self.service, job)


def not_found(job_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"no job {bounded_text(job_id)!r}: unknown, or expired"}, status_code=404)


def store_unavailable(service: Service, exc: StoreUnavailableError) -> Response:
    return ApiError(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)}).response()


def final_event(job: Job) -> str:
    if job.result is not None:
        return sse("result", job.result)
    return sse("error", job.error or {})


class ProgressCursor:
    """What one event stream has sent of a job: the next event carries only what is new."""

    def __init__(self) -> None:
        self.last: tuple[int, int | None, bool, int] | None = None
        self.traced = 0
        self.previewed: int | None = None

    def event(self, job: Job) -> str | None:
        """A `progress` event if the job's step, place in the queue or preemption changed since the last; else
        None. A preemption and its resumption both between two reads (the stream woke late) are told as the two
        events they were, so a client counting them misses none."""
        now = (job.step, job.queue_position, job.preempted, job.preemptions)
        if now == self.last:
            return None
        changes: list[str | None] = [None]
        if self.last is not None:
            was, missed = self.last[2], job.preemptions - self.last[3] - (job.preempted and not self.last[2])
            changes = ["preempted", "resumed"] * missed if not was else ["resumed", "preempted"] * missed
            if was != job.preempted:
                changes.append("preempted" if job.preempted else "resumed")
            changes = changes or [None]
        self.last = now
        trace = None
        if job.spec.return_trace:
            trace, self.traced = job.trace[self.traced :], len(job.trace)
        preview = job.preview
        if preview is not None and preview.step != self.previewed:
            self.previewed = preview.step
        else:
            preview = None
        queued = job.queue_wait_s is None
        events = []
        for i, change in enumerate(changes):
            last = i == len(changes) - 1  # the job's state now; the ones before it, the states it passed
            preempted = job.preempted if last else change == "preempted"
            body = progress_body(
                job.step,
                job.spec.steps,
                job.queue_position,
                queued and last,
                trace if last else None,
                preview if last else None,
                preempted,
                change,
            )
            events.append(sse("progress", body))
        return "".join(events)


async def job_events(job: Job) -> AsyncIterator[str]:
    """`progress` events while the job runs, then one `result` or `error` (outcome `cancelled` if cancelled)."""
    if not job.finished:
        cursor = ProgressCursor()
        sent = time.monotonic()
        while not job.finished:
            if (event := cursor.event(job)) is not None:
                yield event
                sent = time.monotonic()
            elif time.monotonic() - sent >= KEEPALIVE_S:
                yield KEEPALIVE
                sent = time.monotonic()
            await asyncio.wait({job.changed()}, timeout=KEEPALIVE_S)
        if job.outcome == "succeeded" and (event := cursor.event(job)) is not None:
            yield event  # its last step, read with its result
    yield final_event(job)


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
                "description": "a body /generate would reject, a timeout_s (for /generate only), or an "
                "Idempotency-Key reused with another body",
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
        client_name: ClientDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        arrived = time.monotonic()
        if body.timeout_s is not None:
            msg = "timeout_s applies to /generate and /v1/images/generations: a job runs until done or cancelled"
            error = {"loc": ["body", "timeout_s"], "msg": msg, "type": "not_for_jobs", "input": body.timeout_s}
            return JSONResponse({"detail": [error]}, status_code=422)
        body = with_default_cache(service, body)  # stored resolved: a replica that takes the job over draws the same
        request_body = body.model_dump(mode="json")
        try:
            if idempotency_key is not None and (known := await service.jobs.by_key(idempotency_key)) is not None:
                return replay(known, request_body)
        except StoreUnavailableError as exc:
            service.metrics.jobs.labels(outcome="rejected", model=body.model).inc()
            return store_unavailable(service, exc)
        if (refused := refusal(service)) is not None:  # starting or draining
            service.metrics.jobs.labels(outcome="rejected", model=body.model).inc()
            return refused.response()
        if (unrunnable := served_method_error(service, body)) is not None:
            raise RequestValidationError([unrunnable])  # the schema's 422: this model cannot run the method as asked
        client = service.model(body.model).client
        spec = to_spec(body)

        def new_job(request_id: str = "", **running: Any) -> Job:
            return Job(
                id=new_job_id(),
                spec=spec,
                model=client.name,
                request_id=request_id,  # none until a replica takes it, on a store that queues jobs
                body=request_body,
                arrived=arrived,
                created_at=time.time(),
                idempotency_key=idempotency_key,
                client=client_name,
                **running,
            )

        if service.jobs.queues:
            return await add_to_backlog(service, new_job())
        try:
            await service.jobs.reserve()
            # Jobs wait in the engine's queue beyond CFG_MAX_QUEUE: the store's max_jobs bounds them.
            # A job is batch work unless its body says otherwise (docs/api.md).
            request_id = client.add(
                spec, progress=True, limit_queue=False, priority=body.priority or "batch", client=client_name
            )
        except (StoreFullError, StoreUnavailableError, EngineClosedError) as exc:
            return rejected(service, body.model, exc)
        job = new_job(
            request_id,
            queue_position=client.queue_depth,  # its place once the engine takes it, unless it is admitted at once
            abort=lambda: client.abort(request_id),
        )
        try:
            stored = await service.jobs.add(job)
        except (StoreFullError, StoreUnavailableError) as exc:
            client.abort(request_id)
            return rejected(service, body.model, exc)
        if stored is not job:  # another replica took this Idempotency-Key meanwhile
            client.abort(request_id)
            return replay(stored, request_body)
        keep_following(service, job)
        return created(job)

    async def add_to_backlog(service: Service, job: Job) -> Response:
        """A store that queues jobs: the job is stored, and a replica with room takes it."""
        try:
            stored = await service.jobs.add(job)
        except (StoreFullError, StoreUnavailableError) as exc:
            return rejected(service, job.model, exc)
        if stored is not job:  # another replica took this Idempotency-Key meanwhile
            return replay(stored, job.body)
        return created(job)

    def rejected(service: Service, model: str, exc: Exception) -> Response:
        """503 with Retry-After: the store is full or unreachable, or the engine is closed."""
        service.metrics.jobs.labels(outcome="rejected", model=model).inc()
        return ApiError(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)}).response()

    def replay(known: Job, request_body: dict[str, Any]) -> JSONResponse:
        if known.body != request_body:
            msg = "Idempotency-Key was already used with a different body: use a new key for a new request"
            error = {"loc": ["header", "Idempotency-Key"], "msg": msg, "type": "idempotency_key_reused"}
            return JSONResponse({"detail": [error]}, status_code=422)
        return created(known, replayed=True)

    def created(job: Job, replayed: bool = False) -> JSONResponse:
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job_body(job), status_code=202, headers=headers)

    @router.get(
        "/{job_id}",
        operation_id="get_job",
        responses={200: {"model": JobResponse}, **UNKNOWN_JOB, **refusals(body=False)},
        dependencies=[Depends(produces(JSON))],
        summary="A job's status, progress, and its result once it has succeeded",
    )
    async def get_job(job_id: str, service: ServiceDep) -> Response:
        try:
            job = await service.jobs.get(job_id)
        except StoreUnavailableError as exc:
            return store_unavailable(service, exc)
        return not_found(job_id) if job is None else JSONResponse(job_body(job))

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
        try:
            job = await service.jobs.get(job_id)
        except StoreUnavailableError as exc:
            return store_unavailable(service, exc)
        if job is None:
            return not_found(job_id)

        async def stream(job: Job) -> AsyncIterator[str]:
            async with service.jobs.watch(job) as watched:
                async for event in job_events(watched):
                    yield event

        return StreamingResponse(stream(job), media_type="text/event-stream", headers=STREAM_HEADERS)

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
        try:
            job = await service.jobs.get(job_id)
            if job is None:
                return not_found(job_id)
            if not job.finished and await service.jobs.cancel(job, CANCELLED.event()):
                return JSONResponse(job_body(job))
            job = await service.jobs.get(job_id) or job  # it finished meanwhile: as it ended
        except StoreUnavailableError as exc:
            return store_unavailable(service, exc)
        detail = f"job {job_id} has already finished: {job.status}"
        return JSONResponse({"detail": detail, "status": job.status}, status_code=409)

    return router
