"""A lone client, then 16 concurrent ones, against a plain diffusers loop on the same checkpoint.

    python3 bench/bench_lone_client.py                 # 3 rounds, on this machine's CPU
    python3 bench/bench_lone_client.py --rounds 5 --record

The service side is the engine in this process, through its interface (app/engine/client.py; on older commits
Engine.submit), with the checkpoint's own fp32 denoiser. The plain loop is what a simple server would run per
request: UNet2DModel and DDIMScheduler, `torch.cat([x] * 2)` with the class and null labels, the CFG combine,
`scheduler.step`, behind a lock (one request at a time), in the engine's own thread (`Engine.run_in_worker`,
so that no second thread runs torch: see app/engine/engine.py on OpenMP teams). Every request: one image, 30
DDIM steps, constant guidance scale 3 (2 rows per step). Rounds alternate service and loop; images/s is images
over wall time, and the ratio is the service's over the loop's in the same round (median over rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.engine import SharedCompute  # noqa: E402
from app.guidance import GuidanceSchedule  # noqa: E402
from app.models import model_denoiser  # noqa: E402
from app.sampling import GuidanceParams, SampleSpec, to_uint8  # noqa: E402
from bench.engine_api import load, serve  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402

STEPS, SCALE = 30, 3.0


def plain_loop(loaded, lock: threading.Lock):
    """One request of the plain diffusers loop: (label, seed) -> uint8 image."""
    unet, null = loaded.unet, loaded.manifest.null_label
    scheduler = DDIMScheduler.from_config(loaded.scheduler_config)

    @torch.inference_mode()
    def generate(label: int, seed: int) -> np.ndarray:
        with lock:
            scheduler.set_timesteps(STEPS)
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn((1, *loaded.manifest.sample_shape), generator=generator) * scheduler.init_noise_sigma
            labels = torch.tensor([label, null])
            for t in scheduler.timesteps:
                eps_cond, eps_uncond = unet(torch.cat([x] * 2), t, class_labels=labels).sample.chunk(2)
                eps = eps_uncond + SCALE * (eps_cond - eps_uncond)
                x = scheduler.step(eps, t, x).prev_sample
            return to_uint8(x)

    return generate


def spec(label: int, seed: int) -> SampleSpec:
    return SampleSpec(label, (seed,), STEPS, "ddim", GuidanceParams(SCALE, GuidanceSchedule("constant")))


async def clients(n: int, per_client: int, one) -> float:
    """images/s of n closed-loop clients, each sending per_client one-image requests back to back."""

    async def client(c: int) -> None:
        for i in range(per_client):
            await one(c % 10, 1000 * c + i)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(n)))
    return n * per_client / (time.perf_counter() - t0)


async def run(args) -> list[str]:
    compute = SharedCompute()
    loaded = await load(DEFAULT_MODEL_PATH, compute)
    served = serve(loaded, model_denoiser(loaded), compute)
    engine = served.engine
    loop_one = plain_loop(loaded, threading.Lock())

    async def service(label: int, seed: int) -> None:
        await served.generate(spec(label, seed))

    async def plain(label: int, seed: int) -> None:
        await engine.run_in_worker(loop_one, label, seed)

    await engine.warmup(spec(0, 0))
    await served.start()
    levels = {1: args.lone_requests, 16: 1}
    table = {}
    for n, per_client in levels.items():
        await clients(n, 1, service)  # warm: this level's row counts
        await clients(n if n == 1 else 1, 1, plain)
        pairs = []
        for _ in range(args.rounds):
            pairs.append((await clients(n, per_client, service), await clients(n, per_client, plain)))
        table[n] = pairs
    await served.stop()
    compute.shutdown()
    lines = [
        f"## A lone client against a plain diffusers loop, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {git_commit()}",
        "",
        f"- machine: {machine_description()}",
        f"- command: `python3 {' '.join(sys.argv)}` (torch threads {torch.get_num_threads()}, engine interface "
        f"{served.interface})",
        f"- one-image requests, {STEPS} DDIM steps, constant s = {SCALE:g}; {args.rounds} rounds, service and loop "
        "alternating; medians over rounds",
        "",
        "| clients | service images/s | plain loop images/s | service / loop | per round |",
        "|---|---:|---:|---:|---|",
    ]
    for n, pairs in table.items():
        ratios = [s / p for s, p in pairs]
        lines.append(
            f"| {n} | {statistics.median(s for s, _ in pairs):.2f} | {statistics.median(p for _, p in pairs):.2f} "
            f"| **{statistics.median(ratios):.2f}x** | {', '.join(f'{r:.2f}' for r in ratios)} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lone-requests", type=int, default=4, help="requests per round for the lone client")
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    args = p.parse_args()
    publish(asyncio.run(run(args)), args.record)


if __name__ == "__main__":
    main()
