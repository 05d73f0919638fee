"""One denoiser call shared by many requests (denoise_step), the steps that need none (skip_step), and the loop
of such steps (sample).

The conditional rows of all runs, and the rows of the branches their guidance takes at this step, go in ONE
tensor with per-row timesteps and labels; the runs that app.sampling.batched steps together first, then the
others'. Autoguidance's rows go through the guide model: one more forward per guide in the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch

from app.models.attention import RowPerturbations
from app.sampling.batched import advance_together, inputs_together
from app.sampling.cache import CachePlan
from app.sampling.run import SampleRun
from app.sampling.spec import CachingDenoiser, Denoiser, ModelInput


def denoise_step(denoiser: Denoiser, runs: Sequence[SampleRun], guides: Mapping[str, Denoiser] | None = None) -> int:
    """ONE forward over the rows of all runs, then each run advances its own sampler. Returns the main forward's
    rows.

    The runs that app.sampling.batched steps together come first, their rows built at once; then the others',
    each from its own model_input. Runs with a "guide" branch at this step (autoguidance) also get one forward
    per guide model (guides: name -> its denoiser) over their conditional rows."""
    together = [r for r in runs if r.table is not None]
    alone = [r for r in runs if r.table is None]
    inputs = [ModelInput(*inputs_together(together))] if together else []
    inputs += [r.model_input() for r in alone]
    args = [torch.cat([i.x for i in inputs]), torch.cat([i.timesteps for i in inputs])]
    args.append(torch.cat([i.class_labels for i in inputs]))
    deltas = [i.embed_delta for i in inputs]
    if any(d is not None for d in deltas):
        width = next(d for d in deltas if d is not None).shape[1]
        zeros = [torch.zeros((i.rows, width), device=i.x.device) for i in inputs]
        args.append(torch.cat([z if d is None else d for z, d in zip(zeros, deltas, strict=True)]))
    perturb = None
    if any(i.perturbed is not None for i in inputs):  # only then: the other ticks keep their exact path
        per_row = [p for i in inputs for p in (i.perturbed or (None,) * i.rows)]
        perturb = RowPerturbations.from_rows(per_row, args[0].device)
    ordered = [*together, *alone]  # the runs in their rows' order
    plans = [r.cache_plan() for r in ordered]
    if args[0].shape[0] == 0:  # every run skips this step (a skip cache): no forward
        eps = args[0]
    elif any(p is not None for p in plans):
        eps = _cached_forward(denoiser, args, perturb, ordered, plans)
    elif perturb is not None:
        eps = denoiser(*args, perturb=perturb)
    else:
        eps = denoiser(*args)
    guided = guide_outputs(alone, guides or {})
    offsets, offset = [], 0
    for run in together:
        if run.guide_rows_needed():
            raise ValueError("a run with a guide branch is stepped alone (its guider has no combine_rows)")
        offsets.append(offset)
        offset += run.rows_needed()
    for run, inp in zip(alone, inputs[1:] if together else inputs, strict=True):
        run.advance(eps[offset : offset + inp.rows], guided.get(id(run)))
        offset += inp.rows
    if together:
        advance_together(together, eps, offsets)
    return offset


def skip_step(denoiser: Denoiser, runs: Sequence[SampleRun]) -> list[SampleRun]:
    """Advance, by one step and with no forward, the runs whose step runs no row (a skip cache's,
    app/sampling/skip.py); returns them. An engine's tick calls it until none is left, then runs the others'
    forward: a skipped step costs a request no tick of its own."""
    skipping = [r for r in runs if not r.done and r.skips(r.step_index)]
    if skipping:
        denoise_step(denoiser, skipping)
    return skipping


def _cached_forward(
    denoiser: Denoiser,
    args: list[torch.Tensor],
    perturb: RowPerturbations | None,
    runs: Sequence[SampleRun],
    plans: Sequence[CachePlan | None],
) -> torch.Tensor:
    """The forward of a step in which some runs cache (app/sampling/cache.py): each row takes its full or shallow
    path (app/models/deepcache.py, app/models/first_block.py); each caching run keeps what its rows gave."""
    forward_cached = getattr(denoiser, "forward_cached", None)
    if forward_cached is None:
        raise ValueError("a run caches features, and this model's forward cannot reuse them")
    kinds = {p.kind for p in plans if p is not None}
    if len(kinds) != 1:
        raise ValueError(f"one forward runs one kind of step cache, not {', '.join(sorted(kinds))}")
    settings: list[int | float | None] = []
    cached: list[torch.Tensor | None] = []
    sizes = [r.rows_needed() for r in runs]
    for plan, rows in zip(plans, sizes, strict=True):
        settings += [None] * rows if plan is None else list(plan.settings)
        cached += [None] * rows if plan is None else list(plan.cached)
    out = cast(CachingDenoiser, denoiser).forward_cached(
        *args, perturb=perturb, kind=kinds.pop(), settings=settings, cached=cached
    )
    offset = 0
    for run, rows in zip(runs, sizes, strict=True):
        run.keep_cache(out.deep[offset : offset + rows], out.shallow[offset : offset + rows])
        offset += rows
    return out.eps


def guide_outputs(runs: Sequence[SampleRun], guides: Mapping[str, Denoiser]) -> dict[int, dict[str, torch.Tensor]]:
    """The guide forwards of a step: for each guide model, ONE forward over the conditional rows of the runs it
    guides at this step (after their model_input). Returns id(run) -> {"guide": its rows of that output}."""
    by_guide: dict[str, list[SampleRun]] = {}
    for run in runs:
        if run.guide_rows_needed():
            name = run.guider.guide_model
            if name is None or name not in guides:
                raise ValueError(f"the guide model {name!r} is not served beside this model")
            by_guide.setdefault(name, []).append(run)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    for name, members in by_guide.items():
        inputs = [r.guide_input() for r in members]
        cat = [torch.cat([getattr(i, f) for i in inputs]) for f in ("x", "timesteps", "class_labels")]
        eps = guides[name](*cat)
        for run, part in zip(members, eps.split([i.rows for i in inputs]), strict=True):
            outputs[id(run)] = {"guide": part}
    return outputs


def sample(
    denoiser: Denoiser,
    runs: Sequence[SampleRun],
    on_step: Callable[[], None] | None = None,
    guides: Mapping[str, Denoiser] | None = None,
) -> None:
    """Step all runs together until each is done; runs drop out as they finish.

    on_step, if given, is called after each forward (a progress bar's update, say); guides: the guide models
    that autoguidance runs name, by name."""
    active = [r for r in runs if not r.done]
    while active:
        denoise_step(denoiser, active, guides)
        active = [r for r in active if not r.done]
        if on_step is not None:
            on_step()
