"""create_app(settings): the FastAPI app. Its lifespan builds the service, loads the models, warms them up
and starts their engines; on shutdown it stops admitting, finishes the requests in flight and stops the
engines. Served by app/serve.py, the loading runs in the background: the port opens at once, and /readyz
says when the models are ready."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from app.api.body_limit import BodyLimit
from app.api.convert import to_spec
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.job_store import JobBackend, JobStore, MemoryJobs
from app.api.jobs import EngineRunner, build_jobs_router
from app.api.openai_images import build_openai_router
from app.api.playground import build_playground_router
from app.api.routes import build_router
from app.api.schemas import Limits, build_generate_request
from app.api.service import ServedModel, Service
from app.config import Settings
from app.engine import Engine, EngineClient, EngineStats, InProcessClient, SharedCompute
from app.engine.process import EngineProcess
from app.loading import build_engine, build_engines, pair_guides, resolve_device
from app.metrics import Metrics, create_metrics
from app.models import CheckpointError, guide_pairs, verify_checkpoint
from app.models.fast import resolve_precision
from app.sampling import SampleSpec

# Lifecycle messages go through uvicorn's configured logger, so they show with its own.
log = logging.getLogger("uvicorn.error")


def stats_hook(metrics: Metrics, model: str) -> Callable[[EngineStats], None]:
    """Records one model's metrics from each tick's stats."""
    step_duration, batch_rows = metrics.step_duration.labels(model=model), metrics.batch_rows.labels(model=model)
    cond_rows = metrics.forward_rows.labels(kind="conditional", model=model)
    uncond_rows = metrics.forward_rows.labels(kind="unconditional", model=model)
    perturbed_rows = metrics.forward_rows.labels(kind="perturbed", model=model)
    guide_rows = metrics.forward_rows.labels(kind="guide", model=model)
    full_rows = metrics.path_rows.labels(path="full", model=model)
    shallow_rows = metrics.path_rows.labels(path="shallow", model=model)
    skipped_rows, images = metrics.skipped_rows.labels(model=model), metrics.images.labels(model=model)
    reused_rows = metrics.reused_rows.labels(model=model)
    skipped_steps = metrics.skipped_steps.labels(model=model)
    queue_wait = metrics.queue_wait.labels(model=model)
    preemptions = metrics.preemptions.labels(model=model)

    def on_stats(stats: EngineStats) -> None:
        step_duration.observe(stats.tick_seconds)
        batch_rows.observe(stats.rows)
        cond_rows.inc(stats.cond_rows)
        uncond_rows.inc(stats.uncond_rows)
        perturbed_rows.inc(stats.perturbed_rows)
        guide_rows.inc(stats.guide_rows)
        full_rows.inc(stats.rows - stats.shallow_rows)
        shallow_rows.inc(stats.shallow_rows)
        skipped_rows.inc(stats.skipped_uncond_rows)
        reused_rows.inc(stats.reused_uncond_rows)
        skipped_steps.inc(stats.skipped_step_images)
        if stats.images_finished:
            images.inc(stats.images_finished)
        for seconds in stats.queue_waits:
            queue_wait.observe(seconds)
        for priority, seconds in stats.class_queue_waits:
            metrics.class_queue_wait.labels(priority=priority, model=model).observe(seconds)
        for priority, seconds in stats.latencies:
            metrics.class_latency.labels(priority=priority, model=model).observe(seconds)
        for priority, rows in stats.class_rows:
            if rows:
                metrics.class_rows.labels(priority=priority, model=model).inc(rows)
        if stats.preemptions:
            preemptions.inc(stats.preemptions)
        now = time.monotonic()
        for priority, client, rows in stats.client_rows:
            metrics.client_shares.add(model, priority, client, rows, now)

    return on_stats


async def serve_model(
    settings: Settings, path: Path, device: torch.device, compute: SharedCompute, metrics: Metrics
) -> tuple[ServedModel, Engine]:
    """A model served from this process: its engine built here (app/loading.py), behind an in-process client."""
    engine, info = await build_engine(settings, path, device, compute)
    client = InProcessClient(engine, on_stats=stats_hook(metrics, engine.name))
    return served_model(metrics, client, info), engine


def served_model(metrics: Metrics, client: EngineClient, info: dict[str, Any]) -> ServedModel:
    """A model as the routes see it, its gauges read from its client."""
    name = info["name"]
    metrics.add_model(name)
    metrics.in_flight.labels(model=name).set_function(lambda: client.active_requests)
    metrics.queue_depth.labels(model=name).set_function(lambda: client.queue_depth)
    metrics.model_info.labels(model=name).info(
        {
            "device": info["device"],
            "precision": info["precision"],
            "weights_sha256": info["weights_sha256"][:16],
            "torch": torch.__version__,
        }
    )
    return ServedModel(name=name, client=client, info=info)


async def start_serving(
    service: Service,
    settings: Settings,
    paths: list[Path],
    device: torch.device,
    compute: SharedCompute,
    process: EngineProcess | None = None,
) -> None:
    """Load every model, warm each up and start its engine: the service is ready when this returns. process:
    the engines are built in the engine process (CFG_ENGINE_PROCESS), else in this one on `compute`."""
    try:
        if process is None:
            loaded = [await serve_model(settings, path, device, compute, service.metrics) for path in paths]
            models = [served for served, _ in loaded]
            pair_guides({m.name: m.info for m in models}, {m.name: engine for m, engine in loaded}, service.limits)
        else:
            infos = await process.start(on_stats=lambda name: stats_hook(service.metrics, name))
            models = [served_model(service.metrics, process.clients[name], info) for name, info in infos.items()]
        service.models.update((m.name, m) for m in models)
        service.phase = "warming up"
        for served in models:
            if settings.warmup:
                await served.client.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
            await served.client.start()
    except Exception as exc:  # a cancellation (a drain during the startup) is no failure
        service.fail_startup(exc)
        log.exception("startup failed")
        raise
    service.phase = "ready"
    # With a store that queues jobs, this replica takes its share of the backlog from now on.
    service.jobs.take(EngineRunner(service), list(service.models), service.metrics.jobs_taken_over.inc)
    log.info("models %s ready on %s", ", ".join(service.models), device)


def job_backend(settings: Settings, limits: Limits, metrics: Metrics) -> JobBackend:
    """CFG_JOB_STORE: memory, or the Redis server at its URL (listening from here on)."""
    if settings.job_store == "memory":
        return MemoryJobs(JobStore(settings.max_jobs, settings.job_ttl_s))
    from app.api.redis_jobs import RedisJobs  # the fleet extra: only a Redis store needs it

    request_model = build_generate_request(limits)
    store = RedisJobs(
        settings.job_store,
        settings.max_jobs,
        settings.job_ttl_s,
        spec_of=lambda body: to_spec(request_model.model_validate(body)),
        on_error=metrics.job_store_errors.inc,
        visibility_s=settings.job_visibility_s,
    )
    store.start()
    return store


def create_app(settings: Settings | None = None, *, load_in_background: bool = False) -> FastAPI:
    """The app. load_in_background: the lifespan starts loading the models and returns at once, so that a
    server opens its port at once and /readyz tells loading, warming up and ready apart (app/serve.py);
    without it, the lifespan returns once the models are ready (an in-process client such as TestClient
    gets a ready app, and a model that fails to load raises there)."""
    settings = settings or Settings()
    # Fails fast, with one line naming the file, before the server starts listening.
    paths = settings.model_paths()
    checkpoints = [verify_checkpoint(path) for path in paths]
    manifests = [c.manifest for c in checkpoints]
    if len({m.name for m in manifests}) != len(manifests):
        raise CheckpointError(f"two served checkpoints have the same name: {[m.name for m in manifests]}")
    pairs = guide_pairs(checkpoints)
    limits = Limits(
        models=tuple((m.name, tuple(m.class_names)) for m in manifests),
        guides=tuple((name, tuple(others.items())) for name, others in pairs.items()),
        max_images=settings.max_images,
        max_steps=settings.max_steps,
        default_steps=settings.default_steps,
        max_guidance_scale=settings.max_guidance_scale,
        max_noise_level=settings.max_noise_level,
        max_timeout_s=settings.request_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = resolve_device(settings.device)
        resolve_precision(settings.precision, device)  # fp16 on a CPU fails here, before the port opens
        compute = SharedCompute()
        metrics = create_metrics(top_clients=settings.metrics_top_clients)
        jobs = job_backend(settings, limits, metrics)
        process = None  # the engine process, with CFG_ENGINE_PROCESS: it holds the models, and reads their memory
        if settings.engine_process:
            process = app.state.engine_process = EngineProcess(
                partial(build_engines, settings, paths, str(device), limits)
            )
        service = Service(
            metrics=metrics,
            limits=limits,
            request_timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            jobs=jobs,
            on_scrape=lambda: metrics.on_scrape(device, None if process is None else process.memory),
            drain_timeout_s=settings.drain_timeout_s,
        )
        metrics.jobs_stored.labels(state="unfinished").set_function(lambda: service.jobs.counts()[0])
        metrics.jobs_stored.labels(state="finished").set_function(lambda: service.jobs.counts()[1])
        metrics.job_backlog.labels(state="waiting").set_function(lambda: service.jobs.backlog()[0])
        metrics.job_backlog.labels(state="taken").set_function(lambda: service.jobs.backlog()[1])
        app.state.service = service
        starting = start_serving(service, settings, paths, device, compute, process)
        service.startup = asyncio.create_task(starting, name="startup")
        try:
            if not load_in_background:
                await service.startup
            yield
        finally:
            await service.drain()
            await service.jobs.close()
            if process is not None:
                await process.close()
            compute.shutdown()
            log.info("engine stopped")

    app = FastAPI(
        title="cfg-serve",
        summary="Class-conditional diffusion with classifier-free guidance, batched per sampler step",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # install_docs serves them without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.include_router(build_router(limits))
    app.include_router(build_openai_router(limits))
    app.include_router(build_jobs_router(limits))
    app.include_router(build_playground_router(limits))
    install_docs(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
