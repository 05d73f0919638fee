"""The admission policy as pure functions of rows: whether a request's rows fit over the admitted ones' at every
tick to come, from which tick on they would, which running requests to preempt for a waiting one, the order in
which waiting requests are taken (by class, then fair shares between clients), and when a request would start and
finish behind the work ahead of it.

`load[k]` is the rows the admitted requests run at the k-th tick from now; a request's `profile[k]` its own rows
at its k-th step (app/sampling's `rows_profile`). Nothing here touches a run or a clock (app/engine/scheduler.py
holds the queue; tests/engine/test_policy.py tests these as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Priority classes, most urgent first: a request waits behind every request of a more urgent class, and may
# preempt running requests of a less urgent one.
PRIORITIES = ("interactive", "batch")


def rank(priority: str) -> int:
    return PRIORITIES.index(priority)


def fits_at(profile: np.ndarray, load: np.ndarray, max_rows: int, offset: int = 0) -> bool:
    """Whether the profile, started `offset` ticks from now, stays within max_rows at every tick over the load."""
    span = load[offset : offset + len(profile)]
    n = len(span)
    return bool((profile[:n] + span).max(initial=0) <= max_rows) and bool(profile[n:].max(initial=0) <= max_rows)


def earliest_start(profile: np.ndarray, load: np.ndarray, max_rows: int) -> int:
    """The first tick from now at which the profile fits over the load (len(load) at the latest: all of it spent)."""
    # A tick with less room than the profile's smallest step fails every start whose steps cover it: the next
    # start worth trying is past the last such tick in the window, not the next one (a long load stays cheap).
    room = max_rows - load
    least = profile.min(initial=0)
    offset = 0
    while offset < len(load):
        if fits_at(profile, load, max_rows, offset):
            return offset
        blocked = np.flatnonzero(room[offset : offset + len(profile)] < least)
        offset += int(blocked[-1]) + 1 if len(blocked) else 1
    return len(load)


def add_profile(load: np.ndarray, profile: np.ndarray, sign: int = 1, offset: int = 0) -> np.ndarray:
    """The load with the profile, started `offset` ticks from now, added, or taken back with sign -1."""
    end = offset + len(profile)
    if end > len(load):
        load = np.pad(load, (0, end - len(load)))
    else:
        load = load.copy()
    load[offset:end] += sign * profile
    return load


def victims(
    profile: np.ndarray, load: np.ndarray, max_rows: int, candidates: Sequence[np.ndarray], room_bytes: Sequence[int]
) -> int | None:
    """How many of `candidates` (the remaining profiles of the preemptible running requests, the first to go
    first) must leave the batch for `profile` to fit now; None where even all of them leaving would not make room
    or their preempted state would pass its bound (room_bytes[i]: bytes still free after the first i+1 leave)."""
    for count in range(1, len(candidates) + 1):
        if room_bytes[count - 1] < 0:
            return None
        load = add_profile(load, candidates[count - 1], -1)
        if fits_at(profile, load, max_rows):
            return count
    return None


@dataclass(frozen=True)
class Waiting:
    """What the order of the queue reads of a waiting request."""

    rank: int  # its class's (rank())
    client: str
    cost: int  # the rows of the steps it has still to take (its remaining profile's sum)
    arrival: float
    owed: bool = False  # passed over often enough to hold a reservation (app/engine/scheduler.py)


Served = Mapping[tuple[int, str], float]  # per (class rank, client): rows run per unit of weight while it had work


def floor(served: Served, rank_: int) -> float:
    """Where a client that comes (back) with work starts in a class: level with the least served client that has
    work there, so that idleness banks no credit (as app/engine/compute.py's floor, and CFS's min_vruntime)."""
    return min((v for (r, _), v in served.items() if r == rank_), default=0.0)


def fair_order(waiting: Sequence[Waiting], served: Served, weights: Mapping[str, float]) -> list[int]:
    """The indices of `waiting` in admission order: by class; within a class, the requests owed a reservation
    first (by arrival), then by fair shares of rows between clients (weighted fair queueing).

    A request's tag is its finish in its client's virtual time: the rows its client has run in the class per unit
    of weight (`served`, or the class's floor for a client not in it), plus the rows its own and its client's
    earlier waiting requests still have to run over the client's weight (1 where unlisted). The least tag goes
    first, ties by arrival. So the rows of each tick go to clients in proportion to their weights, whatever
    their number of requests: a client with 500 queued and a client with 1 take turns, not arrival order."""
    queued: dict[tuple[int, str], int] = {}  # per (class, client): cost of its requests taken so far, by arrival
    floors = {r: floor(served, r) for r in {w.rank for w in waiting}}
    tags = [0.0] * len(waiting)
    for i in sorted(range(len(waiting)), key=lambda i: waiting[i].arrival):
        w = waiting[i]
        share = (w.rank, w.client)
        queued[share] = queued.get(share, 0) + w.cost
        tags[i] = served.get(share, floors[w.rank]) + queued[share] / weights.get(w.client, 1.0)

    def key(i: int) -> tuple[int, bool, float, float]:
        w = waiting[i]
        return (w.rank, not w.owed, 0.0 if w.owed else tags[i], w.arrival)

    return sorted(range(len(waiting)), key=key)


def overtaken(waiting: Sequence[Waiting], admitted: Sequence[Waiting]) -> list[bool]:
    """For each request that waits on: whether it is its client's first in its class (by arrival) and a request
    admitted at this tick comes after it in the order of classes and arrivals, overtaking it (a pass towards its
    reservation). Fair shares put later requests of other clients first, and that counts, so none waits without
    bound; only a client's first request counts passes, so that one client's backlog, owed a reservation all at
    once, cannot take the class back to arrival order."""
    if not admitted:
        return [False] * len(waiting)
    last = max((a.rank, a.arrival) for a in admitted)
    first: dict[tuple[int, str], float] = {}
    for w in waiting:
        share = (w.rank, w.client)
        first[share] = min(first.get(share, np.inf), w.arrival)
    return [w.arrival == first[(w.rank, w.client)] and last > (w.rank, w.arrival) for w in waiting]


def planned_finish(
    profile: np.ndarray, load: np.ndarray, max_rows: int, ahead: Sequence[np.ndarray], horizon: int
) -> tuple[int, np.ndarray] | None:
    """(the tick from now at which the profile would start, the load with it and the work ahead planned in) where
    the profiles `ahead` (in admission order) each start at the first tick at which they fit and then the profile
    does (list scheduling); None where a start would lie past `horizon` ticks. The plan reads the order only:
    a request behind that fits sooner may still go first (no head-of-line blocking), so it is an estimate."""
    for other in ahead:
        start = earliest_start(other, load, max_rows)
        if start > horizon:
            return None
        load = add_profile(load, other, offset=start)
    start = earliest_start(profile, load, max_rows)
    if start > horizon:
        return None
    return start, add_profile(load, profile, offset=start)


def seconds_over(rows: np.ndarray, seconds_at: np.ndarray) -> float:
    """The time of ticks that run these rows, at `seconds_at[r]` per tick of r rows (ticks of 0 rows are free)."""
    return float(seconds_at[rows].sum())
