"""The part of the model adapters that the sampler's Denoiser signature asks of every class-conditional model."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from app.models.attention import PerturbationSites, RowPerturbations, perturbation_hooks, perturbation_sites
from app.models.deepcache import DeepCacheError, RowsOut


@dataclass(frozen=True)
class Hooks:
    """The hooks a forward is under, each selecting rows by their index in the whole forward: CADS's embedding
    delta, and perturbed rows."""

    delta: bool
    perturb: bool


class HookedDenoiser:
    """(x, timesteps, class_labels[, embed_delta], *, perturb=None) -> eps for a model whose class-embedding
    modules are `label_embedders` and whose network is `network`.

    embed_delta (rows, D) is added to the label embedders' outputs (CADS); perturb gives its rows perturbed
    self-attention or skipped blocks (app/models/attention.py). Both work by forward hooks held only for that
    call. A hook is on the module, seen by every thread: it acts only in the thread that holds the forward, so
    a class embedding read elsewhere meanwhile (a request being built in the event loop), or another thread's
    forward, is the model's own. Subclasses set label_embedders, and implement network, _forward and
    class_embedding."""

    label_embedders: list[torch.nn.Module]

    @property
    def network(self) -> torch.nn.Module:
        """The network whose layers perturbations hook (app/models/attention.py)."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        /,
        *extra: torch.Tensor,
        perturb: RowPerturbations | None = None,
    ) -> torch.Tensor:
        """extra: the Denoiser protocol's optional embed_delta, (rows, D), or nothing."""
        if len(extra) > 1:
            raise TypeError(f"a denoiser takes at most one tensor after class_labels (embed_delta), got {len(extra)}")
        embed_delta = extra[0] if extra else None
        if embed_delta is None and perturb is None:
            return self._forward(x, timesteps, class_labels)
        with self._hooked(x.shape[0], embed_delta, perturb):
            return self._forward(x, timesteps, class_labels)

    @torch.inference_mode()
    def forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        embed_delta: torch.Tensor | None = None,
        *,
        perturb: RowPerturbations | None = None,
        kind: str,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
    ) -> RowsOut:
        """The forward with each row's full or shallow path, by the step cache `kind` (app/sampling/spec.py's
        CachingDenoiser says what settings and cached hold). The hooks of embed_delta and perturb select rows by
        their index in the whole forward: each kind says what it runs on every row while they are held."""
        if self.cache_support().get(kind, "no such step cache") is not None:
            raise DeepCacheError(self.cache_support().get(kind) or f"no step cache of kind {kind!r}")
        with self._hooked(x.shape[0], embed_delta, perturb):
            hooks = Hooks(delta=embed_delta is not None, perturb=perturb is not None)
            return self._forward_cached(x, timesteps, class_labels, settings, cached, hooks)

    @contextlib.contextmanager
    def _hooked(self, rows: int, embed_delta: torch.Tensor | None, perturb: RowPerturbations | None) -> Iterator[None]:
        """The hooks of embed_delta and perturb, held for one forward in this thread."""
        if perturb is not None and perturb.rows != rows:
            raise ValueError(f"perturb covers {perturb.rows} rows, and the forward has {rows}")
        owner = threading.get_ident()

        def add_delta(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            assert embed_delta is not None  # registered only with a delta
            return out + embed_delta.to(out.dtype) if threading.get_ident() == owner else out

        hooks = [] if perturb is None else perturbation_hooks(self.perturbation_sites, perturb, owner)
        if embed_delta is not None:
            hooks += [e.register_forward_hook(add_delta) for e in self.label_embedders]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def cache_support(self) -> dict[str, str | None]:
        """Each step cache kind beyond "none" (app/sampling/cache.py) and why this model can't run it (None:
        it can)."""
        return {
            "deepcache": "deepcache splits a UNet at its levels, and this model has none",
            "first_block": "first_block skips a DiT's transformer blocks, and this model has none",
        }

    def deepcache_branches(self) -> int:
        """The deepest branch deepcache can split this model at (app/models/deepcache.py)."""
        raise DeepCacheError(self.cache_support()["deepcache"] or "deepcache is not supported")

    def _forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
        hooks: Hooks,
    ) -> RowsOut:
        """forward_cached of the one step cache kind this model runs, with the hooks it is under."""
        raise DeepCacheError("this model has no step cache")

    @functools.cached_property
    def perturbation_sites(self) -> PerturbationSites:
        """The network's perturbable layers, found at the first perturbed forward."""
        return perturbation_sites(self.network)

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_embedding(self, label: int) -> torch.Tensor:
        """The model's embedding of one class label, shape (D,), as CADS perturbs it."""
        raise NotImplementedError
