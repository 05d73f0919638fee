"""The batching engine on the real checkpoint's denoiser, driven through its client (app/engine/client.py)."""

import asyncio
import random
import threading
import time

import pytest
import torch

from app.engine import Engine, EngineClosedError, EngineStats, Failed, Finished, InProcessClient, Progress
from app.guidance import GuidanceSchedule
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample
from app.sampling.cache import SkipParams

# Queueing, admission, cancellation and failures: tests/stand_in.py's model. The tests that compare the
# engine's images with a run sampled alone are marked integration: those keep the real checkpoint.
pytestmark = pytest.mark.stand_in


def make_client(loaded, denoiser, stats=None, **kw) -> InProcessClient:
    kw.setdefault("max_batch_rows", 32)
    kw.setdefault("max_queue", 8)
    engine = Engine(
        denoiser,
        scheduler_config=loaded.scheduler_config,
        image_shape=(1, 28, 28),
        null_label=loaded.manifest.null_label,
        device=torch.device("cpu"),
        **kw,
    )
    return InProcessClient(engine, on_stats=stats.append if stats is not None else None)


class Tracked:
    """A request followed through its stream (with progress): its newest Progress, and its end."""

    def __init__(self, client: InProcessClient, spec: SampleSpec, **kw) -> None:
        self.id = client.add(spec, progress=True, **kw)
        self.progress: Progress | None = None
        self.steps_seen: list[int] = []
        self.task = asyncio.ensure_future(self._follow(client))

    async def _follow(self, client: InProcessClient) -> Finished | Failed:
        async for output in client.stream(self.id):
            if not isinstance(output, Progress):
                return output
            self.progress = output
            if not output.queued:
                self.steps_seen.append(output.step)
        raise AssertionError("the stream ended without a result")

    @property
    def queued(self) -> bool:
        return self.progress is None or self.progress.queued

    @property
    def step(self) -> int:
        return 0 if self.progress is None else self.progress.step

    async def result(self) -> Finished:
        output = await self.task
        assert isinstance(output, Finished), output
        return output

    async def failure(self) -> Failed:
        output = await self.task
        assert isinstance(output, Failed), output
        return output


