"""create_app(settings): the FastAPI app. Its lifespan loads the model, warms it up, starts the
engine, and on shutdown stops admitting, finishes the requests in flight and stops the engine."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from app.api.job_store import JobStore
from app.api.jobs import build_jobs_router
from app.api.openai_images import build_openai_router
from app.api.playground import build_playground_router
from app.api.routes import Service, build_router, guidance_body, install_error_handlers
from app.api.schemas import SAMPLER_NAMES, Limits
from app.config import Settings
from app.engine import Engine, EngineStats, Job, worker
from app.guidance import METHOD_KINDS, NOISE_SCHEDULE_KINDS
from app.metrics import Metrics, create_metrics
from app.models import load_checkpoint, unet_denoiser, verify_checkpoint
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, SampleSpec

# Lifecycle messages go through uvicorn's configured logger, so they show with its own.
log = logging.getLogger("uvicorn.error")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CFG_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


def _engine_hooks(metrics: Metrics, device: torch.device):
    def on_step(stats: EngineStats) -> None:
        metrics.step_duration.observe(stats.step_seconds)
        metrics.batch_rows.observe(stats.rows)
        metrics.forward_rows.labels(kind="conditional").inc(stats.cond_rows)
        metrics.forward_rows.labels(kind="unconditional").inc(stats.uncond_rows)
        metrics.skipped_rows.inc(stats.skipped_uncond_rows)
        if stats.images_finished:
            metrics.images.inc(stats.images_finished)

    def on_admit(job: Job) -> None:
        metrics.queue_wait.observe(job.started_at - job.enqueued_at)

    return on_step, on_admit


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Fails fast, with one line naming the file, before the server starts listening.
    manifest = verify_checkpoint(settings.model_path).manifest
    limits = Limits(
        class_names=tuple(manifest.class_names),
        max_images=settings.max_images,
        max_steps=settings.max_steps,
        default_steps=settings.default_steps,
        max_guidance_scale=settings.max_guidance_scale,
        max_noise_level=settings.max_noise_level,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = resolve_device(settings.device)
        # Loaded in the engine's own thread: no torch compute may run in the event loop's thread
        # (see app/engine/engine.py on OpenMP teams).
        executor = worker()
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(executor, load_checkpoint, settings.model_path, device)
        metrics = create_metrics()
        on_step, on_admit = _engine_hooks(metrics, device)
        image_shape = (loaded.manifest.in_channels, loaded.manifest.image_size, loaded.manifest.image_size)
        denoiser = unet_denoiser(loaded.unet)
        engine = Engine(
            denoiser,
            scheduler_config=loaded.scheduler_config,
            image_shape=image_shape,
            null_label=loaded.manifest.null_label,
            device=device,
            max_batch_rows=settings.max_batch_rows,
            max_queue=settings.max_queue,
            on_step=on_step,
            on_admit=on_admit,
            executor=executor,
            class_embedding=denoiser.class_embedding,
        )
        metrics.in_flight.set_function(lambda: engine.active_jobs)
        metrics.queue_depth.set_function(lambda: engine.queue_depth)
        m = loaded.manifest
        metrics.model_info.info(
            {
                "name": m.name,
                "device": str(device),
                "weights_sha256": m.weights_sha256[:16],
                "torch": torch.__version__,
            }
        )
        service = Service(
            engine=engine,
            metrics=metrics,
            limits=limits,
            model_name=m.name,
            models_info={
                "data": [
                    {
                        **m.to_dict(),
                        "device": str(device),
                        "samplers": list(SAMPLER_NAMES),
                        "schedules": ["constant", "linear", "cosine", "interval"],
                        "guidance_methods": list(METHOD_KINDS),
                        "noise_schedules": list(NOISE_SCHEDULE_KINDS),
                        "default_steps": settings.default_steps,
                        "default_sampler": DEFAULT_SAMPLER,
                        "default_guidance": {
                            "guidance_scale": DEFAULT_GUIDANCE.guidance_scale,
                            **guidance_body(DEFAULT_GUIDANCE),
                        },
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
                ]
            },
            request_timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            jobs=JobStore(settings.max_jobs, settings.job_ttl_s),
            on_scrape=lambda: metrics.update_device_memory(device),
        )
        metrics.jobs_stored.labels(state="unfinished").set_function(lambda: service.jobs.unfinished)
        metrics.jobs_stored.labels(state="finished").set_function(lambda: len(service.jobs) - service.jobs.unfinished)
        app.state.service = service
        if settings.warmup:
            await engine.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
        await engine.start()
        service.ready = True
        log.info("model %s ready on %s", m.name, device)
        try:
            yield
        finally:
            service.ready = False
            await engine.stop(drain=True)
            # The drained jobs' results are stored (a client following /v1/jobs/{id}/events gets its result).
            await asyncio.gather(*service.job_tasks)
            log.info("engine stopped")

    app = FastAPI(
        title="cfg-serve",
        summary="Class-conditional diffusion with classifier-free guidance, batched per sampler step",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(build_router(limits))
    app.include_router(build_openai_router(limits))
    app.include_router(build_jobs_router(limits))
    app.include_router(build_playground_router(limits))
    install_error_handlers(app)
    return app
