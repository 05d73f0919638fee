"""bench/bench_cache.py runs end to end on the real checkpoint with wrk (1 s windows: a smoke run, its images/s
meaningless): FLOPs, PSNR and the service's rows for two settings, so an API change that breaks the bench fails
here rather than at the next measurement. Its FLOPs are not noisy: DeepCache at interval 3 cuts them 1.90x. The same
with --model on the shipped small DiT and First-Block Cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.deploy.support import free_port, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def bench_rows(caches: list[dict], *extra: str) -> list[list[str]]:
    """The bench's table rows, one per cache setting, for a 1 s smoke run."""
    require_tool("wrk")  # scripts/install.sh --system installs it
    argv = [sys.executable, "bench/bench_cache.py", "--rounds", "1", "--warm", "1", "--window", "1", *extra]
    argv += ["--clients", "2", "--psnr-images", "1", "--port", str(free_port()), "--caches", *map(json.dumps, caches)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| `")]
    assert [json.loads(r[0].strip().strip("`")) for r in rows] == caches, out.stdout[-3000:]
    return [[c.strip() for c in r] for r in rows]


def test_the_cache_bench_prints_flops_psnr_and_images_per_s_for_each_setting():
    none, cached = bench_rows([{"kind": "none"}, {"kind": "deepcache", "interval": 3, "branch": 0}])
    assert none[2] == "1.00x" and none[3] == "inf"  # the reference against itself
    assert cached[2] == "1.90x" and 10 < float(cached[3]) < 60  # the FLOP cut; a PSNR of changed images
    assert float(none[4]) > 0 and float(cached[4]) > 0  # images/s through the service


def test_with_model_it_serves_the_given_checkpoint_a_trained_dit_with_first_block():
    model = ["--model", "model_store/fashion-mnist-dit"]
    none, cached = bench_rows([{"kind": "none"}, {"kind": "first_block", "threshold": 0.3}], *model)
    assert none[2] == "1.00x" and none[3] == "inf"
    assert float(cached[2].removesuffix("x")) > 1.5  # 2.09x measured (docs/benchmarks.md): rows skip their blocks
    assert float(none[4]) > 0 and float(cached[4]) > 0


def test_dit_s2_serves_a_dit_s2_sized_latent_model_with_first_block():
    """--dit-s2 (its figures in docs/benchmarks.md): a DiT-S/2-sized latent model with random weights, imported as a
    user's DiTPipeline is. Its requests outlast a 1 s window here, so images/s may be nan (no response within wrk's
    run), which the bench prints rather than failing; FLOPs and PSNR do not depend on the window."""
    none, cached = bench_rows([{"kind": "none"}, {"kind": "first_block", "threshold": 0.3}], "--dit-s2")
    assert none[2] == "1.00x" and none[3] == "inf"
    assert float(cached[2].removesuffix("x")) > 2  # 3.94x measured at 0.3 (docs/benchmarks.md)
    assert 10 < float(cached[3]) < 60  # a PSNR of changed images
    assert all(v == "nan" or float(v) > 0 for v in (none[4], cached[4]))


def test_flops_are_counted_on_the_eager_model_beneath_the_served_forward(loaded, denoiser, monkeypatch):
    """A compiled forward (int8, CFG_COMPILE) called under a FlopCounterMode is traced again with the mode, and every
    later call ran ~4x slower: the int8 service measured 0.64x of fp32's images/s, where it runs at 2.2x. So the
    bench counts the FLOPs on the eager model the served FastDenoiser wraps. Stand-in for the compiled forward: a
    FastDenoiser (fp32, not compiled: compiling takes minutes) whose own call fails the test."""
    from types import SimpleNamespace

    import torch

    from app.api.schemas import Limits
    from app.models.fast import FastDenoiser, fast_denoiser
    from bench.bench_cache import flops_per_image
    from tests.engine.test_engine import make_client

    engine = make_client(loaded, fast_denoiser(denoiser, torch.device("cpu"))).engine
    service = SimpleNamespace(limits=Limits((("m", tuple(loaded.manifest.class_names)),), 8, 100, 20, 20.0, 1.0))
    monkeypatch.setattr(FastDenoiser, "__call__", lambda *a, **k: pytest.fail("counted under the served forward"))
    flops = flops_per_image(service, engine, {"kind": "none"})
    assert round(flops / 1e6) == 15053  # the shipped UNet's default request (docs/benchmarks.md)
