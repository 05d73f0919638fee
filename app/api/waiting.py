"""Hand a request to its model's engine client and wait for its end, watching the deadline and the client's
connection; every ending is mapped to an outcome (counted in cfg_requests_total) and, unless it is images, to
an ApiError."""

import asyncio
import math
import time
from collections.abc import Callable

from fastapi import Request

from app.api.errors import ApiError
from app.api.service import Service
from app.engine import ANONYMOUS, EngineClosedError, Failed, Finished, Progress
from app.sampling import SampleSpec


class ClientGoneError(Exception):
    pass


def refusal(service: Service) -> ApiError | None:
    """The 503 (with Retry-After) for new work while the service is starting or draining; None once ready."""
    reason = service.refusal()
    if reason is None:
        return None
    return ApiError(503, reason, "rejected", {"Retry-After": str(service.retry_after_s)})


def submit(
    service: Service,
    model: str,
    spec: SampleSpec,
    arrived: float,
    *,
    progress: bool = False,
    priority: str | None = None,
    client: str = ANONYMOUS,
    timeout_s: float | None = None,
) -> str:
    """The request's id at its model's engine; ApiError (503, counted as rejected) where it is refused now.
    priority: the body's, where it set one; else interactive (these are the synchronous endpoints). client: whose
    fair share it takes (app/api/clients.py). timeout_s: the body's; the engine refuses at once what cannot meet it."""
    if (refused := refusal(service)) is not None:
        service.metrics.observe_request("rejected", time.monotonic() - arrived, model)
        raise refused
    try:
        return service.model(model).client.add(
            spec, progress=progress, priority=priority or "interactive", client=client, timeout_s=timeout_s
        )
    except EngineClosedError as exc:
        service.metrics.observe_request("rejected", time.monotonic() - arrived, model)
        raise ApiError(503, str(exc), "rejected", {"Retry-After": str(service.retry_after_s)}) from exc


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the ASGI server's `http.disconnect` message).

    The body has been read by then, so the next message is the disconnect: an event, not a poll, so a
    waiting request costs the event loop nothing while the forward uses the CPU."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def failure(failed: Failed, retry_after_s: int) -> ApiError:
    """The error of a request that the engine ended without images."""
    if failed.kind == "non_finite":
        return ApiError(500, f"sampling failed: {failed.message}; no image was produced", "error")
    if failed.kind == "rejected":  # the queue was full: another replica, or later
        return ApiError(503, failed.message, "rejected", {"Retry-After": str(retry_after_s)})
    if failed.kind == "deadline":  # the work ahead leaves no time: about when it will have started
        later = math.ceil(failed.retry_after_s or retry_after_s)
        return ApiError(503, failed.message, "rejected", {"Retry-After": str(later)})
    if failed.kind == "closed":  # still unfinished when a drain ran out of time: try another replica
        return ApiError(503, failed.message, "error")
    if failed.kind == "cancelled":
        return ApiError(499, failed.message, "cancelled")
    if failed.kind == "invalid":
        return ApiError(422, failed.message, "invalid")
    return ApiError(500, f"generation failed: {failed.message}", "error")


async def await_result(
    service: Service,
    model: str,
    request_id: str,
    request: Request,
    arrived: float,
    on_progress: Callable[[Progress], None] | None = None,
    timeout_s: float | None = None,
) -> Finished:
    """Read the request's stream to its end (each Progress to on_progress), watching the deadline (timeout_s, else
    CFG_REQUEST_TIMEOUT_S) and the client; map every ending to an outcome."""
    client = service.model(model).client
    timeout_s = timeout_s or service.request_timeout_s
    deadline = arrived + timeout_s

    def observe(outcome: str) -> None:
        service.metrics.observe_request(outcome, time.monotonic() - arrived, model)

    async def final() -> Finished | Failed:
        async for output in client.stream(request_id):
            if not isinstance(output, Progress):
                return output
            if on_progress is not None:
                on_progress(output)
        raise AssertionError("a stream ends with its request's result")  # pragma: no cover

    ended = asyncio.ensure_future(final())
    gone = asyncio.ensure_future(client_gone(request))
    try:
        done, _ = await asyncio.wait({ended, gone}, timeout=deadline - time.monotonic(),
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if ended in done:
            output = ended.result()
            if isinstance(output, Finished):
                observe("ok")
                return output
            error = failure(output, service.retry_after_s)
            observe(error.outcome)
            if output.kind == "deadline":
                service.metrics.deadline_refusals.labels(model=model).inc()
            raise error
        if gone in done:
            raise ClientGoneError
        raise TimeoutError
    except TimeoutError:
        client.abort(request_id)
        observe("timeout")
        raise ApiError(504, f"generation exceeded the {timeout_s:g} s timeout", "timeout") from None
    except (ClientGoneError, asyncio.CancelledError) as exc:
        client.abort(request_id)
        observe("cancelled")
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(499, "client disconnected", "cancelled") from None
    finally:
        gone.cancel()
        ended.cancel()
