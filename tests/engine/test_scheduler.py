"""The scheduler's decisions tick by tick: classes, fair shares between clients, no head-of-line blocking, no
starvation, preemption.

The ticks run here as the engine runs them (app/engine/engine.py): schedule, one forward over the admitted runs,
the step, the finished runs out. On tests/stand_in.py's model: the subject is admission, not the images (those
are compared with unpreempted ones on the real checkpoint in tests/api/test_priorities.py)."""

import itertools

import pytest
import torch

from app.engine import scheduler as scheduler_module
from app.engine.scheduler import EngineRequest, Scheduler, state_bytes
from app.sampling import GuidanceParams, SampleRun, SampleSpec, denoise_step

pytestmark = pytest.mark.stand_in


class Ticks:
    """A scheduler driven as the engine drives it, recording each request's admissions and preemptions."""

    def __init__(self, loaded, denoiser, max_rows: int, **kw) -> None:
        self.loaded, self.denoiser = loaded, denoiser
        self.scheduler = Scheduler(max_rows, 1000, **kw)
        self.arrivals = itertools.count()
        self.now = 0
        self.admitted: dict[str, list[int]] = {}
        self.preempted: dict[str, list[int]] = {}
        self.steps_at_preemption: dict[str, list[int]] = {}
        self.client_rows: list[dict[str, int]] = []  # per tick: rows of the forward per client

    def add(
        self, name: str, num_images: int, steps: int, priority: str, scale: float = 3.0, client: str = "anonymous"
    ) -> EngineRequest:
        spec = SampleSpec(1, tuple(range(num_images)), steps, guidance=GuidanceParams(scale))
        run = SampleRun(spec, self.loaded.scheduler_config, (1, 28, 28), 10, torch.device("cpu"))
        request = EngineRequest(name, run, float(next(self.arrivals)), False, priority, client)
        self.scheduler.add(request)
        return request

    def tick(self) -> list[str]:
        """One tick; the names admitted at it."""
        decision = self.scheduler.schedule()
        for request in decision.preempted:
            self.preempted.setdefault(request.id, []).append(self.now)
            self.steps_at_preemption.setdefault(request.id, []).append(request.run.step_index)
        for request in decision.admitted:
            self.admitted.setdefault(request.id, []).append(self.now)
        active = list(self.scheduler.active)
        rows: dict[str, int] = {}
        for request in active:
            rows[request.client] = rows.get(request.client, 0) + request.run.rows_needed()
        self.client_rows.append(rows)
        if active:
            stepped = denoise_step(self.denoiser, [r.run for r in active])
            assert stepped <= self.scheduler.max_batch_rows
            self.scheduler.stepped()
            for request in active:
                if request.run.done:
                    self.scheduler.finished(request)
        self.now += 1
        return [r.id for r in decision.admitted]


def test_interactive_work_is_admitted_before_batch_work_that_came_first(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=4)
    ticks.add("batch", 2, 3, "batch")
    ticks.add("interactive", 2, 3, "interactive")
    assert ticks.tick() == ["interactive"]
    assert ticks.tick() == []
    ticks.tick()
    assert ticks.tick() == ["batch"]


def test_a_request_that_does_not_fit_does_not_hold_back_smaller_ones_behind_it(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8)
    ticks.add("running", 2, 6, "batch")
    assert ticks.tick() == ["running"]
    ticks.add("large", 4, 3, "batch")  # 8 rows: waits for the running request's 4
    ticks.add("small", 1, 3, "batch")  # 2 rows: fits beside it now
    assert ticks.tick() == ["small"]
    assert "large" not in ticks.admitted


def test_a_large_request_is_overtaken_a_bounded_number_of_times_then_starts(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8)
    ticks.add("first", 1, 3, "batch")
    ticks.tick()
    large = ticks.add("large", 4, 2, "batch")  # 8 rows: the whole budget, never free while small ones keep coming
    reserved_at = None
    for n in range(60):  # two small requests (2 rows, 3 steps) every tick keep rows in use at every tick
        if n:
            ticks.add(f"small-{n}-a", 1, 3, "batch")
            ticks.add(f"small-{n}-b", 1, 3, "batch")
        ticks.tick()
        if "large" in ticks.admitted:
            break
        assert large.passed_over <= scheduler_module.STARVATION_PASSES
        if reserved_at is None and large.passed_over == scheduler_module.STARVATION_PASSES:
            reserved_at = ticks.now
    assert "large" in ticks.admitted, "the large request was starved"
    assert reserved_at is not None, "small requests were not admitted before it meanwhile (backfilling)"
    # Holding its reservation, it waits at most for the admitted requests' remaining steps (3 at most).
    assert ticks.admitted["large"][0] <= reserved_at + 3


