"""The training command: its learning-rate and loss-weight functions, and a tiny real run on the Debian data."""

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
