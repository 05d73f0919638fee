"""Interactive clients beside a flood of batch jobs (issue 25), with and without priorities, in one run:

    nice python3 bench/bench_priorities.py                      # 2 interactive clients, 30 s windows
    nice python3 bench/bench_priorities.py --window 60 --record
    nice python3 bench/bench_priorities.py --max-batch-rows 36      # room for the interactive rows beside a job

The model is served as the service serves it (app.main.serve_model: the shipped checkpoint, the default settings,
its warmup), on its engine client in this process (no HTTP: the subject is the engine's admission). Interactive
clients each send one-image, 20-step requests back to back. The flood keeps `--depth` batch jobs of 16 images and
50 steps (32 rows per tick with the default guidance: the whole default budget) waiting or running, so the engine
is always full. Five phases, each `--window` seconds after `--settle` seconds of the same load:

  idle          the interactive clients alone
  batch alone   the flood alone
  priorities    both; interactive requests in the interactive class, the flood in the batch class (the default)
  one class     both, all of it batch work of one client: arrival order, the engine before issue 25
  fair shares   both, all of it batch work, each interactive client and the flood a client of its own

Interactive latency: p50 and p99 of the requests that finished in the window (n of them), and the longest wait of
one still unanswered when the window closed (a request stuck behind the flood may not finish in it). Batch images/s: the
flood's image-steps run in the window (its jobs' progress, read from their own progress events) over 50 steps
per image, so that a window counts the work done, not only the jobs that happened to end in it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH, Settings  # noqa: E402
from app.engine import Failed, Finished, Progress, SharedCompute  # noqa: E402
from app.main import serve_model  # noqa: E402
from app.metrics import create_metrics  # noqa: E402
from app.sampling import SampleSpec  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402

FLOOD_IMAGES, FLOOD_STEPS = 16, 50
INTERACTIVE_STEPS = 20
# phase -> (interactive clients' priority and client names, the flood's priority and client)
PHASES = {
    "idle": None,
    "batch alone": None,
    "priorities": (("interactive", "ui-{k}"), ("batch", "flood")),
    "one class": (("batch", "anonymous"), ("batch", "anonymous")),
    "fair shares": (("batch", "ui-{k}"), ("batch", "flood")),
}


class Load:
    """The clients of one phase: they run until stopped; what they did in the window is read after."""

    def __init__(self, client, window: tuple[float, float]) -> None:
        self.client = client
        self.start, self.end = window
        self.latencies: list[float] = []  # interactive requests that finished in the window
        self.asked: dict[str, float] = {}  # interactive requests in flight: when each was sent
        self.flood_steps: dict[str, list[tuple[float, int]]] = {}  # per flood job: (time, steps done)
        self.seeds = iter(range(10**9))
        self.in_flight_at_end = 0.0  # unanswered_s() at the window's end

    async def interactive(self, priority: str, client: str) -> None:
        while True:
            spec = SampleSpec(class_label=next(self.seeds) % 10, seeds=(next(self.seeds),), steps=INTERACTIVE_STEPS)
            t0 = time.monotonic()
            request_id = self.client.add(spec, priority=priority, client=client)
            self.asked[request_id] = t0
            try:
                output = await self.client.result(request_id)
            except asyncio.CancelledError:
                self.client.abort(request_id)
                raise
            del self.asked[request_id]
            if not isinstance(output, Finished):
                raise RuntimeError(f"an interactive request failed: {output}")
            if self.start <= time.monotonic() <= self.end:
                self.latencies.append(time.monotonic() - t0)

    async def flood_job(self, priority: str, client: str) -> None:
        seed = next(self.seeds)
        spec = SampleSpec(class_label=seed % 10, seeds=tuple(range(seed, seed + FLOOD_IMAGES)), steps=FLOOD_STEPS)
        request_id = self.client.add(spec, progress=True, limit_queue=False, priority=priority, client=client)
        steps = self.flood_steps.setdefault(request_id, [(time.monotonic(), 0)])
        try:
            async for output in self.client.stream(request_id):
                if isinstance(output, Progress):
                    steps.append((time.monotonic(), output.step))
                elif isinstance(output, Failed):
                    raise RuntimeError(f"a flood job failed: {output}")
                else:
                    steps.append((time.monotonic(), FLOOD_STEPS))
        except asyncio.CancelledError:
            self.client.abort(request_id)
            raise

    async def flood(self, priority: str, client: str, depth: int) -> None:
        running: set[asyncio.Task] = set()
        try:
            while True:
                while len(running) < depth:
                    running.add(asyncio.ensure_future(self.flood_job(priority, client)))
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def unanswered_s(self) -> float:
        """The longest an interactive request still in flight at the window's end had waited by then (0: none)."""
        return max((self.end - t0 for t0 in self.asked.values() if t0 < self.end), default=0.0)

    def flood_images_per_s(self) -> float:
        """Image-steps of the flood run within the window, over FLOOD_STEPS, per second."""
        done = 0
        for points in self.flood_steps.values():
            done += at(points, self.end) - at(points, self.start)
        return done * FLOOD_IMAGES / FLOOD_STEPS / (self.end - self.start)


