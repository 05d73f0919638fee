"""The shared backlog on Redis: one stream per model (`cfg:backlog:{model}`) with one consumer group (`replicas`).

POST /v1/jobs only adds the job: its record, and an entry on its model's stream (the ADD script; the scripts are
in app/api/redis_scripts.py). No engine is given it there. Each replica runs a `Consumer`, which takes an entry
(XREADGROUP) only while its engine for that model has room by its row budget (`EngineClient.free_rows` > 0), so
a fleet drains one backlog together and a replica holds at most one job in its engine's own queue beyond what
its batch admits.

Taking an entry makes it pending to this replica. The job is started by the TAKE script, which names this replica
its runner (and clears the progress of an earlier run): from then on only the runner's progress and end are
written (the PROGRESS and FINISH scripts check it), so a late original and a taker can't both finish a job. While
a job runs, its replica renews the entry every visibility_s / 3 (XCLAIM to itself with JUSTID resets its idle
time). A replica that dies stops renewing: once an entry has been idle for visibility_s (CFG_JOB_VISIBILITY_S),
another replica's consumer claims it (XAUTOCLAIM) and runs the job again from its stored seeds, so its images are
the same. A job's end acknowledges and deletes its entry (XACK, XDEL): the stream holds the jobs waiting (not
delivered yet) and the jobs taken (pending). A job taken MAX_ATTEMPTS times without an end (it took each replica
down with it, say) fails instead of running again. A replica that drains hands back (RELEASE) the jobs it could
not finish in time, at the backlog's tail, rather than failing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from app.api.job_store import Job, JobRunner
from app.api.redis_scripts import RELEASE, RENEW, TAKE
from app.engine import EngineClosedError

log = logging.getLogger("uvicorn.error")

GROUP = "replicas"
MAX_ATTEMPTS = 3  # takes of one job without an end, before it fails
IDLE_S = 0.1  # how often a replica without room looks again
BLOCK_MS = 1000  # how long one XREADGROUP waits for a new entry

QUEUED_STATE = json.dumps({"step": 0, "queue_position": None, "queue_wait_s": None, "preview": None})
EXHAUSTED = f"the job was taken {MAX_ATTEMPTS} times and its replica stopped each time before it finished"


def backlog_key(model: str) -> str:
    return f"cfg:backlog:{model}"


class JobRecords(Protocol):
    """The jobs on Redis, as the consumer uses them (app/api/redis_jobs.py's RedisJobs)."""

    name: str  # the store's URL, without its password
    redis: aioredis.Redis
    owner: str  # this replica
    local: dict[str, Job]  # the jobs running here
    on_error: Callable[[], None]

    def key(self, job_id: str) -> str: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def saved(self, job: Job) -> None: ...

    def running(self, job: Job) -> None: ...

    def forget(self, job: Job) -> None: ...

    def lost(self, job: Job, reply: Any) -> None: ...


class Consumer:
    """One replica's consumer of the backlog of each model it serves."""

    def __init__(
        self,
        store: JobRecords,
        runner: JobRunner,
        models: Sequence[str],
        visibility_s: float,
        on_taken_over: Callable[[], None] = lambda: None,
    ) -> None:
        self.store, self.redis, self.runner = store, store.redis, runner
        self.name = store.owner  # its consumer name in the group
        self.streams = {backlog_key(m): m for m in models}
        self.visibility_s = visibility_s
        self.on_taken_over = on_taken_over  # counts the jobs taken over
        self.backlog = (0, 0)  # (waiting, taken) over these models' streams, as last counted
        self._take, self._renew = self.redis.register_script(TAKE), self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._cursors = dict.fromkeys(self.streams, "0-0")  # where each stream's XAUTOCLAIM goes on from
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._consume(), name="backlog-consumer"),
            asyncio.create_task(self._keep_renewed(), name="backlog-renew"),
        ]

    async def _consume(self) -> None:
        created = False
        claimed_at = 0.0
        while True:
            try:
                if not created:
                    await self._create_groups()
                    created = True
                streams = [backlog_key(m) for m in self.runner.room() if backlog_key(m) in self.streams]
                if not streams:
                    await asyncio.sleep(IDLE_S)
                    continue
                if time.monotonic() - claimed_at >= self.visibility_s / 4:
                    if await self._claim(streams):
                        continue  # a dead replica's other jobs may be idle too: look again while there is room
                    claimed_at = time.monotonic()
                await self._read(streams)
            except (RedisError, OSError) as exc:
                self.store.on_error()
                log.warning("job backlog %s: %s; retrying in 1 s", self.store.name, exc)
                await asyncio.sleep(1.0)
            except Exception:  # a replica whose consumer stopped would take no job again
                log.exception("job backlog %s: the consumer failed; going on in 1 s", self.store.name)
                await asyncio.sleep(1.0)

    async def _create_groups(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: another replica created it
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)

    async def _claim(self, streams: list[str]) -> bool:
        """Take over one job whose entry has been idle past the visibility timeout; whether one was."""
        for stream in streams:
            while True:  # through the whole pending list, a page (XAUTOCLAIM scans ten entries) at a time
                cursor, claimed, *_ = await self.redis.xautoclaim(
                    stream, GROUP, self.name, int(self.visibility_s * 1000), self._cursors[stream], count=1
                )
                self._cursors[stream] = cursor
                for entry_id, fields in claimed:
                    if fields:  # an entry deleted meanwhile has none
                        await self._start(stream, entry_id, fields["id"], taken_over=True)
                        return True
                if cursor == "0-0":
                    break
        return False

    async def _read(self, streams: list[str]) -> None:
        read = self.redis.xreadgroup(GROUP, self.name, dict.fromkeys(streams, ">"), count=1, block=BLOCK_MS)
        answer: Any = await read  # [[stream, [(entry id, fields)]]], or None after BLOCK_MS
        for stream, entries in answer or []:
            for entry_id, fields in entries:
                await self._start(stream, entry_id, fields["id"], taken_over=False)

    async def _start(self, stream: str, entry_id: str, job_id: str, taken_over: bool) -> None:
        if job_id in self.store.local:
            return  # running here already (its entry came back after a stall)
        key = self.store.key(job_id)
        verdict = await self._take(keys=[key], args=[self.name, MAX_ATTEMPTS, QUEUED_STATE])
        if verdict in ("gone", "done"):  # expired, or cancelled while it waited
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, GROUP, entry_id)
                pipe.xdel(stream, entry_id)
                await pipe.execute()
            return
        job = await self.store.get(job_id)
        if job is None:
            return
        job.arrived = time.monotonic() - max(0.0, time.time() - job.created_at)  # its timings count from its POST
        if verdict == "exhausted":
            job.finish("failed", error={"status": 503, "outcome": "error", "detail": EXHAUSTED})
            await self.store.saved(job)
            return
        if taken_over:
            self.on_taken_over()
            log.info("job %s: taken over (its entry was idle for %g s)", job_id, self.visibility_s)
        self.store.running(job)
        try:
            self.runner.run(job)
        except EngineClosedError:  # the engine takes nothing now (draining): another replica will
            await self.release(job)

    async def release(self, job: Job) -> bool:
        """Hand a job this replica runs back to the backlog; whether it was (it had not ended, and was ours)."""
        self.store.forget(job)
        args = [self.name, GROUP, job.id, QUEUED_STATE]
        released = bool(await self._release(keys=[self.store.key(job.id)], args=args))
        if released:
            log.info("job %s: handed back to the backlog, unfinished", job.id)
        return released

    async def _keep_renewed(self) -> None:
        """Every visibility_s / 3: renew the entries of the jobs running here, and count the backlog."""
        while True:
            try:
                await self.renew()
                self.backlog = await self.count()
            except (RedisError, OSError) as exc:
                self.store.on_error()
                log.warning("job backlog %s: its entries were not renewed: %s", self.store.name, exc)
            await asyncio.sleep(self.visibility_s / 3)

    async def renew(self) -> None:
        jobs = [job for job in self.store.local.values() if not job.finished]
        if not jobs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                await self._renew(keys=[self.store.key(job.id)], args=[self.name, GROUP], client=pipe)
            ours = await pipe.execute()
        for job, mine in zip(jobs, ours, strict=True):
            if mine != 1:
                self.store.lost(job, mine)

    async def count(self) -> tuple[int, int]:
        """(waiting, taken): the entries not delivered yet, and those taken and not ended, over the streams."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
            answers: list[Any] = await pipe.execute(raise_on_error=False)
        waiting = taken = 0
        for length, pending in zip(answers[::2], answers[1::2], strict=True):
            if isinstance(length, int) and isinstance(pending, dict):
                taken += pending["pending"]
                waiting += length - pending["pending"]
        return waiting, taken

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The group forgets this consumer where nothing is pending to it (a pending entry would go with it).
        with contextlib.suppress(RedisError, OSError):
            for stream in self.streams:
                if not await self.redis.xpending_range(stream, GROUP, "-", "+", 1, consumername=self.name):
                    await self.redis.xgroup_delconsumer(stream, GROUP, self.name)
