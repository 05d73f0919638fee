"""The event loop's and the engine's own cost per request, on the CPU, without the model:

  - the step loop beside the forward, per sampler: a tick of N one-image requests with a zero-cost stand-in
    forward (eps = 0, a stand-in by design: it isolates the model input, the guidance combine and the
    sampler step), each request stepped by its own diffusers scheduler against app.sampling.batched's step
    over all of them (bench_gpu.py's step loop times the same on a card with the real forward);
  - building a request's SampleRun (the event loop's thread did it for every request before the engine client;
    the compute thread does it now);
  - the event loop's own time per request: its thread's CPU time while the engine, with the zero-cost forward,
    serves one-image requests one at a time and 64 at once, over whichever interface the commit has (its
    client, or Engine.submit before it: bench/engine_api.py), so that two commits compare in one session.

    python3 bench/bench_step.py                     # 64 requests, on this machine's CPU
    python3 bench/bench_step.py --requests 16 --record

prints the markdown table (with machine, commit and command); --record appends it to docs/benchmarks/history.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import timeit
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.engine import SharedCompute  # noqa: E402
from app.models import load_checkpoint  # noqa: E402
from app.sampling import DEFAULT_GUIDANCE, SAMPLERS, SampleRun, SampleSpec  # noqa: E402
from bench.engine_api import serve  # noqa: E402
from bench.gpu_sections import step_breakdown  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402


def build_times(loaded, rounds: int = 5, number: int = 1000) -> list[str]:
    """What building one request's SampleRun costs (the event loop's thread does it for every request), per
    sampler at the default guidance and one image: the best of rounds x number constructions."""
    m = loaded.manifest
    lines = ["Building a one-image request's SampleRun, default guidance (us, best of 5 x 1000):", ""]
    lines += ["| sampler | stepped together | on its own scheduler |", "|---|---:|---:|"]
    for sampler in SAMPLERS:
        spec = SampleSpec(class_label=3, seeds=(1,), sampler=sampler, guidance=DEFAULT_GUIDANCE)
        cells = []
        for together in (True, False):

            def build(together=together, spec=spec) -> SampleRun:
                return SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, together=together)

            build()
            best = min(timeit.timeit(build, number=number) for _ in range(rounds)) / number
            cells.append(f"{best * 1e6:.0f}")
        lines.append(f"| {sampler} | {cells[0]} | {cells[1]} |")
    return lines


def zero_forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


async def event_loop_rounds(loaded, concurrent: int, requests: int, rounds: int) -> tuple[float, float]:
    """The event loop thread's CPU time per request (us) and the wall time per request (ms), medians over rounds:
    `concurrent` closed-loop clients sending `requests` one-image requests (20 steps, default sampler and
    guidance) in all, through the engine's interface with the zero-cost forward (a stand-in by design)."""
    compute = SharedCompute()
    served = serve(loaded, zero_forward, compute, max_batch_rows=max(32, 2 * concurrent))
    await served.engine.warmup(SampleSpec(class_label=0, seeds=(0,), steps=2))
    await served.start()

    async def client(c: int) -> None:
        for i in range(requests // concurrent):
            await served.generate(SampleSpec(class_label=c % 10, seeds=(i,), steps=20, guidance=DEFAULT_GUIDANCE))

    cpu, wall = [], []
    for _ in range(rounds + 1):  # the first round warms up
        c0, w0 = time.thread_time(), time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(concurrent)))
        cpu.append((time.thread_time() - c0) / requests)
        wall.append((time.perf_counter() - w0) / requests)
    await served.stop()
    compute.shutdown()
    return statistics.median(cpu[1:]) * 1e6, statistics.median(wall[1:]) * 1e3


def event_loop_times(loaded, rounds: int = 5) -> list[str]:
    lines = [
        "The event loop's time per request, the zero-cost forward (one-image requests, 20 steps, default guidance; "
        f"medians of {rounds} rounds):",
        "",
        "| clients | requests per round | event loop CPU per request (us) | wall per request (ms) |",
        "|---|---:|---:|---:|",
    ]
    for concurrent, requests in ((1, 20), (64, 128)):
        cpu_us, wall_ms = asyncio.run(event_loop_rounds(loaded, concurrent, requests, rounds))
        lines.append(f"| {concurrent} | {requests} | {cpu_us:.0f} | {wall_ms:.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the engine's thread runs the step)")
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    p.add_argument("--only-event-loop", action="store_true", help="only the event loop's time per request")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    report = types.SimpleNamespace(data={})

    def stand_in(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    if args.only_event_loop:
        table = event_loop_times(loaded)
    else:
        table = step_breakdown(loaded, {"stand-in (eps = 0)": stand_in}, torch.device("cpu"), report, n=args.requests)
        table += ["", *build_times(loaded), "", *event_loop_times(loaded)]
    publish(
        [
            f"## Step loop beside the forward, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
            "",
            f"- machine: {machine_description()}",
            f"- command: `python3 {' '.join(sys.argv)}`",
            "",
            *table,
        ],
        args.record,
    )


if __name__ == "__main__":
    main()
