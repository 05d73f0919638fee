"""What the engine sends its client: plain data, built in the compute thread (no tensors, no live sampler state).

A request's stream is zero or more `Progress`, then one `Finished` or `Failed`. Every field is a number, a
string, a tuple or a uint8 array, so that an engine in its own process could send them as they are (msgpack),
as vLLM's engine core sends its outputs to the API server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.sampling import Preview

# rejected: the queue was full; closed: the engine stopped before it finished (a drain that ran out of time) or
# was not accepting; non_finite: its latents went NaN or infinite; engine: the engine's loop failed; invalid: it
# can never fit max_batch_rows; cancelled: its client aborted it; deadline: at the engine's measured pace, the work
# ahead of it leaves it no time to finish within its timeout_s (refused at once, not queued).
FailureKind = Literal["rejected", "closed", "non_finite", "engine", "invalid", "cancelled", "deadline"]
# A Progress at a change of state: preempted (the request left the batch, its run kept), resumed (it came back).
ProgressEvent = Literal["preempted", "resumed"]
TraceRow = dict[str, Any]  # one step of the guidance trace: step, scale and per-image norms as plain lists


@dataclass(frozen=True)
class Progress:
    """A request's state after a tick: queued at a place in the queue, or admitted and some steps in."""

    request_id: str
    step: int  # steps taken
    steps: int
    queue_position: int | None  # 1: the next to be admitted; None once admitted
    queue_wait_s: float | None = None  # from add to admission; None while queued
    trace: tuple[TraceRow, ...] = ()  # with return_trace: the rows of the steps taken since the last Progress
    preview: Preview | None = None  # a preview newer than the last Progress's, if any
    preempted: bool = False  # out of the batch for more urgent work, in the queue again at queue_position
    event: ProgressEvent | None = None  # set on the Progress sent at the change

    @property
    def queued(self) -> bool:
        return self.queue_wait_s is None


@dataclass(frozen=True)
class Finished:
    request_id: str
    images: np.ndarray  # uint8 (N, H, W, C)
    queue_wait_s: float
    compute_s: float
    trace: tuple[TraceRow, ...] | None = None  # with return_trace: every step's row


@dataclass(frozen=True)
class Failed:
    request_id: str
    kind: FailureKind
    message: str
    retry_after_s: float | None = None  # deadline: about when the work ahead of it will have started


RequestOutput = Progress | Finished | Failed


@dataclass(frozen=True)
class EngineStats:
    """What one tick did; the metrics are recorded from these."""

    rows: int
    active_requests: int
    queue_depth: int
    tick_seconds: float
    images_finished: int
    cond_rows: int = 0  # rows with a class label
    uncond_rows: int = 0  # rows with the null label
    perturbed_rows: int = 0  # rows with perturbed attention (attention guidance), a class label or not
    guide_rows: int = 0  # rows through a guide model's forward (autoguidance), beside the `rows` of this model's
    skipped_uncond_rows: int = 0  # unconditional rows not run: the weight of that step was exactly 1
    reused_uncond_rows: int = 0  # unconditional rows not run: their request reused its guidance difference
    skipped_step_images: int = 0  # images whose request skipped this step (a skip cache): none of their rows ran
    shallow_rows: int = 0  # rows of `rows` that reused cached deep features and ran only the shallow path
    queue_waits: tuple[float, ...] = ()  # seconds each request admitted at this tick waited (resumed ones aside)
    class_queue_waits: tuple[tuple[str, float], ...] = ()  # the same, each with its request's priority class
    class_rows: tuple[tuple[str, int], ...] = ()  # rows of this forward per priority class
    latencies: tuple[tuple[str, float], ...] = ()  # per request finished at this tick: class, seconds from add
    client_rows: tuple[tuple[str, str, int], ...] = ()  # rows of this forward per (priority class, client)
    preemptions: int = 0  # requests preempted at this tick


@dataclass(frozen=True)
class EngineOutputs:
    """One message to the client: a tick's outputs, and the stats of the ticks since the last message (sent with
    every output, else at least every STATS_EVERY_S: a tick without outputs wakes the event loop no more often)."""

    outputs: tuple[RequestOutput, ...]
    stats: tuple[EngineStats, ...] = ()


@dataclass(frozen=True)
class CurvePoint:
    """One step of a request's guidance curve: what the sampler will use, computed by its own code."""

    step: int
    timestep: int
    sigma: float
    scale: float  # s_i
    noise_level: float  # the request's noise level times the noise schedule's factor at this step