async def until(predicate, timeout=60.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError


def test_requests_join_at_the_next_tick_and_share_forwards(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        client = make_client(loaded, denoiser, stats)
        await client.start()
        long = Tracked(client, SampleSpec(class_label=1, seeds=(1,), steps=30))
        await until(lambda: not long.queued and long.step >= 3)
        short = Tracked(client, SampleSpec(class_label=None, seeds=(2, 3), steps=4, sampler="euler_a"))
        short_result = await short.result()
        assert not long.task.done(), "the short request did not wait for the long one"
        await long.result()
        await client.shutdown()
        return short_result

    result = asyncio.run(main())
    assert result.images.shape == (2, 28, 28, 1) and result.images.dtype.name == "uint8"
    rows = [s.rows for s in stats]
    assert 4 in rows  # 2 rows of the long request + 2 unguided rows of the short one, in one forward
    assert rows.count(4) == 4 and len(rows) == 30


@pytest.mark.integration
def test_result_matches_the_request_sampled_alone(loaded, denoiser):
    spec = SampleSpec(class_label=6, seeds=(10, 11), steps=6, sampler="dpmpp_2m", guidance=GuidanceParams(2.5))

    async def main():
        client = make_client(loaded, denoiser)
        await client.start()
        others = [client.add(SampleSpec(class_label=c, seeds=(c,), steps=5 + c)) for c in range(4)]
        res = await client.result(client.add(spec))
        await asyncio.gather(*(client.result(i) for i in others))
        await client.shutdown()
        return res

    res = asyncio.run(main())
    alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    sample(denoiser, [alone])
    assert (res.images.astype(int) - alone.images().astype(int)).__abs__().max() <= 1


@pytest.mark.integration
def test_at_bf16_each_co_batched_request_matches_itself_sampled_alone(loaded, denoiser):
    """CFG_PRECISION=auto serves bf16 on a CPU with AMX: several requests of different classes, scales, samplers and
    seeds in one batch at bf16 each give the images they give alone at bf16 (within one grey level)."""
    from app.models.fast import fast_denoiser

    bf16 = fast_denoiser(denoiser, torch.device("cpu"), "bf16", channels_last=True)
    specs = [
        SampleSpec(class_label=c, seeds=(10 + c, 20 + c), steps=6, sampler=sampler, guidance=GuidanceParams(1.5 + c))
        for c, sampler in enumerate(("dpmpp_2m", "dpmpp_2m", "euler_a", "ddim"))
    ]

    async def main():
        client = make_client(loaded, bf16)
        await client.start()
        ids = [client.add(spec) for spec in specs]
        results = [await client.result(i) for i in ids]
        await client.shutdown()
        return results

    for spec, res in zip(specs, asyncio.run(main()), strict=True):
        alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
        sample(bf16, [alone])
        assert isinstance(res, Finished)
        assert (res.images.astype(int) - alone.images().astype(int)).__abs__().max() <= 1


def test_non_finite_latents_fail_only_that_request(loaded, denoiser):
    # Stand-in fault: the real model, but rows labelled 7 come back as NaN (a real network
    # does not fail on demand).
    def faulty(x, t, y):
        eps = denoiser(x, t, y)
        return torch.where((y == 7)[:, None, None, None], torch.full_like(eps, float("nan")), eps)

    async def main():
        client = make_client(loaded, faulty)
        await client.start()
        bad = client.add(SampleSpec(class_label=7, seeds=(1,), steps=5))
        good = client.add(SampleSpec(class_label=3, seeds=(1,), steps=5))
        failed = await client.result(bad)
        res = await client.result(good)
        await client.shutdown()
        return failed, res

    failed, res = asyncio.run(main())
    assert isinstance(failed, Failed) and failed.kind == "non_finite" and "non-finite" in failed.message
    assert isinstance(res, Finished) and res.images.shape == (1, 28, 28, 1)


def test_an_abort_drops_the_request_before_the_next_tick(loaded, denoiser):
    """The abort lands while a tick may be under way: that forward (at most one) still holds the request's
    rows, every later one holds only the other request's."""
    stats: list[EngineStats] = []
    aborted = threading.Event()
    forwards: list[tuple[int, bool]] = []  # (rows, started after the abort was sent)

    def recording(x, t, labels, *rest):
        forwards.append((x.shape[0], aborted.is_set()))
        return denoiser(x, t, labels, *rest)

    async def main():
        client = make_client(loaded, recording, stats)
        await client.start()
        keep = Tracked(client, SampleSpec(class_label=2, seeds=(1,), steps=12))
        drop = Tracked(client, SampleSpec(class_label=4, seeds=(1, 2, 3), steps=200))
        await until(lambda: not drop.queued and drop.step >= 2)
        aborted.set()
        client.abort(drop.id)
        failed = await drop.failure()
        await keep.result()
        await client.shutdown()
        return failed

    failed = asyncio.run(main())
    assert failed.kind == "cancelled"
    after = [rows for rows, late in forwards if late]
    assert after[0] in (2, 8) and after[1:] and all(r == 2 for r in after[1:]), after
    assert stats[-1].active_requests == 1


def test_queue_limit_rejects_and_drain_finishes_in_flight(loaded, denoiser):
    async def main():
        client = make_client(loaded, denoiser, max_batch_rows=2, max_queue=1)
        await client.start()
        running = Tracked(client, SampleSpec(class_label=0, seeds=(1,), steps=15))
        await until(lambda: not running.queued)
        waiting = Tracked(client, SampleSpec(class_label=1, seeds=(1,), steps=3))
        refused = await client.result(client.add(SampleSpec(class_label=2, seeds=(1,), steps=3)))
        assert isinstance(refused, Failed) and refused.kind == "rejected" and "queue full" in refused.message
        await client.shutdown(drain=True)  # finishes both admitted and waiting requests
        assert (await running.result()).images.shape[0] == 1
        await waiting.result()
        with pytest.raises(EngineClosedError):
            client.add(SampleSpec(class_label=2, seeds=(1,), steps=3))

    asyncio.run(main())


def test_rows_per_forward_never_exceed_the_limit(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        client = make_client(loaded, denoiser, stats, max_batch_rows=8)
        await client.start()
        ids = [client.add(SampleSpec(class_label=c, seeds=(c, c + 1), steps=3)) for c in range(5)]
        await asyncio.gather(*(client.result(i) for i in ids))
        await client.shutdown()

    asyncio.run(main())
    assert max(s.rows for s in stats) == 8


def test_warmup_runs_a_forward_at_every_row_count_the_batch_can_have(loaded, denoiser):
    seen: list[int] = []

    def recording(x, t, labels):
        seen.append(x.shape[0])
        return denoiser(x, t, labels)

    async def main():
        client = make_client(loaded, recording, max_batch_rows=6)
        await client.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
        await client.shutdown()

    asyncio.run(main())
    assert seen[:2] == [2, 2]  # the sampler warmup: one guided image, two steps
    assert sorted(set(seen)) == [1, 2, 3, 4, 5, 6]


def test_a_waiting_request_is_told_its_place_until_admitted(loaded, denoiser):
    async def main():
        client = make_client(loaded, denoiser, max_batch_rows=2)
        await client.start()
        first = Tracked(client, SampleSpec(class_label=0, seeds=(1,), steps=6))
        second = Tracked(client, SampleSpec(class_label=1, seeds=(1,), steps=2))
        await until(lambda: not first.queued and second.progress is not None)
        assert second.queued and second.progress.queue_position == 1
        assert (second.progress.step, second.progress.steps) == (0, 2)
        await asyncio.gather(first.result(), second.result())
        assert not second.queued and second.progress.queue_position is None
        await client.shutdown()

    asyncio.run(main())


def test_free_rows_counts_the_admitted_and_the_waiting_requests_and_is_0_until_a_new_one_is_taken(loaded, denoiser):
    """The figure a shared backlog's consumer takes work by (app/api/redis_backlog.py): free rows of the budget."""

    async def main():
        client = make_client(loaded, denoiser, max_batch_rows=10)
        assert client.free_rows == 0  # not started: admits nothing
        await client.start()
        assert client.free_rows == 10
        running = Tracked(client, SampleSpec(class_label=0, seeds=(1, 2), steps=40))  # 4 rows
        assert client.free_rows == 0  # sent, not yet taken: its rows are unknown
        await until(lambda: not running.queued)
        await until(lambda: client.free_rows == 6)
        waiting = Tracked(client, SampleSpec(class_label=0, seeds=(1, 2, 3, 4), steps=2))  # 8 rows: waits
        await until(lambda: waiting.progress is not None)
        assert waiting.queued and client.free_rows == 0  # 10 - 4 - 8 < 0
        client.abort(running.id)
        await waiting.result()
        await until(lambda: client.free_rows == 10)
        await client.shutdown()
        assert client.free_rows == 0

    asyncio.run(main())


@pytest.mark.integration
def test_run_in_worker_pauses_the_batch_between_ticks_in_the_model_thread(loaded, denoiser):
    """What the benchmark relies on: fn runs in the engine's thread, no tick runs meanwhile, and the
    batch resumes as it was (the result equals the request sampled alone)."""
    spec = SampleSpec(class_label=4, seeds=(5,), steps=8, sampler="ddpm")
    forward_threads = set()
    forwards = [0]

    def recording(x, t, labels):
        forward_threads.add(threading.get_ident())
        forwards[0] += 1
        return denoiser(x, t, labels)

    def probe():
        before = forwards[0]
        time.sleep(0.3)  # room for a tick that could run beside fn
        return threading.get_ident(), forwards[0] - before

    async def main():
        client = make_client(loaded, recording)
        await client.start()
        request = Tracked(client, spec)
        await until(lambda: request.step >= 2)
        thread, forwards_during = await client.engine.run_in_worker(probe)
        result = await request.result()
        await client.shutdown()
        return thread, forwards_during, result

    thread, forwards_during, result = asyncio.run(main())
    assert forward_threads == {thread} and forwards_during == 0
    alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    sample(denoiser, [alone])
    assert (result.images == alone.images()).all()


def test_a_request_asking_for_progress_gets_one_output_per_step(loaded, denoiser):
    async def main():
        client = make_client(loaded, denoiser)
        await client.start()
        request = Tracked(client, SampleSpec(class_label=3, seeds=(1,), steps=6, sampler="euler_a"))
        await request.result()
        await client.shutdown()
        return request.steps_seen

    assert asyncio.run(main()) == [0, 1, 2, 3, 4, 5, 6]  # admitted, then after each step


@pytest.mark.integration  # compares images: the real checkpoint
def test_a_request_s_skipped_steps_take_no_tick_of_their_own_and_still_report_each_step(loaded, denoiser):
    """A skip cache at interval 3 over 8 steps runs rows at steps 0, 3 and 6; a tick takes steps 1-2 and 4-5 before
    the forwards of steps 3 and 6, and step 7, the last, skips: a tick of its own with no forward. Progress, the
    trace and the previews still come at every step, and the images are the run's sampled step by step."""
    spec = SampleSpec(
        class_label=3,
        seeds=(1, 2),
        steps=8,
        cache=SkipParams(interval=3, full_sigma_max=None),  # no band: steps 0, 3 and 6 in full
        preview_every=1,
        return_trace=True,
    )
    stats: list[EngineStats] = []

    async def main():
        client = make_client(loaded, denoiser, stats)
        await client.start()
        outputs = [o async for o in client.stream(client.add(spec, progress=True))]
        await client.shutdown()
        return outputs

    outputs = asyncio.run(main())
    progress = [o for o in outputs if isinstance(o, Progress) and not o.queued]
    assert [s.rows for s in stats] == [4, 4, 4, 0]  # 2 images, guided
    assert sum(s.skipped_step_images for s in stats) == 5 * 2
    assert [p.step for p in progress] == list(range(9))  # admitted, then after each step
    assert [p.preview.step for p in progress if p.preview is not None] == list(range(1, 8))
    assert [row["step"] for p in progress for row in p.trace] == list(range(8))
    alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
    sample(denoiser, [alone])
    result = outputs[-1]
    assert isinstance(result, Finished)
    assert (result.images.astype(int) - alone.images().astype(int)).__abs__().max() <= 1


def test_ticks_run_back_to_back_in_the_compute_thread_while_the_event_loop_is_busy(loaded, denoiser):
    """The compute thread runs its next tick at once: a tick needs no turn of the event loop (a loop that
    handed every tick to the thread and waited for it would stop while the event loop is blocked)."""
    forwards = [0]

    def counting(x, t, labels):
        forwards[0] += 1
        return denoiser(x, t, labels)

    async def main():
        client = make_client(loaded, counting)
        await client.start()
        request = Tracked(client, SampleSpec(class_label=5, seeds=(1,), steps=400))
        await until(lambda: request.step >= 1)
        before = forwards[0]
        deadline = time.monotonic() + 60
        while forwards[0] < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the event loop blocked: no callback, no task runs
        ran = forwards[0] - before
        client.abort(request.id)
        await client.shutdown()
        return ran

    assert asyncio.run(main()) >= 3


def test_each_request_is_built_in_the_compute_thread(loaded, denoiser):
    """No torch op in the event loop's thread (app/engine/engine.py on OpenMP teams): a request's SampleRun
    (its noise, its scheduler) is built in the compute thread."""
    threads: list[str] = []

    async def main():
        client = make_client(loaded, denoiser)
        real = client.engine.make_run

        def recording(spec):
            threads.append(threading.current_thread().name)
            return real(spec)

        client.engine.make_run = recording
        await client.start()
        await client.result(client.add(SampleSpec(class_label=1, seeds=(1, 2), steps=2)))
        await client.shutdown()

    asyncio.run(main())
    assert threads and all(name.startswith("engine-forward") for name in threads), threads


def test_a_failing_model_fails_running_and_waiting_requests_and_the_engine_says_why(loaded, denoiser):
    """Stand-in fault: the real model, whose forward raises once the test says so (a real network
    does not fail on demand), while one request runs and another waits for its rows."""
    fail = threading.Event()

    def failing(x, t, y):
        if fail.is_set():
            raise RuntimeError("injected fault: device lost")
        return denoiser(x, t, y)

    async def main():
        client = make_client(loaded, failing, max_batch_rows=2)
        await client.start()
        running = Tracked(client, SampleSpec(class_label=0, seeds=(1,), steps=200))
        await until(lambda: not running.queued)
        waiting = Tracked(client, SampleSpec(class_label=1, seeds=(1,), steps=3))
        await until(lambda: waiting.progress is not None)
        assert waiting.queued and client.check_health() and client.error is None
        fail.set()
        for request in (running, waiting):
            # A bound, not a timing window: without the engine's error handling these never resolve.
            failed = await asyncio.wait_for(request.failure(), timeout=120)
            assert failed.kind == "engine" and failed.message == "engine failure: injected fault: device lost"
        assert not client.check_health()
        assert client.error == "RuntimeError: injected fault: device lost"
        with pytest.raises(EngineClosedError, match="failed: RuntimeError: injected fault"):
            client.add(SampleSpec(class_label=2, seeds=(1,), steps=3))
        await client.shutdown()  # after a failed engine too: no exception, the worker thread is shut down

    asyncio.run(main())


def interval(start: float, end: float) -> GuidanceParams:
    """CFG at s = 3 for the steps i with start <= i / N < end, and s = 1 (conditional rows only) elsewhere."""
    return GuidanceParams(3.0, GuidanceSchedule("interval", start=start, end=end))


def test_admission_by_rows_per_tick_fits_requests_whose_guidance_intervals_differ(loaded, denoiser):
    """With 12 rows, two 4-image requests guided in opposite halves of their 8 steps need 12 rows at every tick
    (8 + 4, then 4 + 8): they run together, where reserving 2 rows per image (16) would serialize them. A
    third request, which would need 16 rows at some tick, waits until it fits at every tick to come."""
    stats: list[EngineStats] = []
    early, late = interval(0.0, 0.5), interval(0.5, 1.0)

    async def main():
        client = make_client(loaded, denoiser, stats, max_batch_rows=12)
        await client.start()
        a = Tracked(client, SampleSpec(class_label=1, seeds=(1, 2, 3, 4), steps=8, guidance=late))  # rows 4x4, 4x8
        b = Tracked(client, SampleSpec(class_label=2, seeds=(5, 6, 7, 8), steps=8, guidance=early))  # 4x8, 4x4
        c = Tracked(client, SampleSpec(class_label=3, seeds=(9, 10), steps=8, guidance=early))  # 4x4, 4x2
        await until(lambda: not a.queued and not b.queued)
        admitted_together = a.step == b.step
        c_waited = c.queued
        results = await asyncio.gather(a.result(), b.result(), c.result())
        await client.shutdown()
        return results, admitted_together, c_waited

    (a, b, c), admitted_together, c_waited = asyncio.run(main())
    assert admitted_together, "b waited for a, as with a reservation of two rows per image"
    assert c_waited, "c was admitted though at a tick to come it would have made 16 rows"
    rows = [s.rows for s in stats]
    assert max(rows) <= 12 and rows[:8] == [12] * 8, rows
    assert c.queue_wait_s > a.queue_wait_s
    # Forward rows by kind: every image has a conditional row at every step; unconditional rows only where
    # guided; the skipped ones are the rest.
    assert sum(s.cond_rows for s in stats) == (4 + 4 + 2) * 8
    assert sum(s.uncond_rows for s in stats) == (4 + 4 + 2) * 4
    assert sum(s.skipped_uncond_rows for s in stats) == (4 + 4 + 2) * 4
    assert all(s.cond_rows + s.uncond_rows == s.rows for s in stats)


def test_rows_at_every_tick_never_exceed_the_limit_under_random_intervals(loaded, denoiser):
    """Requests of 1-4 images with random intervals, some skipping steps (a skip cache: a tick takes a request's
    skipped steps before its next step that runs rows), added and aborted at random: the scheduler's row
    bookkeeping (`load`) equals the rows the tick runs, and no forward exceeds max_batch_rows."""
    rng = random.Random(3)
    stats: list[EngineStats] = []
    checks: list[tuple[int, int]] = []

    async def main():
        client = make_client(loaded, denoiser, stats, max_batch_rows=10, max_queue=100)
        engine = client.engine
        original = engine._step

        def step(outputs, admitted):  # in the compute thread: the bookkeeping before the tick against its rows
            load = int(engine._scheduler.load[0])
            tick = original(outputs, admitted)
            checks.append((load, tick.rows))
            return tick

        engine._step = step
        await client.start()
        ids, waiters = [], []
        for i in range(24):
            start = rng.choice([0.0, 0.25, 0.5])
            spec = SampleSpec(
                class_label=rng.choice([None, 1, 2]),
                seeds=tuple(range(rng.randint(1, 4))),
                steps=rng.randint(2, 8),
                guidance=interval(start, rng.choice([start + 0.25, 1.0])),
                # no band: every other step skips, the last one too where the steps are even; or only the noisiest
                cache=rng.choice(
                    [None, SkipParams(interval=2, full_sigma_max=None), SkipParams(interval=3, full_sigma_max=10.0)]
                ),
            )
            ids.append(client.add(spec))
            waiters.append(asyncio.ensure_future(client.result(ids[-1])))
            if i % 5 == 4:
                client.abort(ids[rng.randrange(len(ids))])
            await asyncio.sleep(rng.random() * 0.02)
        await asyncio.gather(*waiters)
        await client.shutdown()

    asyncio.run(main())
    assert max(s.rows for s in stats) <= 10
    assert checks and all(load == rows for load, rows in checks), checks


def test_a_request_aborted_during_its_last_step_leaves_the_engine_serving(loaded, denoiser):
    """Aborted while its last forward runs, a request has finished when the engine takes the abort: the abort
    finds nothing to drop, and the engine goes on serving."""
    started, gate = threading.Event(), threading.Event()

    def held(x, t, labels, *rest):
        started.set()
        gate.wait(30)
        return denoiser(x, t, labels, *rest)

    async def main():
        client = make_client(loaded, held)
        await client.start()
        request = client.add(SampleSpec(class_label=1, seeds=(1,), steps=1))
        await until(started.is_set)
        client.abort(request)
        gate.set()
        result = await client.result(client.add(SampleSpec(class_label=2, seeds=(2,), steps=2)))
        healthy = client.check_health()
        await client.shutdown()
        return result, healthy

    result, healthy = asyncio.run(main())
    assert healthy and isinstance(result, Finished) and result.images.shape == (1, 28, 28, 1)


def test_a_cached_request_s_features_are_freed_when_it_is_cancelled_and_a_branch_it_lacks_is_refused(loaded, denoiser):
    import gc
    import weakref

    from app.sampling.cache import DeepCacheParams

    held: list[weakref.ref] = []

    async def main():
        client = make_client(loaded, denoiser)
        await client.start()
        spec = SampleSpec(class_label=4, seeds=(1, 2), steps=200, cache=DeepCacheParams(interval=3))
        drop = Tracked(client, spec)
        await until(lambda: not drop.queued and drop.step >= 2)
        run = client.engine._requests[drop.id].run  # the request's run, as the compute thread holds it
        held.extend(weakref.ref(t) for t in run.cache.tensors)
        client.abort(drop.id)
        failed = await drop.failure()
        deeper = Tracked(client, SampleSpec(class_label=4, seeds=(1,), steps=4, cache=DeepCacheParams(branch=9)))
        refused = await deeper.failure()
        await client.shutdown()
        return failed, refused, run

    failed, refused, run = asyncio.run(main())
    gc.collect()
    # Freed by the engine as the request left, though the run object itself is still referenced here.
    assert failed.kind == "cancelled" and len(held) == 2 and all(ref() is None for ref in held)
    assert run.cache.tensors == []
    assert refused.kind == "invalid" and "deepcache branch must be 0..1 (got 9)" in refused.message  # 2 levels


def test_the_pace_is_measured_on_ticks_whose_rows_all_ran_in_full(loaded, denoiser):
    from app.sampling.cache import DeepCacheParams

    stats: list[EngineStats] = []
    observed: list[int] = []

    async def main():
        client = make_client(loaded, denoiser, stats)
        pace = client.engine._pace
        measure = pace.observe
        pace.observe = lambda rows, seconds: (observed.append(rows), measure(rows, seconds))
        await client.start()
        spec = SampleSpec(class_label=4, seeds=(1,), steps=7, cache=DeepCacheParams(interval=3))
        await Tracked(client, spec).result()
        await client.shutdown()

    asyncio.run(main())
    ticks = [s for s in stats if s.rows]
    full = [s.rows for s in ticks if not s.shallow_rows]
    # Steps 0, 3 and 6 ran in full; the four between reused features, cheaper than their rows say.
    assert len(full) == 3 and len(ticks) == 7
    assert observed == full
