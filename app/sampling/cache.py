"""A request's step cache (issue 27): what it asks for (DeepCacheParams, FirstBlockParams) and what its run keeps
(RowCache for deepcache, FirstBlockRows for first_block: make_row_cache picks).

DeepCache's deep features are kept per kind of row (the conditional rows, and the unconditional and perturbed
rows of its guidance), each kind its own: the kinds run at different steps (a guidance interval runs the
unconditional rows on a few steps only) and see different inputs. The request's steps are of two sorts, known in
advance from its schedule: full steps, where every kind runs the whole network and refreshes its features, and
cached steps, where a kind reuses its features if it computed them at or after the last full step (else it runs
in full, and reuses those until the next full step). A step is full where it lies outside the caching window
[start, end) of the steps, where its sigma lies in the band (full_sigma_min, full_sigma_max] (the steps where the
image's structure forms, whose reuse costs the most: docs/caching.md), and every `interval` steps after the last
full step. So at a cached step every kind reuses features of the same step, and the difference CFG amplifies,
eps_c - eps_u, takes no error from features of different ages; a kind whose rows were skipped for a while (the
unconditional rows outside a guidance interval) runs in full at its first step back.
The features live on the run and leave with it: cleared when it finishes or ends, kept while it is preempted
(counted in its preempted state: app/engine/scheduler.py), so a preempted request's images equal an unpreempted
one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

CACHE_KINDS = ("none", "deepcache", "first_block", "uncond", "skip")
# Kinds that skip rows and enter no network: every model runs them, at every precision (the others need the
# model's own support: its cache_support()).
ANY_MODEL_CACHE_KINDS = frozenset({"uncond", "skip"})


def check_uncond(every: int, order: int) -> None:
    if every < 1:
        raise ValueError(f"uncond every must be at least 1, not {every}")
    if order not in (0, 1):
        raise ValueError(f"uncond order must be 0 or 1, not {order}")


@dataclass(frozen=True)
class CachedSteps:
    """The steps a deepcache or skip cache reuses work on: a full step every `interval` steps, the steps between
    cached; every step in full outside [start, end), fractions of the steps (0: the first, pure noise), and where
    full_sigma_min < sigma <= full_sigma_max (None: no bound on that side; both None: no band). order 0 reuses
    what the last full step computed, order 1 forecasts it from the last two (TaylorSeer's first order)."""

    KIND: ClassVar[str]
    interval: int = 3
    start: float = 0.0
    end: float = 1.0
    full_sigma_min: float | None = None
    full_sigma_max: float | None = None
    order: int = 0
    uncond_every: int = 1  # with an uncond cache (UncondParams' every; 1: none)
    uncond_order: int = 1

    def __post_init__(self) -> None:
        check_uncond(self.uncond_every, self.uncond_order)
        kind = self.KIND
        if self.interval < 1:
            raise ValueError(f"{kind} interval must be at least 1, not {self.interval}")
        if self.order not in (0, 1):
            raise ValueError(f"{kind} order must be 0 or 1, not {self.order}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"{kind} needs 0 <= start <= end <= 1, not start {self.start:g}, end {self.end:g}")
        low, high = self.full_sigma_min, self.full_sigma_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"{kind} full_sigma_min ({low:g}) must be below full_sigma_max ({high:g})")

    def caches_at(self, step: int, sigmas: Sequence[float]) -> bool:
        """Whether step `step` of the run whose steps have these sigmas may reuse work (else it is full)."""
        if not self.start <= step / len(sigmas) < self.end:
            return False
        if self.full_sigma_min is None and self.full_sigma_max is None:
            return True
        sigma = sigmas[step]
        above = self.full_sigma_min is None or sigma > self.full_sigma_min
        below = self.full_sigma_max is None or sigma <= self.full_sigma_max
        return not (above and below)

    def full_steps(self, sigmas: Sequence[float]) -> list[int]:
        """For each step, the last full step at or before it: the steps outside the window or in the band, and
        every `interval` steps after the last full one."""
        last: list[int] = []
        for step in range(len(sigmas)):
            if not last or not self.caches_at(step, sigmas) or step - last[-1] >= self.interval:
                last.append(step)
            else:
                last.append(last[-1])
        return last


@dataclass(frozen=True)
class DeepCacheParams(CachedSteps):
    """{"kind": "deepcache"}: the steps between full ones run the shallow path of depth `branch`
    (app/models/deepcache.py) and reuse (order 0) or forecast (order 1) the deep features."""

    KIND: ClassVar[str] = "deepcache"
    branch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.branch < 0:
            raise ValueError(f"deepcache branch must be at least 0, not {self.branch}")


@dataclass(frozen=True)
class SkipParams(CachedSteps):
    """{"kind": "skip"}: the steps between full ones run no row at all: each image's denoised estimate is that of
    its last full step (order 0) or forecast from the last two (order 1), and the sampler steps on the eps that
    gives it (app/sampling/skip.py). By default only steps with sigma above 10 may skip: the first steps, from
    pure noise, where the estimate barely moves (docs/caching.md)."""

    KIND: ClassVar[str] = "skip"
    full_sigma_min: float | None = None
    full_sigma_max: float | None = 10.0


@dataclass(frozen=True)
class FirstBlockParams:
    """{"kind": "first_block"}: First-Block Cache (app/models/first_block.py). A row skips a step's transformer
    blocks after the first where its first block's residual changed by less than `threshold` (relative, mean
    absolute) since its last full step."""

    threshold: float = 0.1
    uncond_every: int = 1  # with an uncond cache (UncondParams' every; 1: none)
    uncond_order: int = 1

    def __post_init__(self) -> None:
        check_uncond(self.uncond_every, self.uncond_order)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"first_block threshold must be in (0, 1], not {self.threshold:g}")


