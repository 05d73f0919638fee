"""The admission policy's pure functions (app/engine/policy.py), over row profiles and the admitted load."""

import numpy as np

from app.engine.policy import add_profile, earliest_start, fits_at, rank, victims


def rows(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_a_profile_fits_where_it_stays_within_the_budget_at_every_tick_from_its_start():
    load = rows(6, 6, 2, 2)
    assert not fits_at(rows(4, 4), load, 8)
    assert fits_at(rows(2, 2, 2, 2, 8), load, 8)  # past the load's end only its own rows count
    assert not fits_at(rows(4, 4), load, 8, offset=1)
    assert fits_at(rows(4, 4), load, 8, offset=2)
    assert fits_at(rows(8), load, 8, offset=4)


def test_the_earliest_start_is_the_first_tick_from_which_a_profile_fits():
    assert earliest_start(rows(4, 4), rows(6, 6, 2, 2), 8) == 2
    assert earliest_start(rows(8, 8), rows(6, 6, 2, 2), 8) == 4
    assert earliest_start(rows(2), rows(), 8) == 0
    # A dip in the load (a guidance interval freeing rows) is used where the whole profile fits there.
    assert earliest_start(rows(4), rows(6, 2, 6), 8) == 1


def test_adding_and_taking_back_a_profile_leaves_the_load_as_it_was():
    load = rows(4, 4)
    grown = add_profile(load, rows(2, 2, 2))
    assert grown.tolist() == [6, 6, 2] and load.tolist() == [4, 4]
    assert add_profile(grown, rows(2, 2, 2), -1).tolist() == [4, 4, 0]


def test_victims_are_the_fewest_running_requests_in_order_whose_leaving_makes_room():
    load = rows(8, 8, 8)
    running = [rows(2, 2, 2), rows(2, 2), rows(4, 4, 4)]
    unbounded = [10**9] * 3
    assert victims(rows(2, 2), load, 8, running, unbounded) == 1
    assert victims(rows(4, 4), load, 8, running, unbounded) == 2
    assert victims(rows(8), load, 8, running, unbounded) == 3
    assert victims(rows(8), load, 8, running[:2], unbounded) is None  # all of them leaving is not enough


def test_victims_stop_where_preempted_state_would_pass_its_bound():
    load, running = rows(8, 8), [rows(4, 4), rows(4, 4)]
    assert victims(rows(8), load, 8, running, [100, 0]) == 2
    assert victims(rows(8), load, 8, running, [100, -1]) is None
    assert victims(rows(4), load, 8, running, [-1, -2]) is None


def test_interactive_is_more_urgent_than_batch():
    assert rank("interactive") < rank("batch")
