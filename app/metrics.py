"""Prometheus metrics on an explicit registry, recorded from the engine's per-step statistics."""

from __future__ import annotations

import collections
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from app.sampling.device import memory_in_use

# CPU generation is slow: latency buckets reach well past 60 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
# app/engine/policy.py's PRIORITIES (metrics does not import the engine: tests/test_layers.py).
PRIORITY_CLASSES = ("interactive", "batch")
OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "error")
JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "rejected")
# cfg_engine_forward_rows_total's kinds: a class label, the null label, perturbed attention (attention guidance),
# and rows through a guide model (autoguidance).
FORWARD_ROW_KINDS = ("conditional", "unconditional", "perturbed", "guide")
FORWARD_PATHS = ("full", "shallow")  # cfg_engine_path_rows: a step cache's rows take the shallow path


# The model label of a request refused before its model was known (an invalid body).
NO_MODEL = "none"
# The client label of the clients past the top ones in cfg_client_row_share.
OTHER_CLIENTS = "other"
# cfg_client_row_share's window: a client's share of its class's rows over this many seconds.
SHARE_WINDOW_S = 60


class ClientShares:
    """Each client's share of its priority class's rows over the last window_s seconds, per model, for
    cfg_client_row_share: the top_n clients by rows by name, the rest summed as "other", so that the series stay
    at most top_n + 1 per class and model however many clients come. Rows are kept per second of the window."""

    def __init__(self, top_n: int, window_s: float = SHARE_WINDOW_S) -> None:
        self.top_n = top_n
        self.window_s = window_s
        self._seconds: deque[tuple[int, dict[tuple[str, str, str], int]]] = deque()

    def add(self, model: str, priority: str, client: str, rows: int, now: float) -> None:
        second = int(now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append((second, {}))
        rows_by = self._seconds[-1][1]
        rows_by[(model, priority, client)] = rows_by.get((model, priority, client), 0) + rows

    def shares(self, now: float) -> dict[tuple[str, str], dict[str, float]]:
        """(model, priority) -> client (or "other") -> its fraction of the class's rows in the window."""
        while self._seconds and self._seconds[0][0] <= now - self.window_s:
            self._seconds.popleft()
        totals: dict[tuple[str, str], collections.Counter[str]] = {}
        for _, rows_by in self._seconds:
            for (model, priority, client), rows in rows_by.items():
                totals.setdefault((model, priority), collections.Counter())[client] += rows
        shares: dict[tuple[str, str], dict[str, float]] = {}
        for key, rows_by_client in totals.items():
            total = sum(rows_by_client.values())
            top = dict(rows_by_client.most_common(self.top_n))
            shares[key] = {client: rows / total for client, rows in top.items()}
            shares[key][OTHER_CLIENTS] = (total - sum(top.values())) / total
        return shares


@dataclass
class Metrics:
    """Every series of a model's requests and engine carries a `model` label (the served model's name)."""

    registry: CollectorRegistry
    request_duration: Histogram
    queue_wait: Histogram
    step_duration: Histogram
    batch_rows: Histogram
    images: Counter
    requests: Counter
    in_flight: Gauge
    queue_depth: Gauge
    model_info: Info
    device_memory: Gauge
    jobs: Counter
    jobs_stored: Gauge
    job_store_errors: Counter
    job_backlog: Gauge
    jobs_taken_over: Counter
    forward_rows: Counter
    skipped_rows: Counter
    reused_rows: Counter
    skipped_steps: Counter
    path_rows: Counter
    class_queue_wait: Histogram
    class_latency: Histogram
    class_rows: Counter
    preemptions: Counter
    deadline_refusals: Counter
    client_row_share: Gauge
    client_shares: ClientShares
    models: set[str] = field(default_factory=set)

    def observe_request(self, outcome: str, seconds: float | None = None, model: str = NO_MODEL) -> None:
        self.requests.labels(outcome=outcome, model=model).inc()
        if seconds is not None:
            self.request_duration.labels(outcome=outcome, model=model).observe(seconds)

    def add_model(self, model: str) -> None:
        """Export every series of a served model from the start, so that rates read 0 rather than nothing."""
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome, model=model)
            self.request_duration.labels(outcome=outcome, model=model)
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome=outcome, model=model)
        for kind in FORWARD_ROW_KINDS:
            self.forward_rows.labels(kind=kind, model=model)
        for path in FORWARD_PATHS:
            self.path_rows.labels(path=path, model=model)
        for metric in (
            self.queue_wait,
            self.step_duration,
            self.batch_rows,
            self.images,
            self.skipped_rows,
            self.reused_rows,
            self.skipped_steps,
        ):
            metric.labels(model=model)
        for priority in PRIORITY_CLASSES:
            for metric in (self.class_queue_wait, self.class_latency, self.class_rows):
                metric.labels(priority=priority, model=model)
        self.preemptions.labels(model=model)
        self.deadline_refusals.labels(model=model)
        for gauge in (self.in_flight, self.queue_depth):
            gauge.labels(model=model)
        self.models.add(model)
        self.update_client_shares()

    def update_client_shares(self, now: float | None = None) -> None:
        """Set cfg_client_row_share from the window's rows (at each scrape): the top clients' series and "other"
        (0 where the window is empty), the series of clients no longer at the top gone."""
        shares = self.client_shares.shares(time.monotonic() if now is None else now)
        self.client_row_share.clear()
        for model in self.models:
            for priority in PRIORITY_CLASSES:
                for client, share in shares.get((model, priority), {OTHER_CLIENTS: 0.0}).items():
                    self.client_row_share.labels(client=client, priority=priority, model=model).set(share)

    def on_scrape(self, device: torch.device, memory: dict[str, float] | None = None) -> None:
        """Refresh what is read at scrape time: the device's memory (memory: as the engine process last read
        it, with CFG_ENGINE_PROCESS; else read here), the clients' shares."""
        self.update_device_memory(device, memory)
        self.update_client_shares()

    def update_device_memory(self, device: torch.device, memory: dict[str, float] | None = None) -> None:
        for kind, value in (memory if memory is not None else memory_in_use(device)).items():
            self.device_memory.labels(device=str(device), kind=kind).set(value)


