"""Issue 16's whole check of the CUDA path, in one run of a few minutes on a lent GPU machine.

    bash bench/gpu/prepare.sh                  # here, on the CPU machine: wheels and the dataset
    device run: bash bench/gpu/run.sh          # there: this script, results under $OUT

It writes gpu.md (markdown for docs/benchmarks.md, with the card's name) and gpu.json to --out as each
section ends, so a run cut short still returns what it measured. Sections, each timed as ratios in the
same run:
  1. tests/test_cuda.py: the service on CUDA, CPU against GPU for the same seed, batch invariance;
  2. the forward: fp32 eager, TF32, bf16 and fp16 autocast, compiled (app/models/fast.py) and CUDA graphs
     replayed, at a few row counts; one 2B-row forward against two B-row ones;
  3. the service (uvicorn in this process; bench/load_client.py's asyncio clients in another) at 1, 16 and
     64 concurrent clients and at 64 with 4-image requests: images/s, p50 and p99 latency, rows per forward,
     the engine's step and the server's CPU per response; and at saturation against the raw loop;
  4. research.evaluate on the GPU at s = 1 and 3 against the CPU's docs/quality.json;
  5. a DiT-XL/2-sized model (random weights, 256 px) with an SD-shaped VAE: forwards, and images/s of
     DiTPipeline one at a time against this project's sampler at 1 and 16 requests together.
`--device cpu --quick` runs every section small on the CPU, to check the script before spending device time.
Sections 2's step loop, 3 and 5 live in bench/gpu_sections.py, with the timing helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.models import load_checkpoint, model_denoiser  # noqa: E402
from app.models.fast import FastDenoiser  # noqa: E402
from bench.gpu_sections import (  # noqa: E402
    forward_inputs,
    section_dit,
    service_async,
    step_breakdown,
    sync,
    sync_report,
    time_call,
)
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402


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


def section_evaluate(args) -> list[str]:
    """research.evaluate at s = 1 and 3 against the CPU's docs/quality.json, then the default request at fp32, bf16
    and fp16 at the same seeds (research.evaluation.steps). Both score with the CPU's cached classifier where
    prepare.sh carried it (.data/classifier.safetensors), so the figures compare with the CPU's."""
    common = ["--per-class", str(args.eval_per_class), "--data-dir", str(args.data_dir), "--device", args.device]
    carried = args.data_dir / "classifier.safetensors"
    if carried.exists():
        common += ["--classifier-cache", str(carried)]
    scratch = Path("/tmp/gpu-evaluate")
    cmd = [sys.executable, "-m", "research.evaluate", "--scales", "1,3", *common,
           "--report", str(args.out / "evaluate.md"), "--json", str(args.out / "evaluate.json"),
           "--img-dir", str(scratch)]  # fmt: skip
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
    cmd = [sys.executable, "-m", "research.evaluation.steps", "--samplers", "dpmpp_2m_karras", "--steps", "20",
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
        report.section("4. research.evaluate on the GPU", lambda: section_evaluate(args))
    if "dit" in only:
        report.section("5. A DiT-XL/2-sized latent model at 256 px", lambda: section_dit(args, report))
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
