"""Prometheus metrics on an explicit registry, recorded from the engine's per-step statistics."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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


# The model label of a request refused before its model was known (an invalid body).
NO_MODEL = "none"


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
    forward_rows: Counter
    skipped_rows: Counter
    class_queue_wait: Histogram
    class_latency: Histogram
    class_rows: Counter
    preemptions: Counter

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
        for metric in (self.queue_wait, self.step_duration, self.batch_rows, self.images, self.skipped_rows):
            metric.labels(model=model)
        for priority in PRIORITY_CLASSES:
            for metric in (self.class_queue_wait, self.class_latency, self.class_rows):
                metric.labels(priority=priority, model=model)
        self.preemptions.labels(model=model)
        for gauge in (self.in_flight, self.queue_depth):
            gauge.labels(model=model)

    def update_device_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.device_memory.labels(device=str(device), kind="allocated").set(torch.cuda.memory_allocated(device))
            self.device_memory.labels(device=str(device), kind="reserved").set(torch.cuda.memory_reserved(device))
        else:
            # On the CPU the model lives in host memory: report the process's peak resident set.
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.device_memory.labels(device="cpu", kind="max_rss").set(peak)


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
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
    )
    metrics.requests.labels(outcome="invalid", model=NO_MODEL)  # an invalid body names no model yet
    return metrics
