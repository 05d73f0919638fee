"""The engine in its own process (CFG_ENGINE_PROCESS=1) against the engine in the API's process (issue 26).

    python3 bench/bench_split.py --record                         # here: 1 and 16 clients, 1-image requests
    python3 bench/bench_split.py --levels 1x1,1x16,1x64,1x256,8x64  # on a GPU: the issue's matrix

Two real servers (`python -m app.serve`, the same settings but CFG_ENGINE_PROCESS) run side by side; only one is
loaded at a time, in alternating rounds (A then B, then B then A), so the machine's drift hits both. Each level is
IMAGESxCLIENTS: that many closed-loop clients (bench/load_client.py, in a process of its own, one keep-alive
connection each) posting requests of that many images back to back (20 dpmpp_2m steps, constant CFG s = 3).
Reported per level: images/s (the clients over the mean latency), p50 and p99 of each, the split over one process
(median of the rounds' ratios), and, with --raw, the raw sampling loop in this process
(bench_service.raw_images_per_s, the same request shape, IMAGES x CLIENTS requests stepped together, the servers'
forward: channels_last, CUDA graphs on a GPU), against which each server's images/s is read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.loading import load_for_serving  # noqa: E402
from app.models.fast import fast_denoiser  # noqa: E402
from bench.bench_service import raw_images_per_s  # noqa: E402
from bench.gpu_sections import load_process  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402

MODES = {"one process": "0", "engine process": "1"}


def start(port: int, split: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env={**os.environ, **env, "CFG_ENGINE_PROCESS": split},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def levels(text: str) -> list[tuple[int, int]]:
    return [(int(i), int(c)) for i, c in (level.split("x") for level in text.split(","))]


async def run(args: argparse.Namespace) -> list[str]:
    todo = levels(args.levels)
    env = {
        "CFG_DEVICE": args.device,
        "CFG_MAX_BATCH_ROWS": str(args.max_batch_rows),
        "CFG_MAX_QUEUE": str(4 * max(c for _, c in todo)),
    }
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    urls = {mode: f"http://127.0.0.1:{args.port + k}" for k, mode in enumerate(MODES)}
    procs = {
        mode: start(args.port + k, flag, env, logs / f"split-{flag}.log")
        for k, (mode, flag) in enumerate(MODES.items())
    }
    try:
        for mode, url in urls.items():
            wait_ready(url, procs[mode])
        rows: list[str] = []
        data: dict[tuple[int, int], dict[str, list[dict]]] = {}
        for images, clients in todo:
            results: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for r in range(args.rounds):
                order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    result = await load_process(urls[mode], clients, args.steps, args.warm, args.window, images)
                    # A closed loop's throughput is its clients over the mean latency (Little's law): counting the
                    # responses in a window moves in waves of `clients` requests, too coarse at 15 s here.
                    result["images_per_s"] = images * clients / result["mean"]
                    results[mode].append(result)
            data[(images, clients)] = results
        raw: dict[tuple[int, int], float] = {}
        if args.raw:
            device = torch.device(
                args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
            )
            # The forward as the servers run it: channels_last weights and inputs, the default precision (fp32;
            # fp16 on a GPU under "auto" only), CUDA graphs on a GPU.
            loaded, model = load_for_serving(DEFAULT_MODEL_PATH, device, channels_last=True)
            budget = int(env["CFG_MAX_BATCH_ROWS"])
            denoiser = fast_denoiser(model, device, "fp32", channels_last=True, max_rows=budget, cuda_graphs=True)
            for images, clients in todo:
                n = images * clients
                raw_images_per_s(loaded, denoiser, n, args.steps, "dpmpp_2m", device)  # warm
                raw[(images, clients)] = max(
                    raw_images_per_s(loaded, denoiser, n, args.steps, "dpmpp_2m", device) for _ in range(2)
                )
        for (images, clients), results in data.items():
            one, split = results["one process"], results["engine process"]
            ratios = [b["images_per_s"] / a["images_per_s"] for a, b in zip(one, split, strict=True)]

            def med(rs: list[dict], key: str) -> float:
                return statistics.median(x[key] for x in rs)

            raw_cell = ""
            if raw:
                base = raw[(images, clients)]
                raw_cell = (
                    f" | {base:.2f} | {med(one, 'images_per_s') / base:.2f}x | {med(split, 'images_per_s') / base:.2f}x"
                )
            rows.append(
                f"| {images} | {clients} | {med(one, 'images_per_s'):.2f} | {med(split, 'images_per_s'):.2f} | "
                f"**{statistics.median(ratios):.2f}x** ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                f"{med(one, 'p50'):.2f} / {med(one, 'p99'):.2f} | {med(split, 'p50'):.2f} / {med(split, 'p99'):.2f}"
                f"{raw_cell} |"
            )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=120)
    raw_head = " | raw loop images/s | one / raw | split / raw" if args.raw else ""
    raw_rule = "|---:|---:|---:" if args.raw else ""
    return [
        f"## The engine in its own process against one process ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- commit `{git_commit()}`; machine: {machine_description()}; device {args.device}",
        f"- command: `python3 bench/bench_split.py {' '.join(sys.argv[1:])}`",
        f"- two `python -m app.serve` (CFG_MAX_BATCH_ROWS {env['CFG_MAX_BATCH_ROWS']}, otherwise the defaults), one "
        f"loaded at a time; {args.rounds} alternating rounds per level, each {args.warm:g} s warm + {args.window:g} s "
        f"measured; {args.steps} dpmpp_2m steps, CFG s = 3 constant; images/s: images x clients over the mean latency; "
        "median over the rounds",
        "",
        "| images per request | clients | one process images/s | engine process images/s | split / one (rounds) | "
        f"one p50 / p99 (s) | split p50 / p99 (s){raw_head} |",
        f"|---:|---:|---:|---:|---|---|---{raw_rule}|",
        *rows,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1x1,1x16", help="IMAGESxCLIENTS, comma-separated")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warm", type=float, default=4.0)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--max-batch-rows",
        type=int,
        default=32,
        help="the servers' CFG_MAX_BATCH_ROWS (on a GPU: 2 x the most images "
        "at once, as bench_gpu.py; each server's warmup runs a forward at every row count up to it)",
    )
    p.add_argument("--raw", action="store_true", help="also the raw sampling loop in this process, per level")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--logs", default="/tmp/bench-split")
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks/history.md")
    args = p.parse_args()
    publish(asyncio.run(run(args)), args.record)


if __name__ == "__main__":
    main()
