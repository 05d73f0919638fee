"""The admission policy as pure functions of rows: whether a request's rows fit over the admitted ones' at every
tick to come, from which tick on they would, and which running requests to preempt for a waiting one.

`load[k]` is the rows the admitted requests run at the k-th tick from now; a request's `profile[k]` its own rows
at its k-th step (app/sampling's `rows_profile`). Nothing here touches a run or a clock (app/engine/scheduler.py
holds the queue; tests/engine/test_policy.py tests these as they are).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    for offset in range(len(load) + 1):
        if fits_at(profile, load, max_rows, offset):
            return offset
    raise AssertionError("a profile within max_rows fits once the load is spent")  # pragma: no cover


def add_profile(load: np.ndarray, profile: np.ndarray, sign: int = 1) -> np.ndarray:
    """The load with the profile (from this tick on) added, or taken back with sign -1."""
    if len(profile) > len(load):
        load = np.pad(load, (0, len(profile) - len(load)))
    else:
        load = load.copy()
    load[: len(profile)] += sign * profile
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
