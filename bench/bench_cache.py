"""Step caching through the service (issue 27), run by hand (not in CI). Prints markdown and, with --record,
appends it to docs/benchmarks/history.md with the machine, the commit and the command.

    python3 bench/bench_cache.py --record

For each cache setting (--caches, the request's `cache` field as JSON; the first is the reference):
  1. FLOPs per image of the default request's whole sampling, from torch's FLOP counter, one request alone in
     the raw loop (app.sampling.sample over the served model's own forward);
  2. images/s and p50/p99 latency of the HTTP service under --clients closed-loop wrk connections, each posting
     the default request with that cache (a new class and seed each time), in alternating rounds: each round
     measures every setting once, so the machine's drift hits them all; images/s is the clients over wrk's mean
     latency (a closed loop: Little's law), and the result is the median over the rounds.

  3. PSNR against the first setting: --psnr-images one-image default requests (classes 0.., seeds 0..), each
     drawn alone in the raw loop with each setting, the decoded uint8 images compared.

The app runs in this process as `python -m app.serve` runs it (bench/bench_service.py's serve), with the
precision of CFG_PRECISION (fp32 by default). wrk: `scripts/install.sh --system` installs it.

With --dit-s2 it serves a DiT-S/2-sized latent model with random weights (bench/bench_dit.py's: 12 blocks, width
384, 32x32x4 latents, Stable Diffusion's VAE shape at 256 px) instead of the shipped UNet: for First-Block Cache,

    python3 bench/bench_cache.py --dit-s2 --clients 8 --warm 30 --window 60 --rounds 2 \
        --caches '{"kind": "none"}' '{"kind": "first_block", "threshold": 0.2}'

--dit-xl2 serves DiT-XL/2's size instead (28 blocks, width 1152: issue 26, on a lent GPU: bench/gpu/run.sh cache).
Its weights are random (nothing may be downloaded here): its speed is a DiT-S's, its images are no picture of
anything, and how often rows skip depends on how its residuals move, which random weights do not share with a
trained model. The PSNR there says how far a setting moves such a model's images, no more.

With --model FOLDER it serves that checkpoint instead: a trained one, such as the small pixel-space DiT that
`python -m research.train --arch dit` trains (docs/caching.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import PIPE
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.api.convert import to_spec  # noqa: E402
from app.api.schemas import build_generate_request  # noqa: E402
from app.config import Settings  # noqa: E402
from app.models.fast import FastDenoiser  # noqa: E402
from app.models.importer import import_model  # noqa: E402
from app.sampling import sample  # noqa: E402
from bench.bench_dit import dit_s2_pipeline  # noqa: E402
from bench.bench_service import in_process_engine, serve  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluate import git_commit, machine_description  # noqa: E402

DEFAULT_CACHES = (
    '{"kind": "none"}',
    '{"kind": "deepcache", "interval": 2, "branch": 0}',
    '{"kind": "deepcache", "interval": 3, "branch": 0}',
    '{"kind": "deepcache", "interval": 4, "branch": 0}',
)

# wrk's Lua hooks: the default request with the setting's cache, a new class and seed each time; at the end one
# line with the counts and the latency percentiles (microseconds).
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"class_label": %d, "seed": %d, "cache": CACHE}', n % 10, n)
  return wrk.format("POST", "/generate", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %.0f %.0f %.0f\\n", summary.requests, e.connect + e.read + e.write + e.timeout,
                         e.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def flops_per_image(service, engine, cache: dict) -> float:
    """The default request's FLOPs per image with this cache, one request of one image alone, in the raw loop: the
    model's own FLOPs, counted on its eager forward beneath the served one (no bucket padding, whatever the
    precision). Never under the served forward itself: a compiled forward (int8, CFG_COMPILE) called under a
    FlopCounterMode is traced again with the mode, and every later call ran ~4x slower (the int8 service at
    0.64x of fp32, measured 2026-12-05, where it runs at 2.2x)."""
    body = model_body(service, cache)
    run = engine.make_run(to_spec(body))
    denoiser = engine.denoiser
    model = denoiser.denoiser if isinstance(denoiser, FastDenoiser) else denoiser
    with FlopCounterMode(display=False) as counter:
        sample(model, [run])
    return counter.get_total_flops() / run.spec.num_images


def model_body(service, cache: dict, class_label: int = 3, seed: int = 1):
    """The validated default request with this cache, as the route builds it."""
    request = build_generate_request(service.limits)
    return request.model_validate({"class_label": class_label, "seed": seed, "cache": cache})


def images_alone(service, engine, cache: dict, count: int) -> np.ndarray:
    """`count` one-image default requests (class i, seed i) with this cache, each drawn alone: uint8 images."""
    out = []
    for i in range(count):
        run = engine.make_run(to_spec(model_body(service, cache, class_label=i, seed=i)))
        sample(engine.denoiser, [run])
        out.append(run.images())
    return np.concatenate(out)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images against the reference, over all of them (dB; inf: equal)."""
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


