"""Several models' engines on one shared compute thread: equal shares of its time (app/engine/compute.py)."""

import asyncio
import threading

from app.engine import EngineStats, Failed, Finished, SharedCompute
from app.sampling import SampleSpec
from tests.engine.test_engine import make_client, until


def test_a_slow_model_and_a_fast_one_get_equal_shares_of_the_thread(loaded, denoiser):
    """A stand-in for a bigger model: the real UNet run 8 times per forward (real compute, 8x the cost).
    While both have work, each model gets about half the thread's time, so the fast one takes many ticks
    for each of the slow one's instead of waiting on its pace; and the fast one, busy alone before, is
    not shut out when the slow one arrives (no credit banked while idle)."""

    def slow_denoiser(x, t, labels, *rest):
        for _ in range(7):
            denoiser(x, t, labels)
        return denoiser(x, t, labels)

    fast_stats: list[EngineStats] = []
    slow_stats: list[EngineStats] = []

    async def main():
        compute = SharedCompute()
        fast = make_client(loaded, denoiser, fast_stats, compute=compute)
        slow = make_client(loaded, slow_denoiser, slow_stats, compute=compute)
        await fast.start()
        await slow.start()
        fast_request = fast.add(SampleSpec(class_label=1, seeds=(1,), steps=200))
        await until(lambda: len(fast_stats) >= 20)  # the fast model alone: it uses the whole thread
        ticks0, used0 = len(fast_stats), (compute.used_seconds(fast.engine), compute.used_seconds(slow.engine))
        slow_request = slow.add(SampleSpec(class_label=2, seeds=(2,), steps=200))
        await until(lambda: len(slow_stats) >= 8)
        fast_ticks = len(fast_stats) - ticks0
        fast_used = compute.used_seconds(fast.engine) - used0[0]
        slow_used = compute.used_seconds(slow.engine) - used0[1]
        for client, request in ((fast, fast_request), (slow, slow_request)):
            client.abort(request)
            await client.shutdown()
        compute.shutdown()
        return fast_ticks, fast_used, slow_used

    fast_ticks, fast_used, slow_used = asyncio.run(main())
    # Equal shares, to within the slow model's last tick (the window ends just after one) and the uneven
    # stretch of ticks when other processes load the machine (0.499 seen beside an evaluation).
    assert 1 / 3 < fast_used / slow_used < 3, (fast_used, slow_used)
    # Turn by turn (first come, first served) the fast model would take one tick per slow tick: 8 here.
    assert fast_ticks >= 3 * 8, fast_ticks


def test_one_engine_alone_waits_for_nobody(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        compute = SharedCompute()
        client = make_client(loaded, denoiser, stats, compute=compute)
        await client.start()
        result = await client.result(client.add(SampleSpec(class_label=3, seeds=(3,), steps=5)))
        await client.shutdown()
        compute.shutdown()
        return result, compute.used_seconds(client.engine)

    result, used = asyncio.run(main())
    assert result.images.shape == (1, 28, 28, 1) and len(stats) == 5
    assert used >= sum(s.tick_seconds for s in stats) * 0.5


class StandIn:
    """A stand-in engine with one tick of work (the policy under test needs no model)."""

    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order, self.work = name, order, 1

    def has_work(self) -> bool:
        return self.work > 0

    def tick(self) -> None:
        self.work -= 1
        self.order.append(self.name)


def test_the_thread_goes_to_the_owner_with_work_that_has_used_the_least_time():
    """Three owners get work while the thread is busy; they get it in the order of their used time, least
    first, whatever their order of arrival (a policy that picked the most-used owner reverses it)."""
    order: list[str] = []

    async def main():
        compute = SharedCompute()
        owners = {name: StandIn(name, order) for name in ("heavy", "light", "middle")}
        compute._used.update({owners["heavy"]: 3.0, owners["middle"]: 2.0, owners["light"]: 1.0})
        gate = threading.Event()
        busy = asyncio.ensure_future(compute.call(gate.wait, 30))
        await asyncio.sleep(0.05)
        for owner in owners.values():  # all three attached while the thread is busy
            compute.attach(owner)
        gate.set()
        await busy
        await until(lambda: len(order) == 3, timeout=10)
        compute.shutdown()

    asyncio.run(main())
    assert order == ["light", "middle", "heavy"]


def test_a_deadline_is_judged_at_the_engine_s_share_of_the_thread_while_other_models_have_work(loaded, denoiser):
    """A's pace is set to 0.05 s a tick: 10 steps take about 0.5 s alone, inside a 0.8 s deadline; while another
    model has work, A gets half the thread, 1 s, and the same request is refused at once, saying why."""
    busy_stats: list[EngineStats] = []

    def set_pace(client) -> None:
        client.engine._pace.measured[1:] = 0.05  # idle engine: no tick updates it until the next request's

    async def main():
        compute = SharedCompute()
        a = make_client(loaded, denoiser, compute=compute)
        b = make_client(loaded, denoiser, busy_stats, compute=compute)
        await a.start()
        await b.start()
        spec = SampleSpec(class_label=1, seeds=(1,), steps=10)
        set_pace(a)
        alone = await a.result(a.add(spec, timeout_s=0.8))
        busy = b.add(SampleSpec(class_label=2, seeds=(2,), steps=2000))
        await until(lambda: len(busy_stats) >= 2)
        set_pace(a)
        shared = await a.result(a.add(spec, timeout_s=0.8))
        b.abort(busy)
        for client in (a, b):
            await client.shutdown()
        compute.shutdown()
        return alone, shared

    alone, shared = asyncio.run(main())
    assert isinstance(alone, Finished), alone
    assert isinstance(shared, Failed) and shared.kind == "deadline", shared
    assert "sharing the compute thread with 1 other busy model" in shared.message, shared.message
