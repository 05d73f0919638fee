"""Benchmarks for the service, run by hand (not in CI). Prints markdown and, with --record,
appends it to docs/benchmarks/history.md with the machine, the commit and the command.

    python3 bench/bench_service.py --record

Every comparison is a ratio measured in the same run, on the same machine:
  1. one 2B-row forward vs two B-row forwards (cond and uncond apart), B = 1, 4, 16;
  2. raw in-process sampling loop: images/s against rows per forward (where it peaks sets the
     default CFG_MAX_BATCH_ROWS);
  3. the HTTP service: images/s and p50/p95/p99 latency at 1, 4 and 16 concurrent clients,
     against one request at a time;
  4. the service at saturation (steady state, read from its own counters) against the raw loop at
     the same rows per forward, in short alternating rounds (the median of the per-round ratios).

The app runs in this process as `python -m app.serve` runs it (uvicorn's event loop in the main
thread), and every model timing, the raw loop's included, runs in the engine's own thread
(`Engine.run_in_worker`). The load generator is wrk (apt-get install wrk), over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import PIPE
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import uvicorn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.api.service import Service  # noqa: E402
from app.config import DEFAULT_MODEL_PATH, Settings  # noqa: E402
from app.engine import Engine, InProcessClient  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import load_checkpoint  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample  # noqa: E402
from bench.record import record  # noqa: E402
from research.evaluate import git_commit, machine_description  # noqa: E402


def timed_pair(a, b, repeat: int) -> tuple[float, float]:
    """Mean seconds per call of a and of b, called in alternation so that the machine's drift hits both."""
    a(), b()  # warm
    ta = tb = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        ta, tb = ta + t1 - t0, tb + time.perf_counter() - t1
    return ta / repeat, tb / repeat


def bench_forward(loaded, denoiser, sizes, repeat) -> list[str]:
    rows = ["| B | one 2B-row forward (ms) | two B-row forwards (ms) | speed-up |", "|---|---|---|---|"]
    null = loaded.manifest.null_label
    for b in sizes:
        x = torch.randn(b, 1, 28, 28)
        t = torch.full((b,), 500)
        y, n = torch.randint(0, 10, (b,)), torch.full((b,), null)

        def joint_forward(x=x, t=t, y=y, n=n):  # the concatenation is part of the batched step's cost
            return denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, n]))

        def two_forwards(x=x, t=t, y=y, n=n):
            return denoiser(x, t, y), denoiser(x, t, n)

        joint, apart = timed_pair(joint_forward, two_forwards, repeat)
        rows.append(f"| {b} | {joint * 1e3:.1f} | {apart * 1e3:.1f} | {apart / joint:.2f}x |")
    return rows


def raw_images_per_s(
    loaded, denoiser, n_requests: int, steps: int, sampler: str = "ddpm", device: torch.device | str = "cpu"
) -> float:
    """The in-process loop: n single-image guided requests stepped together (2n rows per forward), up to
    their uint8 images (which, on a GPU, waits for the device)."""
    runs = [
        SampleRun(
            SampleSpec(class_label=i % 10, seeds=(i,), steps=steps, sampler=sampler, guidance=GuidanceParams(3.0)),
            loaded.scheduler_config,
            loaded.manifest.sample_shape,
            loaded.manifest.null_label,
            device=device,
        )
        for i in range(n_requests)
    ]
    t0 = time.perf_counter()
    sample(denoiser, runs)
    for run in runs:
        run.images()
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


