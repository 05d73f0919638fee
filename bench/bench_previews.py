"""What previews cost the batch, run by hand (not in CI). Prints markdown and, with --record, appends it to
docs/benchmarks/history.md with the machine, the commit and the command.

    python3 bench/bench_previews.py --record

A full batch (16 one-image requests, 32 rows per forward, as the service runs at saturation) sampled to
the end in the engine's own kind of thread, with previews every step (the worst case), every steps // 10
steps (the API's default) and none, timed in alternation so that the machine's drift hits all three alike.
A preview is the x0 prediction mapped to uint8 in the engine's thread; the PNG encoding of it happens on
the event loop when a progress event is sent, and is timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.images import to_png_bytes  # noqa: E402
from app.models import load_checkpoint, unet_denoiser  # noqa: E402
from app.sampling import SampleRun, SampleSpec, sample  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluate import git_commit, machine_description  # noqa: E402


def batch_seconds(loaded, denoiser, preview_every: int | None, requests: int, steps: int) -> float:
    m = loaded.manifest
    shape = (m.in_channels, m.image_size, m.image_size)
    runs = [
        SampleRun(
            SampleSpec(class_label=i % 10, seeds=(i,), steps=steps, preview_every=preview_every),
            loaded.scheduler_config,
            shape,
            m.null_label,
        )
        for i in range(requests)
    ]
    t0 = time.perf_counter()
    with torch.inference_mode():
        sample(denoiser, runs)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()

    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    denoiser = unet_denoiser(loaded.unet)
    settings = {"none": None, f"every {max(1, args.steps // 10)} (default)": max(1, args.steps // 10), "every 1": 1}
    # The engine's own kind of thread: all compute in one worker (see app/engine/engine.py).
    with ThreadPoolExecutor(max_workers=1) as worker:
        times: dict[str, list[float]] = {k: [] for k in settings}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, every in settings.items():
                times[name].append(
                    worker.submit(batch_seconds, loaded, denoiser, every, args.requests, args.steps).result()
                )
        run = worker.submit(
            lambda: SampleRun(
                SampleSpec(class_label=0, seeds=(0,), steps=args.steps, preview_every=1),
                loaded.scheduler_config,
                (loaded.manifest.in_channels, loaded.manifest.image_size, loaded.manifest.image_size),
                loaded.manifest.null_label,
            )
        ).result()
        worker.submit(sample, denoiser, [run]).result()
    base = statistics.median(times["none"][1:])
    rows = []
    for name in settings:
        rounds = times[name][1:]
        ratios = [t / b for t, b in zip(rounds, times["none"][1:], strict=True)]
        rows.append(f"| {name} | {statistics.median(rounds):.3f} | {statistics.median(ratios):.3f} |")
    image = run.images()[0]
    t0 = time.perf_counter()
    for _ in range(1000):
        to_png_bytes(image)
    png_us = (time.perf_counter() - t0) / 1000 * 1e6

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    publish(
        [
            f"## Previews: their cost to the batch ({now}, commit {git_commit()})",
            "",
            f"Machine: {machine_description()}. Command: `python3 bench/bench_previews.py"
            f"{' --record' if args.record else ''}`.",
            f"{args.requests} one-image requests (32 rows per forward) sampled together for {args.steps} dpmpp_2m "
            f"steps in one worker thread, {args.rounds} rounds in alternation; the ratio is the median of the "
            f"per-round ratios to no previews (base: {base:.3f} s).",
            "",
            "| previews | seconds per batch (median) | vs none |",
            "|---|---:|---:|",
            *rows,
            "",
            f"PNG encoding of one {loaded.manifest.image_size}x{loaded.manifest.image_size} preview on the event "
            f"loop: {png_us:.0f} µs.",
            "",
        ],
        args.record,
    )


if __name__ == "__main__":
    main()
