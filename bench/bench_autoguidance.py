"""What autoguidance costs beside CFG, on this machine: the guide's forward against the main model's, and the
sampling loop of each method. Run by hand (not in CI); prints markdown and, with --record, appends it to
docs/benchmarks/history.md with the machine, the commit and the command.

    python3 bench/bench_autoguidance.py
    python3 bench/bench_autoguidance.py --rounds 5 --record

Both parts run in one worker thread (the engine's kind of thread: see app/engine/engine.py on OpenMP teams), the
shipped default model and its guide (model_store/fashion-mnist-guide) with their fp32 eager forwards:

  1. forward: the median time of one forward of each model at --rows rows (each timed --repeats times after one
     untimed call, the models in turn), and the guide's time over the main model's;
  2. the loop: --requests one-image requests of one method, sampled together with app.sampling.sample
     (dpmpp_2m_karras, --steps steps), each method in turn per round; images/s, and the ratio to CFG s = 3's in
     the same round, median over --rounds rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.guidance import GuidanceMethod, MethodParams  # noqa: E402
from app.models import load_checkpoint, unet_denoiser  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402

GUIDE = "fashion-mnist-guide"


def method(scale: float, cfg: bool) -> MethodParams:
    return GuidanceMethod("autoguidance", guide=GUIDE, scale=scale, cfg=cfg)


# (name, guidance, main rows and guide rows per image and step)
METHODS = [
    ("CFG s = 3", GuidanceParams(3.0), "2 + 0"),
    ("CFG s = 1 (unguided)", GuidanceParams(1.0), "1 + 0"),
    ("autoguidance w = 2", GuidanceParams(3.0, method=method(2.0, False)), "1 + 1"),
    ("autoguidance w = 2 + CFG s = 3", GuidanceParams(3.0, method=method(2.0, True)), "2 + 1"),
]


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def forward_times(main, guide, rows: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """(rows, main's median seconds, guide's median seconds) per row count."""
    out = []
    for n in rows:
        x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        t, y = torch.full((n,), 500), torch.arange(n) % 10
        times: dict[str, list[float]] = {"main": [], "guide": []}
        for denoiser in (main, guide):
            denoiser(x, t, y)  # oneDNN builds its kernels for a new shape at the first call
        for _ in range(repeats):
            times["main"].append(timed(main, x, t, y))
            times["guide"].append(timed(guide, x, t, y))
        out.append((n, statistics.median(times["main"]), statistics.median(times["guide"])))
    return out


def loop_seconds(loaded, main, guides, guidance: GuidanceParams, requests: int, steps: int) -> float:
    specs = [SampleSpec(i % 10, (i,), steps, "dpmpp_2m_karras", guidance) for i in range(requests)]
    m = loaded.manifest
    runs = [SampleRun(s, loaded.scheduler_config, (1, 28, 28), m.null_label) for s in specs]
    return timed(sample, main, runs, None, guides)


def run(args: argparse.Namespace) -> list[str]:
    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    main = unet_denoiser(loaded.unet)
    guide = unet_denoiser(load_checkpoint(DEFAULT_MODEL_PATH.parent / GUIDE, "cpu").unet)
    guides = {GUIDE: guide}
    forwards = forward_times(main, guide, args.rows, args.repeats)
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in METHODS}
    for _ in range(args.rounds):
        for name, guidance, _ in METHODS:
            per_round[name].append(loop_seconds(loaded, main, guides, guidance, args.requests, args.steps))
    base = per_round[METHODS[0][0]]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python3 bench/bench_autoguidance.py " + " ".join(sys.argv[1:])
    lines = [
        "## bench_autoguidance.py",
        "",
        f"- {now}, commit `{git_commit()}`, {machine_description()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- command: `{command.strip()}`",
        "",
        "| rows | main forward (ms) | guide forward (ms) | guide / main |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {m * 1e3:.1f} | {g * 1e3:.1f} | {g / m:.2f} |" for n, m, g in forwards]
    lines += [
        "",
        f"{args.requests} one-image requests, {args.steps} dpmpp_2m_karras steps, {args.rounds} rounds:",
        "",
        "| method | rows per image and step (main + guide) | images/s (median) | time vs CFG s = 3 (median) |",
        "|---|---|---:|---:|",
    ]
    for name, _, rows in METHODS:
        seconds = per_round[name]
        ratios = [s / b for s, b in zip(seconds, base, strict=True)]
        rate = args.requests / statistics.median(seconds)
        lines.append(f"| {name} | {rows} | {rate:.2f} | {statistics.median(ratios):.2f}x |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    args = p.parse_args()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-forward") as worker:
        lines = worker.submit(run, args).result()
    publish(lines, args.record)


if __name__ == "__main__":
    main()