def test_batch_runs_leave_the_batch_for_interactive_work_and_resume_where_they_stopped(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8)
    first, second = ticks.add("batch-1", 2, 8, "batch"), ticks.add("batch-2", 2, 8, "batch")
    ticks.tick()
    ticks.tick()
    assert ticks.scheduler.active == [first, second]
    ticks.add("interactive", 2, 3, "interactive")
    assert ticks.tick() == ["interactive"]
    # The last admitted leaves first, and no more than make room; it keeps its two steps.
    assert ticks.preempted == {"batch-2": [2]} and ticks.steps_at_preemption == {"batch-2": [2]}
    assert second.preempted and second.run.step_index == 2 and first.run.step_index == 3
    assert ticks.scheduler.preempted_bytes == state_bytes(second.run)
    while not (first.run.done and second.run.done):
        ticks.tick()
        assert ticks.now < 40
    assert ticks.admitted["batch-2"] == [0, 5]  # resumed once the interactive request's 3 steps were done
    assert second.run.step_index == 8 and ticks.scheduler.preempted_bytes == 0


def test_preemption_stops_at_the_bound_on_preempted_state(loaded, denoiser):
    bound = 4 * 28 * 28 * 4 * 2  # one 2-image run's state (PREEMPTED_STATE_FACTOR latents of float32)
    ticks = Ticks(loaded, denoiser, max_rows=8, max_preempted_bytes=bound)
    ticks.add("batch-1", 2, 8, "batch")
    ticks.add("batch-2", 2, 8, "batch")
    ticks.tick()
    assert state_bytes(ticks.scheduler.active[0].run) == bound
    ticks.add("interactive-large", 4, 3, "interactive")  # 8 rows: both batch runs would have to leave
    ticks.add("interactive-small", 2, 3, "interactive")  # 4 rows: one may leave
    assert ticks.tick() == ["interactive-small"]
    assert ticks.preempted == {"batch-2": [1]}
    assert ticks.scheduler.preempted_bytes == bound


def test_batch_work_never_preempts_interactive_work(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=4)
    ticks.add("interactive", 2, 4, "interactive")
    ticks.tick()
    ticks.add("batch", 2, 2, "batch")
    assert ticks.tick() == [] and ticks.preempted == {}


def test_rows_per_tick_are_shared_between_clients_not_by_arrival(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8)
    flood = [ticks.add(f"a-{i}", 1, 4, "batch", client="a") for i in range(12)]
    ticks.tick()  # a's first four fill the 8 rows
    few = [ticks.add(f"b-{i}", 1, 4, "batch", client="b") for i in range(4)]
    while not all(r.run.done for r in flood + few):
        ticks.tick()
        assert ticks.now < 60
    b_rows = [t.get("b", 0) for t in ticks.client_rows]
    a_rows = [t.get("a", 0) for t in ticks.client_rows]
    # b's requests run from the tick a's first four finish (4) until b's last is done (12), and over those ticks
    # a and b each run half the rows: 32 of 64. By arrival, b would wait for all twelve of a's (ticks 12-15).
    assert b_rows[:4] == [0] * 4 and b_rows[12:] == [0] * 4 and all(b_rows[4:12])
    assert sum(b_rows[4:12]) == sum(a_rows[4:12]) == 32
    assert ticks.scheduler.served == {}  # every client's entry went with its last request


def test_a_client_weighted_3_gets_3_rows_for_each_of_another_clients_1(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8, client_weights={"b": 3.0})
    for i in range(8):
        ticks.add(f"a-{i}", 1, 4, "batch", client="a")
        ticks.add(f"b-{i}", 1, 4, "batch", client="b")
    for _ in range(8):
        ticks.tick()
    assert [(t["a"], t["b"]) for t in ticks.client_rows] == [(2, 6)] * 8


def test_a_client_of_whole_budget_requests_takes_turns_with_another_whatever_came_first(loaded, denoiser):
    # Each request fills the 8 rows, so no two run together: the share is taken in turns. Had a client's
    # backlog all been owed a reservation once passed over, the class would go back to arrival order.
    ticks = Ticks(loaded, denoiser, max_rows=8)
    for i in range(12):
        ticks.add(f"a-{i}", 4, 2, "batch", client="a")
    order = ticks.tick()
    for i in range(12):
        ticks.add(f"b-{i}", 4, 2, "batch", client="b")
    while len(order) < 24:
        order += ticks.tick()
        assert ticks.now < 100
    assert "".join(name[0] for name in order) == "ab" * 12


def test_a_large_request_is_not_starved_by_another_clients_stream_of_small_ones(loaded, denoiser):
    ticks = Ticks(loaded, denoiser, max_rows=8)
    ticks.add("first", 1, 3, "batch", client="b")
    ticks.tick()
    ticks.add("large", 4, 2, "batch", client="a")  # 8 rows
    for n in range(60):
        ticks.add(f"small-{n}", 1, 3, "batch", client="b")
        ticks.tick()
        if "large" in ticks.admitted:
            break
    assert "large" in ticks.admitted, "the large request was starved"
    assert ticks.admitted["large"][0] <= 1 + scheduler_module.STARVATION_PASSES + 3
