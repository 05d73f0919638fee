"""The jobs on a Redis server every replica shares (CFG_JOB_STORE=redis://host:6379/0).

POST /v1/jobs, on any replica, stores the job and puts it on its model's backlog (a stream): a replica whose engine
has room takes it from there and runs it (app/api/redis_backlog.py: the consumer, the visibility timeout after
which another replica takes over the job of one that died, and the scripts that let only the job's runner write
its progress and end). Every change is written to Redis and announced on the job's channel, so any replica reads it
(GET), follows it (/events: it subscribes to the channel) and cancels it (DELETE: the outcome is set in Redis, once,
by a script, and announced on the `cancel` channel, which the replica running it hears: it aborts the engine
request at its next tick).

Keys, under `cfg:`: `job:{id}` (a hash: meta, state, outcome, final; stream and entry, its backlog entry; runner,
the replica running it; attempts), `job:{id}:trace` (the guidance trace rows), `jobs:unfinished` (a set),
`jobs:finished` (a sorted set by finish time), `key:{Idempotency-Key}` (the job id), `backlog:{model}` (a stream,
with the consumer group `replicas`). The bounds are the memory store's: at most max_jobs jobs, the first finished
dropped first, a finished job kept ttl_s. The scripts touch keys they read from the job's hash, so the store is
one Redis server (or a primary with replicas), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from app.api.job_store import Job, JobRunner, StoreFullError, StoreUnavailableError
from app.api.redis_backlog import GROUP, Consumer, backlog_key
from app.api.redis_scripts import ADD, FINISH, POSITION, PROGRESS
from app.sampling import Preview, SampleSpec

log = logging.getLogger("uvicorn.error")

PREFIX = "cfg:"
UNFINISHED, FINISHED, CANCEL = PREFIX + "jobs:unfinished", PREFIX + "jobs:finished", PREFIX + "cancel"
COUNT_EVERY_S = 5.0  # the stored jobs (a gauge's figures) are counted this often
RETRY_FINAL_S = 1.0  # a result that could not be written is retried this often, for up to ttl_s

T = TypeVar("T")


def public_url(url: str) -> str:
    """The URL without its password (for messages and /readyz)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def preview_record(preview: Preview | None) -> dict[str, Any] | None:
    if preview is None:
        return None
    images = np.ascontiguousarray(preview.images)
    return {"step": preview.step, "shape": list(images.shape), "data": base64.b64encode(images.tobytes()).decode()}


def preview_from(record: dict[str, Any] | None) -> Preview | None:
    if record is None:
        return None
    images = np.frombuffer(base64.b64decode(record["data"]), dtype=np.uint8).reshape(record["shape"])
    return Preview(step=record["step"], images=images)


