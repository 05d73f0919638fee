"""Step-level batching (continuous batching, as in vLLM/Orca, at the granularity of sampler steps).

The engine lives in the compute thread, as vLLM's engine core lives behind its API server: its client
(app/engine/client.py) hands requests in and reads plain outputs back, and nothing else crosses. Requests and
aborts arrive as messages, in order; each tick, in the compute thread, it:
  1. takes the messages: builds each new request's SampleRun (here, not in the event loop), refuses what cannot
     be queued, and what has a deadline that the work ahead of it, at the engine's measured pace per tick
     (app/engine/pace.py), leaves no time to meet; drops aborted requests, so no compute is spent on them;
  2. admits waiting requests by class, then by fair shares between clients, where their rows fit under
     max_batch_rows at every tick to come, and preempts less urgent running requests where that makes room
     (app/engine/scheduler.py): a preempted request keeps its SampleRun and resumes at a later tick where it
     stopped;
  3. steps each active request through its steps that run no row (a skip cache's, app/sampling/skip.py: no
     forward, so they cost it no tick of their own), then runs ONE forward over the rows of all active requests
     (each one's conditional and unconditional rows, and its rows with perturbed attention where its method has
     them; per-row timesteps), and one forward of each guide model over the rows of the autoguidance requests
     that name it (another served model's denoiser, in this same thread);
  4. advances each request's own sampler, fails requests whose latents went non-finite, decodes finished ones;
  5. sends the tick's outputs (progress, results, errors) and stats to the client in one message (stats alone
     at most every STATS_EVERY_S).
A request therefore joins at the next tick and never waits for the current batch to finish. The compute thread
runs the next tick at once while there is work (app/engine/compute.py): no round trip through the event loop.

All of the model's compute runs in that one worker thread, the model load included (`worker()`): torch's CPU
build uses GNU OpenMP, which gives each thread that starts a parallel region its own team of threads, and once
the process holds more OpenMP threads than CPUs it stops spinning between parallel regions and puts its threads
to sleep instead. Measured on 2 cores (docs/benchmarks.md): 23 forwards in a worker thread cost the process ~140
voluntary context switches, and ~11,500 once its main thread had run one large op.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from app.engine.admission import deadline_refusal, model_refusal, refuse_unless_open
from app.engine.batch import guidance_curve, sample_alone, step_batch, tick_stats, warm_rows
from app.engine.compute import SharedCompute
from app.engine.outputs import (
    CurvePoint,
    EngineOutputs,
    EngineStats,
    Failed,
    FailureKind,
    Finished,
    RequestOutput,
)
from app.engine.pace import TickTimes
from app.engine.policy import PRIORITIES
from app.engine.scheduler import ANONYMOUS, EngineRequest, Scheduler
from app.models.attention import PerturbationSupport
from app.sampling import (
    ClassEmbedding,
    Denoiser,
    ImageDecoder,
    SampleRun,
    SampleSpec,
    to_uint8,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Sink = Callable[[EngineOutputs], None]
# A tick without outputs (no request finished, none asked for progress) sends its stats at most this often.
STATS_EVERY_S = 0.1


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
        max_preempted_bytes: int = 256 << 20,
        client_weights: Mapping[str, float] | None = None,
        executor: ThreadPoolExecutor | None = None,
        class_embedding: ClassEmbedding | None = None,
        compute: SharedCompute | None = None,
        name: str = "model",
        decode: ImageDecoder | None = None,
        perturbations: Mapping[str, PerturbationSupport] | None = None,
        guides: Mapping[str, Denoiser] | None = None,
    ) -> None:
        """compute: the thread shared with other models' engines (it outlives this engine); without it,
        the engine runs its own on executor (or a new worker()) and shuts it down when it stops. client_weights:
        a client's share of its class's rows relative to others' (1 where unlisted).
        perturbations: the model's perturbation_support at its precision (app/models/attention.py); a request
        whose method's perturbation it cannot run is refused as invalid (without it, none is checked).
        guides: the served models that may guide this one (autoguidance), by name: their denoisers, run in
        this thread."""
        self.name = name
        self._denoiser = denoiser
        self._guides: dict[str, Denoiser] = dict(guides or {})
        self._decode = decode or to_uint8  # finished samples -> uint8 images, in the compute thread
        self._class_embedding = class_embedding
        self._scheduler_config = scheduler_config
        self._image_shape = image_shape
        self._null_label = null_label
        self._device = device
        self._perturbations = perturbations
        self._scheduler = Scheduler(max_batch_rows, max_queue, max_preempted_bytes, client_weights)
        self._pace = TickTimes(max_batch_rows)
        self._requests: dict[str, EngineRequest] = {}  # waiting and active, by id
        self._messages: deque[tuple[Any, ...]] = deque()  # from the client, in order: add, abort, fail_all
        self._sink: Sink = lambda outputs: None
        self._owns_compute = compute is None
        self._compute = compute or SharedCompute(executor)
        # Counters, each written by one thread: adds sent (the client's), taken and finished (the compute thread's).
        self._sent = 0
        self._taken = 0
        self._finals = 0
        self._queue_changed = False
        # (requests taken, free rows) as the compute thread last saw them: one tuple, written whole.
        self._room = (0, max_batch_rows)
        self._preemptions = 0  # since the last tick's stats
        self._stats: list[EngineStats] = []  # of the ticks since the last message to the client
        self._sent_at = 0.0
        self._started = False
        self._stopped = False
        self._accepting = False
        self._error: BaseException | None = None

    @property
    def max_batch_rows(self) -> int:
        return self._scheduler.max_batch_rows

    @property
    def denoiser(self) -> Denoiser:
        """The forward every tick runs (the served model's, with its precision and compiled buckets)."""
        return self._denoiser

    def add_guide(self, name: str, denoiser: Denoiser) -> None:
        """Let autoguidance requests name `name` as their guide (before start: its forward must run in the
        compute thread this engine ticks in, as another served model's does)."""
        self._guides[name] = denoiser

    @property
    def guides(self) -> tuple[str, ...]:
        return tuple(self._guides)

    # --- what the client calls, from the event loop's thread ----------------------------------------

    def connect(self, sink: Sink) -> None:
        """sink receives each tick's outputs, in the compute thread."""
        self._sink = sink

    def add_request(
        self,
        request_id: str,
        spec: SampleSpec,
        *,
        progress: bool = False,
        limit_queue: bool = True,
        priority: str = PRIORITIES[0],
        client: str = ANONYMOUS,
        timeout_s: float | None = None,
    ) -> None:
        """Queue a request; its run is built in the compute thread. limit_queue=False skips the max_queue check,
        for a caller that bounds its own requests (the jobs API's store). priority: one of PRIORITIES. client:
        whose share of the class's rows it takes. timeout_s: it must finish within this many seconds of now, else
        it is refused at once (Failed "deadline") where the engine's pace says it cannot."""
        refuse_unless_open(priority, self.error, self._accepting)
        self._sent += 1
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        self._messages.append(("add", request_id, spec, now, progress, limit_queue, priority, client, deadline))
        self._compute.notify()

    def abort_request(self, request_id: str) -> None:
        """Drop the request: its rows leave the batch at the next tick."""
        self._messages.append(("abort", request_id))
        self._compute.notify()

    def check_health(self) -> bool:
        return self._started and not self._stopped and self._error is None

    @property
    def error(self) -> str | None:
        """What stopped the engine, for the health endpoints; None while it has not failed."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Requests not admitted yet: those waiting, and those sent that the compute thread has not taken."""
        return len(self._scheduler.waiting) + self._sent - self._taken

    @property
    def active_requests(self) -> int:
        return len(self._scheduler.active)

    @property
    def free_rows(self) -> int:
        """Rows of max_batch_rows free for a new request now (Scheduler.free_rows, as of the last tick); 0 while a
        request sent has not been taken yet (its rows are not known until its run is built), or while the engine
        admits nothing. A consumer of a shared backlog takes work only while this is positive."""
        taken, free = self._room
        return free if taken == self._sent and self._accepting and self._error is None else 0

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def held(self) -> int:
        """Requests sent that have not ended (finished, failed or dropped)."""
        return self._sent - self._finals

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._accepting = self._started = True
        self._compute.attach(self)

    async def stop(self, drain: bool = True, timeout_s: float = math.inf) -> None:
        """Stop admitting; with drain, finish every admitted and waiting request first, for up to timeout_s: those
        still unfinished then fail as closed."""
        self._accepting = False
        if self._started and not self._stopped:
            if not drain:
                self._messages.append(("fail_all", "cancelled", "the engine stopped"))
                self._compute.notify()
            deadline = time.monotonic() + timeout_s
            while self.held and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.held:
                unfinished = f"the service shut down before this finished (still running {timeout_s:g} s after)"
                self._messages.append(("fail_all", "closed", unfinished))
                self._compute.notify()
                while self.held:  # at the next tick, once the one under way has run
                    await asyncio.sleep(0.05)
            self._compute.detach(self)
        self._stopped = True
        if self._owns_compute:
            self._compute.shutdown()

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the compute thread, before its next tick: the batch pauses, and resumes as it was. The warmup
        uses it, and the benchmarks time the raw sampling loop with it in the service's own thread."""
        return await self._compute.call(fn, *args)

    async def warmup(self, spec: SampleSpec) -> None:
        """Before the service reports ready: run one request, then one forward at every row count.

        The batch's row count changes from tick to tick, and the CPU backend (oneDNN) builds its
        kernels per input shape the first time it sees one, at up to about twice a warm forward's cost.
        Paying that here keeps it out of the first requests' latency and the batching throughput.
        """
        await self.run_in_worker(self._sample_alone, spec)
        # One call per row count: a shutdown during the warmup waits for one forward, not for them all.
        for rows in range(1, self.max_batch_rows + 1):
            await self.run_in_worker(self._warm_rows, rows)

    async def guidance_curve(self, spec: SampleSpec) -> list[CurvePoint]:
        """Per step of the request's run: its timestep, sigma, guidance scale s_i and noise level."""
        return await self.run_in_worker(self._curve, spec)

    # --- in the compute thread ----------------------------------------------------------------

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

    def _sample_alone(self, spec: SampleSpec) -> None:
        sample_alone(self._denoiser, self.make_run(spec), self._guides)

    def _warm_rows(self, rows: int) -> None:
        warm_rows(self._denoiser, rows, self._image_shape, self._null_label, self._device)

    def _curve(self, spec: SampleSpec) -> list[CurvePoint]:
        return guidance_curve(self.make_run(spec))

    def has_work(self) -> bool:
        return bool(self._messages) or (self._error is None and bool(self._scheduler.active or self._scheduler.waiting))

    def tick(self) -> None:
        """One tick (the module's docstring); its outputs go to the client in one message."""
        outputs: list[RequestOutput] = []
        stats = None
        try:
            self._take_messages(outputs)
            if self._error is None:
                decision = self._scheduler.schedule()
                admitted = decision.admitted
                self._queue_changed |= bool(admitted or decision.preempted)
                self._preemptions += len(decision.preempted)
                outputs += [r.report("preempted") for r in decision.preempted if r.progress]
                outputs += [r.report("resumed" if r.preemptions else None) for r in admitted if r.progress]
                if outputs:  # admissions and ends show at once, not after the forward (a job is running from here)
                    self._sink(EngineOutputs(tuple(outputs), ()))
                    outputs = []
                if self._scheduler.active:
                    stats = self._step(outputs, admitted)
                self._send_positions(outputs)
        except Exception as exc:  # a broken model must not leave requests hanging
            self._error = exc
            log.exception("engine %s failed", self.name)
            self._end_all("engine", f"engine failure: {exc}", outputs)
        if stats is not None:
            self._stats.append(stats)
        self._room = (self._taken, self._scheduler.free_rows())
        now = time.monotonic()
        if outputs or (self._stats and now - self._sent_at >= STATS_EVERY_S):
            self._sink(EngineOutputs(tuple(outputs), tuple(self._stats)))
            self._stats, self._sent_at = [], now

    def _take_messages(self, outputs: list[RequestOutput]) -> None:
        while self._messages:
            message = self._messages.popleft()
            if message[0] == "add":
                self._take(*message[1:], outputs=outputs)
            elif message[0] == "abort":
                request = self._requests.get(message[1])
                if request is not None:
                    self._end(request, "cancelled", "the request was cancelled", outputs)
            else:
                self._end_all(message[1], message[2], outputs)

    def _take(
        self,
        request_id: str,
        spec: SampleSpec,
        enqueued_at: float,
        progress: bool,
        limit_queue: bool,
        priority: str,
        client: str,
        deadline: float | None,
        *,
        outputs: list,
    ) -> None:
        self._taken += 1
        if self._error is not None:
            self._finals += 1
            outputs.append(Failed(request_id, "engine", f"engine failure: {self._error}"))
            return
        request = EngineRequest(request_id, self.make_run(spec), enqueued_at, progress, priority, client)
        refusal = model_refusal(request.run, self.name, self._denoiser, self._perturbations, self._guides)
        refusal = refusal or self._scheduler.refusal(request.run, limit_queue)
        if refusal is not None:
            self._finals += 1
            outputs.append(Failed(request.id, *refusal))
            return
        if deadline is not None and (late := self._late(request, deadline)) is not None:
            self._finals += 1
            outputs.append(late)
            return
        self._requests[request.id] = request
        self._scheduler.add(request)
        self._queue_changed = True

    def _late(self, request: EngineRequest, deadline: float) -> Failed | None:
        """deadline_refusal at the engine's measured pace, in its share of the compute thread."""
        table = self._pace.table()
        others = 0 if table is None else self._compute.busy_others(self)
        return deadline_refusal(request, deadline, table, others, self._scheduler)

    def _end(self, request: EngineRequest, kind: FailureKind, message: str, outputs: list[RequestOutput]) -> None:
        """A request leaves before its last step: its rows leave the batch, its client gets the reason."""
        self._scheduler.remove(request)
        request.run.release()
        del self._requests[request.id]
        self._finals += 1
        self._queue_changed = True
        outputs.append(Failed(request.id, kind, message))

    def _end_all(self, kind: FailureKind, message: str, outputs: list[RequestOutput]) -> None:
        for request in list(self._requests.values()):
            self._end(request, kind, message, outputs)

    def _step(self, outputs: list[RequestOutput], admitted: list[EngineRequest]) -> EngineStats:
        """The tick's compute (app/engine/batch.py), then each request's outputs: its progress, its end where its
        latents went non-finite, its images where it is done."""
        t0 = time.perf_counter()
        requests = list(self._scheduler.active)
        step = step_batch(self._denoiser, self._guides, self._decode, requests, outputs)
        self._scheduler.stepped()
        finished = 0
        latencies: list[tuple[str, float]] = []
        now = time.monotonic()
        for request, ok in zip(requests, step.finite, strict=True):
            run = request.run
            if not ok:
                message = f"non-finite values in the latents at step {run.step_index}"
                self._end(request, "non_finite", message, outputs)
                continue
            if request.progress:
                outputs.append(request.report())
            if run.done:
                self._scheduler.finished(request)
                del self._requests[request.id]
                self._finals += 1
                finished += run.spec.num_images
                trace = tuple(t.to_dict() for t in run.trace) if run.spec.return_trace else None
                assert request.started_at is not None
                compute_s = now - request.started_at
                wait_s = request.started_at - request.enqueued_at
                latencies.append((request.priority, now - request.enqueued_at))
                outputs.append(Finished(request.id, step.images[id(run)], wait_s, compute_s, trace))
        tick_seconds = time.perf_counter() - t0
        if not step.shallow_rows:  # a tick with cached rows costs less than its rows say: the pace is of full rows
            self._pace.observe(step.rows, tick_seconds)
        return tick_stats(
            step,
            active_requests=len(requests),
            queue_depth=len(self._scheduler.waiting),
            tick_seconds=tick_seconds,
            images_finished=finished,
            admitted=admitted,
            latencies=latencies,
            preemptions=self._take_preemptions(),
        )

    def _take_preemptions(self) -> int:
        count, self._preemptions = self._preemptions, 0
        return count

    def _send_positions(self, outputs: list[RequestOutput]) -> None:
        """A Progress for each waiting request whose place in the queue changed."""
        if not self._queue_changed:
            return
        self._queue_changed = False
        for position, request in enumerate(self._scheduler.ordered(), start=1):
            if request.progress and request.position != position:
                request.position = position
                outputs.append(request.report())
