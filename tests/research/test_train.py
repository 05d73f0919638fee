"""The training command: its learning-rate and loss-weight functions, and a tiny real run on the Debian data."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler

from app.models import load_checkpoint
from research.train import autocast_dtype, lr_at, main, min_snr_weights


def test_lr_warms_up_then_decays_to_zero_at_the_last_step():
    assert lr_at(0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 10) == pytest.approx(0.5)
    assert lr_at(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_lr_follows_the_wall_clock_when_it_runs_out_first():
    # Step 20 of 1000 is early, but 3/4 of --max-minutes is spent: the decay follows the clock.
    assert lr_at(20, 1000, 10, time_fraction=0.75) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lr_at(20, 1000, 10, time_fraction=1.5) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, 1000, 10, time_fraction=0.9) == pytest.approx(0.6)  # warmup is by steps


def test_min_snr_weights_are_min_snr_gamma_over_snr():
    ac = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    t = torch.tensor([0, 50, 300, 999])
    snr = ac[t] / (1 - ac[t])
    w = min_snr_weights(ac, t, 5.0)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0  # the nearly clean step is weighted down, the noisiest not
    assert torch.equal(min_snr_weights(ac, t, 0.0), torch.ones(4))


def test_autocast_dtype_follows_the_precision_flag():
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16


@pytest.mark.slow  # trains for real: half a minute on the shared 2 cores
def test_tiny_run_writes_a_loadable_checkpoint_that_records_its_history(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--steps", "2", "--batch-size", "8", "--channels", "8,16,32", "--warmup", "1", "--save-every", "0"]
    main(["--out", str(first), *common])
    main(["--out", str(second), "--init-from", str(first), "--precision", "fp32", *common])
    assert f"wrote {second}" in capsys.readouterr().out
    loaded = load_checkpoint(second)
    training = loaded.manifest.training
    assert training["steps_done"] == 2 and training["autocast"] == "fp32" and training["snr_gamma"] == 5.0
    assert training["init_from_training"]["out"] == str(first)  # the run it continued, with its settings
    assert json.loads((second / "manifest.json").read_text())["weights_sha256"] == loaded.manifest.weights_sha256


def test_a_tiny_dit_run_writes_a_dit_checkpoint_that_draws_with_first_block_cache(tmp_path):
    """--arch dit: a pixel-space DiT checkpoint that loads, and that research.generate draws with, a First-Block
    Cache included (the path docs/caching.md's trained-DiT table takes)."""
    from app.models import model_denoiser
    from app.models.latent import DiTDenoiser
    from app.sampling import SampleSpec
    from app.sampling.cache import FirstBlockParams
    from research.generate import generate

    out = tmp_path / "dit"
    main(["--out", str(out), "--arch", "dit", "--dit", "2,2,8,4", "--steps", "2", "--batch-size", "8"])
    loaded = load_checkpoint(out)
    assert loaded.manifest.kind == "dit" and (out / "transformer").is_dir() and not (out / "unet").exists()
    assert isinstance(model_denoiser(loaded), DiTDenoiser)
    spec = SampleSpec(class_label=3, seeds=(1, 2), steps=4, sampler="dpmpp_2m_karras")
    plain, cached = generate(loaded, [spec, dataclasses.replace(spec, cache=FirstBlockParams(1.0))])
    assert plain.shape == cached.shape == (2, 28, 28, 1)
    assert not (plain == cached).all()  # threshold 1: every row after its first step skips the blocks after the first