@dataclass(frozen=True)
class UncondParams:
    """{"kind": "uncond"}: CFG's unconditional rows run on the first of a request's guided steps and on every
    `every`-th after it; the guided steps between skip them and take eps_uncond = eps_cond - d, with d the
    guidance difference eps_cond - eps_uncond of the last step that ran them (order 0) or its first-order forecast
    from the last two (order 1), as FasterCache's CFG-Cache (Lv et al. 2025) does. Any model, any precision: it
    skips rows, it enters no network."""

    every: int = 3
    order: int = 1

    def __post_init__(self) -> None:
        check_uncond(self.every, self.order)


CacheParams = DeepCacheParams | FirstBlockParams | UncondParams | SkipParams


# Each kind's settings, by the name a request gives it ("none": no cache).
CACHE_PARAMS: dict[str, type[CacheParams]] = {
    "deepcache": DeepCacheParams,
    "first_block": FirstBlockParams,
    "uncond": UncondParams,
    "skip": SkipParams,
}


def uncond_params(params: CacheParams | None) -> UncondParams | None:
    """The uncond cache a request's step cache includes: its own (kind uncond), or deepcache's or first_block's
    uncond_every and uncond_order where uncond_every > 1 (the two together: FasterCache's pairing); else None."""
    if params is None or isinstance(params, UncondParams):
        return params
    return UncondParams(params.uncond_every, params.uncond_order) if params.uncond_every > 1 else None


def cache_kind(params: CacheParams) -> str:
    return next(kind for kind, settings in CACHE_PARAMS.items() if isinstance(params, settings))


class HeldTensors:
    """What a run's step cache holds (its features, states, differences or estimates): its tensors, and their
    bytes (counted in a preempted run's state)."""

    @property
    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.tensors)


@dataclass(frozen=True)
class CachePlan:
    """One step's rows of a run, in its rows' order: the cache's kind, each row's setting (deepcache's branch,
    first_block's threshold) and what it reuses (deepcache: its features; first_block: its state; None: none)."""

    kind: str
    settings: tuple[int | float, ...]
    cached: tuple[torch.Tensor | None, ...]


class RowCache(HeldTensors):
    """One run's deep features, per kind of row: kind -> (the step they were computed at, (images, ...))."""

    def __init__(self, params: DeepCacheParams, sigmas: Sequence[float]) -> None:
        self.params = params
        self._last_full = params.full_steps(sigmas)
        self._held: dict[str, tuple[int, torch.Tensor]] = {}
        self._before: dict[str, tuple[int, torch.Tensor]] = {}  # order 1: each kind's full step before the last
        self._planned: tuple[int, tuple[str, ...], frozenset[str]] | None = None

    def _features(self, kind: str, step: int) -> torch.Tensor:
        """The kind's features to reuse at `step`: those of its last full step, or at order 1, where it ran in full
        twice within `interval` steps, their first-order forecast (TaylorSeer, Liu et al. 2025):
        F(s) = F1 + (F1 - F0) (s - s1) / (s1 - s0)."""
        s1, f1 = self._held[kind]
        before = self._before.get(kind)
        if self.params.order == 0 or before is None or s1 - before[0] > self.params.interval:
            return f1
        s0, f0 = before
        return f1 + (f1 - f0) * ((step - s1) / (s1 - s0))

    def _reusable(self, kind: str, step: int) -> bool:
        held = self._held.get(kind)
        full = self._last_full[step]
        return held is not None and step != full and held[0] >= full

    def plan(self, step: int, kinds: Sequence[str], images: int) -> CachePlan:
        """Step `step`'s rows: `images` rows of each kind in `kinds`, in that order."""
        reuse = frozenset(k for k in kinds if self._reusable(k, step))
        self._planned = (step, tuple(kinds), reuse)
        cached: list[torch.Tensor | None] = []
        for kind in kinds:
            cached += list(self._features(kind, step).unbind(0)) if kind in reuse else [None] * images
        return CachePlan("deepcache", (self.params.branch,) * len(cached), tuple(cached))

    def keep(self, step: int, deep: Sequence[torch.Tensor | None]) -> None:
        """The step's forward gave `deep` for the planned rows: keep the new features of the kinds run in full."""
        if self._planned is None or self._planned[0] != step:
            raise RuntimeError(f"a cache's features came back for step {step}, which was not planned")
        _, kinds, reuse = self._planned
        images = len(deep) // len(kinds)
        for k, kind in enumerate(kinds):
            if kind not in reuse:
                rows = deep[k * images : (k + 1) * images]
                if any(r is None for r in rows):
                    raise RuntimeError(f"the forward gave no deep features for the {kind} rows it ran in full")
                if self.params.order == 1 and kind in self._held:
                    self._before[kind] = self._held[kind]
                self._held[kind] = (step, torch.stack(rows))  # type: ignore[arg-type]
        self._planned = None

    def clear(self) -> None:
        self._held.clear()
        self._before.clear()
        self._planned = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in (*self._held.values(), *self._before.values())]


