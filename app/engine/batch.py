"""A tick's compute over the active requests (steps 3 and 4 of app/engine/engine.py's tick), the rows it ran, and
the one-off compute the engine runs in its thread between ticks (its warmup, a request's guidance curve).

`step_batch` steps each request through its steps that run no row, runs the one shared forward over the others'
rows, reads every image's finiteness in the tick's one host sync and decodes the samples that are done in one
call. It holds none of the engine's state: the engine does the bookkeeping (who finished, who failed, what their
clients get) and `tick_stats` turns what it ran into the tick's EngineStats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.outputs import CurvePoint, EngineStats, RequestOutput
from app.engine.policy import PRIORITIES
from app.engine.scheduler import EngineRequest
from app.sampling import Denoiser, ImageDecoder, SampleRun, skip_step
from app.sampling import denoise_step as forward_step


@dataclass
class BatchStep:
    """What one tick's compute did: per request (in the order given), whether its latents are finite, and the
    images of those that finished; the rows of each kind its forward ran."""

    finite: list[bool]
    images: dict[int, np.ndarray]  # by id(request.run), for each finite request that is done
    rows: int = 0  # rows of the model's forward
    cond_rows: int = 0
    perturbed_rows: int = 0
    guide_rows: int = 0
    skipped_uncond_rows: int = 0
    reused_uncond_rows: int = 0
    skipped_step_images: int = 0
    shallow_rows: int = 0
    class_rows: dict[str, int] = field(default_factory=dict)
    client_rows: dict[tuple[str, str], int] = field(default_factory=dict)


def step_batch(
    denoiser: Denoiser,
    guides: Mapping[str, Denoiser],
    decode: ImageDecoder,
    requests: Sequence[EngineRequest],
    outputs: list[RequestOutput],
) -> BatchStep:
    """One tick's compute (the module's docstring). A request's progress at each step it skips goes to outputs,
    as at any step; its progress at the step of the forward is the caller's to send."""
    skipped_images = skip_ahead(denoiser, requests, outputs)
    runs = [r.run for r in requests]
    stepping = [r for r in runs if not r.done]  # a request whose last steps all skip finished above
    class_rows = dict.fromkeys(PRIORITIES, 0)
    client_rows: dict[tuple[str, str], int] = {}
    for request in requests:
        rows_now = 0 if request.run.done else request.run.rows_needed()
        class_rows[request.priority] += rows_now
        share = (request.priority, request.client)
        client_rows[share] = client_rows.get(share, 0) + rows_now
    step = BatchStep(
        [],
        {},
        cond_rows=sum(r.spec.num_images for r in stepping if r.spec.class_label is not None),
        perturbed_rows=sum(r.spec.num_images for r in stepping if r.needs_perturbed()),
        guide_rows=sum(r.guide_rows_needed() for r in stepping),
        skipped_uncond_rows=sum(r.skipped_uncond_rows() for r in stepping),
        reused_uncond_rows=sum(r.reused_uncond_rows() for r in stepping),
        skipped_step_images=skipped_images,
        class_rows=class_rows,
        client_rows=client_rows,
    )
    step.rows = forward_step(denoiser, stepping, guides) if stepping else 0
    step.shallow_rows = sum(r.shallow_rows for r in runs if r.cache is not None)
    # Every image's flag in one reduction over the batch (not two kernels per request: on a GPU each is a
    # launch), read in the tick's one sync; a request is finite where all its images are.
    per_image = torch.cat([r.latents.flatten(1) for r in runs]).isfinite().all(dim=1).tolist()
    ends = np.cumsum([r.spec.num_images for r in runs])
    step.finite = [all(per_image[b - r.spec.num_images : b]) for r, b in zip(runs, ends, strict=True)]
    done = [r for r, ok in zip(runs, step.finite, strict=True) if ok and r.done]
    if done:
        decoded = decode(torch.cat([r.latents for r in done]))
        offsets = np.cumsum([0] + [r.spec.num_images for r in done])
        step.images = {id(r): decoded[a:b] for r, a, b in zip(done, offsets[:-1], offsets[1:], strict=True)}
    return step


def skip_ahead(denoiser: Denoiser, requests: Sequence[EngineRequest], outputs: list[RequestOutput]) -> int:
    """Step each request through its steps that run no row (skip_step), each with its progress as at any step;
    returns the images of the steps skipped."""
    images = 0
    while skipping := skip_step(denoiser, [r.run for r in requests]):
        images += sum(r.spec.num_images for r in skipping)
        skipped = {id(r) for r in skipping}
        outputs += [r.report() for r in requests if r.progress and id(r.run) in skipped and not r.run.done]
    return images


def tick_stats(
    step: BatchStep,
    *,
    active_requests: int,
    queue_depth: int,
    tick_seconds: float,
    images_finished: int,
    admitted: Sequence[EngineRequest],
    latencies: Sequence[tuple[str, float]],
    preemptions: int,
) -> EngineStats:
    """The tick's stats: what step_batch ran, and the engine's side of it (admissions, ends)."""
    first_admissions = [r for r in admitted if not r.preemptions]  # resumed requests' waits were counted once
    return EngineStats(
        rows=step.rows,
        active_requests=active_requests,
        queue_depth=queue_depth,
        tick_seconds=tick_seconds,
        images_finished=images_finished,
        cond_rows=step.cond_rows,
        uncond_rows=step.rows - step.cond_rows - step.perturbed_rows,
        perturbed_rows=step.perturbed_rows,
        guide_rows=step.guide_rows,
        skipped_uncond_rows=step.skipped_uncond_rows,
        reused_uncond_rows=step.reused_uncond_rows,
        skipped_step_images=step.skipped_step_images,
        shallow_rows=step.shallow_rows,
        queue_waits=tuple(r.queue_wait_s for r in first_admissions),  # type: ignore[misc]
        class_queue_waits=tuple((r.priority, r.queue_wait_s) for r in first_admissions),  # type: ignore[misc]
        class_rows=tuple(step.class_rows.items()),
        latencies=tuple(latencies),
        client_rows=tuple((priority, client, n) for (priority, client), n in step.client_rows.items()),
        preemptions=preemptions,
    )


def sample_alone(denoiser: Denoiser, run: SampleRun, guides: Mapping[str, Denoiser]) -> None:
    """Run one request alone to its end (the warmup's first request)."""
    while not run.done:
        forward_step(denoiser, [run], guides)


def warm_rows(
    denoiser: Denoiser, rows: int, image_shape: tuple[int, int, int], null_label: int, device: torch.device
) -> None:
    """One forward at a row count (the warmup's: the CPU backend builds its kernels per input shape)."""
    x = torch.zeros((rows, *image_shape), device=device)
    t = torch.full((rows,), 500, dtype=torch.long, device=device)
    labels = torch.full((rows,), null_label, dtype=torch.long, device=device)
    denoiser(x, t, labels)


def guidance_curve(run: SampleRun) -> list[CurvePoint]:
    """Per step of the run: its timestep, sigma, guidance scale s_i and noise level."""
    level = run.spec.guidance.noise_level
    rows = zip(run.timesteps.tolist(), run.sigmas, run.scales, run.noise_factors, strict=True)
    return [
        CurvePoint(step=i, timestep=int(t), sigma=sigma, scale=scale, noise_level=level * factor)
        for i, (t, sigma, scale, factor) in enumerate(rows)
    ]
