"""The asynchronous jobs, and where they are kept: `JobBackend` is what the routes use; `MemoryJobs` (over
`JobStore`, below) keeps them in this process (CFG_JOB_STORE=memory, the default), `RedisJobs`
(app/api/redis_jobs.py) on a Redis server every replica shares.

In memory, bounded:

At most `max_jobs` jobs are kept. A finished job stays for `ttl_s` after it finished; when a new
job needs room, the job that finished first goes first. Unfinished jobs are never dropped: when every
job is unfinished the store is full and a new job is refused. So memory is bounded by max_jobs
jobs, each holding at most one result. A restart loses them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.engine import ANONYMOUS, Progress, TraceRow
from app.sampling import Preview, SampleSpec

Status = Literal["queued", "running", "preempted", "succeeded", "failed", "cancelled"]


@dataclass(eq=False)
class Job:
    """One /v1/jobs job: its engine request's progress while it runs (from the request's stream), then its result
    (the /generate body) or its error."""

    id: str
    spec: SampleSpec
    model: str
    request_id: str  # the engine's request
    body: dict[str, Any]  # the validated request, for Idempotency-Key replays
    arrived: float  # time.monotonic() at submit
    created_at: float  # time.time() at submit
    idempotency_key: str | None = None
    client: str = ANONYMOUS  # whose fair share of its class's rows it takes (app/api/clients.py)
    queue_position: int | None = None  # while queued: 1 for the next to be admitted
    queue_wait_s: float | None = None  # once admitted: how long it waited
    preempted: bool = False  # out of the batch for interactive work, its state kept, queued again
    preemptions: int = 0  # times it has been preempted: an event stream that read it late still tells each one
    step: int = 0  # steps taken; once finished, the step it had then
    trace: list[TraceRow] = field(default_factory=list, repr=False)  # with return_trace: the rows so far
    preview: Preview | None = field(default=None, repr=False)  # the newest preview
    outcome: Status | None = None  # set once finished
    finished_at: float | None = None  # time.time()
    finished_mono: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    abort: Callable[[], None] | None = field(default=None, repr=False)  # stops its engine request, where it runs here
    # Another replica runs it now (it was taken over), or it went back to the shared backlog: this replica's run of
    # it is not the job's, and its outputs are dropped.
    handed_on: bool = False
    _watchers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _changed: asyncio.Future | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def status(self) -> Status:
        if self.outcome is not None:
            return self.outcome
        if self.preempted:
            return "preempted"
        return "queued" if self.queue_wait_s is None else "running"

    @property
    def started_at(self) -> float | None:
        """Wall-clock time of admission into the batch."""
        return None if self.queue_wait_s is None else self.created_at + self.queue_wait_s

    def update(self, progress: Progress) -> None:
        """The engine's progress. Ignored once finished: a cancelled job keeps the step DELETE answered with (a
        tick under way when it was cancelled still stepped it; that step is not the job's)."""
        if self.finished:
            return
        self.step = min(progress.step, progress.steps)
        self.queue_position, self.queue_wait_s = progress.queue_position, progress.queue_wait_s
        self.preemptions += progress.preempted and not self.preempted
        self.preempted = progress.preempted
        self.trace.extend(progress.trace)
        if progress.preview is not None:
            self.preview = progress.preview
        self._notify_change()

    def changed(self) -> asyncio.Future:
        """A future resolved at the job's next update or when it finishes (an event stream's wake-up)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _notify_change(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def on_finish(self, notify: Callable[[], None]) -> None:
        """Call notify once the job finishes (at once if it has)."""
        if self.finished:
            notify()
        else:
            self._watchers.append(notify)

    def finish(self, outcome: Status, *, result: dict | None = None, error: dict | None = None) -> None:
        if self.finished:
            return
        self.outcome, self.result, self.error = outcome, result, error
        self.finished_at, self.finished_mono = time.time(), time.monotonic()
        watchers, self._watchers = self._watchers, []
        for notify in watchers:
            notify()
        self._notify_change()


def new_job_id() -> str:
    return secrets.token_hex(16)


class StoreFullError(RuntimeError):
    """Every stored job is unfinished."""


class StoreUnavailableError(RuntimeError):
    """The job store can't be reached now (the message names it)."""