# wrk's Lua hooks: every request a new seed and class, uncached as the raw loop (no model default cache); at the
# end one line with the counts and the latency percentiles (microseconds).
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"class_label": %d, "steps": STEPS, "seed": %d, "guidance_scale": 3, "sampler": "ddpm", '
                             .. '"schedule": {"kind": "constant"}, "cache": {"kind": "none"}}', n % 10, n)
  return wrk.format("POST", "/generate", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %.0f %.0f %.0f\\n", summary.requests, e.connect + e.read + e.write + e.timeout,
                         e.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Level:
    images_per_s: float  # rows computed in the window / (2 rows per image-step x steps) / window
    mean_rows: float  # rows per forward, from the server's cfg_engine_batch_rows
    step_s: float  # mean engine step (forward + sampler steps), from cfg_engine_step_duration_seconds
    wall_per_tick_s: float


@dataclass(frozen=True)
class WrkStats:
    responses_per_s: float  # over wrk's whole run, start-up and the cut-off end included
    p50_s: float
    p95_s: float
    p99_s: float


class WrkLoad:
    """`clients` closed-loop connections from wrk, each posting single-image requests back to back.

    wrk is one C process with one epoll thread, so the load generator takes little of the 2 cores
    it shares with the server (a Python client with a thread per connection took about 2% of one).
    Throughput is read from the server's own counters inside a window, so neither the first wave's
    start nor the requests cut off when wrk stops count: images/s is the rows the engine computed
    over the rows an image needs (2 per step), which in steady state is the rate of finished images."""

    NAMES = ("cfg_engine_batch_rows_sum", "cfg_engine_batch_rows_count", "cfg_engine_step_duration_seconds_sum")

    def __init__(self, service: Service, proc: asyncio.subprocess.Process, steps: int, seconds: float) -> None:
        self.service, self.proc, self.steps, self.seconds = service, proc, steps, seconds

    @classmethod
    async def start(cls, service: Service, url: str, clients: int, steps: int, seconds: float) -> WrkLoad:
        script = Path(tempfile.mkdtemp()) / "generate.lua"
        script.write_text(WRK_SCRIPT.replace("STEPS", str(steps)))
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "600s", "-s", str(script), url]
        return cls(service, await asyncio.create_subprocess_exec(*cmd, stdout=PIPE), steps, seconds)

    def _sample(self) -> list[float]:
        registry = self.service.metrics.registry
        labels = {"model": self.service.model().name}  # the engine's series carry the model's name
        values = [registry.get_sample_value(n, labels) for n in self.NAMES]
        missing = [n for n, v in zip(self.NAMES, values, strict=True) if v is None]
        if missing:
            raise RuntimeError(f"the service exports no {', '.join(missing)}")
        return [float(v or 0) for v in values]

    async def window(self, seconds: float) -> Level:
        m0, t0 = self._sample(), time.perf_counter()
        await asyncio.sleep(seconds)
        m1, wall = self._sample(), time.perf_counter() - t0
        rows, ticks, step = (b - a for a, b in zip(m0, m1, strict=True))
        return Level(rows / (2 * self.steps) / wall, rows / ticks, step / ticks, wall / ticks)

    async def finish(self, stop: bool = False) -> WrkStats:
        """Wait for the end of wrk's run (stop: end it now), and check that every response was a 2xx."""
        if stop:
            self.proc.send_signal(signal.SIGINT)  # wrk stops and prints its summary
        out = (await self.proc.communicate())[0].decode()
        engine = in_process_engine(self.service)
        while engine.active_requests or engine.queue_depth:  # requests cut off by wrk's end leave the batch
            await asyncio.sleep(0.1)
        line = next(x for x in out.splitlines() if x.startswith("WRK "))
        responses, errors, non2xx, p50, p95, p99 = (float(v) for v in line.split()[1:])
        if errors or non2xx:
            raise RuntimeError(f"wrk: {errors:g} socket errors, {non2xx:g} non-2xx responses\n{out}")
        return WrkStats(responses / self.seconds, p50 / 1e6, p95 / 1e6, p99 / 1e6)


def in_process_engine(service: Service) -> Engine:
    """The default model's engine, which the benches time in its own thread (the service runs it in its process:
    CFG_ENGINE_PROCESS off, as serve() builds it)."""
    client = service.model().client
    if not isinstance(client, InProcessClient):
        raise RuntimeError("the benches time the engine in the API's process: unset CFG_ENGINE_PROCESS")
    return client.engine