def at(points: list[tuple[float, int]], t: float) -> int:
    """Steps done by time t (the last progress event at or before it)."""
    return max((steps for when, steps in points if when <= t), default=0)


async def phase(client, name: str, args) -> Load:
    now = time.monotonic()
    load = Load(client, (now + args.settle, now + args.settle + args.window))
    tasks = []
    setup = PHASES[name]
    if name == "idle":
        tasks += [load.interactive("interactive", f"ui-{k}") for k in range(args.interactive)]
    elif name == "batch alone":
        tasks.append(load.flood("batch", "flood", args.depth))
    else:
        assert setup is not None
        (ui_priority, ui_client), (flood_priority, flood_client) = setup
        tasks += [load.interactive(ui_priority, ui_client.format(k=k)) for k in range(args.interactive)]
        tasks.append(load.flood(flood_priority, flood_client, args.depth))
    running = [asyncio.ensure_future(t) for t in tasks]
    await asyncio.sleep(args.settle + args.window)
    load.in_flight_at_end = load.unanswered_s()
    for task in running:
        task.cancel()
    results = await asyncio.gather(*running, return_exceptions=True)
    if errors := [r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]:
        raise errors[0]
    while client.active_requests or client.queue_depth:  # the aborted requests leave at the next tick
        await asyncio.sleep(0.05)
    return load


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def run(args) -> list[str]:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(max_batch_rows=args.max_batch_rows)
    compute = SharedCompute()
    served, _engine = await serve_model(settings, DEFAULT_MODEL_PATH, torch.device("cpu"), compute, create_metrics())
    client = served.client
    await client.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
    await client.start()
    loads = {}
    for name in PHASES:
        loads[name] = await phase(client, name, args)
        print(f"{name}: done", file=sys.stderr, flush=True)
    await client.shutdown()
    compute.shutdown()

    idle = loads["idle"].latencies
    alone = loads["batch alone"].flood_images_per_s()
    lines = [
        f"## Interactive clients beside a batch flood, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {git_commit()}",
        "",
        f"- machine: {machine_description()}",
        f"- command: `python3 {' '.join(sys.argv)}` (torch threads {torch.get_num_threads()})",
        f"- {args.interactive} interactive clients (1 image, {INTERACTIVE_STEPS} steps, back to back); a flood of "
        f"{args.depth} batch jobs of {FLOOD_IMAGES} images and {FLOOD_STEPS} steps always waiting or running; "
        f"CFG_MAX_BATCH_ROWS {settings.max_batch_rows}; each phase {args.settle:g} s to settle, then "
        f"{args.window:g} s measured",
        "",
        "| phase | interactive n | p50 (s) | p99 (s) | p50 / idle | p99 / idle | unanswered at the end (s) "
        "| batch images/s | / batch alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, load in loads.items():
        lat = load.latencies
        p50, p99 = quantile(lat, 0.5), quantile(lat, 0.99)
        images = load.flood_images_per_s()
        cells = [str(len(lat)), f"{p50:.2f}", f"{p99:.2f}"]
        cells += [f"{p50 / quantile(idle, 0.5):.2f}x", f"{p99 / quantile(idle, 0.99):.2f}x"] if lat else ["", ""]
        cells.append(f"{load.in_flight_at_end:.1f}" if name != "batch alone" else "")
        cells += [f"{images:.2f}", f"{images / alone:.0%}"] if name != "idle" else ["", ""]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "unanswered at the end: the longest an interactive request still waiting when the window closed had waited "
        "by then (a lower bound on its latency, which p50 and p99 leave out).",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interactive", type=int, default=2, help="interactive clients")
    p.add_argument("--depth", type=int, default=2, help="flood jobs waiting or running at any time")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured per phase")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of each phase's load before its window")
    p.add_argument("--max-batch-rows", type=int, default=32, help="CFG_MAX_BATCH_ROWS (32: the default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    args = p.parse_args()
    publish(asyncio.run(run(args)), args.record)


if __name__ == "__main__":
    main()
