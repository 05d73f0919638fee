"""The engine behind whichever interface the checked-out commit has: its client (add, result), or the
Engine.submit / job.future of the commits before it; so that a bench runs on both in one session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import app.engine as engine_package
from app.engine import Engine, SharedCompute
from app.models import LoadedModel, load_checkpoint
from app.sampling import SampleSpec


@dataclass
class Served:
    engine: Any  # app.engine.Engine: run_in_worker, warmup
    start: Callable[[], Awaitable[None]]
    generate: Callable[[SampleSpec], Awaitable[np.ndarray]]  # the uint8 images of one request
    stop: Callable[[], Awaitable[None]]
    interface: str


async def load(path: Path, compute: SharedCompute) -> LoadedModel:
    """The checkpoint, loaded in the compute thread: no torch op in the event loop's (see app/engine/engine.py)."""
    return await asyncio.get_running_loop().run_in_executor(compute.executor, load_checkpoint, path, "cpu")


def serve(loaded, denoiser, compute: SharedCompute, max_batch_rows: int = 32, max_queue: int = 256) -> Served:
    m = loaded.manifest
    engine = Engine(
        denoiser,
        scheduler_config=loaded.scheduler_config,
        image_shape=m.sample_shape,
        null_label=m.null_label,
        device=torch.device("cpu"),
        max_batch_rows=max_batch_rows,
        max_queue=max_queue,
        compute=compute,
    )
    client_class = getattr(engine_package, "InProcessClient", None)
    if client_class is None:  # before the client: Engine.submit returns a Job holding a future

        async def submitted(spec: SampleSpec) -> np.ndarray:
            return (await engine.submit(spec).future).images

        return Served(engine, engine.start, submitted, engine.stop, "Engine.submit")
    client = client_class(engine)

    async def added(spec: SampleSpec) -> np.ndarray:
        output = await client.result(client.add(spec))
        if not isinstance(output, engine_package.Finished):
            raise RuntimeError(f"the request failed: {output}")
        return output.images

    return Served(engine, client.start, added, client.shutdown, "EngineClient")
