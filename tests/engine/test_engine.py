"""The batching engine on the real checkpoint's denoiser, driven directly through asyncio."""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.engine import Engine, EngineClosedError, EngineStats, NonFiniteError, QueueFullError
from app.guidance import GuidanceSchedule
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample

# Queueing, admission, cancellation and failures: tests/stand_in.py's model. The tests that compare the
# engine's images with a run sampled alone are marked integration: those keep the real checkpoint.
pytestmark = pytest.mark.stand_in


def make_engine(loaded, denoiser, stats=None, **kw) -> Engine:
    kw.setdefault("max_batch_rows", 32)
    kw.setdefault("max_queue", 8)
    return Engine(
        denoiser,
        scheduler_config=loaded.scheduler_config,
        image_shape=(1, 28, 28),
        null_label=loaded.manifest.null_label,
        device=torch.device("cpu"),
        on_step=stats.append if stats is not None else None,
        **kw,
    )


async def until(predicate, timeout=60.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError


def test_requests_join_at_the_next_tick_and_share_forwards(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        engine = make_engine(loaded, denoiser, stats)
        await engine.start()
        long = engine.submit(SampleSpec(class_label=1, seeds=(1,), steps=30))
        await until(lambda: not long.queued and long.run.step_index >= 3)
        short = engine.submit(SampleSpec(class_label=None, seeds=(2, 3), steps=4, sampler="euler_a"))
        short_result = await short.future
        assert not long.future.done(), "the short request did not wait for the long one"
        await long.future
        await engine.stop()
        return short_result

    result = asyncio.run(main())
    assert result.images.shape == (2, 28, 28, 1) and result.images.dtype.name == "uint8"
    rows = [s.rows for s in stats]
    assert 4 in rows  # 2 rows of the long job + 2 unguided rows of the short one, in one forward
    assert rows.count(4) == 4 and len(rows) == 30


@pytest.mark.integration
def test_result_matches_the_request_sampled_alone(loaded, denoiser):
    spec = SampleSpec(class_label=6, seeds=(10, 11), steps=6, sampler="dpmpp_2m", guidance=GuidanceParams(2.5))

    async def main():
        engine = make_engine(loaded, denoiser)
        await engine.start()
        jobs = [engine.submit(SampleSpec(class_label=c, seeds=(c,), steps=5 + c)) for c in range(4)]
        job = engine.submit(spec)
        res = await job.future
        await asyncio.gather(*(j.future for j in jobs))
        await engine.stop()
        return res

    res = asyncio.run(main())
    alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    sample(denoiser, [alone])
    assert (res.images.astype(int) - alone.images().astype(int)).__abs__().max() <= 1


def test_non_finite_latents_fail_only_that_request(loaded, denoiser):
    # Stand-in fault: the real model, but rows labelled 7 come back as NaN (a real network
    # does not fail on demand).
    def faulty(x, t, y):
        eps = denoiser(x, t, y)
        return torch.where((y == 7)[:, None, None, None], torch.full_like(eps, float("nan")), eps)

    async def main():
        engine = make_engine(loaded, faulty)
        await engine.start()
        bad = engine.submit(SampleSpec(class_label=7, seeds=(1,), steps=5))
        good = engine.submit(SampleSpec(class_label=3, seeds=(1,), steps=5))
        with pytest.raises(NonFiniteError, match="non-finite"):
            await bad.future
        res = await good.future
        await engine.stop()
        return res

    res = asyncio.run(main())
    assert res.images.shape == (1, 28, 28, 1)


def test_cancel_removes_rows_at_the_next_tick(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        engine = make_engine(loaded, denoiser, stats)
        await engine.start()
        keep = engine.submit(SampleSpec(class_label=2, seeds=(1,), steps=12))
        drop = engine.submit(SampleSpec(class_label=4, seeds=(1, 2, 3), steps=200))
        await until(lambda: not drop.queued and drop.run.step_index >= 2)
        engine.cancel(drop)
        n_before = len(stats)
        await keep.future
        await engine.stop()
        return n_before

    n_before = asyncio.run(main())
    after = [s.rows for s in stats[n_before + 1 :]]
    assert after and all(r == 2 for r in after), after
    assert stats[-1].active_jobs == 1


def test_queue_limit_rejects_and_drain_finishes_in_flight(loaded, denoiser):
    async def main():
        engine = make_engine(loaded, denoiser, max_batch_rows=2, max_queue=1)
        await engine.start()
        running = engine.submit(SampleSpec(class_label=0, seeds=(1,), steps=15))
        await until(lambda: not running.queued)
        waiting = engine.submit(SampleSpec(class_label=1, seeds=(1,), steps=3))
        with pytest.raises(QueueFullError):
            engine.submit(SampleSpec(class_label=2, seeds=(1,), steps=3))
        await engine.stop(drain=True)  # finishes both admitted and waiting jobs
        assert running.future.done() and waiting.future.done()
        assert running.future.result().images.shape[0] == 1
        with pytest.raises(EngineClosedError):
            engine.submit(SampleSpec(class_label=2, seeds=(1,), steps=3))

    asyncio.run(main())


def test_rows_per_forward_never_exceed_the_limit(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        engine = make_engine(loaded, denoiser, stats, max_batch_rows=8)
        await engine.start()
        jobs = [engine.submit(SampleSpec(class_label=c, seeds=(c, c + 1), steps=3)) for c in range(5)]
        await asyncio.gather(*(j.future for j in jobs))
        await engine.stop()

    asyncio.run(main())
    assert max(s.rows for s in stats) == 8


def test_warmup_runs_a_forward_at_every_row_count_the_batch_can_have(loaded, denoiser):
    seen: list[int] = []

    def recording(x, t, labels):
        seen.append(x.shape[0])
        return denoiser(x, t, labels)

    async def main():
        engine = make_engine(loaded, recording, max_batch_rows=6)
        await engine.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
        await engine.stop()

    asyncio.run(main())
    assert seen[:2] == [2, 2]  # the sampler warmup: one guided image, two steps
    assert sorted(set(seen)) == [1, 2, 3, 4, 5, 6]


def test_waiting_job_is_queued_until_admitted(loaded, denoiser):
    async def main():
        engine = make_engine(loaded, denoiser, max_batch_rows=2)
        await engine.start()
        first = engine.submit(SampleSpec(class_label=0, seeds=(1,), steps=6))
        second = engine.submit(SampleSpec(class_label=1, seeds=(1,), steps=2))
        await until(lambda: not first.queued)
        assert second.queued and second.progress == (0, 2)
        await asyncio.gather(first.future, second.future)
        assert not second.queued
        await engine.stop()

    asyncio.run(main())


class SignallingExecutor(ThreadPoolExecutor):
    """The engine's one model thread, as worker() makes it, that also says when work is queued on it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="engine-forward")
        self.queued_after: Callable | None = None  # set queued once something other than this is queued
        self.queued = threading.Event()

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(fn, *args, **kwargs)
        if self.queued_after is not None and fn is not self.queued_after:
            self.queued.set()
        return future


@pytest.mark.integration
def test_run_in_worker_pauses_the_batch_between_ticks_in_the_model_thread(loaded, denoiser):
    """What the benchmark relies on: fn runs in the engine's thread, no tick runs meanwhile, and the
    batch resumes as it was (the result equals the request sampled alone)."""
    spec = SampleSpec(class_label=4, seeds=(5,), steps=8, sampler="ddpm")
    forward_threads = set()

    def recording(x, t, labels):
        forward_threads.add(threading.get_ident())
        return denoiser(x, t, labels)

    async def main():
        executor = SignallingExecutor()
        engine = make_engine(loaded, recording, executor=executor)
        await engine.start()
        job = engine.submit(spec)
        await until(lambda: job.run.step_index >= 2)

        def probe():
            step = job.run.step_index
            # The engine has asked for its next tick by the time this is set: a tick that could run
            # beside fn would have advanced the job. No clock: on a loaded machine a tick may take seconds.
            assert executor.queued.wait(timeout=120), "the engine never asked for its next tick"
            return threading.get_ident(), job.run.step_index - step

        executor.queued_after = probe
        thread, steps_during = await engine.run_in_worker(probe)
        result = await job.future
        await engine.stop()
        return thread, steps_during, result

    thread, steps_during, result = asyncio.run(main())
    assert forward_threads == {thread} and steps_during == 0
    alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    sample(denoiser, [alone])
    assert (result.images == alone.images()).all()


def test_next_step_wakes_a_waiter_after_every_step(loaded, denoiser):
    """The event-stream progress bar waits on job.next_step() instead of polling: one wake-up per step."""

    async def main():
        engine = make_engine(loaded, denoiser)
        await engine.start()
        job = engine.submit(SampleSpec(class_label=3, seeds=(1,), steps=6, sampler="euler_a"))
        seen = []
        while not job.future.done():
            await asyncio.wait({job.future, job.next_step()}, return_when=asyncio.FIRST_COMPLETED)
            seen.append(job.progress[0])
        await engine.stop()
        return seen

    assert asyncio.run(main()) == [1, 2, 3, 4, 5, 6]


def test_a_failing_model_fails_running_and_waiting_jobs_and_the_engine_says_why(loaded, denoiser):
    """Stand-in fault: the real model, whose forward raises once the test says so (a real network
    does not fail on demand), while one job runs and another waits for its rows."""
    fail = threading.Event()

    def failing(x, t, y):
        if fail.is_set():
            raise RuntimeError("injected fault: device lost")
        return denoiser(x, t, y)

    async def main():
        engine = make_engine(loaded, failing, max_batch_rows=2)
        await engine.start()
        running = engine.submit(SampleSpec(class_label=0, seeds=(1,), steps=200))
        await until(lambda: not running.queued)
        waiting = engine.submit(SampleSpec(class_label=1, seeds=(1,), steps=3))
        assert waiting.queued and engine.check_health() and engine.error is None
        fail.set()
        for job in (running, waiting):
            # A bound, not a timing window: without the engine's error handling these never resolve.
            with pytest.raises(RuntimeError, match="engine failure: injected fault: device lost"):
                await asyncio.wait_for(job.future, timeout=120)
        assert not engine.check_health()
        assert engine.error == "RuntimeError: injected fault: device lost"
        with pytest.raises(EngineClosedError, match="failed: RuntimeError: injected fault"):
            engine.submit(SampleSpec(class_label=2, seeds=(1,), steps=3))
        await engine.stop()  # after a failed loop too: no exception, the worker thread is shut down

    asyncio.run(main())


def interval(start: float, end: float) -> GuidanceParams:
    """CFG at s = 3 for the steps i with start <= i / N < end, and s = 1 (conditional rows only) elsewhere."""
    return GuidanceParams(3.0, GuidanceSchedule("interval", start=start, end=end))


def test_admission_by_rows_per_tick_fits_jobs_whose_guidance_intervals_differ(loaded, denoiser):
    """With 12 rows, two 4-image jobs guided in opposite halves of their 8 steps need 12 rows at every tick
    (8 + 4, then 4 + 8): they run together, where reserving 2 rows per image (16) would serialize them. A
    third job, which would need 16 rows at some tick, waits until it fits at every tick to come."""
    stats: list[EngineStats] = []
    early, late = interval(0.0, 0.5), interval(0.5, 1.0)

    async def main():
        engine = make_engine(loaded, denoiser, stats, max_batch_rows=12)
        await engine.start()
        a = engine.submit(SampleSpec(class_label=1, seeds=(1, 2, 3, 4), steps=8, guidance=late))  # rows 4x4, 4x8
        b = engine.submit(SampleSpec(class_label=2, seeds=(5, 6, 7, 8), steps=8, guidance=early))  # 4x8, 4x4
        c = engine.submit(SampleSpec(class_label=3, seeds=(9, 10), steps=8, guidance=early))  # 4x4, 4x2
        await asyncio.sleep(0)
        await until(lambda: not a.queued and not b.queued)
        admitted_together = b.started_at is not None and not a.future.done()
        c_waited = c.queued
        await asyncio.gather(a.future, b.future, c.future)
        await engine.stop()
        return a, b, c, admitted_together, c_waited

    a, b, c, admitted_together, c_waited = asyncio.run(main())
    assert admitted_together, "b waited for a, as with a reservation of two rows per image"
    assert c_waited, "c was admitted though at a tick to come it would have made 16 rows"
    rows = [s.rows for s in stats]
    assert max(rows) <= 12 and rows[:8] == [12] * 8, rows
    assert c.started_at >= a.started_at and a.run.done and b.run.done and c.run.done
    # Forward rows by kind: every image has a conditional row at every step; unconditional rows only where
    # guided; the skipped ones are the rest.
    assert sum(s.cond_rows for s in stats) == (4 + 4 + 2) * 8
    assert sum(s.uncond_rows for s in stats) == (4 + 4 + 2) * 4
    assert sum(s.skipped_uncond_rows for s in stats) == (4 + 4 + 2) * 4
    assert all(s.cond_rows + s.uncond_rows == s.rows for s in stats)


def test_rows_at_every_tick_never_exceed_the_limit_under_random_intervals(loaded, denoiser):
    """Jobs of 1-4 images with random intervals, submitted and cancelled at random: the engine's row
    bookkeeping (`_load`) equals the rows of the next tick, and no forward exceeds max_batch_rows."""
    import random

    rng = random.Random(3)
    stats: list[EngineStats] = []
    checks: list[tuple[int, int]] = []

    async def main():
        engine = make_engine(loaded, denoiser, stats, max_batch_rows=10, max_queue=100)
        original = engine._tick

        def tick(runs):  # in the worker thread, before the forward: the bookkeeping against the truth
            checks.append((int(engine._load[0]), sum(r.rows_needed() for r in runs)))
            return original(runs)

        engine._tick = tick
        await engine.start()
        jobs = []
        for i in range(24):
            start = rng.choice([0.0, 0.25, 0.5])
            spec = SampleSpec(
                class_label=rng.choice([None, 1, 2]),
                seeds=tuple(range(rng.randint(1, 4))),
                steps=rng.randint(2, 8),
                guidance=interval(start, rng.choice([start + 0.25, 1.0])),
            )
            jobs.append(engine.submit(spec))
            if i % 5 == 4:
                engine.cancel(jobs[rng.randrange(len(jobs))])
            await asyncio.sleep(rng.random() * 0.02)
        await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await engine.stop()

    asyncio.run(main())
    assert max(s.rows for s in stats) <= 10
    assert checks and all(load == rows for load, rows in checks), checks


def test_a_job_cancelled_during_its_last_step_leaves_the_loop_serving(loaded, denoiser):
    """Cancelled while its last forward runs, a job is done when the loop drops it: its rows to come are
    none (an empty profile), and the loop goes on serving."""
    started, gate = threading.Event(), threading.Event()

    def held(x, t, labels, *rest):
        started.set()
        gate.wait(30)
        return denoiser(x, t, labels, *rest)

    async def main():
        engine = make_engine(loaded, held)
        await engine.start()
        job = engine.submit(SampleSpec(class_label=1, seeds=(1,), steps=1))
        await until(started.is_set)
        engine.cancel(job)
        gate.set()
        result = await engine.submit(SampleSpec(class_label=2, seeds=(2,), steps=2)).future
        healthy = engine.check_health()
        await engine.stop()
        return result, healthy

    result, healthy = asyncio.run(main())
    assert healthy and result.images.shape == (1, 28, 28, 1)
