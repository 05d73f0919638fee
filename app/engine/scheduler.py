"""Admission by rows per tick, by priority class: which requests wait, which run, which leave the batch for a
while, and the rows of every tick to come.

A request's rows at each of its steps are known when it arrives: two per image where its guidance weight is not
exactly 1, one where it is (the unconditional pass is skipped), one for an unconditional request; and an
autoguidance request's rows through its guide model, one per image at each step it guides (counted as full rows:
the bound holds for each forward, main or guide). Every admitted
request takes one step per tick, so the rows of the ticks to come are the sum of the admitted requests' remaining
profiles, aligned at the current tick (`load`). A request is admitted when its profile, added to that sum, stays
within max_batch_rows at every tick; no forward ever holds more than max_batch_rows.

Each tick (`schedule`), the waiting requests are taken in order: by class (`interactive` before `batch`), then,
within a class, by fair shares between clients (`fair_order`: the client that has run the fewest rows of the
class while it had work, per its weight, goes next; a client is its API key, else its X-Client-Id, else
"anonymous"), so that a client with 500 queued requests does not hold back one with 1. Every request that fits
is admitted, so a large request that does not fit does not hold back smaller ones behind it (no head-of-line
blocking). It is not starved either:
once requests that came after it (in the order of classes and arrivals) have been admitted at STARVATION_PASSES
ticks while it waited as its client's first, it is owed: it goes first in its class, holds a reservation at the
first tick from which it fits over the admitted load, and requests behind it are admitted only where they leave
that reservation whole (backfilling, as EASY backfilling in batch-job schedulers). The admitted load only shrinks
at the reserved tick's rows, so it is admitted at that tick at the latest. Across classes the order is strict:
batch work behind a steady stream of interactive work that alone fills the budget waits.

A waiting request that does not fit may preempt running requests of a less urgent class, the last admitted first:
they leave the batch at this tick, keep their whole state in their SampleRun (latents, sampler, generators,
guidance state), go back to the queue at their place (by arrival), and resume when they fit. Preempted state is
bounded: at most max_preempted_bytes, counted as PREEMPTED_STATE_FACTOR latent-sized tensors per request.

The scheduler decides and never executes (as vLLM's): the engine runs the ticks. It lives in the compute thread.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from app.engine.outputs import FailureKind, Progress, ProgressEvent
from app.engine.policy import (
    PRIORITIES,
    Waiting,
    add_profile,
    earliest_start,
    fair_order,
    fits_at,
    floor,
    overtaken,
    planned_finish,
    rank,
    victims,
)
from app.sampling import SampleRun

# Ticks at which requests behind a waiting request are admitted before it holds a reservation.
STARVATION_PASSES = 8
# The client of a request that names none (no X-API-Key, no X-Client-Id).
ANONYMOUS = "anonymous"
# A preempted run holds its latents and, at most, about three more latent-sized tensors: the solver's history
# (DPM-Solver++ 2M's previous x0), the guider's state (APG's momentum) and the last scaled model input.
PREEMPTED_STATE_FACTOR = 4


def state_bytes(run: SampleRun) -> int:
    """What a preempted run holds in memory, as counted against max_preempted_bytes: its latent-sized state and
    what its step cache holds (app/sampling/cache.py: features, states, guidance differences), which it keeps
    to resume with the same images."""
    return PREEMPTED_STATE_FACTOR * run.latents.nelement() * run.latents.element_size() + run.cached_bytes()


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine: its sampler run and what its client has been sent of it so far."""

    id: str
    run: SampleRun
    enqueued_at: float  # time.monotonic() at add
    progress: bool  # send Progress outputs (steps, queue position, trace rows, previews)
    priority: str = PRIORITIES[0]
    client: str = ANONYMOUS  # whose share of the class's rows it takes (app/engine/policy.py's fair_order)
    started_at: float | None = None  # first admitted into the batch
    preempted: bool = False  # out of the batch, in the queue again, its run kept
    preemptions: int = 0
    passed_over: int = field(default=0, repr=False)  # ticks at which requests behind it were admitted
    position: int | None = field(default=None, repr=False)  # the queue position last sent
    traced: int = field(default=0, repr=False)  # trace rows sent
    previewed: int | None = field(default=None, repr=False)  # the step of the last preview sent
    _profile: tuple[int, np.ndarray, int] | None = field(default=None, repr=False)  # step, profile, its sum

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.enqueued_at

    def report(self, event: ProgressEvent | None = None) -> Progress:
        """Its progress since the last one sent: its step, its place in the queue while it waits, new trace rows
        (plain lists: the device sync is here, in the compute thread) and a new preview."""
        run = self.run
        trace: tuple[dict, ...] = ()
        if run.spec.return_trace:
            new = run.trace[self.traced : run.step_index]
            self.traced += len(new)
            trace = tuple(t.to_dict() for t in new)
        preview = run.preview
        if preview is not None and preview.step != self.previewed:
            self.previewed = preview.step
        else:
            preview = None
        wait = self.queue_wait_s
        position = self.position if wait is None or self.preempted else None
        return Progress(self.id, run.step_index, run.spec.steps, position, wait, trace, preview, self.preempted, event)

    def profile(self) -> np.ndarray:
        """Its run's remaining rows profile, kept while its step does not move: a waiting request's is read at
        every tick, and a queue of hundreds would rebuild hundreds of arrays per tick."""
        return self._kept()[1]

    def cost(self) -> int:
        """The rows its remaining steps will run (its profile's sum)."""
        return self._kept()[2]

    def _kept(self) -> tuple[int, np.ndarray, int]:
        if self._profile is None or self._profile[0] != self.run.step_index:
            profile = self.run.admission_profile()  # main and guide rows: what max_batch_rows bounds
            self._profile = (self.run.step_index, profile, int(profile.sum()))
        return self._profile