def create_metrics(registry: CollectorRegistry | None = None, top_clients: int = 8) -> Metrics:
    """top_clients: the clients cfg_client_row_share names (CFG_METRICS_TOP_CLIENTS)."""
    registry = registry or CollectorRegistry()
    metrics = Metrics(
        registry=registry,
        requests=Counter("cfg_requests", "Generation requests by outcome", ["outcome", "model"], registry=registry),
        request_duration=Histogram(
            "cfg_request_duration_seconds",
            "Time from arrival to response of a generation request (/generate, /v1/images/generations), by outcome",
            ["outcome", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        queue_wait=Histogram(
            "cfg_queue_wait_seconds",
            "Time a request waited before its first forward",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        step_duration=Histogram(
            "cfg_engine_step_duration_seconds",
            "Duration of one engine step (one model forward over all active rows)",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=registry,
        ),
        batch_rows=Histogram(
            "cfg_engine_batch_rows", "Rows in one model forward", ["model"], buckets=ROW_BUCKETS, registry=registry
        ),
        images=Counter("cfg_images_generated", "Images generated", ["model"], registry=registry),
        in_flight=Gauge("cfg_requests_in_flight", "Requests being sampled now", ["model"], registry=registry),
        queue_depth=Gauge("cfg_queue_depth", "Requests waiting for a place in the batch", ["model"], registry=registry),
        model_info=Info("cfg_model", "A served checkpoint", ["model"], registry=registry),
        device_memory=Gauge(
            "cfg_device_memory_bytes",
            "Device memory: CUDA allocated/reserved on a GPU, peak resident set on the CPU",
            ["device", "kind"],
            registry=registry,
        ),
        jobs=Counter(
            "cfg_jobs", "Asynchronous jobs (POST /v1/jobs) by outcome", ["outcome", "model"], registry=registry
        ),
        jobs_stored=Gauge("cfg_jobs_stored", "Jobs held in the job store, by state", ["state"], registry=registry),
        job_store_errors=Counter(
            "cfg_job_store_errors",
            "Calls to the job store (Redis) that failed: unreachable, or timed out",
            registry=registry,
        ),
        job_backlog=Gauge(
            "cfg_job_backlog",
            "Jobs in the shared backlog (a Redis job store), by state: waiting (no replica has taken it yet) or taken "
            "(a replica runs it); the same fleet-wide figure from every replica, 0 with the memory store",
            ["state"],
            registry=registry,
        ),
        jobs_taken_over=Counter(
            "cfg_jobs_taken_over",
            "Jobs this replica took over from a replica that stopped renewing them (it died, or stalled) for "
            "CFG_JOB_VISIBILITY_S, and ran again from their seeds",
            registry=registry,
        ),
        forward_rows=Counter(
            "cfg_engine_forward_rows",
            "Rows run through the model, by kind: conditional (a class label), unconditional (the null label) or "
            "perturbed (perturbed attention, for attention guidance) or guide (an autoguidance request's rows through "
            "its guide model, counted under the guided model)",
            ["kind", "model"],
            registry=registry,
        ),
        skipped_rows=Counter(
            "cfg_engine_skipped_uncond_rows",
            "Unconditional rows not run because the step's guidance weight was exactly 1 (interval schedules)",
            ["model"],
            registry=registry,
        ),
        reused_rows=Counter(
            "cfg_engine_reused_uncond_rows",
            "Unconditional rows not run because their request's step cache (kind uncond) reused its guidance "
            "difference eps_c - eps_u from an earlier step",
            ["model"],
            registry=registry,
        ),
        skipped_steps=Counter(
            "cfg_engine_skipped_step_images",
            "Images whose step ran no row because their request's step cache (kind skip) stepped on its denoised "
            "estimate from an earlier step",
            ["model"],
            registry=registry,
        ),
        path_rows=Counter(
            "cfg_engine_path_rows",
            "Rows of this model's forwards by the path they took: full (the whole network) or shallow (a step cache's "
            "row that reused its deep features and ran only the shallow path, app/models/deepcache.py)",
            ["path", "model"],
            registry=registry,
        ),
        class_queue_wait=Histogram(
            "cfg_class_queue_wait_seconds",
            "Time a request waited before its first forward, by priority class (a resumed request: its first wait)",
            ["priority", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        class_latency=Histogram(
            "cfg_class_latency_seconds",
            "Time from a request's arrival at the engine to its last step, by priority class (preemptions included)",
            ["priority", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        class_rows=Counter(
            "cfg_class_forward_rows",
            "Rows run through the model, by priority class (per tick: divide by the step count's rate)",
            ["priority", "model"],
            registry=registry,
        ),
        preemptions=Counter(
            "cfg_engine_preemptions",
            "Requests that left the batch at a step boundary for more urgent work (each resumes later)",
            ["model"],
            registry=registry,
        ),
        deadline_refusals=Counter(
            "cfg_deadline_refusals",
            "Requests refused at once (503) because the work ahead of them left no time to finish within timeout_s",
            ["model"],
            registry=registry,
        ),
        client_row_share=Gauge(
            "cfg_client_row_share",
            f"A client's share of its priority class's rows over the last {SHARE_WINDOW_S} s: the top clients by "
            "rows (an API key as key: and a short hash of it; an X-Client-Id as id: and the name), the rest as other",
            ["client", "priority", "model"],
            registry=registry,
        ),
        client_shares=ClientShares(top_clients),
    )
    metrics.requests.labels(outcome="invalid", model=NO_MODEL)  # an invalid body names no model yet
    return metrics
