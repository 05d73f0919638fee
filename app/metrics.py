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
OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "error")
JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "rejected")


@dataclass
class Metrics:
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
    forward_rows: Counter
    skipped_rows: Counter

    def observe_request(self, outcome: str, seconds: float | None = None) -> None:
        self.requests.labels(outcome=outcome).inc()
        if seconds is not None:
            self.request_duration.labels(outcome=outcome).observe(seconds)

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
    requests = Counter("cfg_requests", "Generation requests by outcome", ["outcome"], registry=registry)
    request_duration = Histogram(
        "cfg_request_duration_seconds",
        "Time from arrival to response of POST /generate, by outcome",
        ["outcome"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    jobs = Counter("cfg_jobs", "Asynchronous jobs (POST /v1/jobs) by outcome", ["outcome"], registry=registry)
    for outcome in OUTCOMES:  # export every series from the start, so rates read 0 rather than nothing
        requests.labels(outcome=outcome)
        request_duration.labels(outcome=outcome)
    for outcome in JOB_OUTCOMES:
        jobs.labels(outcome=outcome)
    forward_rows = Counter(
        "cfg_engine_forward_rows",
        "Rows run through the model, by kind: conditional (a class label) or unconditional (the null label)",
        ["kind"],
        registry=registry,
    )
    for kind in ("conditional", "unconditional"):
        forward_rows.labels(kind=kind)
    return Metrics(
        registry=registry,
        request_duration=request_duration,
        queue_wait=Histogram(
            "cfg_queue_wait_seconds",
            "Time a request waited before its first forward",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        step_duration=Histogram(
            "cfg_engine_step_duration_seconds",
            "Duration of one engine step (one model forward over all active rows)",
            buckets=STEP_BUCKETS,
            registry=registry,
        ),
        batch_rows=Histogram(
            "cfg_engine_batch_rows", "Rows in one model forward", buckets=ROW_BUCKETS, registry=registry
        ),
        images=Counter("cfg_images_generated", "Images generated", registry=registry),
        requests=requests,
        in_flight=Gauge("cfg_requests_in_flight", "Requests being sampled now", registry=registry),
        queue_depth=Gauge("cfg_queue_depth", "Requests waiting for a place in the batch", registry=registry),
        model_info=Info("cfg_model", "The loaded checkpoint", registry=registry),
        device_memory=Gauge(
            "cfg_device_memory_bytes",
            "Device memory: CUDA allocated/reserved on a GPU, peak resident set on the CPU",
            ["device", "kind"],
            registry=registry,
        ),
        jobs=jobs,
        forward_rows=forward_rows,
        skipped_rows=Counter(
            "cfg_engine_skipped_uncond_rows",
            "Unconditional rows not run because the step's guidance weight was exactly 1 (interval schedules)",
            registry=registry,
        ),
        jobs_stored=Gauge("cfg_jobs_stored", "Jobs held in memory, by state", ["state"], registry=registry),
    )
