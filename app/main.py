"""create_app(settings): the FastAPI app. Its lifespan builds the service, loads the models, warms them up
and starts their engines; on shutdown it stops admitting, finishes the requests in flight and stops the
engines. Served by app/serve.py, the loading runs in the background: the port opens at once, and /readyz
says when the models are ready."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from app.api.body_limit import BodyLimit
from app.api.clients import weights_by_client
from app.api.convert import guidance_body, to_spec
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.job_store import JobBackend, JobStore, MemoryJobs
from app.api.jobs import EngineRunner, build_jobs_router
from app.api.openai_images import build_openai_router
from app.api.playground import build_playground_router
from app.api.routes import build_router
from app.api.schemas import SAMPLER_NAMES, Limits, build_generate_request
from app.api.service import ServedModel, Service
from app.config import Settings
from app.engine import Engine, EngineStats, InProcessClient, SharedCompute
from app.engine.calibrate import model_calibrator
from app.guidance import NOISE_SCHEDULE_KINDS, method_fields, method_kinds
from app.metrics import Metrics, create_metrics
from app.models import (
    CheckpointError,
    LoadedModel,
    Manifest,
    guide_pairs,
    image_decoder,
    load_checkpoint,
    model_denoiser,
    verify_checkpoint,
)
from app.models.attention import PerturbationSupport, perturbation_support
from app.models.denoiser import HookedDenoiser
from app.models.fast import fast_denoiser, resolve_precision, to_channels_last
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, SampleSpec
from app.sampling.cache import CACHE_KINDS

# Lifecycle messages go through uvicorn's configured logger, so they show with its own.
log = logging.getLogger("uvicorn.error")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CFG_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


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


def model_info(
    settings: Settings,
    manifest: Manifest,
    device: torch.device,
    precision: str,
    channels_last: bool,
    cuda_graphs: bool = False,
    perturbations: Mapping[str, PerturbationSupport] | None = None,
    cache: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A served model's entry in GET /v1/models. perturbations: the model's perturbation_support at its precision
    (its attention-guidance methods' layers, or why it cannot run them); the methods it cannot run are not
    listed in guidance_methods, and the API refuses them (app/api/methods.py). cache: the model's step caches
    (cache_entry)."""
    attention = {
        kind: {
            "supported": support.supported,
            "layers": list(support.layers),
            "default_layers": list(support.default_layers),
            "reason": support.reason,
        }
        for kind, support in (perturbations or {}).items()
    }
    unsupported = {kind for kind, entry in attention.items() if not entry["supported"]}
    return {
        **manifest.to_dict(),
        "id": manifest.name,
        "object": "model",
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": settings.compile or precision == "int8",
        "cuda_graphs": cuda_graphs,
        "samplers": list(SAMPLER_NAMES),
        "schedules": ["constant", "linear", "cosine", "interval"],
        "guidance_methods": [kind for kind in method_kinds() if kind not in unsupported],
        "guidance_method_fields": {k: v for k, v in method_fields().items() if k not in unsupported},
        "attention_guidance": attention,
        "cache": dict(cache or cache_entry({})),
        "noise_schedules": list(NOISE_SCHEDULE_KINDS),
        "default_steps": settings.default_steps,
        "default_sampler": DEFAULT_SAMPLER,
        "default_guidance": {"guidance_scale": DEFAULT_GUIDANCE.guidance_scale, **guidance_body(DEFAULT_GUIDANCE)},
        "limits": {
            "max_images": settings.max_images,
            "max_steps": settings.max_steps,
            "max_guidance_scale": settings.max_guidance_scale,
            "max_noise_level": settings.max_noise_level,
            "max_batch_rows": settings.max_batch_rows,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


def cache_entry(support: Mapping[str, str | None], max_branch: int | None = None) -> dict[str, Any]:
    """A model's step caches in GET /v1/models: the kinds it runs (none always), and for each cache kind of the
    service whether it can run it (reason None), and deepcache's deepest branch."""
    runs = ["none", *(kind for kind, reason in support.items() if reason is None)]
    entry: dict[str, Any] = {"kinds": runs}
    for kind in CACHE_KINDS[1:]:
        entry[kind] = {"reason": support.get(kind, "this model has no step cache")}
    entry["deepcache"]["max_branch"] = max_branch if entry["deepcache"]["reason"] is None else None
    return entry


def model_cache_entry(denoiser: Any) -> dict[str, Any]:
    """cache_entry of a served model's denoiser (app/models/fast.py's FastDenoiser)."""
    support: dict[str, str | None] = denoiser.cache_support()
    return cache_entry(support, denoiser.deepcache_branches() if support.get("deepcache") is None else None)


def load_for_serving(path: Path, device: torch.device, channels_last: bool) -> tuple[LoadedModel, HookedDenoiser]:
    """load_checkpoint, a UNet's weights in channels_last where asked (a DiT's only convolution is its patch
    embedding, so it stays as it is), and the model's denoiser (a DiT's compares its blocks' class tables).
    All of it is torch work: run it in the compute thread."""
    loaded = load_checkpoint(path, device)
    if channels_last and loaded.unet is not None:
        to_channels_last(loaded.unet)
    return loaded, model_denoiser(loaded)


def captures_cuda_graphs(settings: Settings, loaded: LoadedModel) -> bool:
    """CFG_CUDA_GRAPHS for this model (fast_denoiser applies it on a CUDA device only): UNet checkpoints only,
    the path verified on a GPU (tests/test_cuda.py on an H200). A DiT's forward has not been captured on a
    card yet; it runs eager until it has."""
    return settings.cuda_graphs and loaded.unet is not None


async def serve_model(
    settings: Settings, path: Path, device: torch.device, compute: SharedCompute, metrics: Metrics
) -> tuple[ServedModel, Engine]:
    """Load a checkpoint in the compute thread (no torch compute may run in the event loop's thread: see
    app/engine/engine.py on OpenMP teams) and give it an engine of its own on the shared thread."""
    precision = resolve_precision(settings.precision, device)  # before loading: fp16 on the CPU fails here
    loaded, model = await compute.call(load_for_serving, path, device, settings.channels_last)
    m = loaded.manifest
    channels_last = settings.channels_last and loaded.unet is not None
    # autocast, channels_last inputs and torch.compile over row buckets (app/models/fast.py); the warmup
    # compiles every bucket.
    # int8: calibrated on the model's own sampling at the warmup's first forward (app/models/quantize.py).
    calibrate = model_calibrator(loaded, model) if precision == "int8" else None
    perturbations = perturbation_support(loaded.network, precision)  # which attention methods it runs, and where
    denoiser = fast_denoiser(
        model,
        device,
        precision,
        channels_last,
        compile=settings.compile,  # int8 compiles whatever this says
        max_rows=settings.max_batch_rows,
        calibrate=calibrate,
        cuda_graphs=captures_cuda_graphs(settings, loaded),
    )
    engine = Engine(
        denoiser,
        scheduler_config=loaded.scheduler_config,
        image_shape=m.sample_shape,
        null_label=m.null_label,
        device=device,
        max_batch_rows=settings.max_batch_rows,
        max_queue=settings.max_queue,
        max_preempted_bytes=int(settings.max_preempted_mb * 2**20),
        client_weights=weights_by_client(settings.client_weight_table()),
        class_embedding=model.class_embedding,
        compute=compute,
        name=m.name,
        decode=image_decoder(loaded),
        perturbations=perturbations,
    )
    client = InProcessClient(engine, on_stats=stats_hook(metrics, m.name))
    metrics.add_model(m.name)
    metrics.in_flight.labels(model=m.name).set_function(lambda: client.active_requests)
    metrics.queue_depth.labels(model=m.name).set_function(lambda: client.queue_depth)
    metrics.model_info.labels(model=m.name).info(
        {
            "device": str(device),
            "precision": precision,
            "weights_sha256": m.weights_sha256[:16],
            "torch": torch.__version__,
        }
    )
    cache = model_cache_entry(denoiser)
    info = model_info(settings, m, device, precision, channels_last, denoiser.cuda_graphs, perturbations, cache)
    return ServedModel(name=m.name, client=client, info=info), engine


def pair_guides(served: list[ServedModel], engines: dict[str, Engine], limits: Limits) -> None:
    """Give each engine the denoisers of the served models that can guide it (autoguidance: Limits.guides),
    and list them in its /v1/models entry. A guide's forward runs in the same compute thread as every model's,
    with the guide's own precision, compiled buckets and CUDA graphs."""
    for model in served:
        model.info["guides"] = list(limits.guides_of(model.name))
        for guide in model.info["guides"]:
            engines[model.name].add_guide(guide, engines[guide].denoiser)
        if not model.info["guides"]:  # nothing served can guide it: autoguidance is not among its methods
            model.info["guidance_methods"] = [k for k in model.info["guidance_methods"] if k != "autoguidance"]
            model.info["guidance_method_fields"].pop("autoguidance", None)


async def start_serving(
    service: Service, settings: Settings, paths: list[Path], device: torch.device, compute: SharedCompute
) -> None:
    """Load every model, warm each up and start its engine: the service is ready when this returns."""
    try:
        loaded = [await serve_model(settings, path, device, compute, service.metrics) for path in paths]
        models = [served for served, _ in loaded]
        pair_guides(models, {served.name: engine for served, engine in loaded}, service.limits)
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
        service = Service(
            metrics=metrics,
            limits=limits,
            request_timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            jobs=jobs,
            on_scrape=lambda: metrics.on_scrape(device),
            drain_timeout_s=settings.drain_timeout_s,
        )
        metrics.jobs_stored.labels(state="unfinished").set_function(lambda: service.jobs.counts()[0])
        metrics.jobs_stored.labels(state="finished").set_function(lambda: service.jobs.counts()[1])
        metrics.job_backlog.labels(state="waiting").set_function(lambda: service.jobs.backlog()[0])
        metrics.job_backlog.labels(state="taken").set_function(lambda: service.jobs.backlog()[1])
        app.state.service = service
        service.startup = asyncio.create_task(start_serving(service, settings, paths, device, compute), name="startup")
        try:
            if not load_in_background:
                await service.startup
            yield
        finally:
            await service.drain()
            await service.jobs.close()
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
