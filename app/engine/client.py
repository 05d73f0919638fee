"""The one boundary between the API and the engine, as vLLM's between its API server and its engine core.

The API adds a request (`add`, which returns its id), may `abort` it, and reads its stream: `Progress` outputs
(when asked for), then one `Finished` or `Failed` (app/engine/outputs.py), all plain data built in the compute
thread. Health, readiness and the queue's depth are asked through the client too. `EngineClient` is the interface
the routes use; `InProcessClient` runs the engine in this process, on the compute thread; `ProcessClient`
(app/engine/process.py, CFG_ENGINE_PROCESS) talks to an engine in a process of its own over pipes, msgpack-encoded,
with no change to the routes. Both hand outputs to their requests' streams through `Streams`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from app.engine.engine import Engine
from app.engine.outputs import (
    CurvePoint,
    EngineOutputs,
    EngineStats,
    Failed,
    FailureKind,
    Finished,
    Progress,
    RequestOutput,
)
from app.engine.scheduler import ANONYMOUS
from app.sampling import SampleSpec

StatsHook = Callable[[EngineStats], None]
_ids = itertools.count()


class EngineClient(Protocol):
    name: str

    def add(
        self,
        spec: SampleSpec,
        *,
        progress: bool = False,
        limit_queue: bool = True,
        priority: str = "interactive",
        client: str = ANONYMOUS,
        timeout_s: float | None = None,
    ) -> str:
        """Queue a request and return its id; EngineClosedError while the engine is not accepting. progress: the
        stream carries Progress outputs; limit_queue=False: the caller bounds its own requests (the jobs API);
        priority: its class (app/engine/policy.py's PRIORITIES), interactive before batch; client: whose fair
        share of the class's rows it takes; timeout_s: its deadline from now, refused at once (Failed "deadline")
        where the engine's measured pace says the work ahead of it leaves no time to meet it."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop the request before the engine's next tick; its stream ends with Failed (cancelled) at once."""
        ...

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs: Progress (if asked for), then one Finished or Failed. One reader per request."""
        ...

    async def result(self, request_id: str) -> Finished | Failed: ...

    async def guidance_curve(self, spec: SampleSpec) -> list[CurvePoint]: ...

    def check_health(self) -> bool: ...

    @property
    def error(self) -> str | None: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def active_requests(self) -> int: ...

    @property
    def free_rows(self) -> int:
        """Rows of the row budget that no admitted or waiting request holds (0 while one sent is not taken yet)."""
        ...

    async def warmup(self, spec: SampleSpec) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self, drain: bool = True, timeout_s: float = math.inf) -> None: ...


class Streams:
    """The API side of every client: one queue per request, filled from the engine's outputs in the event loop
    (deliver), read by the request's one reader (stream, result)."""

    def __init__(self, on_stats: StatsHook | None) -> None:
        self._on_stats = on_stats
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}

    def open(self, request_id: str) -> None:
        self._streams[request_id] = asyncio.Queue()

    def close(self, request_id: str) -> None:
        del self._streams[request_id]

    def put(self, output: RequestOutput) -> None:
        queue = self._streams.get(output.request_id)
        if queue is not None:
            queue.put_nowait(output)

    def cancel(self, request_id: str) -> None:
        """Its reader reads this next and stops (the engine's own answer comes after it)."""
        self.put(Failed(request_id, "cancelled", "the request was cancelled"))

    def fail_all(self, kind: FailureKind, message: str) -> None:
        for request_id in list(self._streams):
            self.put(Failed(request_id, kind, message))

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        return self._read(request_id, self._streams[request_id])

    async def _read(self, request_id: str, queue: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                output = await queue.get()
                yield output
                if not isinstance(output, Progress):
                    return
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]

    async def result(self, request_id: str) -> Finished | Failed:
        async for output in self.stream(request_id):
            if not isinstance(output, Progress):
                return output
        raise AssertionError("a stream ends with its request's result")  # pragma: no cover

    def deliver(self, outputs: EngineOutputs) -> None:
        if self._on_stats is not None:
            for stats in outputs.stats:
                self._on_stats(stats)
        for output in outputs.outputs:
            self.put(output)


class InProcessClient:
    """The engine in this process: requests go to it as messages, and each tick's outputs come back from the
    compute thread in one call_soon_threadsafe, then go to their requests' streams and the stats hook."""

    def __init__(self, engine: Engine, on_stats: StatsHook | None = None) -> None:
        self.engine = engine  # for the lifespan and benchmarks; the routes use this client's interface only
        self.name = engine.name
        self._streams = Streams(on_stats)
        self._loop: asyncio.AbstractEventLoop | None = None
        engine.connect(self._receive)

    def add(
        self,
        spec: SampleSpec,
        *,
        progress: bool = False,
        limit_queue: bool = True,
        priority: str = "interactive",
        client: str = ANONYMOUS,
        timeout_s: float | None = None,
    ) -> str:
        self._loop = self._loop or asyncio.get_running_loop()
        request_id = f"{self.name}-{next(_ids)}"
        self._streams.open(request_id)  # before the engine can answer
        try:
            self.engine.add_request(
                request_id,
                spec,
                progress=progress,
                limit_queue=limit_queue,
                priority=priority,
                client=client,
                timeout_s=timeout_s,
            )
        except BaseException:
            self._streams.close(request_id)
            raise
        return request_id

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._streams.cancel(request_id)

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        return self._streams.stream(request_id)

    async def result(self, request_id: str) -> Finished | Failed:
        return await self._streams.result(request_id)

    def _receive(self, outputs: EngineOutputs) -> None:
        """In the compute thread: one hop to the event loop per tick."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._streams.deliver, outputs)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    async def guidance_curve(self, spec: SampleSpec) -> list[CurvePoint]:
        return await self.engine.guidance_curve(spec)

    def check_health(self) -> bool:
        return self.engine.check_health()

    @property
    def error(self) -> str | None:
        return self.engine.error

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    @property
    def active_requests(self) -> int:
        return self.engine.active_requests

    @property
    def free_rows(self) -> int:
        return self.engine.free_rows

    async def warmup(self, spec: SampleSpec) -> None:
        await self.engine.warmup(spec)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.engine.start()

    async def shutdown(self, drain: bool = True, timeout_s: float = math.inf) -> None:
        await self.engine.stop(drain=drain, timeout_s=timeout_s)
