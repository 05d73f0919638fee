"""The timing helpers of bench/bench_gpu.py, its step-loop and service sections, and its DiT section: the
parts of issue 16's device check that time the sampler, the HTTP service and a latent model."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH, Settings  # noqa: E402
from app.models import load_checkpoint  # noqa: E402
from app.models.fast import FastDenoiser  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample  # noqa: E402
from bench.bench_service import in_process_engine, raw_images_per_s, serve  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Mean seconds per call after two warm calls, synchronized at both ends only."""
    fn(), fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def forward_inputs(rows: int, device: torch.device, shape=(1, 28, 28), classes: int = 10, null: int = 10):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn((rows, *shape), generator=g).to(device)
    t = torch.randint(0, 1000, (rows,), generator=g).to(device)
    y = torch.randint(0, classes, (rows,), generator=g).to(device)
    y[rows // 2 :] = null
    return x, t, y


def step_breakdown(loaded, denoisers: dict, device: torch.device, report: Any, n: int = 64) -> list[str]:
    """Where a tick of the step loop goes with n one-image requests together, 20 steps of the default sampler
    (and of the ancestral ones, whose steps add noise): the forward against the rest (each request's model
    input, then the guidance combine and the sampler step: diffusers' scheduler one request at a time, or
    app.sampling.batched's over all of them)."""
    from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, denoise_step

    m = loaded.manifest
    lines = [
        f"Step loop with {n} one-image requests, 20 steps (ms per tick, mean over the run):",
        "",
        "| sampler, guidance | forward | stepping | whole tick | forward alone | the rest (per request-step) |",
        "|---|---|---|---:|---:|---:|",
    ]
    cases = (
        (f"{DEFAULT_SAMPLER}, default (interval)", DEFAULT_SAMPLER, DEFAULT_GUIDANCE),
        (f"{DEFAULT_SAMPLER}, constant s = 3", DEFAULT_SAMPLER, GuidanceParams(3.0)),
        ("ddpm, constant s = 3", "ddpm", GuidanceParams(3.0)),
        ("euler_a, constant s = 3", "euler_a", GuidanceParams(3.0)),
    )
    for gname, sampler, g in cases:
        for fname, denoiser in denoisers.items():
            for stepping in ("per request (diffusers)", "together (batched)"):

                def runs(g=g, sampler=sampler, stepping=stepping):
                    return [
                        SampleRun(SampleSpec(class_label=i % 10, seeds=(i,), steps=20, sampler=sampler, guidance=g),
                                  loaded.scheduler_config, m.sample_shape, m.null_label, device=device,
                                  together=not stepping.startswith("per request"))
                        for i in range(n)
                    ]  # fmt: skip

                for _ in range(2):  # the second pass is timed
                    rs, rows = runs(), []
                    sync(device)
                    t0 = time.perf_counter()
                    while not rs[0].done:
                        rows.append(denoise_step(denoiser, rs))
                    sync(device)
                    whole = (time.perf_counter() - t0) / len(rows)
                fwd = []
                for r in sorted(set(rows)):
                    x, t, y = forward_inputs(r, device)
                    fwd += [time_call(lambda x=x, t=t, y=y, f=denoiser: f(x, t, y), device, 5)] * rows.count(r)
                fwd_ms = statistics.mean(fwd) * 1e3
                rest = whole * 1e3 - fwd_ms
                key = f"{gname} / {fname} / {stepping}"
                report.data.setdefault("step_breakdown", {})[key] = {"tick_ms": whole * 1e3, "forward_ms": fwd_ms}
                lines.append(
                    f"| {gname} | {fname} | {stepping} | {whole * 1e3:.2f} | {fwd_ms:.2f} | "
                    f"{rest:.2f} ({rest * 1e3 / n:.0f} us) |"
                )
    return lines


def sync_report(loaded, denoiser, device: torch.device) -> list[str]:
    """Host-device synchronizations in the step loop: torch's sync debug mode warns at each one; a few
    requests of each sampler, default guidance, are sampled under it and the distinct call sites counted."""
    import warnings

    sites: dict[str, int] = {}
    for sampler in ("dpmpp_2m_karras", "dpmpp_2m", "ddpm", "euler_a", "ddim"):
        runs = [
            SampleRun(
                SampleSpec(class_label=i, seeds=(i,), steps=6, sampler=sampler),
                loaded.scheduler_config,
                loaded.manifest.sample_shape,
                loaded.manifest.null_label,
                device=device,
            )
            for i in range(3)
        ]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample(denoiser, runs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            key = f"{sampler}: {str(w.message)[:80]} ({Path(w.filename).name}:{w.lineno})"
            sites[key] = sites.get(key, 0) + 1
    if not sites:
        return ["Host-device syncs over 6 steps of 3 requests, every sampler: none."]
    return [
        "Host-device syncs over 6 steps of 3 requests per sampler (torch.cuda.set_sync_debug_mode):",
        "",
        *(f"- {n} x {k}" for k, n in sorted(sites.items())),
    ]


async def load_process(url: str, clients: int, steps: int, warm: float, window: float, images: int = 1) -> dict:
    """closed_loop in a process of its own, so that the clients' Python does not share the server's event loop."""
    spec = json.dumps([url, clients, steps, warm, window, images])
    client = str(REPO / "bench" / "load_client.py")
    proc = await asyncio.create_subprocess_exec(sys.executable, client, spec, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"load generator exited with {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def service_async(args, report: Any) -> list[str]:
    device = torch.device(args.device)
    top = max(args.clients)
    settings = Settings(device=args.device, max_batch_rows=max(32, 2 * top), max_queue=4 * top, max_images=16)
    server, task, service = await serve(settings, args.port)
    url = f"http://127.0.0.1:{args.port}"
    engine = in_process_engine(service)
    if args.stand_in:
        # A forward that costs next to nothing (eps = 0), in the service and the raw loop alike: what is left
        # is the per-request cost of everything else, HTTP and sampler included (a stand-in, by design).
        engine._denoiser = lambda x, *rest: torch.zeros_like(x)
    try:
        served = service.model().info
        registry, labels = service.metrics.registry, {"model": service.model().name}

        def counters() -> list[float]:  # the engine's own: rows per forward and its step time, whole run so far
            names = ("cfg_engine_batch_rows_sum", "cfg_engine_batch_rows_count", "cfg_engine_step_duration_seconds_sum")
            return [registry.get_sample_value(n, labels) or 0.0 for n in names]

        async def level(clients: int, images: int = 1) -> dict:
            before, cpu = counters(), time.process_time()  # the server's process: its event loop and engine
            result = await load_process(url, clients, args.steps, args.warm, args.window, images)
            cpu_ms = 1e3 * (time.process_time() - cpu) / max(result["completed"], 1)
            rows, ticks, step_s = (b - a for a, b in zip(before, counters(), strict=True))
            per_tick = {"rows_per_forward": rows / max(ticks, 1), "step_ms": 1e3 * step_s / max(ticks, 1)}
            return {**result, **per_tick, "cpu_ms_per_response": cpu_ms}

        levels = {}
        for c in args.clients:
            levels[c] = await level(c)
        one = levels[args.clients[0]]["images_per_s"]
        lines = [
            *(
                ["**Stand-in forward** (eps = 0, no model): the service's cost without the model's.", ""]
                if args.stand_in
                else []
            ),
            f"`CFG_MAX_BATCH_ROWS={settings.max_batch_rows}`, precision {served['precision']}, CUDA graphs "
            f"{served.get('cuda_graphs')}, channels_last {served['channels_last']}; "
            f"closed-loop clients (bench/load_client.py, asyncio HTTP/1.1) in a process of their own, "
            f"each posting "
            f"one-image requests ({args.steps} dpmpp_2m steps, constant CFG s = 3: 2 rows per image-step) back to "
            f"back; responses finished inside a {args.window:g} s window after {args.warm:g} s of load.",
            "",
            "Rows per forward and the engine's step (ms) are the server's own counters over the whole level; the "
            "server's CPU per response is its process's CPU time (event loop and engine threads) over the level "
            "divided by the responses it completed.",
            "",
            "| clients | images/s | vs one at a time | p50 (s) | p99 (s) | rows per forward | engine step (ms) "
            "| server CPU per response (ms) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def row(name: str, lv: dict) -> str:
            ips = lv["images_per_s"]
            return (
                f"| {name} | {ips:.1f} | {ips / one:.2f}x | {lv['p50']:.3f} | {lv['p99']:.3f} | "
                f"{lv['rows_per_forward']:.1f} | {lv['step_ms']:.2f} | {lv['cpu_ms_per_response']:.2f} |"
            )

        lines += [row(str(c), lv) for c, lv in levels.items()]
        report.data["service"] = levels
        # The same clients with 4-image requests: the HTTP path paid once per 4 images.
        four = await level(top, images=4)
        report.data["service_4_images"] = four
        lines.append(row(f"{top}, 4 images per request", four))
        # Saturation against the raw loop at the same forward, in the engine's thread, alternating.
        loaded = await engine.run_in_worker(load_checkpoint, DEFAULT_MODEL_PATH, device)
        denoiser = engine.denoiser
        await engine.run_in_worker(raw_images_per_s, loaded, denoiser, top, 2, "dpmpp_2m", device)
        rounds = []
        for _ in range(args.rounds):
            svc = (await load_process(url, top, args.steps, args.warm / 2, args.window / 2))["images_per_s"]
            raw = await engine.run_in_worker(raw_images_per_s, loaded, denoiser, top, args.steps, "dpmpp_2m", device)
            rounds.append((raw, svc))
        ratios = sorted(s / r for r, s in rounds)
        report.data["saturation"] = rounds
        lines += [
            "",
            f"Service at {top} clients against the raw loop ({top} requests stepped together in the engine's thread), "
            f"{args.rounds} alternating rounds: median {statistics.median(ratios):.0%} "
            f"(range {ratios[0]:.0%}-{ratios[-1]:.0%}); raw {statistics.median(r for r, _ in rounds):.1f} images/s.",
        ]
        return lines
    finally:
        server.should_exit = True
        await task


def section_dit(args, report: Any) -> list[str]:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    from app.models.latent import DiTDenoiser, decode_latents

    device = torch.device(args.device)
    torch.manual_seed(0)
    size = (
        dict(num_layers=28, attention_head_dim=72, num_attention_heads=16)
        if not args.quick
        else dict(num_layers=2, attention_head_dim=16, num_attention_heads=2)
    )
    dit = DiTTransformer2DModel(
        in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000, **size
    )
    dit = dit.to(device).eval()
    vae = (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            sample_size=256,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
        )
        .to(device)
        .eval()
    )
    params = sum(p.numel() for p in dit.parameters())
    denoiser = DiTDenoiser(dit, eps_channels=4)
    lines = [f"DiT: {params / 1e6:.0f}M parameters (DiT-XL/2: 675M), 32x32x4 latents, 1000 classes, learned sigma.", ""]
    lines += [
        "| forward | " + " | ".join(f"{r} rows (ms)" for r in args.dit_rows) + " |",
        "|---" * (1 + len(args.dit_rows)) + "|",
    ]
    variants = [("fp32", denoiser), ("bf16 autocast", FastDenoiser(denoiser, device, "bf16"))]
    if device.type == "cuda":  # not yet served (app.loading.captures_cuda_graphs): this checks the capture
        top = max(args.dit_rows)
        variants += [
            ("CUDA graphs, fp32", FastDenoiser(denoiser, device, cuda_graphs=True, max_rows=top)),
            ("CUDA graphs + bf16", FastDenoiser(denoiser, device, "bf16", cuda_graphs=True, max_rows=top)),
        ]
    for name, fn in variants:
        ms = []
        try:
            for r in args.dit_rows:
                x, t, y = forward_inputs(r, device, (4, 32, 32), 1000, 1000)
                if name.startswith("CUDA graphs"):
                    with torch.inference_mode():
                        want = denoiser(x, t, y)
                    err = (fn(x, t, y) - want).abs().max().item()
                    report.data.setdefault("dit_graph_max_abs_err", {})[f"{name} {r}"] = err
                ms.append(time_call(lambda fn=fn, x=x, t=t, y=y: fn(x, t, y), device, max(2, args.repeat // 4)) * 1e3)
        except Exception as exc:  # a capture that fails is this check's finding, not the end of the section
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |")
            continue
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms) + " |")
        report.data.setdefault("dit_forward_ms", {})[name] = ms
    sched = DDIMScheduler(clip_sample=False).config

    def ours(n: int) -> float:
        runs = [
            SampleRun(
                SampleSpec(class_label=i, seeds=(i,), steps=10, sampler="ddim", guidance=GuidanceParams(4.0)),
                dict(sched),
                (4, 32, 32),
                1000,
                device=device,
            )
            for i in range(n)
        ]
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            sample(denoiser, runs)
            decode_latents(vae, torch.cat([r.latents for r in runs]), 0.18215)
        return n / (time.perf_counter() - t0)

    from diffusers import DiTPipeline

    pipe = DiTPipeline(dit, vae, DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)

    def theirs(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            pipe([i], num_inference_steps=10, guidance_scale=4.0, output_type="np")
        return n / (time.perf_counter() - t0)

    ours(1), theirs(1)
    one_pipe, one, many = theirs(args.dit_requests), ours(1), ours(args.dit_requests)
    report.data["dit_images_per_s"] = {"pipeline": one_pipe, "ours_1": one, f"ours_{args.dit_requests}": many}
    lines += [
        "",
        "| DDIM 10 steps, CFG s = 4, VAE decode included | images/s | vs DiTPipeline |",
        "|---|---:|---:|",
        f"| DiTPipeline, one request at a time | {one_pipe:.2f} | 1.00x |",
        f"| this project's sampler, 1 request | {one:.2f} | {one / one_pipe:.2f}x |",
        f"| this project's sampler, {args.dit_requests} requests together | {many:.2f} | {many / one_pipe:.2f}x |",
    ]
    return lines
