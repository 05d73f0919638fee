"""The raw sampling loop with faster forwards (app/models/fast.py) against today's fp32 eager forward, run by
hand (not in CI). Prints markdown and, with --record, appends it to docs/benchmarks/history.md with the machine, the
commit and the command.

    python3 bench/bench_forward.py --record
    python3 bench/bench_forward.py --variants bf16,cl,compile,compile+bf16 --rounds 9

A variant is a '+'-joined set of: fp32, bf16 (autocast) or int8 (app/models/quantize.py: calibrated on the
model's own sampling and compiled, so int8 alone is a compiled variant; fp32 is the default), cl (channels_last
weights and inputs), compile (torch.compile with freezing over padded row buckets), dynamic (torch.compile with
freezing, one graph with a symbolic row count, no padding). For each variant:

  1. warm-up: the time to run one forward at every row count 1..--max-rows, as the engine's warmup does
     before the service is ready (for a compiled variant, compiling every bucket). The inductor cache
     is a fresh folder unless --cache-dir names one, so the first compiled variant pays a cold compile;
     with --restart, a second process then times the same warm-up on the now-filled cache (a restart);
  2. the raw loop as bench/bench_service.py times it: --requests one-image requests, guided at scale 3
     (2 rows each, so 32 rows per forward by default), DDPM, --steps steps, sampled together in one worker
     thread (the engine's kind of thread); --rounds rounds, each variant in turn, and the median of the
     per-round ratios to the fp32 eager loop of the same round;
  3. agreement: the largest difference of eps from fp32 eager's over one 32-row batch, and of the final
     uint8 images over one raw-loop run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import record  # noqa: E402

BASELINE = "fp32"
TOKENS = ("fp32", "bf16", "int8", "cl", "compile", "dynamic")


def variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        bad = [t for t in name.split("+") if t not in TOKENS]
        if bad:
            raise argparse.ArgumentTypeError(f"{name}: unknown part(s) {bad}; parts are {', '.join(TOKENS)}")
    return [n for n in names if n != BASELINE]


@dataclass
class Variant:
    name: str
    denoiser: object
    warmup_s: float = 0.0


def build(name: str, loaded, max_rows: int):
    """The denoiser of a variant, on its own copy of the network where it changes the weights' layout."""
    import torch

    from app.engine.calibrate import model_calibrator
    from app.models import unet_denoiser
    from app.models.fast import FastDenoiser, to_channels_last

    parts = set(name.split("+"))
    if parts == {BASELINE}:
        return unet_denoiser(loaded.unet)  # today's forward
    unet = to_channels_last(copy.deepcopy(loaded.unet)) if "cl" in parts else loaded.unet
    precision = next((p for p in ("bf16", "int8") if p in parts), "fp32")
    compile = "compile" in parts or "dynamic" in parts
    base = unet_denoiser(unet)
    calibrate = model_calibrator(loaded, base) if precision == "int8" else None
    return FastDenoiser(
        base, torch.device("cpu"), precision, "cl" in parts, compile, max_rows, "dynamic" in parts, calibrate
    )


def warm_row_counts(denoiser, max_rows: int, null_label: int) -> float:
    """As Engine.warmup's row counts: one forward at every row count; returns the seconds it took."""
    import torch

    t0 = time.perf_counter()
    for rows in range(1, max_rows + 1):
        denoiser(torch.zeros(rows, 1, 28, 28), torch.full((rows,), 500), torch.full((rows,), null_label))
    return time.perf_counter() - t0


def make_runs(loaded, requests: int, steps: int):
    from app.sampling import GuidanceParams, SampleRun, SampleSpec

    spec = dict(steps=steps, sampler="ddpm", guidance=GuidanceParams(3.0))
    m = loaded.manifest
    return [
        SampleRun(
            SampleSpec(class_label=i % 10, seeds=(i,), **spec), loaded.scheduler_config, (1, 28, 28), m.null_label
        )
        for i in range(requests)
    ]


def loop_seconds(loaded, denoiser, requests: int, steps: int) -> float:
    from app.sampling import sample

    runs = make_runs(loaded, requests, steps)
    t0 = time.perf_counter()
    sample(denoiser, runs)
    return time.perf_counter() - t0


def agreement(loaded, baseline, denoiser, requests: int, steps: int) -> tuple[float, int]:
    """Largest |eps - eps_fp32| over a 2*requests-row batch, and largest uint8 difference of the final images."""
    import torch

    from app.sampling import sample

    g = torch.Generator().manual_seed(0)
    rows = 2 * requests
    x = torch.randn(rows, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, loaded.manifest.null_label + 1, (rows,), generator=g)
    eps_diff = (denoiser(x, t, y) - baseline(x, t, y)).abs().max().item()
    images = []
    for d in (baseline, denoiser):
        runs = make_runs(loaded, requests, steps)
        sample(d, runs)
        images.append(torch.cat([torch.from_numpy(r.images()) for r in runs]).int())
    return eps_diff, int((images[0] - images[1]).abs().max())


