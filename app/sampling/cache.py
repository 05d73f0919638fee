"""A request's step cache (issue 27): what it asks for (DeepCacheParams) and the features its run keeps
(RowCache).

DeepCache's deep features are kept per kind of row (the conditional rows, and the unconditional and perturbed
rows of its guidance), each kind its own: the kinds run at different steps (a guidance interval runs the
unconditional rows on a few steps only) and see different inputs. A kind's rows run in full, and refresh its
features, where the step lies outside the request's caching window [start, end) of its steps, where the kind has
none yet, or where its features are `interval` steps old or more; between, they run only the shallow path and
reuse them. So a kind whose rows were skipped for a while (the unconditional rows outside a guidance interval)
runs in full at its first step back, never on features from before the skip more than interval - 1 steps old.
The features live on the run and leave with it: cleared when it finishes or ends, kept while it is preempted
(counted in its preempted state: app/engine/scheduler.py), so a preempted request's images equal an unpreempted
one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CACHE_KINDS = ("none", "deepcache")


@dataclass(frozen=True)
class DeepCacheParams:
    """{"kind": "deepcache"}: a full step every `interval` steps for each kind of row, the steps between on the
    shallow path of depth `branch` (app/models/deepcache.py); every step in full outside [start, end), fractions
    of the steps (0: the first, pure noise)."""

    interval: int = 3
    branch: int = 0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"deepcache interval must be at least 1, not {self.interval}")
        if self.branch < 0:
            raise ValueError(f"deepcache branch must be at least 0, not {self.branch}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"deepcache needs 0 <= start <= end <= 1, not start {self.start:g}, end {self.end:g}")

    def caches_at(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` may reuse features (else every kind runs it in full)."""
        return self.start <= step / steps < self.end


@dataclass(frozen=True)
class CachePlan:
    """One step's rows of a run, in its rows' order: each row's branch and its features to reuse (None: full)."""

    branches: tuple[int, ...]
    cached: tuple[torch.Tensor | None, ...]

    @property
    def reused(self) -> int:
        return sum(c is not None for c in self.cached)


class RowCache:
    """One run's deep features, per kind of row: kind -> (the step they were computed at, (images, ...))."""

    def __init__(self, params: DeepCacheParams, steps: int) -> None:
        self.params = params
        self.steps = steps
        self._held: dict[str, tuple[int, torch.Tensor]] = {}
        self._planned: tuple[int, tuple[str, ...], frozenset[str]] | None = None

    def _reusable(self, kind: str, step: int) -> bool:
        held = self._held.get(kind)
        return held is not None and step - held[0] < self.params.interval and self.params.caches_at(step, self.steps)

    def reused_kinds(self, step: int, kinds: Sequence[str]) -> frozenset[str]:
        """The kinds of `kinds` whose rows reuse their features at step `step`."""
        return frozenset(k for k in kinds if self._reusable(k, step))

    def plan(self, step: int, kinds: Sequence[str], images: int) -> CachePlan:
        """Step `step`'s rows: `images` rows of each kind in `kinds`, in that order."""
        reuse = self.reused_kinds(step, kinds)
        self._planned = (step, tuple(kinds), reuse)
        cached: list[torch.Tensor | None] = []
        for kind in kinds:
            cached += list(self._held[kind][1].unbind(0)) if kind in reuse else [None] * images
        return CachePlan((self.params.branch,) * len(cached), tuple(cached))

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
                self._held[kind] = (step, torch.stack(rows))  # type: ignore[arg-type]
        self._planned = None

    def clear(self) -> None:
        self._held.clear()
        self._planned = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self._held.values()]

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.tensors)
