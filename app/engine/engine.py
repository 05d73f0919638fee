"""Step-level batching (continuous batching, as in vLLM/Orca, at the granularity of sampler steps).

One asyncio task owns the model. Each tick it:
  1. drops cancelled jobs, so no compute is spent on them;
  2. admits waiting jobs, in arrival order, while their rows fit under max_batch_rows at every tick to
     come (below);
  3. runs ONE forward over the rows of all active jobs (each job's conditional and unconditional
     rows, per-row timesteps) in a worker thread, so the event loop stays responsive;
  4. advances each job's own sampler, fails jobs whose latents went non-finite, resolves finished ones.
A job therefore joins at the next tick and never waits for the current batch to finish.

Admission by rows per tick. A job's rows at each of its steps are known when it is submitted: two per
image where its guidance weight is not exactly 1, one where it is (the unconditional pass is skipped),
one for an unconditional request. Every admitted job takes one step per tick, so the rows of the ticks to
come are the sum of the admitted jobs' remaining profiles, aligned at the current tick (`_load`). The job
at the head of the queue is admitted when its profile, added to that sum, stays within max_batch_rows at
every tick; the queue is first-in first-out, so a large job at its head is never overtaken. Rows that one
job's guidance interval frees are thereby given to another job for exactly those ticks, and no forward
ever holds more than max_batch_rows.

All of the model's compute runs in that one worker thread, the model load included (`worker()`):
torch's CPU build uses GNU OpenMP, which gives each thread that starts a parallel region its own
team of threads, and once the process holds more OpenMP threads than CPUs it stops spinning
between parallel regions and puts its threads to sleep instead. Measured on 2 cores
(docs/benchmarks.md): 23 forwards in a worker thread cost the process ~140 voluntary context
switches, and ~11,500 once its main thread had run one large op.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch

from app.engine.compute import SharedCompute
from app.sampling import ClassEmbedding, Denoiser, ImageDecoder, SampleRun, SampleSpec, denoise_step, to_uint8

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The wait queue is at its limit."""


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and admits no new jobs."""


class NonFiniteError(RuntimeError):
    """A job's latents became NaN or infinite."""


@dataclass(frozen=True)
class JobResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    queue_wait_s: float
    compute_s: float
    trace: list[dict] | None = None  # with spec.return_trace: the guidance trace, one dict per step


@dataclass(frozen=True)
class EngineStats:
    """What one tick did; the metrics are recorded from these."""

    rows: int
    active_jobs: int
    queue_depth: int
    step_seconds: float
    images_finished: int
    cond_rows: int = 0  # rows with a class label
    uncond_rows: int = 0  # rows with the null label
    skipped_uncond_rows: int = 0  # unconditional rows not run: the weight of that step was exactly 1


@dataclass(eq=False)
class Job:
    spec: SampleSpec
    future: asyncio.Future
    run: SampleRun  # built at submit, while the current forward runs, not between forwards
    model: str  # the name of the engine's model
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # admitted into the batch
    cancelled: bool = False
    _stepped: asyncio.Future | None = field(default=None, repr=False)

    @property
    def progress(self) -> tuple[int, int]:
        return (self.run.step_index, self.spec.steps)

    @property
    def queued(self) -> bool:
        return self.started_at is None

    def next_step(self) -> asyncio.Future:
        """A future resolved once the job has taken its next step (a progress bar's wake-up)."""
        if self._stepped is None or self._stepped.done():
            self._stepped = asyncio.get_running_loop().create_future()
        return self._stepped

    def _notify_step(self) -> None:
        if self._stepped is not None and not self._stepped.done():
            self._stepped.set_result(None)


StatsHook = Callable[[EngineStats], None]
AdmitHook = Callable[[Job], None]


@dataclass(frozen=True)
class Tick:
    """What one tick's compute returns to the loop."""

    stats: EngineStats
    finite: list[bool]  # per run: its latents are finite
    images: dict[int, np.ndarray]  # id(run) -> the uint8 images of each run that finished