async def load_round(service, url: str, cache: dict, clients: int, warm: float, window: float) -> tuple[float, ...]:
    """wrk posting the default request with `cache` for warm + window seconds: (images/s, p50, p99, images/s counted
    in the window). images/s: the clients over the mean latency (a closed loop, Little's law): the server's count of
    finished images in a window moves in waves of `clients` images, too coarse for a 10 s window here."""
    script = Path(tempfile.mkdtemp()) / "cache.lua"
    script.write_text(WRK_SCRIPT.replace("CACHE", json.dumps(cache)))
    seconds = warm + window + 1
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "600s", "-s", str(script), url]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=PIPE)
    registry, labels = service.metrics.registry, {"model": service.model().name}
    await asyncio.sleep(warm)
    n0, t0 = registry.get_sample_value("cfg_images_generated_total", labels), time.perf_counter()
    await asyncio.sleep(window)
    n1, wall = registry.get_sample_value("cfg_images_generated_total", labels), time.perf_counter() - t0
    out = (await proc.communicate())[0].decode()
    engine = in_process_engine(service)
    while engine.active_requests or engine.queue_depth:  # requests cut off by wrk's end leave the batch
        await asyncio.sleep(0.1)
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    _, errors, non2xx, p50, p99, mean = (float(v) for v in line.split()[1:])
    if errors or non2xx:
        raise RuntimeError(f"wrk: {errors:g} socket errors, {non2xx:g} non-2xx responses\n{out}")
    if mean == 0:  # no response within wrk's run (a request outlasts it: a smoke run, a large model): no rate
        return math.nan, math.nan, math.nan, (n1 - n0) / wall
    return clients / (mean / 1e6), p50 / 1e6, p99 / 1e6, (n1 - n0) / wall


async def run(args: argparse.Namespace) -> list[str]:
    caches = [json.loads(c) for c in args.caches]
    url = f"http://127.0.0.1:{args.port}"
    settings = Settings(max_batch_rows=max(32, 2 * args.clients), max_queue=256)
    if args.dit_s2 or args.dit_xl2:
        folder, size = Path(tempfile.mkdtemp()), "xl2" if args.dit_xl2 else "s2"
        checkpoint, _ = import_model(dit_s2_pipeline(folder / "dit", size), f"dit-{size}-256", folder / "store")
        settings = Settings(model_path=checkpoint, max_batch_rows=max(32, 2 * args.clients), max_queue=256)
    elif args.model is not None:
        settings = Settings(model_path=args.model, max_batch_rows=max(32, 2 * args.clients), max_queue=256)
    server, serving, service = await serve(settings, args.port)
    engine = in_process_engine(service)
    try:
        flops = [await engine.run_in_worker(flops_per_image, service, engine, c) for c in caches]
        drawn = [await engine.run_in_worker(images_alone, service, engine, c, args.psnr_images) for c in caches]
        rounds: list[list[tuple[float, ...]]] = [[] for _ in caches]
        for _ in range(args.rounds):
            for k, cache in enumerate(caches):
                rounds[k].append(await load_round(service, url, cache, args.clients, args.warm, args.window))
    finally:
        server.should_exit = True
        await serving
    info = service.model().info
    model = f"model {info['id']}"
    if args.dit_s2 or args.dit_xl2:
        model = f"a DiT-{'XL' if args.dit_xl2 else 'S'}/2-sized model with random weights (speed only)"
    out = [
        f"## Step caching through the service, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
        "",
        f"- machine: {machine_description()}",
        f"- command: `python3 {' '.join(sys.argv)}`",
        f"- {model}; PSNR: {args.psnr_images} one-image default requests drawn alone with each setting, against the "
        "first setting's",
        f"- the default request (20 {info['default_sampler']} steps, its guidance interval), one image per request, "
        f"{args.clients} wrk connections back to back; forward: precision {info['precision']}, channels_last "
        f"{info['channels_last']}, compiled {info['compile']} (a cached forward runs eager)",
        f"- {args.rounds} rounds, each setting a {args.warm + args.window + 1:g} s wrk run; images/s: {args.clients} "
        "clients over wrk's mean latency (a closed loop), median over the rounds; latency: wrk's, per response, median "
        f"over the rounds; counted: the server's count of finished images in a {args.window:g} s window after "
        f"{args.warm:g} s (coarse: images finish in waves of up to {args.clients})",
        "",
        "| cache | FLOPs per image (M) | FLOP cut | PSNR (dB) | images/s | vs no cache | p50 (s) | p99 (s) "
        "| images/s by round | counted images/s by round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base_ips = statistics.median(r[0] for r in rounds[0]) or float("nan")  # no image in a window: too short
    for cache, f, measured, images in zip(caches, flops, rounds, drawn, strict=True):
        ips = statistics.median(r[0] for r in measured)
        p50, p99 = (statistics.median(r[i] for r in measured) for i in (1, 2))
        by_round = ", ".join(f"{r[0]:.2f}" for r in measured)
        counted = ", ".join(f"{r[3]:.1f}" for r in measured)
        out.append(
            f"| `{json.dumps(cache)}` | {f / 1e6:.0f} | {flops[0] / f:.2f}x | {psnr(images, drawn[0]):.1f} "
            f"| {ips:.2f} | {ips / base_ips:.2f}x "
            f"| {p50:.2f} | {p99:.2f} | {by_round} | {counted} |"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caches", nargs="+", default=list(DEFAULT_CACHES), help="cache settings as JSON, first: base")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm", type=float, default=5.0, help="seconds of load before a window")
    p.add_argument("--window", type=float, default=10.0, help="seconds measured per setting and round")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--psnr-images", type=int, default=8, help="images per setting for the PSNR column")
    p.add_argument("--dit-s2", action="store_true", help="serve a DiT-S/2-sized model with random weights")
    p.add_argument("--dit-xl2", action="store_true", help="the same at DiT-XL/2's size (28 blocks, width 1152)")
    p.add_argument("--model", type=Path, default=None, help="serve this checkpoint folder (default: the shipped one)")
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks/history.md")
    args = p.parse_args()
    publish(asyncio.run(run(args)), args.record)


if __name__ == "__main__":
    main()
