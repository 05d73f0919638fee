"""app.sampling.cache: which steps a request's kinds of rows reuse their features at, as pure functions of the
steps, the kinds and the settings (no model: the features are stand-in tensors, their values never read)."""

from __future__ import annotations

import pytest
import torch

from app.sampling.cache import (
    DeepCacheParams,
    FirstBlockParams,
    FirstBlockRows,
    GuidanceDeltas,
    RowCache,
    UncondParams,
    make_row_cache,
)

IMAGES = 2


def sigmas(steps: int) -> list[float]:
    """A run's sigmas, falling: step i's is steps - i."""
    return [float(steps - i) for i in range(steps)]


def features(step: int, kind: str) -> tuple[torch.Tensor, ...]:
    """The rows' features a full step of `kind` gives: marked with the step, to see which step a reuse reads."""
    return tuple(torch.full((3,), float(step * 10 + len(kind))) for _ in range(IMAGES))


def run_steps(cache: RowCache, kinds_at: dict[int, tuple[str, ...]]) -> dict[int, dict[str, int | None]]:
    """Each step's plan: kind -> the step whose features its rows reuse, None where they run in full."""
    seen: dict[int, dict[str, int | None]] = {}
    for step, kinds in sorted(kinds_at.items()):
        plan = cache.plan(step, kinds, IMAGES)
        assert len(plan.cached) == len(plan.settings) == IMAGES * len(kinds)
        seen[step] = {}
        deep: list[torch.Tensor | None] = []
        for k, kind in enumerate(kinds):
            rows = plan.cached[k * IMAGES : (k + 1) * IMAGES]
            if rows[0] is None:
                assert all(r is None for r in rows)
                seen[step][kind] = None
                deep += features(step, kind)
            else:
                seen[step][kind] = int(rows[0][0].item()) // 10
                deep += rows
        cache.keep(step, tuple(deep))
    return seen


def test_each_kind_runs_in_full_every_interval_steps_and_reuses_its_own_features_between():
    cache = RowCache(DeepCacheParams(interval=3), sigmas(9))
    seen = run_steps(cache, {i: ("cond",) for i in range(9)})
    assert [seen[i]["cond"] for i in range(9)] == [None, 0, 0, None, 3, 3, None, 6, 6]


def test_every_kind_refreshes_at_the_full_steps_and_a_kind_back_from_a_skip_runs_in_full():
    # A guidance interval runs the unconditional rows at steps 2-6 only (app.sampling.run): they run in full at
    # their first step, and then at the full steps with the conditional rows, so that at a cached step both
    # reuse features of the same step.
    cache = RowCache(DeepCacheParams(interval=3), sigmas(10))
    kinds = {i: ("cond", "uncond") if 2 <= i <= 6 else ("cond",) for i in range(8)}
    kinds[9] = ("cond", "uncond")  # back after a skip of two steps: its features of step 5 are 4 steps old
    seen = run_steps(cache, kinds)
    assert [seen[i]["cond"] for i in sorted(seen)] == [None, 0, 0, None, 3, 3, None, 6, None]  # steps 0-7, 9
    assert [seen[i].get("uncond", "-") for i in sorted(seen)] == ["-", "-", None, None, 3, 3, None, "-", None]


def test_outside_its_window_every_step_runs_in_full():
    cache = RowCache(DeepCacheParams(interval=2, start=0.25, end=0.75), sigmas(8))
    seen = run_steps(cache, {i: ("cond",) for i in range(8)})
    # steps 2..5 may reuse; step 2 has features of step 1 (full, outside the window), 1 step old
    assert [seen[i]["cond"] for i in range(8)] == [None, None, 1, None, 3, None, None, None]


def test_the_steps_in_the_full_sigma_band_run_in_full_and_the_interval_counts_from_them():
    # sigmas 10..1: the band (3, 7] holds steps 3..6
    cache = RowCache(DeepCacheParams(interval=3, full_sigma_min=3.0, full_sigma_max=7.0), sigmas(10))
    seen = run_steps(cache, {i: ("cond",) for i in range(10)})
    assert [seen[i]["cond"] for i in range(10)] == [None, 0, 0, None, None, None, None, 6, 6, None]
    below = RowCache(DeepCacheParams(interval=2, full_sigma_max=7.0), sigmas(10))  # no lower bound: sigma <= 7
    assert [s["cond"] for s in run_steps(below, {i: ("cond",) for i in range(10)}).values()] == [None, 0] + [None] * 8


