"""What the engine refuses before a request waits, and why: pure checks, run in the compute thread as each request
is taken (app/engine/engine.py), except `refuse_unless_open`, which the clients run before sending.

- the engine's state: failed, starting up or draining (EngineClosedError), or a priority it has no class for;
- the model: a method whose perturbed rows it can't run, a guide it does not serve, a step cache it can't run
  (the API refuses each of these first, naming the fields: these keep a forward that would raise out of the
  shared batch, where it would fail every request in it);
- the deadline: where, at the engine's measured pace, the work ahead leaves no time to finish.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from app.engine.outputs import Failed, FailureKind
from app.engine.policy import PRIORITIES, seconds_over
from app.engine.scheduler import EngineRequest, Scheduler
from app.models.attention import PerturbationError, PerturbationSupport, resolve_layers
from app.models.deepcache import DeepCacheError
from app.sampling import Denoiser, SampleRun
from app.sampling.cache import ANY_MODEL_CACHE_KINDS, DeepCacheParams, cache_kind

# (failure kind, message)
Refusal = tuple[FailureKind, str]


class EngineClosedError(RuntimeError):
    """The engine is draining, stopped or failed, and admits no new requests."""


def refuse_unless_open(priority: str, error: str | None, accepting: bool) -> None:
    """Why a request can't be added now, raised: ValueError for a priority outside PRIORITIES, EngineClosedError
    where the engine failed (error) or admits nothing (starting up or draining). Its client checks the same before
    sending, in whichever process the engine runs."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if error is not None:
        raise EngineClosedError(f"the engine failed: {error}")
    if not accepting:
        raise EngineClosedError("the engine is not accepting requests (starting up or draining)")


def model_refusal(
    run: SampleRun,
    name: str,
    denoiser: Denoiser,
    perturbations: Mapping[str, PerturbationSupport] | None,
    guides: Mapping[str, Denoiser],
) -> Refusal | None:
    """("invalid", why) where model `name` can't run the run: its perturbed rows, its guide or its step cache."""
    return (
        perturbation_refusal(run, name, perturbations)
        or guide_refusal(run, name, guides)
        or cache_refusal(run, name, denoiser)
    )


def perturbation_refusal(
    run: SampleRun, name: str, perturbations: Mapping[str, PerturbationSupport] | None
) -> Refusal | None:
    """Where the model can't run the run's perturbed rows (perturbations: its perturbation_support at its
    precision, app/models/attention.py; None: nothing is checked)."""
    if run.perturbation is None or perturbations is None:
        return None
    try:
        resolve_layers(perturbations[run.perturbation.kind], run.perturbation)
    except PerturbationError as exc:
        return "invalid", f"model {name}: {exc}"
    return None


def guide_refusal(run: SampleRun, name: str, guides: Mapping[str, Denoiser]) -> Refusal | None:
    """Where the run names a guide model this engine does not serve."""
    guide = run.guider.guide_model
    if guide is None or guide in guides:
        return None
    allowed = ", ".join(guides) or "none"
    return "invalid", f"method.guide {guide!r} is not a guide served for {name} (served guides: {allowed})"


def cache_refusal(run: SampleRun, name: str, denoiser: Denoiser) -> Refusal | None:
    """Where the model can't run the run's step cache, or not at its branch. A kind that enters no network
    (ANY_MODEL_CACHE_KINDS) every model runs; the others, as the denoiser's cache_support() says."""
    cache = run.spec.cache
    if cache is None:
        return None
    kind = cache_kind(cache)
    if kind in ANY_MODEL_CACHE_KINDS:
        return None
    support: dict[str, str | None] = getattr(denoiser, "cache_support", dict)()
    if kind not in support:
        return "invalid", f"model {name} has no step cache: cache.kind must be none"
    if support[kind] is not None:
        return "invalid", f"model {name}: {support[kind]}"
    if isinstance(cache, DeepCacheParams):
        try:
            deepest = denoiser.deepcache_branches()  # type: ignore[attr-defined]
        except DeepCacheError as exc:
            return "invalid", f"model {name}: {exc}"
        if cache.branch > deepest:
            return "invalid", f"model {name}: deepcache branch must be 0..{deepest} (got {cache.branch})"
    return None


def deadline_refusal(
    request: EngineRequest, deadline: float, table: np.ndarray | None, others: int, scheduler: Scheduler
) -> Failed | None:
    """Failed "deadline" where, at the measured pace (table: seconds per tick by rows, app/engine/pace.py; None
    before any tick has been measured), the request cannot start and finish by its deadline behind the work ahead
    of it (Scheduler.plan); None where it can. others: other models' engines with work, which share the compute
    thread equally (app/engine/compute.py): while they keep it, each of this engine's ticks takes (1 + others)
    times its own time in wall time."""
    if table is None:
        return None
    now = time.monotonic()
    timeout_s = deadline - request.enqueued_at
    left = deadline - now
    table = table * (1 + others)
    horizon = int(left / table[1:].min()) + 1  # no tick is faster than the fastest measured
    plan = scheduler.plan(request.run, request.priority, request.client, horizon)
    reason = f"cannot finish within timeout_s={timeout_s:g}: behind the {request.priority} work ahead of it"
    if others:
        reason += f", sharing the compute thread with {others} other busy model{'s' if others > 1 else ''}"
    if plan is None:
        message = f"{reason}, it would not start within {left:.2f} s at the engine's measured pace"
        return Failed(request.id, "deadline", message, retry_after_s=max(1.0, left))
    start_s, total_s = seconds_over(plan.rows[: plan.start], table), seconds_over(plan.rows, table)
    if total_s <= left:
        return None
    message = (
        f"{reason}, it would start in about {start_s:.2f} s and finish in about {total_s:.2f} s at the engine's "
        f"measured pace ({table[int(plan.rows.max())]:.3f} s per tick of {int(plan.rows.max())} rows"
        f"{' in its share of the thread' if others else ''})"
    )
    return Failed(request.id, "deadline", message, retry_after_s=max(1.0, start_s))