class RedisJobs:
    """The JobBackend on Redis, with the shared backlog."""

    queues = True

    def __init__(
        self,
        url: str,
        max_jobs: int,
        ttl_s: float,
        spec_of: Callable[[dict[str, Any]], SampleSpec],
        on_error: Callable[[], None] = lambda: None,
        visibility_s: float = 30.0,
    ) -> None:
        self.name = public_url(url)
        self.max_jobs, self.ttl_s, self.visibility_s = max_jobs, ttl_s, visibility_s
        self.spec_of = spec_of  # a stored request body -> its SampleSpec
        self.on_error = on_error  # counts the store's errors
        # Two retries on a fresh connection: after a Redis restart the pooled connections are closed by the server,
        # and a read must not fail for that (redis-py's from_url retries nothing by default).
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        self.redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0, retry=retry
        )
        # This replica (its consumer's name in the group): where it runs, for an operator's XINFO CONSUMERS.
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.local: dict[str, Job] = {}  # the jobs running here, until their end is written
        self._traced: dict[str, int] = {}  # trace rows written, per local job
        self._counts = (0, 0)
        self._add, self._finish = self.redis.register_script(ADD), self.redis.register_script(FINISH)
        self._progress = self.redis.register_script(PROGRESS)
        self._position = self.redis.register_script(POSITION)
        self._tasks: set[asyncio.Task] = set()
        self._listener: asyncio.Task | None = None
        self.consumer: Consumer | None = None

    def unreachable(self, exc: BaseException) -> StoreUnavailableError:
        self.on_error()
        return StoreUnavailableError(f"the job store ({self.name}) is unreachable: {type(exc).__name__}: {exc}")

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            raise self.unreachable(exc) from exc

    def start(self) -> None:
        """Listen for cancellations, in the background."""
        self._listener = asyncio.create_task(self._listen(), name="job-store")

    def take(self, runner: JobRunner, models: list[str], on_taken_over: Callable[[], None] = lambda: None) -> None:
        """Take jobs from these models' backlogs while the runner has room (app/api/redis_backlog.py)."""
        self.consumer = Consumer(self, runner, models, self.visibility_s, on_taken_over)
        self.consumer.start()

    @staticmethod
    def key(job_id: str) -> str:
        return job_key(job_id)

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(CANCEL)
                counted = 0.0
                while True:
                    if time.monotonic() - counted >= COUNT_EVERY_S:
                        unfinished, finished = await self.redis.scard(UNFINISHED), await self.redis.zcard(FINISHED)
                        self._counts, counted = (unfinished, finished), time.monotonic()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._cancelled(json.loads(message["data"]))
            except (RedisError, OSError) as exc:
                self.on_error()
                log.warning("job store %s: %s; retrying in 1 s", self.name, exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _cancelled(self, message: dict[str, Any]) -> None:
        job = self.local.get(message["id"])
        if job is not None and not job.finished:
            job.finish("cancelled", error=message["error"])
            if job.abort is not None:
                job.abort()

    async def reserve(self) -> None:
        unfinished = await self._call(lambda: self.redis.scard(UNFINISHED))
        if unfinished >= self.max_jobs:
            raise StoreFullError(f"{unfinished} unfinished jobs: the store holds at most {self.max_jobs}")

    async def add(self, job: Job) -> Job:
        meta = {
            "id": job.id,
            "model": job.model,
            "body": job.body,
            "created_at": job.created_at,
            "idempotency_key": job.idempotency_key,
            "seeds": list(job.spec.seeds),  # drawn at the POST where the body has no seed: every run draws these
            "client": job.client,
        }
        idem = "" if job.idempotency_key is None else f"{PREFIX}key:{job.idempotency_key}"
        args: list[str | float] = [time.time(), self.ttl_s, self.max_jobs, job.id, json.dumps(meta)]
        args += [json.dumps(self._state(job)), PREFIX, idem]
        keys = [UNFINISHED, FINISHED, backlog_key(job.model)]
        answer, value = await self._call(lambda: self._add(keys=keys, args=args))
        if answer == "full":
            raise StoreFullError(f"{value} unfinished jobs: the store holds at most {self.max_jobs}")
        if answer == "known":
            known = await self.get(value)
            if known is not None:
                return known
        return job

    def running(self, job: Job) -> None:
        """The job runs here from now on (the consumer took it): its changes are written by saved()."""
        self.local[job.id] = job
        self._traced[job.id] = 0

    def forget(self, job: Job) -> None:
        """This replica runs the job no more: another one does, or the backlog has it again."""
        job.handed_on = True
        self.local.pop(job.id, None)
        self._traced.pop(job.id, None)

    def lost(self, job: Job, reply: Any) -> None:
        """The job is no longer this replica's to run, by a RENEW or PROGRESS reply: it ended (a cancel, whose
        message this replica may not have heard yet: the job ends here as stored, and its run counts it) or another
        replica runs it now (this run's work is not the job's). Either way its engine request is aborted."""
        if isinstance(reply, list) and reply[0] == "ended":
            final = json.loads(reply[2] or "{}")
            job.finish(reply[1], result=final.get("result"), error=final.get("error"))
        else:
            self.forget(job)
        if job.abort is not None:
            job.abort()

    async def release(self, job: Job) -> bool:
        """Hand the job back to the backlog (its engine stopped before it finished): whether it was."""
        consumer = self.consumer
        if consumer is None:
            return False
        return await self._call(lambda: consumer.release(job))

    @staticmethod
    def _state(job: Job) -> dict[str, Any]:
        return {
            "step": job.step,
            "queue_position": job.queue_position,
            "queue_wait_s": job.queue_wait_s,
            "preview": preview_record(job.preview),
            "preempted": job.preempted,
            "preemptions": job.preemptions,
        }

    async def saved(self, job: Job) -> None:
        if job.finished:
            if not await self._write_final(job):
                self._keep(self._retry_final(job))
            return
        traced = self._traced.get(job.id, 0)
        rows = job.trace[traced:]
        args = [self.owner, json.dumps(self._state(job)), *(json.dumps(row) for row in rows)]
        try:
            mine = await self._progress(keys=[job_key(job.id)], args=args)
        except (RedisError, OSError) as exc:  # progress is dropped; the result is retried
            self.on_error()
            log.warning("job %s: its progress was not stored: %s", job.id, exc)
            return
        self._traced[job.id] = traced + len(rows)
        if mine != 1 and job.id in self.local:
            self.lost(job, mine)

    async def _write_final(self, job: Job) -> bool:
        """Write the job's end (it stands unless another outcome was written first); False if Redis failed."""
        final = {"step": job.step, "finished_at": job.finished_at, "result": job.result, "error": job.error}
        idem = "" if job.idempotency_key is None else f"{PREFIX}key:{job.idempotency_key}"
        args: list[str | float] = [job.id, job.outcome or "", json.dumps(final), time.time(), int(self.ttl_s), idem]
        args += [self.owner, GROUP]
        try:
            await self._finish(keys=[UNFINISHED, FINISHED, job_key(job.id)], args=args)
        except (RedisError, OSError) as exc:
            self.on_error()
            log.warning("job %s: its %s end was not stored yet: %s", job.id, job.outcome, exc)
            return False
        self.local.pop(job.id, None)
        self._traced.pop(job.id, None)
        return True

    async def _retry_final(self, job: Job) -> None:
        deadline = time.monotonic() + self.ttl_s
        while time.monotonic() < deadline:
            await asyncio.sleep(RETRY_FINAL_S)
            if await self._write_final(job):
                return

    def _keep(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get(self, job_id: str) -> Job | None:
        if (job := self.local.get(job_id)) is not None:
            return job
        return await self._load(job_id)

    async def _load(self, job_id: str) -> Job | None:
        async def read() -> tuple[dict[str, str], list[str]]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(job_key(job_id))
                pipe.lrange(f"{job_key(job_id)}:trace", 0, -1)
                record, trace = await pipe.execute()
            return record, trace

        record, trace = await self._call(read)
        if not record:
            return None
        job = self._job(record, trace)
        if "runner" not in record and job.outcome is None:  # in the backlog: its place there
            job.queue_position = await self._call(lambda: self._position(keys=[job_key(job_id)], args=[GROUP]))
        return job

    def _job(self, record: dict[str, str], trace: list[str]) -> Job:
        meta, state = json.loads(record["meta"]), json.loads(record["state"])
        spec = self.spec_of(meta["body"])
        job = Job(
            id=meta["id"],
            spec=dataclasses.replace(spec, seeds=tuple(meta["seeds"])),
            model=meta["model"],
            request_id="",  # on another replica, or finished
            body=meta["body"],
            arrived=0.0,
            created_at=meta["created_at"],
            idempotency_key=meta["idempotency_key"],
            client=meta["client"],
            queue_position=state["queue_position"],
            queue_wait_s=state["queue_wait_s"],
            step=state["step"],
            trace=[json.loads(row) for row in trace],
            preview=preview_from(state["preview"]),
            preempted=state.get("preempted", False),  # a state written before it was kept: none
            preemptions=state.get("preemptions", 0),
        )
        if "outcome" in record:
            final = json.loads(record["final"])
            job.outcome = record["outcome"]  # type: ignore[assignment]  # written from a Status
            job.step, job.finished_at = final["step"], final["finished_at"]
            job.result, job.error = final["result"], final["error"]
        return job

    async def by_key(self, key: str) -> Job | None:
        job_id = await self._call(lambda: self.redis.get(f"{PREFIX}key:{key}"))
        return None if job_id is None else await self.get(str(job_id))

    async def cancel(self, job: Job, error: dict[str, Any]) -> bool:
        local = self.local.get(job.id)
        finished_at = time.time()
        final = {"step": job.step, "finished_at": finished_at, "result": None, "error": error}
        idem = "" if job.idempotency_key is None else f"{PREFIX}key:{job.idempotency_key}"
        args: list[str | float] = [job.id, "cancelled", json.dumps(final), finished_at, int(self.ttl_s), idem]
        args += ["", GROUP]  # any runner: a cancel ends the job wherever it runs
        keys = [UNFINISHED, FINISHED, job_key(job.id)]

        if not await self._call(lambda: self._finish(keys=keys, args=args)):
            return False
        job.finish("cancelled", error=error)
        job.finished_at = finished_at
        if local is not None:
            self._cancelled({"id": job.id, "error": error})
            self.local.pop(job.id, None)
        else:
            await self._call(lambda: self.redis.publish(CANCEL, json.dumps({"id": job.id, "error": error})))
        return True

    @contextlib.asynccontextmanager
    async def watch(self, job: Job) -> AsyncIterator[Job]:
        if job.id in self.local or job.finished:
            yield job
            return
        pubsub = self.redis.pubsub()
        await self._call(lambda: pubsub.subscribe(job_key(job.id)))

        async def refresh() -> None:
            while not job.finished:
                if (loaded := await self._load(job.id)) is None:
                    return
                self._apply(job, loaded)
                with contextlib.suppress(asyncio.TimeoutError):
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)

        task = asyncio.create_task(refresh())
        try:
            yield job
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    @staticmethod
    def _apply(job: Job, loaded: Job) -> None:
        """Bring a job read earlier up to date with the store."""
        job.step, job.queue_position, job.queue_wait_s = loaded.step, loaded.queue_position, loaded.queue_wait_s
        job.trace, job.preview = loaded.trace, loaded.preview
        job.preempted, job.preemptions = loaded.preempted, loaded.preemptions
        if loaded.outcome is not None:
            job.finish(loaded.outcome, result=loaded.result, error=loaded.error)
            job.finished_at = loaded.finished_at
        else:
            job._notify_change()

    async def check(self) -> str | None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            return str(self.unreachable(exc))
        return None

    def counts(self) -> tuple[int, int]:
        return self._counts

    def backlog(self) -> tuple[int, int]:
        return (0, 0) if self.consumer is None else self.consumer.backlog

    async def close(self) -> None:
        """Stop taking jobs and listening; the results still unwritten get a few more seconds."""
        if self.consumer is not None:
            await self.consumer.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
            for task in self._tasks:
                task.cancel()
        await self.redis.aclose()
