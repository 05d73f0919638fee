"""What the admission policy costs per tick: Scheduler.schedule() with a queue of N waiting requests.

    python3 bench/bench_schedule.py                    # N = 10, 100, 500
    python3 bench/bench_schedule.py --record

Each waiting request is a 16-image, 50-step guided request (32 rows: the whole default budget), one of them
running, so every call walks the whole queue and admits nothing, as under a flood of jobs. Requests belong to one
client, or to 50 (fair shares). The script runs on commits before fair shares too (no Scheduler.add, no client),
so that two commits compare in one session; the engine's tick is this plus a forward (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.engine.scheduler import EngineRequest, Scheduler  # noqa: E402
from app.models import load_checkpoint  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402


def schedule_seconds(loaded, waiting: int, clients: int, calls: int, rounds: int) -> float:
    """The best of `rounds` means over `calls` schedule() calls with `waiting` requests queued behind a running one."""
    scheduler = Scheduler(32, 100_000)
    for i in range(waiting + 1):
        spec = SampleSpec(1, tuple(range(16)), 50, guidance=GuidanceParams(3.0))
        run = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), 10, torch.device("cpu"))
        request = EngineRequest(str(i), run, float(i), False, "batch")
        if hasattr(request, "client"):
            request.client = f"client-{i % clients}"
        if hasattr(scheduler, "add"):
            scheduler.add(request)
        else:
            scheduler.waiting.append(request)
    scheduler.schedule()  # the first one runs
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            scheduler.schedule()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    args = p.parse_args()
    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    lines = [
        f"## Scheduler.schedule() per tick, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
        "",
        f"- machine: {machine_description()}",
        f"- command: `python3 {' '.join(sys.argv)}`; best of {args.rounds} means of {args.calls} calls",
        "",
        "| waiting requests | one client (ms) | 50 clients (ms) |",
        "|---:|---:|---:|",
    ]
    for waiting in (10, 100, 500):
        one, many = (schedule_seconds(loaded, waiting, c, args.calls, args.rounds) for c in (1, 50))
        lines.append(f"| {waiting} | {one * 1e3:.2f} | {many * 1e3:.2f} |")
    publish(lines, args.record)


if __name__ == "__main__":
    main()
