"""One sampler step for many requests at once: plain CFG and the sampler's update over all their rows together.

Each request keeps its own diffusers scheduler (app/sampling/run.py), and stepping them one by one costs
some twenty small tensor operations per request: on a GPU, where the forward of this project's model takes
a millisecond or two, that Python dominates a tick (359 us per request-step on an H200, docs/benchmarks.md).
For the requests this module reproduces exactly, the step is instead a handful of operations over the
batch, whatever its size:

  - the guidance combine of the requests' guider over their gathered rows (its combine_rows: CFG's
    eps_u + s * (eps_c - eps_u), app.guidance.cfg, with s per row);
  - the sampler's update (app.sampling.solvers: DPM-Solver++ 2M, DDIM, DDPM, Euler ancestral), its per-step
    scalars from a table built once per (sampler, config, steps) and shared by every request of that
    schedule; the ancestral samplers' noise drawn on the host by each image's own generator, as diffusers
    draws it, and queued to the device without a sync.

Every coefficient is a per-row value broadcast over the row's pixels, and every operation is elementwise or a
row gather, so a request's images do not depend on what it is batched with. The result equals diffusers' step
to the bit on the CPU (tests/sampling/test_batched.py) and, DPM-Solver++ so far, on an H200 (tests/test_cuda.py,
which checks the others on the next card).

Which requests: a guider with combine_rows (method cfg) and no condition noise, no rescale, no CADS, no trace
(those keep their per-request path); any of them may ask for previews.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from app.guidance import Guider, RowsCombine
from app.rng import StackedRandom
from app.sampling.device import to_device
from app.sampling.schedulers import step_kwargs, timed_scheduler
from app.sampling.solvers import SOLVERS, Solver


@dataclass(frozen=True)
class StepTable:
    """A schedule's per-step coefficients for one of SOLVERS, on the host: each step's row as the float32
    values it holds, read as a list once here rather than at every step; and what each step's model input is
    divided by (the scheduler's scale_model_input, which keeps a step index of its own), None where it is 1."""

    solver: str
    rows: tuple[list[float], ...]
    input_divisors: tuple[float, ...] | None = None
    timesteps: tuple[float, ...] = ()  # each step's timestep on the host, as the model takes it
    timestep_dtype: torch.dtype = torch.int64

    def __getitem__(self, step: int) -> list[float]:
        return self.rows[step]


class BatchedRun(Protocol):
    """What this module reads and writes of a request (app.sampling.run.SampleRun, which imports this module)."""

    spec: Any
    table: StepTable | None  # this module steps only runs that have one: table_of
    guider: Guider
    rng: StackedRandom
    latents: torch.Tensor
    scaled_input: torch.Tensor | None
    x0_prev: torch.Tensor | None
    step_index: int
    scales: list[float]
    label: int
    null_label: int

    @property
    def done(self) -> bool: ...

    def needs_uncond(self) -> bool: ...

    def skips(self, i: int) -> bool: ...

    def skipped_eps(self) -> torch.Tensor: ...

    def reuses_uncond(self, i: int) -> bool: ...

    def uncond_estimate(self, eps_cond: torch.Tensor) -> torch.Tensor: ...

    def keep_delta(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> None: ...

    def finish_step(self, latents: torch.Tensor, eps_guided: torch.Tensor) -> None: ...


def table_of(run: BatchedRun) -> StepTable:
    """The run's step table; ValueError for a run stepped alone (SampleRun.table None), which never comes here."""
    if run.table is None:
        raise ValueError("app.sampling.batched steps only runs that have a step table")
    return run.table


@functools.lru_cache(maxsize=256)
def step_table(sampler: str, scheduler_config_json: str, steps: int) -> StepTable | None:
    """The step table of (sampler, config_key, steps), for whichever of SOLVERS reproduces its scheduler (None:
    none does), built once and shared (read-only) by every request that asks for it: ~20 scalar operations a
    step, off each request's path."""
    scheduler = timed_scheduler(sampler, scheduler_config_json, steps)
    for name, solver in SOLVERS.items():
        coefs = solver.table(scheduler, **step_kwargs(sampler))
        if coefs is not None:
            divisors = None if solver.input_divisors is None else tuple(solver.input_divisors(scheduler))
            host = scheduler.timesteps
            return StepTable(name, tuple(coefs.tolist()), divisors, tuple(host.tolist()), host.dtype)
    return None


def inputs_together(runs: Sequence[BatchedRun]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's rows (x, timesteps, labels) for runs that have a step table, built over all of them at
    once rather than run by run: each run's conditional rows, then its unconditional ones where this step runs
    them, in the runs' order, as SampleRun.model_input would give them. The timesteps and labels come from
    host lists, with one copy each that does not wait; each run's scaled input is kept for its preview."""
    latents = torch.cat([r.latents for r in runs]) if len(runs) > 1 else runs[0].latents
    index: list[int] = []
    timesteps: list[float] = []
    labels: list[int] = []
    tables = [table_of(r) for r in runs]
    scaled = any(t.input_divisors is not None for t in tables)
    divisors: list[float] = []
    start = 0
    for r, table in zip(runs, tables, strict=True):
        n, i = r.spec.num_images, r.step_index
        if not r.skips(i):  # a skipped step runs no row; its scaled input is kept all the same
            rows = list(range(start, start + n))
            guided = r.needs_uncond()
            index += rows + rows if guided else rows
            labels += [r.label] * n + [r.null_label] * n if guided else [r.label] * n
            timesteps += [table.timesteps[i]] * (2 * n if guided else n)
        if scaled:
            divisors += [1.0 if table.input_divisors is None else table.input_divisors[i]] * n
        start += n
    x = latents
    if scaled:  # Euler's scale_model_input, a division by a host scalar: CUDA multiplies by its reciprocal
        d = torch.tensor(divisors, dtype=torch.float32)
        d = to_device(1.0 / d if latents.is_cuda else d, latents.device).reshape(-1, *([1] * (latents.dim() - 1)))
        x = latents * d if latents.is_cuda else latents / d
    for r, view in zip(runs, x.split([r.spec.num_images for r in runs]), strict=True):
        r.scaled_input = view
    dtype = functools.reduce(torch.promote_types, {t.timestep_dtype for t in tables})
    device = latents.device
    x_rows = x.index_select(0, to_device(torch.tensor(index, dtype=torch.long), device))
    labels_rows = to_device(torch.tensor(labels, dtype=torch.long), device)
    return x_rows, to_device(torch.tensor(timesteps, dtype=dtype), device), labels_rows


def advance_together(runs: Sequence[BatchedRun], eps: torch.Tensor, offsets: Sequence[int]) -> None:
    """Advance runs that have a step table (SampleRun.table) by one step, each solver's runs all at once.
    offsets[k] is where runs[k]'s rows start in eps, the shared forward's output (its conditional rows, then
    its unconditional)."""
    groups: dict[tuple[str, type[Guider]], list[tuple[BatchedRun, int]]] = {}
    for run, offset in zip(runs, offsets, strict=True):
        groups.setdefault((table_of(run).solver, type(run.guider)), []).append((run, offset))
    for (name, guider), members in groups.items():
        if guider.combine_rows is None:
            raise ValueError(f"{guider.__name__} has no combine_rows: its requests are stepped alone")
        _advance(SOLVERS[name], guider.combine_rows, members, eps)


def step_noise(run: BatchedRun, column: int) -> torch.Tensor:
    """The noise an ancestral step adds to the run's images, on the host: one draw per image from its own
    generator, as diffusers' step draws it (randn_tensor with the generator list); zeros where the table's
    noise scale (column) is 0 and the step adds none: DDPM draws nothing there either (t = 0), and Euler
    ancestral's draw at its last step (sigma_up = 0) only moves generators that nothing reads again."""
    if table_of(run)[run.step_index][column] == 0:
        return torch.zeros(tuple(run.latents.shape), dtype=run.latents.dtype)
    return run.rng.randn(run.latents.shape[1:], dtype=run.latents.dtype)


def _advance(
    solver: Solver, combine_rows: RowsCombine, members: list[tuple[BatchedRun, int]], eps: torch.Tensor
) -> None:
    runs = [run for run, _ in members]
    sizes = [r.spec.num_images for r in runs]
    per_row: list[list[float]] = []  # cond index, uncond index, scale, then the step-table row
    # The rows no forward gave: the unconditional rows of runs that reuse their guidance difference, the eps of
    # runs that skip the step; they go after the forward's rows.
    estimates: list[torch.Tensor] = []
    estimated_at = eps.shape[0]
    for (run, offset), n in zip(members, sizes, strict=True):
        i, cond = run.step_index, offset
        if run.skips(i):
            estimates.append(run.skipped_eps())
            scale, cond = 1.0, estimated_at
            uncond = cond
            estimated_at += n
        elif run.needs_uncond():
            run.keep_delta(eps[offset : offset + n], eps[offset + n : offset + 2 * n])
            scale, uncond = run.scales[i], offset + n
        elif run.reuses_uncond(i):
            estimates.append(run.uncond_estimate(eps[offset : offset + n]))
            scale, uncond = run.scales[i], estimated_at
            estimated_at += n
        else:
            scale, uncond = 1.0, offset
        coefs = table_of(run)[i]
        per_row += [[cond + j, uncond + j, scale, *coefs] for j in range(n)]
    if estimates:
        eps = torch.cat([eps, *estimates])
    host = torch.tensor(per_row, dtype=torch.float32)
    table = to_device(host, eps.device)  # one copy, which does not wait: no host-device sync in the step
    eps_guided = combine_rows(eps, table[:, 0].long(), table[:, 1].long(), table[:, 2])
    sample = torch.cat([r.latents for r in runs]) if len(runs) > 1 else runs[0].latents
    x0_prev = None
    if solver.history:
        x0_prev = torch.cat([r.x0_prev if r.x0_prev is not None else torch.zeros_like(r.latents) for r in runs])
    noise = None
    if solver.noise is not None:  # drawn on the host by each image's generator, as diffusers' step, and queued
        noise = to_device(torch.cat([step_noise(r, solver.noise) for r in runs]), eps.device)
    x_t, x0 = solver.update(sample, eps_guided.to(sample.dtype), x0_prev, table[:, 3:], noise)
    x0s = x0.split(sizes) if solver.history else [None] * len(runs)
    for run, latents, eps_run, x0_run in zip(runs, x_t.split(sizes), eps_guided.split(sizes), x0s, strict=True):
        run.x0_prev = x0_run
        run.finish_step(latents, eps_run)
        if run.done:  # a finished request keeps its own latents, not a view holding the whole batch's alive
            run.latents, run.x0_prev, run.scaled_input = run.latents.clone(), None, None
