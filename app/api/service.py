"""The Service the routes share: the served models, the job store, the metrics, and where the process is
in its life (loading, warming up, ready, draining), which /readyz reports and every new request obeys.

The lifespan builds it before the models load (the port opens at once), fills in the models as they load,
and drains it on shutdown: new work is refused (503 with Retry-After) while the engines finish what they
hold, for up to drain_timeout_s, and the jobs' results are stored before the process goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, Request

from app.api.job_store import JobBackend
from app.api.schemas import Limits
from app.engine import EngineClient
from app.metrics import Metrics

log = logging.getLogger("uvicorn.error")

# loading: the checkpoints are being read; warming up: the first forwards (and any compiling) run;
# draining: shutting down, finishing what was admitted; failed: the startup raised (the process exits).
Phase = Literal["loading", "warming up", "ready", "draining", "failed"]

# What a refused request is told, per phase.
REFUSALS: dict[str, str] = {
    "loading": "the service is starting: loading its models",
    "warming up": "the service is starting: warming up its models",
    "draining": "the service is draining: it finishes the requests it holds and takes no new ones",
    "failed": "the service failed to start",
}


@dataclass
class ServedModel:
    """One served model: the client of its engine (its own batch, on the compute thread all models share) and
    its /v1/models entry."""

    name: str
    client: EngineClient
    info: dict[str, Any]

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the images served: a latent model's decoded size."""
        _, height, width = self.info["image_shape"]
        return height, width


@dataclass
class Service:
    """What the routes need, built by the lifespan and kept on app.state.service."""

    metrics: Metrics
    limits: Limits
    request_timeout_s: float
    retry_after_s: int
    jobs: JobBackend
    models: dict[str, ServedModel] = field(default_factory=dict)  # CFG_MODELS order, once loaded; first: default
    on_scrape: Callable[[], None] = lambda: None  # refreshes gauges read at scrape time
    drain_timeout_s: float = 300.0
    phase: Phase = "loading"
    startup_error: str | None = None  # why the startup failed (phase "failed")
    startup: asyncio.Task | None = None  # loads, warms up and starts the models (app/main.py)
    job_tasks: set[asyncio.Task] = field(default_factory=set)  # one per unfinished job (app/api/jobs.py)
    _drained: asyncio.Future | None = field(default=None, init=False, repr=False)

    def model(self, name: str | None = None) -> ServedModel:
        """A served model by name (validated by the request schema); the default model without one."""
        return self.models[name] if name is not None else next(iter(self.models.values()))

    @property
    def clients(self) -> list[EngineClient]:
        return [m.client for m in self.models.values()]

    @property
    def models_info(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.info for m in self.models.values()]}

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def refusal(self) -> str | None:
        """Why new work is refused now (the detail of a 503), or None once the service is ready. An engine
        that failed while ready refuses its own requests (EngineClient.add)."""
        if self.phase == "ready":
            return None
        if self.phase == "failed":
            return f"{REFUSALS['failed']}: {self.startup_error}"
        return REFUSALS[self.phase]

    def failures(self) -> list[str]:
        """What keeps the process from ever serving: a failed startup, or an engine loop that failed."""
        if self.startup_error is not None:
            return [f"startup: {self.startup_error}"]
        return [f"{m.name}: {m.client.error}" for m in self.models.values() if m.client.error is not None]

    def fail_startup(self, exc: BaseException) -> None:
        self.phase = "failed"
        self.startup_error = f"{type(exc).__name__}: {exc}"

    def drain(self) -> asyncio.Future:
        """Stop admitting and finish what was admitted; the first call starts it, every call returns it.

        New requests get 503 from here on. A startup still running is cancelled (the forward or load in
        the compute thread finishes first). The engines finish their requests and jobs for up to
        drain_timeout_s; those still unfinished then fail (503). Done once every job's result is stored."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        return self._drained

    async def _drain(self) -> None:
        if self.phase != "failed":
            self.phase = "draining"
        if self.startup is not None:
            self.startup.cancel()  # nothing if it has finished
            await asyncio.gather(self.startup, return_exceptions=True)  # its error, if any, is logged already
        held = sum(c.active_requests + c.queue_depth for c in self.clients)
        log.info("draining: new requests get 503; finishing %d request(s) and job(s), up to %g s",
                 held, self.drain_timeout_s)  # fmt: skip
        await asyncio.gather(*(c.shutdown(drain=True, timeout_s=self.drain_timeout_s) for c in self.clients))
        # The drained jobs' results are stored (a client following /v1/jobs/{id}/events gets its result).
        await asyncio.gather(*self.job_tasks)
        log.info("drained")


async def get_service(request: Request) -> Service:  # async: no thread-pool hop per request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
