"""The one compute thread, shared by the engines of several models with fair shares of its time.

Every model's forwards run in the same thread (see engine.py on OpenMP teams). The thread runs ticks back to
back while any engine has work, without a round trip through the event loop between them: the event loop
only hands requests in and takes outputs back. Policy: **equal shares of thread time** among the engines that
have work. The next tick goes to the engine with work that has used the least thread time so far (as Linux's
CFS picks the task of least virtual runtime). A model whose forward takes 1 s and one whose forward takes
20 ms, both busy, each get half the thread: the fast one runs about 50 ticks for each of the slow one's, so
neither waits on the other's pace. An engine coming back from idle starts at the time of the tick granted
last, so that idleness banks no credit that would later shut the others out.

One-off calls (a model's load, the warmup, a benchmark's raw loop) run in the same thread, before the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def worker() -> ThreadPoolExecutor:
    """The one thread for the models' compute."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-forward")


class Ticking(Protocol):
    """What the compute thread drives: an engine. Both are called in the compute thread."""

    def has_work(self) -> bool: ...

    def tick(self) -> None: ...


class SharedCompute:
    def __init__(self, executor: ThreadPoolExecutor | None = None) -> None:
        self.executor = executor or worker()
        self._lock = threading.Lock()
        self._owners: list[Ticking] = []
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._used: dict[Any, float] = {}  # thread seconds per owner (an engine)
        self._floor = 0.0  # the used time of the owner granted last
        self._driving = False  # a drive() is queued or running in the thread

    def used_seconds(self, owner: Any) -> float:
        return self._used.get(owner, 0.0)

    def busy_others(self, owner: Any) -> int:
        """How many other owners have work now: while they keep it, `owner` gets 1 / (this + 1) of the thread."""
        with self._lock:
            return sum(1 for o in self._owners if o is not owner and o.has_work())

    def attach(self, owner: Ticking) -> None:
        with self._lock:
            self._owners.append(owner)
        self.notify()

    def detach(self, owner: Ticking) -> None:
        with self._lock:
            if owner in self._owners:
                self._owners.remove(owner)

    def notify(self) -> None:
        """Some owner may have work (from any thread, after handing it in): start the thread's loop if it idles."""
        with self._lock:
            if self._driving:
                return
            self._driving = True
        self.executor.submit(self._drive)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the compute thread, before its next tick: the batch pauses, and resumes as it was."""
        future: Future = Future()
        with self._lock:
            self._calls.append((lambda: fn(*args), future))
        self.notify()
        return await asyncio.wrap_future(future)

    def _next(self) -> tuple[Callable[[], Any], Future] | Ticking | None:
        """Under the lock: the next call, else the owner with work that has used the least time, else None (and the
        loop stops: a notify() after this starts a new one)."""
        if self._calls:
            return self._calls.popleft()
        busy = [o for o in self._owners if o.has_work()]
        if not busy:
            self._driving = False
            return None
        owner = min(busy, key=lambda o: max(self._used.get(o, 0.0), self._floor))
        self._used[owner] = max(self._used.get(owner, 0.0), self._floor)
        self._floor = self._used[owner]
        return owner

    def _drive(self) -> None:
        """In the compute thread: calls and ticks back to back until there is nothing to do."""
        try:
            while True:
                with self._lock:
                    item = self._next()
                if item is None:
                    return
                if isinstance(item, tuple):
                    fn, future = item
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:
                            future.set_exception(exc)
                    continue
                start = time.perf_counter()
                item.tick()  # an engine fails its own requests when its tick raises
                self._used[item] += time.perf_counter() - start
        except BaseException:
            log.exception("the compute thread's loop failed")
            with self._lock:
                self._driving = False
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