def test_interval_1_never_reuses_and_the_branch_is_every_row_s():
    cache = RowCache(DeepCacheParams(interval=1, branch=2), sigmas(4))
    assert all(
        kind is None
        for step in run_steps(cache, {i: ("cond", "uncond") for i in range(4)}).values()
        for kind in step.values()
    )
    assert cache.plan(0, ("cond", "uncond"), IMAGES).settings == (2,) * (2 * IMAGES)


def test_clear_frees_every_tensor_and_nbytes_counts_them():
    cache = RowCache(DeepCacheParams(interval=3), sigmas(6))
    run_steps(cache, {0: ("cond", "uncond")})
    assert len(cache.tensors) == 2 and cache.nbytes() == 2 * IMAGES * 3 * 4
    cache.clear()
    assert cache.tensors == [] and cache.nbytes() == 0
    assert cache.plan(1, ("cond",), IMAGES).cached == (None,) * IMAGES  # nothing left to reuse


def test_features_for_a_step_not_planned_are_refused():
    cache = RowCache(DeepCacheParams(), sigmas(4))
    cache.plan(0, ("cond",), IMAGES)
    with pytest.raises(RuntimeError, match="step 1, which was not planned"):
        cache.keep(1, features(1, "cond"))
    with pytest.raises(RuntimeError, match="no deep features for the cond rows"):
        cache.keep(0, (None,) * IMAGES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval": 0}, "interval must be at least 1"),
        ({"branch": -1}, "branch must be at least 0"),
        ({"start": 0.6, "end": 0.4}, "0 <= start <= end <= 1"),
        ({"full_sigma_min": 5.0, "full_sigma_max": 1.0}, "full_sigma_min \\(5\\) must be below full_sigma_max \\(1\\)"),
    ],
)
def test_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCacheParams(**kwargs)


def test_first_block_rows_reuse_the_states_of_the_step_before_and_drop_them_after_a_skip():
    cache = make_row_cache(FirstBlockParams(threshold=0.2), sigmas(6))
    assert isinstance(cache, FirstBlockRows)
    plan = cache.plan(0, ("cond", "uncond"), IMAGES)
    assert plan.kind == "first_block" and plan.settings == (0.2,) * 4 and plan.cached == (None,) * 4
    states = [torch.full((2, 3), float(i)) for i in range(4)]
    cache.keep(0, states)
    plan = cache.plan(1, ("cond", "uncond"), IMAGES)
    assert all(c is s for c, s in zip(plan.cached, states, strict=True))  # each row its own state
    kept = [states[0], torch.zeros(2, 3), states[2], states[3]]  # row 1 ran in full: a new state
    cache.keep(1, kept)
    plan = cache.plan(2, ("cond",), IMAGES)  # the unconditional rows skip step 2 (a guidance interval)
    assert plan.cached[0] is states[0] and plan.cached[1] is kept[1]
    cache.keep(2, kept[:2])
    plan = cache.plan(3, ("cond", "uncond"), IMAGES)  # back: they run in full, their old states dropped
    assert plan.cached[:2] == tuple(kept[:2]) and plan.cached[2:] == (None, None)
    cache.keep(3, [*kept[:2], *states[2:]])
    assert cache.nbytes() == 4 * 2 * 3 * 4
    with pytest.raises(RuntimeError, match="not planned"):
        cache.keep(4, kept)
    cache.clear()
    assert cache.tensors == [] and cache.nbytes() == 0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_first_block_threshold_outside_0_to_1_is_refused(threshold):
    with pytest.raises(ValueError, match=r"first_block threshold must be in \(0, 1\]"):
        FirstBlockParams(threshold=threshold)