class Engine:
    def __init__(
        self,
        denoiser: Denoiser,
        *,
        scheduler_config: dict,
        image_shape: tuple[int, int, int],
        null_label: int,
        device: torch.device,
        max_batch_rows: int,
        max_queue: int,
        on_step: StatsHook | None = None,
        on_admit: AdmitHook | None = None,
        executor: ThreadPoolExecutor | None = None,
        class_embedding: ClassEmbedding | None = None,
        compute: SharedCompute | None = None,
        name: str = "model",
        decode: ImageDecoder | None = None,
    ) -> None:
        """compute: the thread shared with other models' engines (it outlives this engine); without it,
        the engine runs its own on executor (or a new worker()) and shuts it down when it stops."""
        self.name = name
        self._denoiser = denoiser
        self._decode = decode or to_uint8  # finished samples -> uint8 images, in the compute thread
        self._class_embedding = class_embedding
        self._scheduler_config = scheduler_config
        self._image_shape = image_shape
        self._null_label = null_label
        self._device = device
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self._on_step = on_step
        self._on_admit = on_admit
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._load = np.zeros(0, dtype=np.int64)  # rows at each tick to come, of the admitted jobs
        self._wake = asyncio.Event()
        self._owns_compute = compute is None
        self._compute = compute or SharedCompute(executor)
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._error: BaseException | None = None

    # --- the interface the HTTP front end uses -------------------------------------------------

    @property
    def denoiser(self) -> Denoiser:
        """The forward every tick runs (the served model's, with its precision and compiled buckets)."""
        return self._denoiser

    def submit(self, spec: SampleSpec, *, limit_queue: bool = True) -> Job:
        """Queue a job. limit_queue=False skips the max_queue check, for a caller that bounds its own
        jobs (the jobs API's store)."""
        if self._error is not None:
            raise EngineClosedError(f"the engine failed: {self.error}")
        if not self._accepting:
            raise EngineClosedError("the engine is not accepting requests (starting up or draining)")
        run = self.make_run(spec)
        if run.rows_profile().max(initial=0) > self.max_batch_rows:
            raise ValueError(f"a request of {spec.num_images} images cannot fit max_batch_rows")
        room_now = not self._waiting and self._fits(run)
        if limit_queue and len(self._waiting) >= self.max_queue and not room_now:
            raise QueueFullError(f"queue full ({self.max_queue} waiting)")
        job = Job(spec=spec, future=asyncio.get_running_loop().create_future(), run=run, model=self.name)
        self._waiting.append(job)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job: its rows leave the batch at the next tick."""
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
        if not job.future.done():
            job.future.cancel()
        self._wake.set()

    def check_health(self) -> bool:
        return self._task is not None and not self._task.done() and self._error is None

    @property
    def error(self) -> str | None:
        """What stopped the engine's loop, for the health endpoints; None while it has not failed."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_jobs(self) -> int:
        return len(self._active)

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to be admitted, 2 for the one after it; None once admitted or cancelled."""
        try:
            return self._waiting.index(job) + 1
        except ValueError:
            return None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")
        self._accepting = True

    async def stop(self, drain: bool = True, timeout_s: float = math.inf) -> None:
        """Stop admitting; with drain, finish every admitted and waiting job first, for up to timeout_s: the
        jobs still unfinished then fail with EngineClosedError."""
        self._accepting = False
        if not drain:
            for job in [*self._waiting, *self._active]:
                self.cancel(job)
        deadline = time.monotonic() + timeout_s
        while self._task and not self._task.done() and (self._waiting or self._active):
            if time.monotonic() >= deadline:
                unfinished = f"the service shut down before this finished (still running {timeout_s:g} s after)"
                self._fail_unfinished(EngineClosedError(unfinished))
                break
            await asyncio.sleep(0.05)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop failed earlier: logged, and its jobs failed, when it did
                pass
        if self._owns_compute:
            self._compute.shutdown()

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the model's thread, where every tick runs.

        Called while the loop awaits a tick, fn runs right after that tick and the next one waits for
        it: the batch pauses, and resumes as it was. The warmup uses it, and the benchmark times the raw
        sampling loop with it in the service's own thread, between the service's ticks under load."""
        return await asyncio.get_running_loop().run_in_executor(self._compute.executor, fn, *args)

    async def warmup(self, spec: SampleSpec) -> None:
        """Before the service reports ready: run one job, then one forward at every row count.

        The batch's row count changes from tick to tick, and the CPU backend (oneDNN) builds its
        kernels per input shape the first time it sees one, at up to about twice a warm forward's cost.
        Paying that here keeps it out of the first requests' latency and the batching throughput.
        """
        run = self.make_run(spec)
        while not run.done:
            await self.run_in_worker(denoise_step, self._denoiser, [run])
        # One call per row count: a shutdown during the warmup waits for one forward, not for them all.
        for rows in range(1, self.max_batch_rows + 1):
            await self.run_in_worker(self._warm_rows, rows)

    def _warm_rows(self, rows: int) -> None:
        x = torch.zeros((rows, *self._image_shape), device=self._device)
        t = torch.full((rows,), 500, dtype=torch.long, device=self._device)
        labels = torch.full((rows,), self._null_label, dtype=torch.long, device=self._device)
        self._denoiser(x, t, labels)

    def _fail_unfinished(self, error: Exception) -> None:
        """Fail every waiting and admitted job with error; their rows leave the batch at the next tick."""
        for job in [*self._waiting, *self._active]:
            job.cancelled = True
            if not job.future.done():
                job.future.set_exception(error)
        self._waiting.clear()
        self._wake.set()

    # --- the loop -----------------------------------------------------------------------------

    def make_run(self, spec: SampleSpec) -> SampleRun:
        return SampleRun(
            spec,
            self._scheduler_config,
            self._image_shape,
            self._null_label,
            self._device,
            self._class_embedding,
            self._decode,
        )

    def _fits(self, run: SampleRun) -> bool:
        """Whether the run's rows, added to the admitted jobs' at every tick to come, fit max_batch_rows."""
        profile = run.rows_profile()
        n = min(len(profile), len(self._load))
        return bool((profile[:n] + self._load[:n]).max(initial=0) <= self.max_batch_rows) and bool(
            profile[n:].max(initial=0) <= self.max_batch_rows
        )

    def _add_load(self, run: SampleRun, sign: int) -> None:
        """Add (sign 1) or take back (sign -1) the run's remaining rows at the ticks to come."""
        profile = run.rows_profile()
        if len(profile) > len(self._load):
            self._load = np.pad(self._load, (0, len(profile) - len(self._load)))
        self._load[: len(profile)] += sign * profile

    def _drop(self, job: Job) -> None:
        """A job leaves the batch before its last step: its rows at the ticks to come are free."""
        self._active.remove(job)
        self._add_load(job.run, -1)

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0].run):
            job = self._waiting.popleft()
            job.started_at = time.monotonic()
            self._add_load(job.run, 1)
            self._active.append(job)
            if self._on_admit:
                self._on_admit(job)

    def _tick(self, runs: list[SampleRun]) -> Tick:
        """In the compute thread: one shared forward, one host sync for all the finiteness flags, and one
        decode of the samples that are done (a latent model's VAE, batched over the requests)."""
        cond = sum(r.spec.num_images for r in runs if r.spec.class_label is not None)
        skipped = sum(r.spec.num_images for r in runs if r.spec.class_label is not None and not r.needs_uncond())
        rows = denoise_step(self._denoiser, runs)
        # Every image's flag in one reduction over the batch (not two kernels per request: on a GPU each is a
        # launch), read in the tick's one sync; a request is finite where all its images are.
        per_image = torch.cat([r.latents.flatten(1) for r in runs]).isfinite().all(dim=1).tolist()
        ends = np.cumsum([r.spec.num_images for r in runs])
        finite = [all(per_image[b - r.spec.num_images : b]) for r, b in zip(runs, ends, strict=True)]
        done = [r for r, ok in zip(runs, finite, strict=True) if ok and r.done]
        images: dict[int, np.ndarray] = {}
        if done:
            decoded = self._decode(torch.cat([r.latents for r in done]))
            offsets = np.cumsum([0] + [r.spec.num_images for r in done])
            images = {id(r): decoded[a:b] for r, a, b in zip(done, offsets[:-1], offsets[1:], strict=True)}
        stats = EngineStats(rows, len(runs), 0, 0.0, 0, cond, rows - cond, skipped)
        return Tick(stats, finite, images)

    async def _loop(self) -> None:
        try:
            while True:
                for job in [j for j in self._active if j.cancelled]:
                    self._drop(job)
                self._admit()
                if not self._active:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                jobs = list(self._active)
                t0 = time.perf_counter()
                tick = await self._compute.run(self, self._tick, [j.run for j in jobs])
                step_seconds = time.perf_counter() - t0
                self._load = self._load[1:]  # every admitted job took its step
                images_finished = self._settle(jobs, tick)
                if self._on_step:
                    self._on_step(
                        replace(
                            tick.stats,
                            queue_depth=len(self._waiting),
                            step_seconds=step_seconds,
                            images_finished=images_finished,
                        )
                    )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a broken model must not leave requests hanging
            self._error = exc
            log.exception("engine loop failed")
            for job in [*self._waiting, *self._active]:
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"engine failure: {exc}"))
            raise

    def _settle(self, jobs: list[Job], tick: Tick) -> int:
        """Fail non-finite jobs, resolve finished ones; returns the number of images finished."""
        now = time.monotonic()
        finished = 0
        for job, ok in zip(jobs, tick.finite, strict=True):
            job._notify_step()
            if job.cancelled:
                continue
            if not ok:
                self._drop(job)
                job.future.set_exception(
                    NonFiniteError(f"non-finite values in the latents at step {job.run.step_index}")
                )
            elif job.run.done:
                self._active.remove(job)
                finished += job.spec.num_images
                started_at = now if job.started_at is None else job.started_at  # set when it was admitted
                job.future.set_result(
                    JobResult(
                        images=tick.images[id(job.run)],
                        queue_wait_s=started_at - job.enqueued_at,
                        compute_s=now - started_at,
                        trace=[t.to_dict() for t in job.run.trace] if job.spec.return_trace else None,
                    )
                )
        return finished
