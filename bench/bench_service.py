"""Benchmarks for the service, run by hand (not in CI). Prints markdown and, with --record,
appends it to docs/benchmarks.md with the machine, the commit and the command.

    python3 bench/bench_service.py --record

Every comparison is a ratio measured in the same run, on the same machine:
  1. one 2B-row forward vs two B-row forwards (cond and uncond apart), B = 1, 4, 16;
  2. raw in-process sampling loop: images/s against rows per forward (where it peaks sets the
     default CFG_MAX_BATCH_ROWS);
  3. the HTTP service: images/s and p50/p95/p99 latency at 1, 4 and 16 concurrent clients,
     against one request at a time;
  4. the service at saturation against the raw loop at the same rows per forward, in alternating
     rounds (the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.evaluate import git_commit, machine_description  # noqa: E402
from app.models import load_checkpoint, unet_denoiser  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_forward(loaded, denoiser, sizes, repeat) -> list[str]:
    rows = ["| B | one 2B-row forward (ms) | two B-row forwards (ms) | speed-up |", "|---|---|---|---|"]
    null = loaded.manifest.null_label
    for b in sizes:
        x = torch.randn(b, 1, 28, 28)
        t = torch.full((b,), 500)
        y, n = torch.randint(0, 10, (b,)), torch.full((b,), null)

        def joint_forward(x=x, t=t, y=y, n=n):  # the concatenation is part of the batched step's cost
            return denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, n]))

        joint = timed(joint_forward, repeat)
        apart = timed(lambda x=x, t=t, y=y, n=n: (denoiser(x, t, y), denoiser(x, t, n)), repeat)
        rows.append(f"| {b} | {joint * 1e3:.1f} | {apart * 1e3:.1f} | {apart / joint:.2f}x |")
    return rows


def raw_images_per_s(loaded, denoiser, n_requests: int, steps: int) -> float:
    """The in-process loop: n single-image guided requests stepped together (2n rows per forward)."""
    runs = [
        SampleRun(
            SampleSpec(class_label=i % 10, seeds=(i,), steps=steps, sampler="ddpm", guidance=GuidanceParams(3.0)),
            loaded.scheduler_config,
            (1, 28, 28),
            loaded.manifest.null_label,
        )  # fmt: skip
        for i in range(n_requests)
    ]
    t0 = time.perf_counter()
    sample(denoiser, runs)
    return n_requests / (time.perf_counter() - t0)


def bench_rows(loaded, denoiser, steps) -> tuple[list[str], int]:
    rows = ["| rows per forward | requests | images/s |", "|---|---|---|"]
    best = (0.0, 0)
    for n in (1, 2, 4, 8, 16, 32, 64):
        raw_images_per_s(loaded, denoiser, n, 2)  # warm this shape
        ips = raw_images_per_s(loaded, denoiser, n, steps)
        rows.append(f"| {2 * n} | {n} | {ips:.2f} |")
        best = max(best, (ips, 2 * n))
    return rows, best[1]


class Server:
    def __init__(self, port: int, env: dict[str, str], clients: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.clients = [httpx.Client(timeout=600) for _ in range(clients)]  # created once, reused
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve", "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env={**os.environ, **env},
        )  # fmt: skip
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def histogram(self, name: str) -> tuple[float, float]:
        """(sum, count) of one of the server's histograms, read from /metrics."""
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith((f"{name}_sum ", f"{name}_count ")):
                key, value = line.split()
                values[key] = float(value)
        return values[f"{name}_sum"], values[f"{name}_count"]

    def stop(self) -> None:
        for http in self.clients:
            http.close()
        self.proc.terminate()
        self.proc.wait(60)


def load(server: Server, clients: int, per_client: int, steps: int) -> tuple[float, list[float]]:
    """Closed loop: each client sends per_client single-image requests back to back.

    The clients are the server's long-lived httpx.Client objects, not new ones per run (each builds
    an SSL context, even for plain HTTP): the load generator shares the server's 2 cores, and with a
    Client per run its process used about 7% of them at 16 clients."""

    def client(c: int) -> list[float]:
        lat = []
        http = server.clients[c]
        for i in range(per_client):
            body = {"class_label": (c + i) % 10, "steps": steps, "seed": c * 1000 + i, "guidance_scale": 3,
                    "sampler": "ddpm"}  # fmt: skip
            t0 = time.perf_counter()
            r = http.post(f"{server.url}/generate", json=body)
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lats = [x for lat in pool.map(client, range(clients)) for x in lat]
    return len(lats) / (time.perf_counter() - t0), lats


@dataclass(frozen=True)
class Level:
    images_per_s: float
    latencies: list[float]
    mean_rows: float  # rows per forward, from the server's cfg_engine_batch_rows
    step_s: float  # mean engine step (forward + sampler steps), from cfg_engine_step_duration_seconds
    wall_per_tick_s: float