def test_order_1_forecasts_the_features_from_the_last_two_full_steps_of_the_kind():
    # Full steps 0, 2, 4 (interval 2). The conditional rows' features are 4 at step 0, 24 at step 2, 44 at step 4
    # (features(): step * 10 + len(kind)); at step 1 only one full step is known: plain reuse.
    cache = RowCache(DeepCacheParams(interval=2, order=1), sigmas(6))
    reused: dict[int, float] = {}
    for step in range(6):
        plan = cache.plan(step, ("cond",), IMAGES)
        if plan.cached[0] is None:
            cache.keep(step, features(step, "cond"))
        else:
            assert torch.equal(plan.cached[0], plan.cached[1])
            reused[step] = plan.cached[0][0].item()
            cache.keep(step, plan.cached)
    # F(s) = F1 + (F1 - F0) (s - s1) / (s1 - s0): at step 3, 24 + 20 * 1 / 2; at step 5, 44 + 20 * 1 / 2.
    assert reused == {1: 4.0, 3: 34.0, 5: 54.0}
    assert cache.nbytes() == 2 * IMAGES * 3 * 4  # the last two full steps' features
    cache.clear()
    assert cache.tensors == []


def test_order_1_reuses_plainly_where_the_full_step_before_is_further_back_than_the_interval():
    # The unconditional rows run at step 0, then from step 4 (back from a guidance interval's skip: in full): their
    # two full steps are 4 apart, more than the interval, so step 5 reuses step 4's features as they are (a
    # forecast would read 44 + 40 / 4 = 54).
    cache = RowCache(DeepCacheParams(interval=3, order=1), sigmas(8))
    kinds = {0: ("cond", "uncond"), **{i: ("cond",) for i in range(1, 4)}, 4: ("cond", "uncond"), 5: ("cond", "uncond")}
    seen = run_steps(cache, kinds)
    assert seen[4]["uncond"] is None and seen[5]["uncond"] == 4  # its features of step 4, not a forecast
    # The conditional rows' full steps, 0 and 3, are an interval apart: forecast, 34 + (34 - 4) * 2 / 3 = 54.
    assert seen[5]["cond"] == 5


def test_uncond_reuses_between_every_nth_guided_step_and_enters_no_network():
    # A guidance interval on steps 9..15: the unconditional rows run on 9, 12 and 15; 10, 11, 13 and 14 reuse.
    deltas = GuidanceDeltas(UncondParams(every=3), list(range(9, 16)))
    assert sorted(deltas.reused) == [10, 11, 13, 14]
    assert not any(deltas.reuses(i) for i in (*range(9), 9, 12, 15, 16))
    assert make_row_cache(UncondParams(), sigmas(20)) is None  # nothing to plan in the forward
    assert GuidanceDeltas(UncondParams(every=1), list(range(20))).reused == frozenset()


def test_uncond_reuses_the_last_difference_at_order_0_and_forecasts_from_the_last_two_at_order_1():
    d9, d12 = torch.full((2, 3), 1.0), torch.full((2, 3), 4.0)
    plain = GuidanceDeltas(UncondParams(every=3, order=0), list(range(9, 16)))
    forecast = GuidanceDeltas(UncondParams(every=3, order=1), list(range(9, 16)))
    with pytest.raises(RuntimeError, match="none was kept"):
        forecast.delta(10)
    for deltas in (plain, forecast):
        deltas.keep(9, d9)
    assert torch.equal(forecast.delta(10), d9)  # one difference: as it was
    for deltas in (plain, forecast):
        deltas.keep(12, d12)
    assert torch.equal(plain.delta(13), d12) and torch.equal(plain.delta(14), d12)
    # d12 + (d12 - d9) (s - 12) / 3: 5 at step 13, 6 at step 14
    assert torch.equal(forecast.delta(13), torch.full((2, 3), 5.0))
    assert torch.equal(forecast.delta(14), torch.full((2, 3), 6.0))
    assert forecast.nbytes() == 2 * 6 * 4  # the last two, fp32
    forecast.keep(15, d9)
    assert len(forecast.tensors) == 2 and forecast.tensors[0] is d12  # only the last two are held
    forecast.clear()
    assert forecast.tensors == [] and forecast.nbytes() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"every": 0}, "every must be at least 1"), ({"order": 2}, "order must be 0 or 1")]
)
def test_uncond_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UncondParams(**kwargs)
