"""The jobs' in-memory store: its bounds, eviction order, expiry and Idempotency-Key index.

The jobs here are never given to an engine (their request ids name none): what is under test is the
store's bookkeeping, which needs no model. tests/api/test_jobs.py runs real jobs through it.
"""

import gc
import time
import tracemalloc

import pytest

from app.api.job_store import Job, JobStore, StoreFullError
from app.sampling import SampleSpec


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def record(store: JobStore, key: str | None = None) -> Job:
    return Job(
        id=store.new_id(),
        spec=SampleSpec(class_label=0, seeds=(0,)),
        model="model",
        request_id="none",
        body={},
        arrived=0.0,
        created_at=time.time(),
        idempotency_key=key,
    )


def test_the_first_finished_job_goes_first_and_unfinished_ones_never():
    store = JobStore(max_jobs=3, ttl_s=3600)
    a, b, c = (record(store) for _ in range(3))
    for r in (a, b, c):
        store.add(r)
    with pytest.raises(StoreFullError, match="3 unfinished"):
        store.add(record(store))
    c.finish("succeeded", result={})
    a.finish("cancelled")
    d = record(store)
    store.add(d)  # drops c, which finished first, not a
    assert store.get(c.id) is None and store.get(a.id) is a and store.get(b.id) is b
    e = record(store)
    store.add(e)
    assert store.get(a.id) is None and len(store) == 3 and store.unfinished == 3


def test_finished_jobs_expire_after_the_ttl():
    clock = Clock()
    store = JobStore(max_jobs=10, ttl_s=60, clock=clock)
    done, running = record(store), record(store)
    store.add(done)
    store.add(running)
    done.finish("failed", error={"detail": "x"})
    done.finished_mono = clock.now
    clock.now += 59
    assert store.get(done.id) is done
    clock.now += 2
    assert store.get(done.id) is None and store.get(running.id) is running


def test_an_idempotency_key_finds_its_job_until_the_job_is_dropped():
    store = JobStore(max_jobs=1, ttl_s=3600)
    first = record(store, key="k1")
    store.add(first)
    assert store.by_key("k1") is first and store.by_key("k2") is None
    first.finish("succeeded", result={})
    store.add(record(store, key="k2"))
    assert store.by_key("k1") is None


def test_memory_stays_bounded_over_thousands_of_jobs():
    """10,000 jobs, each with a ~20 kB result, through a store of 100: what stays is 100 jobs' worth."""
    store = JobStore(max_jobs=100, ttl_s=3600)

    def run(n: int) -> None:
        for i in range(n):
            r = record(store, key=f"key-{i}")
            store.add(r)
            r.finish("succeeded", result={"images": ["x" * 20_000]})

    run(200)  # reach the bound first
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    run(10_000)
    gc.collect()
    grown, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(store) == 100
    # What was allocated since (the 100 results held now: ~2 MB) is still held; unbounded, 10,000 results
    # would hold ~200 MB.
    assert grown - base < 4_000_000, f"holds {grown - base} bytes allocated since"