@dataclass
class Decision:
    """A tick's changes: requests admitted (new or resumed) and running requests preempted."""

    admitted: list[EngineRequest]
    preempted: list[EngineRequest]


@dataclass(frozen=True)
class Plan:
    """When a new request would run, behind the work ahead of it in its class (`Scheduler.plan`)."""

    start: int  # ticks from now to its first step
    rows: np.ndarray  # rows of the batch at each tick from now to its last step (all classes' running work)


class Scheduler:
    def __init__(
        self,
        max_batch_rows: int,
        max_queue: int,
        max_preempted_bytes: int = 256 << 20,
        client_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.max_preempted_bytes = max_preempted_bytes
        self.client_weights = dict(client_weights or {})  # per client; 1 where unlisted
        self.waiting: list[EngineRequest] = []  # in arrival order; ordered() is the admission order
        self.active: list[EngineRequest] = []  # in admission order
        self.load = np.zeros(0, dtype=np.int64)  # rows at each tick to come, of the admitted requests
        self.preempted_bytes = 0
        # Per (class rank, client) with requests waiting or running: rows run per unit of weight (policy.Served),
        # and how many requests it has there; a client's entry goes when its last request there ends.
        self.served: dict[tuple[int, str], float] = {}
        self._members: dict[tuple[int, str], int] = {}

    def refusal(self, run: SampleRun, limit_queue: bool) -> tuple[FailureKind, str] | None:
        """(kind, message) where a new request cannot be queued: it can never fit, or the queue is full (unless it
        fits now); None where it can. limit_queue=False: its caller bounds its own requests (the jobs API)."""
        rows = run.admission_profile().max(initial=0)
        if rows > self.max_batch_rows:
            return "invalid", (
                f"a request of {run.spec.num_images} images cannot fit max_batch_rows: it needs {rows} rows at a step "
                f"(its guide model's rows included), and the engine runs at most {self.max_batch_rows}"
            )
        room_now = not self.waiting and self.fits(run)
        if limit_queue and len(self.waiting) >= self.max_queue and not room_now:
            return "rejected", f"queue full ({self.max_queue} waiting)"
        return None

    def fits(self, run: SampleRun) -> bool:
        """Whether the run's rows, added to the admitted requests' at every tick to come, fit max_batch_rows."""
        return fits_at(run.admission_profile(), self.load, self.max_batch_rows)

    def free_rows(self) -> int:
        """Rows of max_batch_rows that no request holds: the admitted requests' at their busiest tick to come, and
        each waiting request's at its busiest step, subtracted (0 where they hold it all)."""
        admitted = int(self.load.max(initial=0))
        waiting = sum(int(r.profile().max(initial=0)) for r in self.waiting)
        return max(0, self.max_batch_rows - admitted - waiting)

    def add(self, request: EngineRequest) -> None:
        """Queue a new request; its client, new to its class, starts level with the least served there."""
        share = (rank(request.priority), request.client)
        if share not in self._members:
            self.served[share] = floor(self.served, share[0])
        self._members[share] = self._members.get(share, 0) + 1
        self.waiting.append(request)

    def ordered(self) -> list[EngineRequest]:
        """The waiting requests in admission order: by class, then by fair shares between clients (a preempted one
        keeps its arrival), a request owed a reservation first in its class (policy.fair_order)."""
        waiting = [self._waiting(r) for r in self.waiting]
        return [self.waiting[i] for i in fair_order(waiting, self.served, self.client_weights)]

    def _waiting(self, request: EngineRequest) -> Waiting:
        owed = request.passed_over >= STARVATION_PASSES
        return Waiting(rank(request.priority), request.client, request.cost(), request.enqueued_at, owed)

    def schedule(self) -> Decision:
        """Admit every waiting request that fits, in order, preempting less urgent work where that makes room;
        behind a reserved request, only those that leave its reservation whole (the module's docstring). The rows
        the tick will run are charged to their clients' shares."""
        decision = Decision([], [])
        reserved: tuple[np.ndarray, int] | None = None  # a starving request's profile and the tick it is held at
        for request in self.ordered():
            profile = request.profile()
            if reserved is not None:
                held, at = reserved
                if fits_at(profile, self.load, self.max_batch_rows) and fits_at(
                    held, add_profile(self.load, profile), self.max_batch_rows, at
                ):
                    self._admit(request, decision)
                continue
            # The rows free at this tick rule most waiting requests out without the whole profile's check.
            free_now = self.max_batch_rows - (int(self.load[0]) if len(self.load) else 0)
            fits = profile[0] <= free_now and fits_at(profile, self.load, self.max_batch_rows)
            if fits or self._preempt_for(request, profile, decision):
                self._admit(request, decision)
                continue
            if request.passed_over >= STARVATION_PASSES:
                reserved = (profile, earliest_start(profile, self.load, self.max_batch_rows))
        if decision.admitted:
            waiting = [r for r in self.waiting if r not in decision.preempted]
            admitted = [self._waiting(r) for r in decision.admitted]
            for request, passed in zip(waiting, overtaken([self._waiting(r) for r in waiting], admitted), strict=True):
                request.passed_over += passed
        for request in self.active:
            share = (rank(request.priority), request.client)
            self.served[share] += request.run.rows_needed() / self.client_weights.get(request.client, 1.0)
        return decision

    def plan(self, run: SampleRun, priority: str, client: str, horizon: int) -> Plan | None:
        """When a new request (not queued yet) would start and the batch's rows until it finishes, were it queued
        now: the work ahead of it in its class and more urgent ones, in admission order, list-scheduled over the
        running requests of those classes (running less urgent work would leave the batch for it: their rows
        count only in the tick's size). None where it would not start within `horizon` ticks."""
        own = rank(priority)
        profile = run.admission_profile()
        ahead_load = np.zeros(0, dtype=np.int64)
        other_load = np.zeros(0, dtype=np.int64)
        for r in self.active:
            if rank(r.priority) <= own:
                ahead_load = add_profile(ahead_load, r.profile())
            else:
                other_load = add_profile(other_load, r.profile())
        waiting = [self._waiting(r) for r in self.waiting]
        waiting.append(Waiting(own, client, int(profile.sum()), np.inf))  # it arrives last
        order = fair_order(waiting, self.served, self.client_weights)
        ahead = [self.waiting[i].profile() for i in order[: order.index(len(self.waiting))]]
        planned = planned_finish(profile, ahead_load, self.max_batch_rows, ahead, horizon)
        if planned is None:
            return None
        start, load = planned
        end = start + len(profile)
        rows = add_profile(load[:end], other_load[:end])[:end]
        return Plan(start, np.minimum(rows, self.max_batch_rows))

    def _preempt_for(self, request: EngineRequest, profile: np.ndarray, decision: Decision) -> bool:
        """Preempt running requests of less urgent classes, the last admitted first, where that lets the request
        fit now within the bound on preempted state; whether it did."""
        candidates = [r for r in reversed(self.active) if rank(r.priority) > rank(request.priority)]
        if not candidates:
            return False
        room = self.max_preempted_bytes - self.preempted_bytes - np.cumsum([state_bytes(r.run) for r in candidates])
        profiles = [r.profile() for r in candidates]
        count = victims(profile, self.load, self.max_batch_rows, profiles, room.tolist())
        if count is None:
            return False
        for victim, victim_profile in zip(candidates[:count], profiles, strict=False):
            self.active.remove(victim)
            self.load = add_profile(self.load, victim_profile, -1)
            victim.preempted = True
            victim.preemptions += 1
            self.preempted_bytes += state_bytes(victim.run)
            self.waiting.append(victim)
            decision.preempted.append(victim)
        return True

    def _admit(self, request: EngineRequest, decision: Decision) -> None:
        self.waiting.remove(request)
        if request.preempted:
            request.preempted = False
            self.preempted_bytes -= state_bytes(request.run)
        else:
            request.started_at = time.monotonic()
        request.passed_over = 0
        self.load = add_profile(self.load, request.profile())
        self.active.append(request)
        decision.admitted.append(request)

    def remove(self, request: EngineRequest) -> None:
        """A request leaves before its last step (cancelled, failed): its rows at the ticks to come are free."""
        if request in self.active:
            self.active.remove(request)
            self.load = add_profile(self.load, request.profile(), -1)
        elif request in self.waiting:
            self.waiting.remove(request)
            if request.preempted:
                self.preempted_bytes -= state_bytes(request.run)
        else:
            return
        self._left(request)

    def stepped(self) -> None:
        """Every admitted request took its step."""
        self.load = self.load[1:]

    def finished(self, request: EngineRequest) -> None:
        """A request took its last step: its profile is spent."""
        self.active.remove(request)
        self._left(request)

    def _left(self, request: EngineRequest) -> None:
        share = (rank(request.priority), request.client)
        self._members[share] -= 1
        if not self._members[share]:
            del self._members[share], self.served[share]