def measure_level(server: Server, clients: int, per_client: int, steps: int) -> Level:
    s0, n0 = server.histogram("cfg_engine_batch_rows")
    d0, _ = server.histogram("cfg_engine_step_duration_seconds")
    t0 = time.perf_counter()
    ips, lats = load(server, clients, per_client, steps)
    wall = time.perf_counter() - t0
    s1, n1 = server.histogram("cfg_engine_batch_rows")
    d1, _ = server.histogram("cfg_engine_step_duration_seconds")
    ticks = n1 - n0
    return Level(ips, lats, (s1 - s0) / ticks, (d1 - d0) / ticks, wall / ticks)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=5, help="alternating raw/service rounds for the saturation ratio")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    args = p.parse_args()

    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    denoiser = unet_denoiser(loaded.unet)
    out = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}", "",
           f"- machine: {machine_description()}", f"- command: `python3 {' '.join(sys.argv)}`",
           f"- {args.steps} DDPM steps per request, guidance scale 3, one image per request", ""]  # fmt: skip

    out += ["### 1. One 2B-row forward vs two B-row forwards", ""]
    out += bench_forward(loaded, denoiser, (1, 4, 16), repeat=20) + [""]

    out += ["### 2. Raw in-process loop: images/s by rows per forward", ""]
    rows_table, best_rows = bench_rows(loaded, denoiser, args.steps)
    out += rows_table + ["", f"Peak at {best_rows} rows per forward.", ""]

    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    max_rows = max(32, 2 * top)
    server = Server(args.port, {"CFG_MAX_BATCH_ROWS": str(max_rows), "CFG_MAX_QUEUE": "256"}, clients=top)
    try:
        results = {}
        for c in levels:
            load(server, c, 1, 2)  # warm the clients' connections
            results[c] = measure_level(server, c, max(1, args.requests // c), args.steps)
        # Service at saturation vs the raw loop at the rows per forward the service ran at, in
        # alternating rounds: this machine's speed drifts by +-20% over minutes, so each round's
        # ratio compares two runs a few seconds apart, and the median ratio is the result.
        n_raw = max(1, round(results[top].mean_rows / 2))
        raw_images_per_s(loaded, denoiser, n_raw, 2)  # warm this shape
        rounds = []
        for _ in range(args.rounds):
            raw = raw_images_per_s(loaded, denoiser, n_raw, args.steps)
            svc = measure_level(server, top, max(1, args.requests // top), args.steps)
            rounds.append((raw, svc))
    finally:
        server.stop()

    base = results[levels[0]].images_per_s
    out += ["### 3. The HTTP service at 1, 4 and 16 concurrent clients", "",
            f"CFG_MAX_BATCH_ROWS={max_rows}; each client sends single-image requests back to back.", "",
            "| clients | images/s | vs one at a time | mean rows per forward | p50 (s) | p95 (s) | p99 (s) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c, r in results.items():
        lat = r.latencies
        out.append(f"| {c} | {r.images_per_s:.2f} | {r.images_per_s / base:.2f}x | {r.mean_rows:.1f} | "
                   f"{pct(lat, 50):.2f} | {pct(lat, 95):.2f} | {pct(lat, 99):.2f} |")  # fmt: skip

    out += ["", "### 4. Service at saturation vs the raw loop", "",
            f"{args.rounds} alternating rounds: the raw in-process loop with {n_raw} requests together "
            f"({2 * n_raw} rows per forward), then the service with {top} concurrent clients. Per tick: the raw "
            "loop's wall time; the service's engine step (`cfg_engine_step_duration_seconds`: one forward and "
            "the sampler steps, in the worker thread) and its wall time, which adds the event loop's work "
            "between forwards.", "",
            "| round | raw images/s | service images/s | service / raw | raw tick (ms) | service rows per forward "
            "| service engine step (ms) | service wall per tick (ms) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ratios = []
    for k, (raw, svc) in enumerate(rounds, 1):
        ratios.append(svc.images_per_s / raw)
        raw_tick = n_raw / raw / args.steps  # every tick of the raw loop advances all n_raw requests
        out.append(f"| {k} | {raw:.2f} | {svc.images_per_s:.2f} | {ratios[-1]:.0%} | {raw_tick * 1e3:.1f} | "
                   f"{svc.mean_rows:.1f} | {svc.step_s * 1e3:.1f} | {svc.wall_per_tick_s * 1e3:.1f} |")  # fmt: skip
    raw_med = statistics.median(raw for raw, _ in rounds)
    svc_med = statistics.median(svc.images_per_s for _, svc in rounds)
    out += [f"| median | {raw_med:.2f} | {svc_med:.2f} | {statistics.median(ratios):.0%} | | | | |", ""]
    text = "\n".join(out) + "\n"
    print(text)
    if args.record:
        path = REPO / "docs" / "benchmarks.md"
        if not path.exists():
            path.write_text("# Benchmarks\n\nRecorded by `bench/bench_service.py --record`; newest last.\n\n")
        with open(path, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
