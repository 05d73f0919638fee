"""The asynchronous jobs' records, in memory and bounded.

At most `max_jobs` records are kept. A finished job stays for `ttl_s` after it finished; when a new
job needs room, the job that finished first goes first. Unfinished jobs are never dropped: when every
record is unfinished the store is full and a new job is refused. So memory is bounded by max_jobs
records, each holding at most one result. A restart loses them all.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from app.engine import Job
from app.sampling import SampleSpec

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@dataclass(eq=False)
class JobRecord:
    """One job: the engine's Job while it runs, then its result (the /generate body) or its error."""

    id: str
    spec: SampleSpec
    job: Job
    body: dict[str, Any]  # the validated request, for Idempotency-Key replays
    arrived: float  # time.monotonic() at submit
    created_at: float  # time.time() at submit
    idempotency_key: str | None = None
    outcome: Status | None = None  # set once finished
    finished_at: float | None = None  # time.time()
    finished_mono: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    final_step: int | None = None  # the step reached when it finished
    _watchers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def status(self) -> Status:
        if self.outcome is not None:
            return self.outcome
        return "queued" if self.job.queued else "running"

    @property
    def step(self) -> int:
        """Steps taken: the engine's count while the job runs; once it has finished, the count it had then. A
        cancelled job's rows leave the batch at the next tick, and a tick already under way when it was
        cancelled still steps it: that step is not the job's."""
        if self.final_step is not None:
            return self.final_step
        step, steps = self.job.progress
        return min(step, steps)

    @property
    def started_at(self) -> float | None:
        """Wall-clock time of admission into the batch, from the engine's monotonic stamps."""
        if self.job.started_at is None:
            return None
        return self.created_at + (self.job.started_at - self.job.enqueued_at)

    def on_finish(self, notify: Callable[[], None]) -> None:
        """Call notify once the job finishes (at once if it has)."""
        if self.finished:
            notify()
        else:
            self._watchers.append(notify)

    def finish(self, outcome: Status, *, result: dict | None = None, error: dict | None = None) -> None:
        if self.finished:
            return
        self.final_step = self.step
        self.outcome, self.result, self.error = outcome, result, error
        self.finished_at, self.finished_mono = time.time(), time.monotonic()
        watchers, self._watchers = self._watchers, []
        for notify in watchers:
            notify()


class StoreFullError(RuntimeError):
    """Every stored job is unfinished."""


class JobStore:
    def __init__(self, max_jobs: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._clock = clock
        self._jobs: dict[str, JobRecord] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished ids, first finished first
        self._by_key: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def unfinished(self) -> int:
        return len(self._jobs) - len(self._finished)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def get(self, job_id: str) -> JobRecord | None:
        self.expire()
        return self._jobs.get(job_id)

    def by_key(self, key: str) -> JobRecord | None:
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

    def add(self, record: JobRecord) -> None:
        self.reserve()
        self._jobs[record.id] = record
        if record.idempotency_key is not None:
            self._by_key[record.idempotency_key] = record.id
        record.on_finish(lambda: self._finished.__setitem__(record.id, None))

    def expire(self) -> None:
        """Drop the jobs that finished more than ttl_s ago."""
        deadline = self._clock() - self.ttl_s
        while self._finished:
            oldest = self._jobs[next(iter(self._finished))]
            if oldest.finished_mono is None or oldest.finished_mono > deadline:
                break
            self._drop(oldest.id)

    def _drop(self, job_id: str) -> None:
        record = self._jobs.pop(job_id)
        self._finished.pop(job_id, None)
        if record.idempotency_key is not None and self._by_key.get(record.idempotency_key) == job_id:
            del self._by_key[record.idempotency_key]
