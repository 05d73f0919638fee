"""Server-sent events: /generate's stream of `progress` events, then one `result` or `error`."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from app.api.encoding import progress_body, result_body
from app.api.errors import ApiError
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


async def generate_events(
    service: Service,
    model: str,
    request_id: str,
    request: Request,
    spec: SampleSpec,
    arrived: float,
    timeout_s: float | None = None,
) -> AsyncIterator[str]:
    """`progress` as the request's place in the queue changes and its steps advance, then one `result` or
    `error`; a comment every KEEPALIVE_S while nothing happens."""
    events: asyncio.Queue[str] = asyncio.Queue()

    def on_progress(progress: Progress) -> None:
        events.put_nowait(progress_event(progress, spec))

    waiter = asyncio.ensure_future(await_result(service, model, request_id, request, arrived, on_progress, timeout_s))
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