class JobStore:
    def __init__(self, max_jobs: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished ids, first finished first
        self._by_key: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def unfinished(self) -> int:
        return len(self._jobs) - len(self._finished)

    @staticmethod
    def new_id() -> str:
        return new_job_id()

    def get(self, job_id: str) -> Job | None:
        self.expire()
        return self._jobs.get(job_id)

    def by_key(self, key: str) -> Job | None:
        self.expire()
        job_id = self._by_key.get(key)
        return None if job_id is None else self._jobs.get(job_id)

    def reserve(self) -> None:
        """Make room for one more job: drop expired jobs, then the first finished; StoreFullError if none."""
        self.expire()
        while len(self._jobs) >= self.max_jobs and self._finished:
            self._drop(next(iter(self._finished)))
        if len(self._jobs) >= self.max_jobs:
            raise StoreFullError(f"{self.unfinished} unfinished jobs: the store holds at most {self.max_jobs}")

    def add(self, job: Job) -> None:
        self.reserve()
        self._jobs[job.id] = job
        if job.idempotency_key is not None:
            self._by_key[job.idempotency_key] = job.id
        job.on_finish(lambda: self._finished.__setitem__(job.id, None))

    def expire(self) -> None:
        """Drop the jobs that finished more than ttl_s ago."""
        deadline = self._clock() - self.ttl_s
        while self._finished:
            oldest = self._jobs[next(iter(self._finished))]
            if oldest.finished_mono is None or oldest.finished_mono > deadline:
                break
            self._drop(oldest.id)

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        self._finished.pop(job_id, None)
        if job.idempotency_key is not None and self._by_key.get(job.idempotency_key) == job_id:
            del self._by_key[job.idempotency_key]


class JobRunner(Protocol):
    """What a store that queues jobs runs them on: this replica's engines (app/api/jobs.py's EngineRunner)."""

    def room(self) -> list[str]:
        """The models whose engine has room for a job now (none while the replica is not ready)."""
        ...

    def run(self, job: Job) -> None:
        """Give the job to its model's engine, and store its progress and end as it runs; EngineClosedError
        where the engine takes nothing now."""
        ...


class JobBackend(Protocol):
    """Where the jobs are kept, as the routes use it. A job submitted here is `add`ed, then `saved` after each
    change its engine request makes; `get` and `by_key` find any job in the store, wherever it runs."""

    name: str  # the store, for messages and /readyz: "memory", or the Redis URL without its password
    # Whether it queues the jobs itself: POST /v1/jobs only adds a job, and a replica with room takes it (`take`);
    # else the replica that takes the POST runs the job.
    queues: bool

    async def reserve(self) -> None:
        """Room for one more job now; StoreFullError, or StoreUnavailableError."""

    async def add(self, job: Job) -> Job:
        """Store a new job; the job its Idempotency-Key already names where another request took the key first."""

    async def saved(self, job: Job) -> None:
        """The job (one running here) changed: its progress, or its end."""

    async def get(self, job_id: str) -> Job | None: ...

    async def by_key(self, key: str) -> Job | None: ...

    async def cancel(self, job: Job, error: dict[str, Any]) -> bool:
        """Cancel the job wherever it runs; False if it had already finished."""

    async def release(self, job: Job) -> bool:
        """Hand a job whose engine stopped before it finished to another replica; False where it can't be."""

    def take(self, runner: JobRunner, models: list[str], on_taken_over: Callable[[], None]) -> None:
        """Where the store queues jobs: take these models' jobs while the runner has room, from now on."""

    def watch(self, job: Job) -> contextlib.AbstractAsyncContextManager[Job]:
        """The job, kept up to date while the context is open (an event stream follows it)."""

    async def check(self) -> str | None:
        """Why the store can't be used now, or None."""

    def counts(self) -> tuple[int, int]:
        """(unfinished, finished) jobs, as last known."""

    def backlog(self) -> tuple[int, int]:
        """(waiting, taken): jobs in the shared backlog not taken yet, and taken and not finished, as last known."""

    async def close(self) -> None: ...


class MemoryJobs:
    """The jobs in this process's memory (a JobStore): a restart loses them, another replica doesn't see them."""

    name = "memory"
    queues = False  # a job runs on the replica that took its POST

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    async def reserve(self) -> None:
        self.store.reserve()

    async def add(self, job: Job) -> Job:
        self.store.add(job)
        return job

    async def saved(self, job: Job) -> None:
        pass

    async def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    async def by_key(self, key: str) -> Job | None:
        return self.store.by_key(key)

    async def cancel(self, job: Job, error: dict[str, Any]) -> bool:
        if job.finished:
            return False
        job.finish("cancelled", error=error)
        if job.abort is not None:
            job.abort()
        return True

    async def release(self, job: Job) -> bool:
        return False

    def take(self, runner: JobRunner, models: list[str], on_taken_over: Callable[[], None]) -> None:
        pass

    @contextlib.asynccontextmanager
    async def watch(self, job: Job) -> AsyncIterator[Job]:
        yield job

    async def check(self) -> str | None:
        return None

    def counts(self) -> tuple[int, int]:
        return self.store.unfinished, len(self.store) - self.store.unfinished

    def backlog(self) -> tuple[int, int]:
        return 0, 0  # no shared backlog: a job waits in its engine's queue (cfg_queue_depth)

    async def close(self) -> None:
        pass