class FirstBlockRows(HeldTensors):
    """One run's First-Block Cache states, per kind of row and image: kind -> (the last step its rows ran, one
    state (2, tokens, channels) per image). Each row decides for itself at every step (app/models/first_block.py);
    its state changes only at its full steps. A kind whose rows did not run at the step before (the unconditional
    rows outside a guidance interval) drops its states: its first step back runs in full, as deepcache's does."""

    def __init__(self, params: FirstBlockParams) -> None:
        self.params = params
        self._held: dict[str, tuple[int, list[torch.Tensor]]] = {}
        self._planned: tuple[int, tuple[str, ...]] | None = None

    def plan(self, step: int, kinds: Sequence[str], images: int) -> CachePlan:
        """Step `step`'s rows: `images` rows of each kind in `kinds`, in that order."""
        self._planned = (step, tuple(kinds))
        cached: list[torch.Tensor | None] = []
        for kind in kinds:
            held = self._held.get(kind)
            cached += held[1] if held is not None and held[0] == step - 1 else [None] * images
        return CachePlan("first_block", (self.params.threshold,) * len(cached), tuple(cached))

    def keep(self, step: int, states: Sequence[torch.Tensor | None]) -> None:
        """The step's forward gave each planned row its state (new at a full step, its held one where it skipped)."""
        if self._planned is None or self._planned[0] != step:
            raise RuntimeError(f"a cache's states came back for step {step}, which was not planned")
        kinds = self._planned[1]
        images = len(states) // len(kinds)
        for k, kind in enumerate(kinds):
            rows = states[k * images : (k + 1) * images]
            if any(r is None for r in rows):
                raise RuntimeError(f"the forward gave no first_block state for the {kind} rows")
            self._held[kind] = (step, list(rows))  # type: ignore[arg-type]
        self._planned = None

    def clear(self) -> None:
        self._held.clear()
        self._planned = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, rows in self._held.values() for t in rows]


class GuidanceDeltas(HeldTensors):
    """One run's reused guidance differences (UncondParams): which of its guided steps skip the unconditional
    rows, and the differences d = eps_cond - eps_uncond of the last two guided steps that ran them.

    The guided steps are the run's steps whose guidance asks for unconditional rows (a guidance interval's few,
    or every step at a constant scale), known in advance: the first of them runs its rows, and every `every`-th
    after it; the others reuse. Each image keeps its own difference (a row of d), so an image's guidance never
    depends on another's. At order 1 the forecast is d1 + (d1 - d0) (s - s1) / (s1 - s0), in steps, from the last
    two steps that ran the rows; before there are two, it is d1 as it was."""

    def __init__(self, params: UncondParams, guided: Sequence[int]) -> None:
        self.params = params
        ran = set(guided[:: params.every])
        self.reused = frozenset(guided) - ran
        self._held: list[tuple[int, torch.Tensor]] = []

    def reuses(self, step: int) -> bool:
        """Whether step `step` takes its unconditional prediction from the held differences, running no rows."""
        return step in self.reused

    def keep(self, step: int, delta: torch.Tensor) -> None:
        """Step `step` ran the unconditional rows: their difference from the conditional ones, eps_c - eps_u."""
        self._held = [*self._held[-1:], (step, delta)]

    def delta(self, step: int) -> torch.Tensor:
        """The difference step `step` reuses: the last one kept, or at order 1 its forecast."""
        if not self._held:
            raise RuntimeError(f"step {step} reuses a guidance difference, and none was kept before it")
        s1, d1 = self._held[-1]
        if self.params.order == 0 or len(self._held) < 2:
            return d1
        s0, d0 = self._held[0]
        return d1 + (d1 - d0) * ((step - s1) / (s1 - s0))

    def clear(self) -> None:
        self._held = []

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [d for _, d in self._held]


def make_row_cache(params: CacheParams, sigmas: Sequence[float]) -> RowCache | FirstBlockRows | None:
    """What a run with this step cache keeps in its forwards (None: a cache that enters no network)."""
    if isinstance(params, DeepCacheParams):
        return RowCache(params, sigmas)
    return FirstBlockRows(params) if isinstance(params, FirstBlockParams) else None
