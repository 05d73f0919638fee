"""The engine's measure of its own pace (app/engine/pace.py): seconds per tick at each row count."""

import numpy as np

from app.engine.pace import TickTimes


def test_no_pace_before_any_tick():
    assert TickTimes(8).table() is None


def test_each_row_count_keeps_a_weighted_mean_of_its_ticks():
    times = TickTimes(8, alpha=0.5)
    times.observe(4, 1.0)
    times.observe(4, 2.0)
    times.observe(4, 2.0)
    assert times.table()[4] == 1.75  # 1, then 1.5, then 1.75
    times.observe(0, 9.0)  # no rows: no forward, nothing to learn
    times.observe(9, 9.0)  # past max_rows: not a tick this engine runs
    assert times.table()[4] == 1.75 and times.table()[0] == 0.0


def test_row_counts_not_run_yet_read_the_next_measured_above_else_scale_the_largest_below():
    times = TickTimes(8)
    times.observe(2, 0.2)
    times.observe(6, 0.3)
    table = times.table()
    assert np.allclose(table, [0.0, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.35, 0.4])
