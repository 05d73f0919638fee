"""Server-sent events: /generate's stream of `progress` events, then one `result` or `error`."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.api.encoding import progress_body, result_body
from app.api.errors import ApiError
from app.api.media import EVENT_STREAM
from app.api.service import Service
from app.api.waiting import await_result
from app.engine import Progress
from app.sampling import SampleSpec

# A stream quiet this long gets an SSE comment, so that no proxy's read timeout closes it (a long queue).
KEEPALIVE_S = 15.0
KEEPALIVE = ": keepalive\n\n"
# nginx passes each write of a response with this header on at once, whatever its location's buffering.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def progress_event(progress: Progress, spec: SampleSpec) -> str:
    trace = list(progress.trace) if spec.return_trace else None
    body = progress_body(
        progress.step,
        progress.steps,
        progress.queue_position,
        progress.queued,
        trace,
        progress.preview,
        progress.preempted,
        progress.event,
    )
    return sse("progress", body)


async def open_event_stream(
    service: Service,
    model: str,
    request_id: str,
    request: Request,
    spec: SampleSpec,
    arrived: float,
    timeout_s: float | None = None,
) -> Response:
    """The /generate response with Accept: text/event-stream: `progress` as the request's place in the queue
    changes and its steps advance, then one `result` or `error`; a comment every KEEPALIVE_S while nothing happens.

    With a timeout_s, the stream opens only once the engine has taken the request (its first event, within a
    tick): a deadline it refuses is a 503 with Retry-After, like the JSON response's, not a 200 whose only event
    is an error."""
    events: asyncio.Queue[str] = asyncio.Queue()
    heard = asyncio.Event()

    def on_progress(progress: Progress) -> None:
        events.put_nowait(progress_event(progress, spec))
        heard.set()

    waiter = asyncio.ensure_future(await_result(service, model, request_id, request, arrived, on_progress, timeout_s))
    if timeout_s is not None:
        first = asyncio.ensure_future(heard.wait())
        try:
            await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
            if not waiter.done() and not heard.is_set():  # this handler was cancelled: so is the request
                waiter.cancel()
        if not heard.is_set() and isinstance(error := waiter.exception(), ApiError):  # ended before any event
            return error.response()
    stream = stream_events(service, model, spec, arrived, events, waiter)
    return StreamingResponse(stream, media_type=EVENT_STREAM, headers=STREAM_HEADERS)


async def stream_events(
    service: Service,
    model: str,
    spec: SampleSpec,
    arrived: float,
    events: asyncio.Queue[str],
    waiter: asyncio.Future,
) -> AsyncIterator[str]:
    """The events as they come, then the result or error, from the request's waiter."""
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, waiter}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            if waiter in done:
                break
            yield KEEPALIVE
        while not events.empty():  # put before the end, their getter not run yet
            yield events.get_nowait()
        try:
            yield sse("result", result_body(service, model, spec, waiter.result(), arrived))
        except ApiError as exc:
            yield sse("error", exc.event())
    finally:
        waiter.cancel()
