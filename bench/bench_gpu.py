"""Issue 16's whole check of the CUDA path, in one run of a few minutes on a lent GPU machine.

    bash bench/gpu/prepare.sh                  # here, on the CPU machine: wheels and the dataset
    device run: bash bench/gpu/run.sh          # there: this script, results under $OUT

It writes gpu.md (markdown for docs/benchmarks.md, with the card's name) and gpu.json to --out as each
section ends, so a run cut short still returns what it measured. Sections, each timed as ratios in the
same run:
  1. tests/test_cuda.py: the service on CUDA, CPU against GPU for the same seed, batch invariance;
  2. the forward: fp32 eager, TF32, bf16 and fp16 autocast, compiled (app/models/fast.py) and CUDA graphs
     replayed, at a few row counts; one 2B-row forward against two B-row ones;
  3. the service (uvicorn in this process, httpx clients) at 1, 16 and 64 concurrent clients: images/s,
     p50 and p99 latency; and at saturation against the raw loop in the engine's thread;
  4. app.evaluate on the GPU at s = 1 and 3 against the CPU's docs/quality.json;
  5. a DiT-XL/2-sized model (random weights, 256 px) with an SD-shaped VAE: forwards, and images/s of
     DiTPipeline one at a time against this project's sampler at 1 and 16 requests together.
`--device cpu --quick` runs every section small on the CPU, to check the script before spending device time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH, Settings  # noqa: E402
from app.evaluation.provenance import git_commit, machine_description  # noqa: E402
from app.models import load_checkpoint, model_denoiser  # noqa: E402
from app.models.fast import FastDenoiser  # noqa: E402
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample  # noqa: E402
from bench.bench_service import raw_images_per_s, serve  # noqa: E402


class Report:
    """Markdown and JSON, rewritten to --out after every section."""

    def __init__(self, out: Path) -> None:
        self.out, self.lines, self.data = out, [], {}
        out.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        self.lines += [
            f"## The GPU path on {card} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()})",
            "",
            f"- machine: {machine_description()}; CUDA {torch.version.cuda}; card: {card}",
            f"- command: `python3 bench/bench_gpu.py {' '.join(sys.argv[1:])}`",
            "",
        ]
        self.data["card"] = card

    def section(self, title: str, fn: Callable[[], list[str]]) -> None:
        t0 = time.perf_counter()
        self.lines += [f"### {title}", ""]
        try:
            self.lines += fn()
        except Exception:  # a broken section is reported and the next one still runs
            self.lines += ["```", traceback.format_exc()[-3000:], "```"]
        self.lines += ["", f"({time.perf_counter() - t0:.0f} s)", ""]
        self.flush()

    def flush(self) -> None:
        (self.out / "gpu.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "gpu.json").write_text(json.dumps(self.data, indent=2, default=str))


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


def section_tests(args) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-rs"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    (args.out / "pytest.txt").write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-12:]
    return ["`pytest -q tests/test_cuda.py` (full output in pytest.txt):", "", "```", *tail, "```"]


def section_forward(args, report: Report) -> list[str]:
    device = torch.device(args.device)
    loaded = load_checkpoint(DEFAULT_MODEL_PATH, device)
    base = model_denoiser(loaded)
    variants: dict[str, Callable] = {"fp32 eager": base}
    if device.type == "cuda":
        top = max(args.rows)
        variants["bf16 autocast"] = FastDenoiser(base, device, "bf16")
        variants["fp16 autocast"] = FastDenoiser(base, device, "fp16")
        variants["CUDA graphs, fp32 (CFG_CUDA_GRAPHS)"] = FastDenoiser(base, device, cuda_graphs=True, max_rows=top)
        variants["CUDA graphs + fp16 (CFG_PRECISION=auto)"] = FastDenoiser(
            base, device, "fp16", cuda_graphs=True, max_rows=top
        )
        variants["CUDA graphs + bf16"] = FastDenoiser(base, device, "bf16", cuda_graphs=True, max_rows=top)
    else:
        variants["bf16 autocast"] = FastDenoiser(base, device, "bf16")
    if not args.skip_compile:
        variants["compiled (CFG_COMPILE)"] = FastDenoiser(base, device, "fp32", compile=True, max_rows=max(args.rows))
    rows_list = args.rows
    table = {name: {} for name in variants}
    compile_s = {}
    for name, fn in variants.items():
        for rows in rows_list:
            x, t, y = forward_inputs(rows, device)
            if name.startswith("compiled"):
                t0 = time.perf_counter()
                fn(x, t, y)
                sync(device)
                compile_s[rows] = time.perf_counter() - t0
            table[name][rows] = time_call(lambda fn=fn, x=x, t=t, y=y: fn(x, t, y), device, args.repeat)
    # TF32 (cuDNN's default for convolutions) against strict fp32, at the same rows.
    tf32 = {}
    if device.type == "cuda":
        before = torch.backends.cudnn.allow_tf32
        for allow in (False, True):
            torch.backends.cudnn.allow_tf32 = allow
            tf32[allow] = {
                r: time_call(lambda r=r: base(*forward_inputs(r, device)), device, args.repeat) for r in rows_list
            }
        torch.backends.cudnn.allow_tf32 = before
    report.data["forward_ms"] = {k: {r: v * 1e3 for r, v in d.items()} for k, d in table.items()}
    report.data["compile_s"] = compile_s
    head = (
        "| forward | "
        + " | ".join(f"{r} rows (ms)" for r in rows_list)
        + " | "
        + " | ".join(f"vs eager at {r}" for r in rows_list)
        + " |"
    )
    lines = [head, "|---" * (1 + 2 * len(rows_list)) + "|"]
    eager = table["fp32 eager"]
    for name, d in table.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{d[r] * 1e3:.2f}" for r in rows_list)
            + " | "
            + " | ".join(f"{eager[r] / d[r]:.2f}x" for r in rows_list)
            + " |"
        )
    if compile_s:
        lines += [
            "",
            "First call (compile) per row count: " + ", ".join(f"{r}: {s:.0f} s" for r, s in compile_s.items()),
        ]
    if tf32:
        lines += [
            "",
            "cuDNN TF32 off / on, ms: "
            + ", ".join(f"{r} rows {tf32[False][r] * 1e3:.2f} / {tf32[True][r] * 1e3:.2f}" for r in rows_list),
        ]
    # One 2B-row forward against two B-row ones (the cond and uncond halves apart).
    lines += ["", "| B | one 2B-row forward (ms) | two B-row forwards (ms) | speed-up |", "|---|---:|---:|---:|"]
    for b in args.pair_rows:
        x, t, y = forward_inputs(2 * b, device)
        joint = time_call(lambda x=x, t=t, y=y: base(x, t, y), device, args.repeat)
        split = time_call(
            lambda x=x, t=t, y=y, b=b: (base(x[:b], t[:b], y[:b]), base(x[b:], t[b:], y[b:])),
            device,
            args.repeat,
        )
        lines.append(f"| {b} | {joint * 1e3:.2f} | {split * 1e3:.2f} | {split / joint:.2f}x |")
        report.data.setdefault("pair", {})[b] = [joint, split]
    fast = variants.get("CUDA graphs, fp32 (CFG_CUDA_GRAPHS)")
    lines += ["", *step_breakdown(loaded, {"eager": base, **({"CUDA graphs": fast} if fast else {})}, device, report)]
    if device.type == "cuda":
        lines += ["", *sync_report(loaded, fast or base, device)]
    return lines


def step_breakdown(loaded, denoisers: dict, device: torch.device, report: Report, n: int = 64) -> list[str]:
    """Where a tick of the step loop goes with n one-image requests together, 20 steps of the default sampler:
    the forward against the rest (each request's model input, then the guidance combine and the sampler
    step: diffusers' scheduler one request at a time, or app.sampling.batched's over all of them)."""
    from app.sampling import DEFAULT_GUIDANCE
    from app.sampling.run import denoise_step

    m = loaded.manifest
    lines = [
        f"Step loop with {n} one-image requests, 20 steps of the default sampler (ms per tick, mean over the run):",
        "",
        "| guidance | forward | stepping | whole tick | forward alone | the rest (per request-step) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for gname, g in (("default (interval)", DEFAULT_GUIDANCE), ("constant s = 3", GuidanceParams(3.0))):
        for fname, denoiser in denoisers.items():
            for stepping in ("per request (diffusers)", "together (batched)"):

                def runs(g=g, stepping=stepping):
                    rs = [
                        SampleRun(SampleSpec(class_label=i % 10, seeds=(i,), steps=20, guidance=g),
                                  loaded.scheduler_config, m.sample_shape, m.null_label, device=device)
                        for i in range(n)
                    ]  # fmt: skip
                    if stepping.startswith("per request"):
                        for r in rs:
                            r.table = None
                    return rs

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


async def service_async(args, report: Report) -> list[str]:
    device = torch.device(args.device)
    top = max(args.clients)
    settings = Settings(device=args.device, max_batch_rows=max(32, 2 * top), max_queue=4 * top, max_images=16)
    server, task, service = await serve(settings, args.port)
    url = f"http://127.0.0.1:{args.port}"
    engine = service.engine
    if args.stand_in:
        # A forward that costs next to nothing (eps = 0), in the service and the raw loop alike: what is left
        # is the per-request cost of everything else, HTTP and sampler included (a stand-in, by design).
        engine._denoiser = lambda x, *rest: torch.zeros_like(x)
    try:
        served = service.model().info
        levels = {}
        for c in args.clients:
            levels[c] = await load_process(url, c, args.steps, args.warm, args.window)
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
            "| clients | images/s | vs one at a time | p50 (s) | p99 (s) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c, lv in levels.items():
            ips = lv["images_per_s"]
            lines.append(f"| {c} | {ips:.1f} | {ips / one:.2f}x | {lv['p50']:.3f} | {lv['p99']:.3f} |")
        report.data["service"] = levels
        # The same clients with 4-image requests: the HTTP path paid once per 4 images.
        four = await load_process(url, top, args.steps, args.warm, args.window, images=4)
        report.data["service_4_images"] = four
        lines.append(
            f"| {top}, 4 images per request | {four['images_per_s']:.1f} | {four['images_per_s'] / one:.2f}x | "
            f"{four['p50']:.3f} | {four['p99']:.3f} |"
        )
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


def section_evaluate(args) -> list[str]:
    """app.evaluate at s = 1 and 3 against the CPU's docs/quality.json, then the default request at fp32, bf16
    and fp16 at the same seeds (app.evaluation.steps). Both score with the CPU's cached classifier where
    prepare.sh carried it (.data/classifier.safetensors), so the figures compare with the CPU's."""
    common = ["--per-class", str(args.eval_per_class), "--data-dir", str(args.data_dir), "--device", args.device]
    carried = args.data_dir / "classifier.safetensors"
    if carried.exists():
        common += ["--classifier-cache", str(carried)]
    scratch = Path("/tmp/gpu-evaluate")
    cmd = [sys.executable, "-m", "app.evaluate", "--scales", "1,3", *common, "--report", str(args.out / "evaluate.md"),
           "--json", str(args.out / "evaluate.json"), "--img-dir", str(scratch)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return ["```", (proc.stdout + proc.stderr)[-3000:], "```"]
    gpu = json.loads((args.out / "evaluate.json").read_text())
    cpu = json.loads((REPO / "docs" / "quality.json").read_text())

    def by_scale(d):
        return {float(r["guidance_scale"]): r for r in d["results"]}

    lines = [
        f"`{' '.join(cmd[1:])}` (GPU n = {10 * args.eval_per_class} per scale; CPU n = {10 * cpu['per_class']})",
        "",
        "| s | accuracy GPU | accuracy CPU (docs/quality.json) | FID GPU | FID CPU |",
        "|---:|---:|---:|---:|---:|",
    ]
    g, c = by_scale(gpu), by_scale(cpu)
    for s in sorted(g):
        cs = c.get(s, {})
        lines.append(
            f"| {s:g} | {g[s]['accuracy']:.3f} | {cs.get('accuracy', float('nan')):.3f} | "
            f"{g[s]['fid']:.2f} | {cs.get('fid', float('nan')):.2f} |"
        )
    precisions = "fp32,bf16,fp16" if args.device.startswith("cuda") else "fp32,bf16"
    cmd = [sys.executable, "-m", "app.evaluation.steps", "--samplers", "dpmpp_2m_karras", "--steps", "20",
           "--precisions", precisions, *common, "--report", str(args.out / "precision.md"),
           "--json", str(args.out / "precision.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return [*lines, "", "```", (proc.stdout + proc.stderr)[-3000:], "```"]
    table = json.loads((args.out / "precision.json").read_text())
    lines += ["", f"Precision at the same seeds, the default request: `{' '.join(cmd[1:])}`", ""]
    lines += ["| precision | accuracy | FID | diversity |", "|---|---:|---:|---:|"]
    for r in table["results"]:
        lines.append(f"| {r['precision']} | {r['accuracy']:.3f} | {r['fid']:.2f} | {r['diversity']:.3f} |")
    return lines


def section_dit(args, report: Report) -> list[str]:
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
    if device.type == "cuda":  # not yet served (app.main.captures_cuda_graphs): this checks the capture
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=REPO / "gpu-out")
    p.add_argument("--data-dir", type=Path, default=REPO / ".data")
    p.add_argument("--quick", action="store_true", help="everything small: a dry run of the script on the CPU")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--only", default="tests,forward,service,evaluate,dit", help="sections to run")
    p.add_argument("--port", type=int, default=8777)
    p.add_argument("--stand-in", action="store_true", help="service section: a zero-cost forward, not the model")
    args = p.parse_args()
    q = args.quick
    args.rows = [2, 8] if q else [2, 8, 32, 128]
    args.pair_rows = [1, 4] if q else [1, 8, 64]
    args.repeat = 3 if q else 20
    args.clients = [1, 4] if q else [1, 16, 64]
    args.steps = 4 if q else 20
    args.warm, args.window, args.rounds = (1.0, 3.0, 2) if q else (3.0, 8.0, 5)
    args.eval_per_class = 4 if q else 64
    args.dit_rows = [2, 4] if q else [2, 32]
    args.dit_requests = 2 if q else 16
    report = Report(args.out)
    only = set(args.only.split(","))
    if "tests" in only:
        report.section("1. tests/test_cuda.py", lambda: section_tests(args))
    if "forward" in only:
        report.section("2. The forward", lambda: section_forward(args, report))
    if "service" in only:
        report.section("3. The service at 1, 16 and 64 clients", lambda: asyncio.run(service_async(args, report)))
    if "evaluate" in only:
        report.section("4. app.evaluate on the GPU", lambda: section_evaluate(args))
    if "dit" in only:
        report.section("5. A DiT-XL/2-sized latent model at 256 px", lambda: section_dit(args, report))
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
