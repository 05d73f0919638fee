"""The batching engine on the real checkpoint's denoiser, driven directly through asyncio."""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.engine import Engine, EngineClosedError, EngineStats, NonFiniteError, QueueFullError
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample


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