def startup_only(args: argparse.Namespace) -> None:
    """--startup-only: print the warm-up seconds of one variant (a fresh process on --cache-dir)."""
    from app.config import DEFAULT_MODEL_PATH
    from app.models import load_checkpoint

    def work() -> float:
        loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
        return warm_row_counts(
            build(args.startup_only, loaded, args.max_rows), args.max_rows, loaded.manifest.null_label
        )

    with ThreadPoolExecutor(max_workers=1) as worker:
        print(f"WARMUP {worker.submit(work).result():.3f}")


def restart_seconds(args: argparse.Namespace, variant: str, cache_dir: str) -> float:
    cmd = [sys.executable, __file__, "--startup-only", variant, "--max-rows", str(args.max_rows)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("WARMUP ")).split()[1])


def run(args: argparse.Namespace, cache_dir: str) -> str:
    import torch

    from app.config import DEFAULT_MODEL_PATH
    from app.models import load_checkpoint
    from research.evaluate import git_commit, machine_description

    worker = ThreadPoolExecutor(max_workers=1)  # the engine's kind of thread: all compute in one worker

    def in_worker(fn, *a):
        return worker.submit(fn, *a).result()

    loaded = in_worker(load_checkpoint, DEFAULT_MODEL_PATH, "cpu")
    null = loaded.manifest.null_label
    variants = [Variant(name, in_worker(build, name, loaded, args.max_rows)) for name in [BASELINE, *args.variants]]
    for v in variants:
        v.warmup_s = in_worker(warm_row_counts, v.denoiser, args.max_rows, null)
        print(f"{v.name}: warm-up {v.warmup_s:.1f} s", file=sys.stderr)
    restarts = {}
    if args.restart:
        for v in variants:
            if "compile" in v.name or "dynamic" in v.name:
                restarts[v.name] = restart_seconds(args, v.name, cache_dir)

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for k in range(args.rounds + 1):  # the first round warms the loop up and is dropped
        for v in variants:
            times[v.name].append(in_worker(loop_seconds, loaded, v.denoiser, args.requests, args.steps))
        print(f"round {k}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), file=sys.stderr)
    agree = {v.name: in_worker(agreement, loaded, variants[0].denoiser, v.denoiser, args.requests, args.steps)
             for v in variants[1:]}  # fmt: skip
    worker.shutdown()

    base = times[BASELINE][1:]
    rows = 2 * args.requests
    lines = [
        f"## Faster forwards: the raw loop against fp32 eager ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {git_commit()})",
        "",
        f"- machine: {machine_description()}",
        f"- command: `python3 bench/bench_forward.py {' '.join(sys.argv[1:])}`",
        f"- raw loop: {args.requests} one-image requests guided at scale 3 ({rows} rows per forward), {args.steps} "
        f"DDPM steps, sampled together in one worker thread; {args.rounds} rounds, the variants in turn in each "
        f"round; ratio = fp32 eager's seconds / the variant's in the same round, median over the rounds",
        f"- warm-up: one forward at every row count 1..{args.max_rows} (the engine's warmup before ready), "
        f"first in a process{' with an empty inductor cache' if not args.cache_dir else ''}; restart: the same "
        "in a new process on the filled cache",
        "",
        "| variant | images/s (median) | vs fp32 eager (median of rounds) | quartiles | warm-up (s) | restart (s) "
        "| max abs eps diff | max image diff (of 255) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        mine = times[v.name][1:]
        ratios = [b / t for b, t in zip(base, mine, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0], 0, ratios[0])
        eps_diff, image_diff = agree.get(v.name, (0.0, 0))
        restart = f"{restarts[v.name]:.1f}" if v.name in restarts else "–"
        name = "fp32 eager (today)" if v.name == BASELINE else v.name
        lines.append(
            f"| {name} | {args.requests / statistics.median(mine):.2f} | {statistics.median(ratios):.2f}x | "
            f"{q1:.2f}-{q3:.2f} | {v.warmup_s:.1f} | {restart} | {eps_diff:.2g} | {image_diff} |"
        )
    lines += ["", f"torch {torch.__version__}, {torch.get_num_threads()} threads.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=variant_list, default=variant_list("bf16,cl,compile,compile+bf16"))
    p.add_argument("--requests", type=int, default=16, help="one-image guided requests: 2 rows each per forward")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-rows", type=int, default=32, help="CFG_MAX_BATCH_ROWS: the warm-up's row counts")
    p.add_argument("--cache-dir", help="the inductor cache (TORCHINDUCTOR_CACHE_DIR); default a fresh folder")
    p.add_argument("--restart", action="store_true", help="also time a compiled variant's warm-up in a new process")
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks/history.md")
    p.add_argument("--startup-only", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.startup_only:
        startup_only(args)
        return
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch reads it
    text = run(args, cache_dir)
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
