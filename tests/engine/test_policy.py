"""The admission policy's pure functions (app/engine/policy.py), over row profiles and the admitted load."""

import numpy as np

from app.engine.policy import (
    Waiting,
    add_profile,
    earliest_start,
    fair_order,
    fits_at,
    floor,
    overtaken,
    planned_finish,
    rank,
    seconds_over,
    victims,
)


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


def test_the_earliest_start_is_the_first_fit_however_far_it_skips():
    # It skips past ticks too full for the profile's smallest step; checked against trying every offset in turn.
    rng = np.random.default_rng(0)
    for _ in range(300):
        load = rng.integers(0, 9, size=rng.integers(0, 40))
        profile = rng.choice([1, 2, 4], size=rng.integers(1, 8)) * rng.integers(1, 3)
        first = next(o for o in range(len(load) + 1) if fits_at(profile, load, 8, o))
        assert earliest_start(profile, load, 8) == first, (load.tolist(), profile.tolist())


def test_adding_and_taking_back_a_profile_leaves_the_load_as_it_was():
    load = rows(4, 4)
    grown = add_profile(load, rows(2, 2, 2))
    assert grown.tolist() == [6, 6, 2] and load.tolist() == [4, 4]
    assert add_profile(grown, rows(2, 2, 2), -1).tolist() == [4, 4, 0]
    assert add_profile(load, rows(2, 2), offset=1).tolist() == [4, 6, 2]


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


def queue(*entries: tuple[str, int], rank_: int = 1, start: float = 0.0) -> list[Waiting]:
    """Waiting requests of (client, cost) in arrival order."""
    return [Waiting(rank_, client, cost, start + i) for i, (client, cost) in enumerate(entries)]


def clients_in(order: list[int], waiting: list[Waiting]) -> str:
    return "".join(waiting[i].client for i in order)


def test_a_client_with_many_queued_requests_takes_turns_with_a_client_with_one():
    waiting = queue(*[("a", 40)] * 5, ("b", 40))
    order = fair_order(waiting, {}, {})
    assert clients_in(order, waiting) == "abaaaa"  # arrival order: aaaaab
    assert order[:2] == [0, 5]


def test_the_client_served_more_rows_in_the_class_waits_behind_one_served_fewer():
    waiting = queue(("a", 2), ("a", 2), ("b", 2), ("b", 2))
    assert clients_in(fair_order(waiting, {(1, "a"): 4, (1, "b"): 0}, {}), waiting) == "bbaa"
    assert clients_in(fair_order(waiting, {(1, "a"): 0, (1, "b"): 1}, {}), waiting) == "abab"  # tags a 2, 4; b 3, 5
    # What a client was served in another class does not count against it in this one.
    assert clients_in(fair_order(waiting, {(0, "a"): 8}, {}), waiting) == "abab"


def test_a_client_new_to_the_class_starts_level_with_the_least_served_not_at_zero():
    waiting = queue(("a", 2), ("a", 2), ("c", 2), ("b", 2))
    # a and c have had work (served 100 and 104); b comes new and starts at 100, as a does: no credit for idleness.
    assert floor({(1, "a"): 100.0, (1, "c"): 104.0, (0, "x"): 1.0}, 1) == 100.0 and floor({}, 1) == 0.0
    assert clients_in(fair_order(waiting, {(1, "a"): 100, (1, "c"): 104}, {}), waiting) == "abac"


def test_shares_follow_rows_not_requests():
    # b's one request of 8 rows weighs as much as four of a's 2-row ones.
    waiting = queue(*[("a", 2)] * 6, ("b", 8))
    assert clients_in(fair_order(waiting, {}, {}), waiting) == "aaaabaa"


def test_a_client_of_weight_w_gets_w_times_the_rows():
    waiting = queue(*[("a", 2)] * 6, *[("b", 2)] * 6)
    order = fair_order(waiting, {}, {"b": 3.0})
    # b's tags: 2/3, 4/3, 2, 8/3, ...; a's: 2, 4, ... (a tie goes to the earlier arrival)
    assert clients_in(order[:8], waiting) == "bbabbbab"
    # An unlisted client weighs 1; a weight below 1 gives less than an equal share.
    order = fair_order(waiting, {}, {"a": 0.5})
    assert clients_in(order[:6], waiting).count("b") == 4


def test_classes_stay_strict_and_a_request_owed_a_reservation_goes_first_in_its_class():
    batch = queue(("a", 2), ("b", 2), rank_=1, start=0.0)
    interactive = queue(("c", 2), ("c", 2), rank_=0, start=10.0)
    owed = Waiting(1, "a", 8, 0.5, owed=True)
    waiting = [*batch, *interactive, owed]
    assert fair_order(waiting, {(0, "c"): 100}, {}) == [2, 3, 4, 0, 1]


def test_only_a_clients_first_request_counts_passes_and_only_from_requests_that_came_after_it():
    waiting = [Waiting(1, "a", 8, 1.0), Waiting(1, "a", 8, 2.0), Waiting(1, "b", 8, 3.0), Waiting(0, "c", 8, 9.0)]
    # a's second request counts no pass while a's first waits; less urgent work admitted while an interactive
    # request waits overtakes it, whenever it came.
    assert overtaken(waiting, [Waiting(1, "b", 2, 4.0)]) == [True, False, True, True]
    assert overtaken(waiting, [Waiting(1, "b", 2, 0.5)]) == [False, False, False, True]
    assert overtaken(waiting, [Waiting(0, "d", 2, 9.5)]) == [False, False, False, True]
    assert overtaken(waiting, [Waiting(0, "d", 2, 8.0)]) == [False, False, False, False]
    assert overtaken(waiting, []) == [False] * 4


def test_a_plan_starts_each_request_ahead_where_it_first_fits_then_the_new_one():
    load = rows(8, 8, 4)
    ahead = [rows(4, 4), rows(8)]
    # rows(4, 4) ahead fits from tick 2, rows(8) from tick 4 (after it), the new request from tick 5.
    start, planned = planned_finish(rows(4, 4), load, 8, ahead, horizon=100)
    assert start == 5 and planned.tolist() == [8, 8, 8, 4, 8, 4, 4]
    assert planned_finish(rows(4, 4), load, 8, ahead, horizon=4) is None  # it would start past the horizon
    assert planned_finish(rows(4, 4), load, 8, ahead, horizon=3) is None  # so would rows(8) ahead of it
    assert planned_finish(rows(2), rows(6, 6), 8, [], horizon=0)[0] == 0


def test_the_time_of_a_plan_is_each_tick_at_its_rows():
    seconds_at = np.array([0.0, 0.1, 0.2, 0.3])
    assert np.isclose(seconds_over(rows(1, 3, 3, 0), seconds_at), 0.7)
    assert seconds_over(rows(), seconds_at) == 0.0
