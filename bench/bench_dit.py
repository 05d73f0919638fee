"""A DiT-S/2-sized latent model at 256 px on this machine, run by hand (not in CI). Prints markdown and, with
--record, appends it to docs/benchmarks/history.md with the machine, the commit and the command.

    python3 bench/bench_dit.py --record

The weights are random (nothing may be downloaded here); the architecture and the shapes are DiT-S/2's
(Peebles & Xie 2023: 12 layers, width 384, 6 heads, patch 2, 1000 classes, learned sigma) on 32x32x4
latents, with Stable Diffusion's AutoencoderKL (256 px RGB). It compares, in images per second:
  1. diffusers' DiTPipeline, called one request at a time in this process;
  2. the service (python -m app.serve on the imported checkpoint) with 1 client, requests one at a time;
  3. the service with 8 concurrent clients.
Every request is one image of a class with constant CFG at s = 4 (DiTPipeline's default guidance: two rows
per image at every step) and DDIM, the same steps everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.models.importer import import_model  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluate import git_commit, machine_description  # noqa: E402

# name -> (attention heads, head width, blocks): DiT's sizes at patch 2 (Peebles and Xie 2023)
DIT_SIZES = {"s2": (6, 64, 12), "xl2": (16, 72, 28)}


def dit_s2_pipeline(path: Path, size: str = "s2") -> Path:
    """A DiTPipeline of a DiT-S/2-sized (or `size`: DIT_SIZES) transformer with random weights and Stable
    Diffusion's VAE shape, at 256 px, saved to path."""
    torch.manual_seed(0)
    heads, width, blocks = DIT_SIZES[size]
    dit = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width,
        in_channels=4,
        out_channels=8,
        num_layers=blocks,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=2,
        sample_size=256,
    )
    DiTPipeline(dit, vae, DDIMScheduler(clip_sample=False)).save_pretrained(path)
    return path


def pipeline_images_per_s(source: Path, requests: int, steps: int) -> float:
    pipe = DiTPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    pipe([1], num_inference_steps=2, guidance_scale=4.0)  # warm
    t0 = time.perf_counter()
    for i in range(requests):
        pipe([i % 1000], num_inference_steps=steps, guidance_scale=4.0, output_type="np")
    return requests / (time.perf_counter() - t0)


def start_server(checkpoint: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "CFG_MODEL_PATH": str(checkpoint),
        "CFG_MAX_IMAGES": "8",
        "CFG_MAX_BATCH_ROWS": "16",
        "CFG_REQUEST_TIMEOUT_S": "3600",
    }
    cmd = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(1)
    raise TimeoutError("server not ready")


async def service_images_per_s(url: str, clients: int, requests: int, steps: int) -> float:
    body = {"num_images": 1, "steps": steps, "sampler": "ddim", "guidance_scale": 4.0, "cache": {"kind": "none"}}
    body["schedule"] = {"kind": "constant"}
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            r = await http.post(f"{url}/generate", json={**body, "class_label": i % 1000, "seed": i})
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=3600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return requests / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = dit_s2_pipeline(Path(tmp) / "dit-s2")
        checkpoint, _ = import_model(source, "dit-s2-256", Path(tmp) / "store")
        pipeline = pipeline_images_per_s(source, args.requests, args.steps)
        proc = start_server(checkpoint, args.port, Path(tmp) / "server.log")
        try:
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(service_images_per_s(url, 1, 1, 2))  # one request end to end, decode included
            one = asyncio.run(service_images_per_s(url, 1, args.requests, args.steps))
            eight = asyncio.run(service_images_per_s(url, 8, args.requests, args.steps))
        finally:
            proc.terminate()
            proc.wait(timeout=120)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    publish(
        [
            f"## A DiT-S/2-sized latent model at 256 px ({now}, commit {git_commit()})",
            "",
            f"Machine: {machine_description()}. Command: `python3 bench/bench_dit.py"
            f"{' --record' if args.record else ''}`. Random weights of DiT-S/2's shape (32x32x4 latents, "
            f"1000 classes, learned sigma) and Stable Diffusion's VAE shape (256 px); {args.requests} one-image "
            f"requests, DDIM {args.steps} steps, constant CFG s = 4 (two rows per image at every step), the VAE "
            "decode included.",
            "",
            "| | images/s | vs DiTPipeline |",
            "|---|---:|---:|",
            f"| DiTPipeline, one request at a time | {pipeline:.3f} | 1.00x |",
            f"| service, 1 client | {one:.3f} | {one / pipeline:.2f}x |",
            f"| service, 8 concurrent clients | {eight:.3f} | {eight / pipeline:.2f}x |",
            "",
        ],
        args.record,
    )


if __name__ == "__main__":
    main()