async def serve(settings: Settings, port: int) -> tuple[uvicorn.Server, asyncio.Task, Service]:
    """The app in this process, as `python -m app.serve` runs it: uvicorn's event loop in the main thread,
    the model in the engine's thread. This process's main thread runs no torch op (see app/engine)."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not getattr(getattr(app.state, "service", None), "ready", False):
        if task.done():
            task.result()
        await asyncio.sleep(0.2)
    return server, task, app.state.service


async def run(args: argparse.Namespace) -> str:
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    max_rows = max(32, 2 * top)
    url = f"http://127.0.0.1:{args.port}"
    settings = Settings(max_batch_rows=max_rows, max_queue=256)  # CFG_PRECISION and CFG_COMPILE from the environment
    server, serving, service = await serve(settings, args.port)
    engine = in_process_engine(service)
    try:
        # Every timing of the model, raw loop included, runs in the engine's thread: the same thread, process
        # and OpenMP team as the service's own forwards.
        loaded = await engine.run_in_worker(load_checkpoint, DEFAULT_MODEL_PATH, "cpu")
        denoiser = engine.denoiser  # the service's own forward: CFG_PRECISION and CFG_COMPILE apply to both sides
        model_info = service.model().info
        out = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}", "",
               f"- machine: {machine_description()}", f"- command: `python3 {' '.join(sys.argv)}`",
               f"- {args.steps} DDPM steps per request, guidance scale 3, one image per request",
               f"- forward: precision {model_info['precision']}, compiled {settings.compile}",
               ""]  # fmt: skip

        out += ["### 1. One 2B-row forward vs two B-row forwards", ""]
        out += await engine.run_in_worker(bench_forward, loaded, denoiser, (1, 4, 16), 20) + [""]

        out += ["### 2. Raw in-process loop: images/s by rows per forward", ""]
        rows_table, best_rows = await engine.run_in_worker(bench_rows, loaded, denoiser, args.steps)
        out += rows_table + ["", f"Peak at {best_rows} rows per forward.", ""]

        results = {}
        for c in levels:
            load = await WrkLoad.start(service, url, c, args.steps, args.warm + args.window + 1)
            await asyncio.sleep(args.warm)
            level = await load.window(args.window)
            results[c] = (level, await load.finish())

        # Service at saturation vs the raw loop at the rows per forward the service ran at. This
        # machine's speed drifts by +-20% within seconds, so the two alternate in short rounds: a
        # window of the loaded service, then the raw loop in the engine's thread, which pauses the
        # batch between two ticks; the median of the per-round ratios is the result.
        n_raw = max(1, round(results[top][0].mean_rows / 2))
        await engine.run_in_worker(raw_images_per_s, loaded, denoiser, n_raw, 2)  # warm this shape
        load = await WrkLoad.start(service, url, top, args.steps, 3600)
        await asyncio.sleep(args.warm)
        rounds = []
        for _ in range(args.rounds):
            svc = await load.window(args.round_window)
            raw = await engine.run_in_worker(raw_images_per_s, loaded, denoiser, n_raw, args.steps)
            await asyncio.sleep(0.5)  # the tick that waited for the raw loop lands outside the next window
            rounds.append((raw, svc))
        await load.finish(stop=True)
    finally:
        server.should_exit = True
        await serving

    base = results[levels[0]][0].images_per_s
    out += ["### 3. The HTTP service at 1, 4 and 16 concurrent clients", "",
            f"CFG_MAX_BATCH_ROWS={max_rows}. Load: `wrk -t1 -c<clients>`, each connection posting single-image "
            f"requests back to back; measured over {args.window:g} s after {args.warm:g} s of load. Images/s: rows "
            "the engine computed in the window (server counters) / 2 rows per image-step; responses/s: wrk's "
            "count over its whole run (start-up and the cut-off end included); latency: wrk, per response.", "",
            "| clients | images/s | vs one at a time | responses/s | mean rows per forward | p50 (s) | p95 (s) "
            "| p99 (s) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c, (r, w) in results.items():
        out.append(f"| {c} | {r.images_per_s:.2f} | {r.images_per_s / base:.2f}x | {w.responses_per_s:.2f} | "
                   f"{r.mean_rows:.1f} | {w.p50_s:.2f} | {w.p95_s:.2f} | {w.p99_s:.2f} |")  # fmt: skip

    out += ["", "### 4. Service at saturation vs the raw loop", "",
            f"{args.rounds} rounds, each a {args.round_window:g} s window of the service under {top} wrk connections "
            f"(measured as in section 3), then the raw loop with {n_raw} requests stepped together ({2 * n_raw} rows "
            "per forward) in the engine's thread between two of the service's ticks (the batch waits, then resumes "
            "as it was; 0.5 s pass before the next window). "
            "Per tick: the raw loop's wall time; the service's engine step (`cfg_engine_step_duration_seconds`: one "
            "forward and the sampler steps, in the worker thread) and its wall time, which adds the event loop's "
            "work between forwards.", "",
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
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    out += [
        f"| median | {raw_med:.2f} | {svc_med:.2f} | {statistics.median(ratios):.0%} | | | | |",
        "",
        f"Per-round ratios: quartiles {q1:.0%} and {q3:.0%}, range {min(ratios):.0%} to {max(ratios):.0%}.",
        "",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--window", type=float, default=12.0, help="seconds measured per concurrency level")
    p.add_argument("--warm", type=float, default=4.0, help="seconds of load before a window (longer than a request)")
    p.add_argument("--rounds", type=int, default=20, help="alternating service/raw rounds for the saturation ratio")
    p.add_argument("--round-window", type=float, default=3.0, help="seconds of service load measured per round")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks/history.md")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("argument --rounds: at least 2 (the per-round ratios' quartiles need two)")
    if shutil.which("wrk") is None:
        sys.exit("error: the load generator is wrk: apt-get install wrk")
    text = asyncio.run(run(args))
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
