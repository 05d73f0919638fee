"""Admission by rows per tick: which requests wait, which run, and the rows of every tick to come.

A request's rows at each of its steps are known when it arrives: two per image where its guidance weight is not
exactly 1, one where it is (the unconditional pass is skipped), one for an unconditional request. Every admitted
request takes one step per tick, so the rows of the ticks to come are the sum of the admitted requests' remaining
profiles, aligned at the current tick (`load`). The request at the head of the queue is admitted when its
profile, added to that sum, stays within max_batch_rows at every tick; the queue is first-in first-out, so a large
request at its head is never overtaken. Rows that one request's guidance interval frees are thereby given to
another for exactly those ticks, and no forward ever holds more than max_batch_rows.

The scheduler decides and never executes (as vLLM's): the engine runs the ticks. It lives in the compute thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from app.sampling import SampleRun


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine: its sampler run and what its client has been sent of it so far."""

    id: str
    run: SampleRun
    enqueued_at: float  # time.monotonic() at add
    progress: bool  # send Progress outputs (steps, queue position, trace rows, previews)
    started_at: float | None = None  # admitted into the batch
    position: int | None = field(default=None, repr=False)  # the queue position last sent
    traced: int = field(default=0, repr=False)  # trace rows sent
    previewed: int | None = field(default=None, repr=False)  # the step of the last preview sent

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.enqueued_at


class Scheduler:
    def __init__(self, max_batch_rows: int, max_queue: int) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.waiting: deque[EngineRequest] = deque()
        self.active: list[EngineRequest] = []
        self.load = np.zeros(0, dtype=np.int64)  # rows at each tick to come, of the admitted requests

    def refusal(self, run: SampleRun, limit_queue: bool) -> tuple[str, str] | None:
        """(kind, message) where a new request cannot be queued: it can never fit, or the queue is full (unless it
        fits now); None where it can. limit_queue=False: its caller bounds its own requests (the jobs API)."""
        if run.rows_profile().max(initial=0) > self.max_batch_rows:
            return "invalid", f"a request of {run.spec.num_images} images cannot fit max_batch_rows"
        room_now = not self.waiting and self.fits(run)
        if limit_queue and len(self.waiting) >= self.max_queue and not room_now:
            return "rejected", f"queue full ({self.max_queue} waiting)"
        return None

    def fits(self, run: SampleRun) -> bool:
        """Whether the run's rows, added to the admitted requests' at every tick to come, fit max_batch_rows."""
        profile = run.rows_profile()
        n = min(len(profile), len(self.load))
        return bool((profile[:n] + self.load[:n]).max(initial=0) <= self.max_batch_rows) and bool(
            profile[n:].max(initial=0) <= self.max_batch_rows
        )

    def _add_load(self, run: SampleRun, sign: int) -> None:
        """Add (sign 1) or take back (sign -1) the run's remaining rows at the ticks to come."""
        profile = run.rows_profile()
        if len(profile) > len(self.load):
            self.load = np.pad(self.load, (0, len(profile) - len(self.load)))
        self.load[: len(profile)] += sign * profile

    def admit(self) -> list[EngineRequest]:
        """Admit from the head of the queue while the head fits; returns the requests admitted."""
        admitted = []
        while self.waiting and self.fits(self.waiting[0].run):
            request = self.waiting.popleft()
            request.started_at = time.monotonic()
            self._add_load(request.run, 1)
            self.active.append(request)
            admitted.append(request)
        return admitted

    def remove(self, request: EngineRequest) -> None:
        """A request leaves before its last step (cancelled, failed): its rows at the ticks to come are free."""
        if request in self.active:
            self.active.remove(request)
            self._add_load(request.run, -1)
        elif request in self.waiting:
            self.waiting.remove(request)

    def stepped(self) -> None:
        """Every admitted request took its step."""
        self.load = self.load[1:]

    def finished(self, request: EngineRequest) -> None:
        """A request took its last step: its profile is spent."""
        self.active.remove(request)
