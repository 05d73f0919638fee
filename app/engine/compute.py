"""The one compute thread, shared by the engines of several models with fair shares of its time.

Every model's forwards run in the same thread (see engine.py on OpenMP teams). Each model's engine
batches its own rows and asks for the thread once per tick. Policy: **equal shares of thread time**
among the models that have work. The next tick goes to the waiting engine that has used the least
thread time so far (as Linux's CFS picks the task of least virtual runtime). A model whose forward
takes 1 s and one whose forward takes 20 ms, both busy, each get half the thread: the fast one runs
about 50 ticks for each of the slow one's, so neither waits on the other's pace. An engine coming back
from idle starts at the time of the tick granted last, so that idleness banks no credit that would
later shut the others out.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def worker() -> ThreadPoolExecutor:
    """The one thread for the models' compute: load the models in it, then hand it to the engines."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-forward")


class SharedCompute:
    def __init__(self, executor: ThreadPoolExecutor | None = None) -> None:
        self.executor = executor or worker()
        self._used: dict[Any, float] = {}  # thread seconds per owner (an engine)
        self._floor = 0.0  # the used time of the owner granted last
        self._waiting: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()
        self._busy = False

    def used_seconds(self, owner: Any) -> float:
        return self._used.get(owner, 0.0)

    async def run(self, owner: Any, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the compute thread when it is owner's turn; owner's thread time grows by it."""
        await self._acquire(owner)
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self._used[owner] = self._used.get(owner, 0.0) + time.perf_counter() - start
            self._release()

    async def _acquire(self, owner: Any) -> None:
        used = max(self._used.get(owner, 0.0), self._floor)
        self._used[owner] = used
        if not self._busy and not self._waiting:
            self._busy = True
            self._floor = used
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (used, next(self._seq), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, then cancelled: pass the turn on
                self._grant_next()
            raise
        self._floor = used

    def _release(self) -> None:
        # Decided one turn of the event loop later: the owner releasing the thread runs on without
        # suspending to its next request for it (settle, admit, next tick), so by then it waits too and
        # competes with its own used time, instead of the thread going to whoever waited already.
        asyncio.get_running_loop().call_soon(self._grant_next)

    def _grant_next(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)  # the thread stays busy: it is that owner's now
                return
        self._busy = False

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
