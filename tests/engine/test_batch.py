"""A tick's compute (app/engine/batch.py) called directly on the stand-in model: what it ran, what it flags, what
it decodes, and the stats it makes of that."""

import numpy as np
import pytest
import torch

from app.engine.batch import guidance_curve, step_batch, tick_stats
from app.engine.scheduler import EngineRequest
from app.sampling import GuidanceParams, SampleRun, SampleSpec
from app.sampling.cache import SkipParams

pytestmark = pytest.mark.stand_in


def request(loaded, name: str, spec: SampleSpec, *, priority: str = "interactive", client: str = "-") -> EngineRequest:
    run = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    return EngineRequest(name, run, 0.0, progress=True, priority=priority, client=client)


def test_one_forward_counts_each_kind_of_row_flags_each_request_and_decodes_only_the_finite_finished(loaded, denoiser):
    # Stand-in fault: rows labelled 7 come back as NaN.
    def faulty(x, t, y):
        eps = denoiser(x, t, y)
        return torch.where((y == 7)[:, None, None, None], torch.full_like(eps, float("nan")), eps)

    guided = request(loaded, "guided", SampleSpec(class_label=3, seeds=(1, 2), steps=1), client="a")
    unguided = request(loaded, "unguided", SampleSpec(class_label=None, seeds=(3,), steps=1), priority="batch")
    bad = request(loaded, "bad", SampleSpec(class_label=7, seeds=(4,), steps=1), client="a")
    longer = request(loaded, "longer", SampleSpec(class_label=2, seeds=(5,), steps=3, guidance=GuidanceParams(1.0)))
    decoded: list[int] = []

    def decode(latents: torch.Tensor) -> np.ndarray:
        decoded.append(latents.shape[0])
        return np.full((latents.shape[0], 28, 28, 1), 9, dtype=np.uint8)

    outputs: list = []
    step = step_batch(faulty, {}, decode, [guided, unguided, bad, longer], outputs)
    # guided: 2 cond + 2 uncond; unguided: 1 uncond; bad: 1 + 1; longer (scale 1): its cond row only.
    assert step.rows == 4 + 1 + 2 + 1
    assert (step.cond_rows, step.perturbed_rows, step.skipped_uncond_rows) == (2 + 1 + 1, 0, 1)
    assert step.finite == [True, True, False, True]
    assert decoded == [3]  # one decode: guided's 2 and unguided's 1 (bad is not finite, longer is not done)
    assert set(step.images) == {id(guided.run), id(unguided.run)} and step.images[id(guided.run)].shape[0] == 2
    assert step.class_rows == {"interactive": 4 + 2 + 1, "batch": 1}
    assert step.client_rows == {("interactive", "a"): 6, ("batch", "-"): 1, ("interactive", "-"): 1}
    assert outputs == []  # no step skipped: the forward's progress is the engine's to send

    guided.started_at = 0.5
    stats = tick_stats(
        step,
        active_requests=4,
        queue_depth=0,
        tick_seconds=0.1,
        images_finished=3,
        admitted=[guided],
        latencies=[("interactive", 1.0)],
        preemptions=0,
    )
    assert (stats.rows, stats.cond_rows, stats.uncond_rows) == (8, 4, 4)
    assert stats.queue_waits == (0.5,) and stats.class_rows == (("interactive", 7), ("batch", 1))


def test_a_request_s_skipped_steps_run_before_the_forward_with_a_progress_each(loaded, denoiser):
    # Interval 3 with no band: steps 0, 3 and 6 run rows; 1, 2, 4, 5 and 7 skip.
    no_band = SkipParams(interval=3, full_sigma_max=None)
    skipping = request(loaded, "skip", SampleSpec(class_label=3, seeds=(1,), steps=8, cache=no_band))
    plain = request(loaded, "plain", SampleSpec(class_label=4, seeds=(2,), steps=8))
    outputs: list = []
    first = step_batch(denoiser, {}, lambda x: np.zeros((x.shape[0], 28, 28, 1), np.uint8), [skipping, plain], outputs)
    assert (first.rows, first.skipped_step_images, skipping.run.step_index, plain.run.step_index) == (4, 0, 1, 1)
    outputs = []
    second = step_batch(denoiser, {}, lambda x: np.zeros((x.shape[0], 28, 28, 1), np.uint8), [skipping, plain], outputs)
    # steps 1 and 2 skipped (a Progress each), then step 3's forward beside plain's step 1
    assert (second.rows, second.skipped_step_images) == (4, 2)
    assert [o.step for o in outputs] == [2, 3] and all(o.request_id == "skip" for o in outputs)
    assert (skipping.run.step_index, plain.run.step_index) == (4, 2)


def test_the_guidance_curve_is_the_run_s_own_schedule(loaded):
    spec = SampleSpec(class_label=1, seeds=(1,), steps=5, guidance=GuidanceParams(4.0, noise_level=0.2))
    run = request(loaded, "r", spec).run
    points = guidance_curve(run)
    assert [p.step for p in points] == list(range(5))
    assert [p.scale for p in points] == list(run.scales)
    assert all(p.noise_level == pytest.approx(0.2 * f) for p, f in zip(points, run.noise_factors, strict=True))
