"""int8 forwards (app/models/quantize.py) on the real shipped checkpoint: calibrated on the model's own
sampling, compiled by inductor to oneDNN's int8 kernels."""

import sys

import numpy as np
import pytest
import torch

from app.engine.calibrate import calibration_inputs, model_calibrator
from app.models import precision
from app.models.fast import INT8_MAX_ROWS, FastDenoiser, PrecisionError, fast_denoiser, resolve_precision
from app.models.quantize import Int8Unavailable, quantize_int8
from app.sampling import DEFAULT_GUIDANCE, SampleSpec, sample
from tests.models.test_fast import SHAPE, make_run, random_batch

pytestmark = pytest.mark.integration  # int8 numerics

CPU = torch.device("cpu")
# int8 activations and weights, conv_in and conv_out fp32: eps within ~0.05% of fp32's in mean square on
# this model (measured 3e-5 to 4.5e-4 on random inputs at 1 to 4 rows; 1e-4 to 1e-3 with conv_in and conv_out
# quantized too); a 20-step image within a few grey levels on average (measured 1.1 below, 1.1 to 5.0 over
# three classes: a sampling trajectory amplifies small changes).
INT8_EPS_REL_MSE = 2e-3
INT8_IMAGE_MEAN_LEVELS = 4.0


# The int8 forward is served only on CPUs with int8 dot products (app/models/precision.py): elsewhere
# resolve_precision refuses it, which test_int8_is_refused_without_int8_dot_products checks on any CPU.
needs_int8_dot = pytest.mark.skipif(
    not precision.cpu_has_int8_dot(), reason=f"this CPU has none of {precision.INT8_DOT_FLAGS}: int8 is refused here"
)


@pytest.fixture(scope="module")
def int8(real_loaded, real_denoiser) -> FastDenoiser:
    """The int8 denoiser at max_rows 4: buckets of 2 and 4 rows, both compiled by the calls below."""
    loaded, denoiser = real_loaded, real_denoiser  # module-scoped: the session's real model
    return fast_denoiser(denoiser, CPU, "int8", max_rows=4, calibrate=model_calibrator(loaded, denoiser))


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_calibration_sees_every_noise_level_and_every_label(loaded, denoiser):
    m = loaded.manifest
    inputs = calibration_inputs(denoiser, loaded.scheduler_config, SHAPE, m.null_label, m.num_classes, steps=20)
    assert len(inputs) == 20  # dpmpp_2m: one forward a step
    assert all(x.shape[0] == 2 * m.num_classes for x, _, _ in inputs)  # a conditional and a null row per class
    timesteps = torch.cat([t for _, t, _ in inputs])
    assert timesteps.max() >= 900 and timesteps.min() <= 100
    assert set(torch.cat([y for _, _, y in inputs]).tolist()) == set(range(m.num_classes + 1))


@needs_int8_dot
def test_int8_eps_is_close_to_fp32_and_not_fp32(loaded, denoiser, int8):
    for rows in (1, 2, 3, 4):
        batch = random_batch(loaded, rows, seed=rows)
        got, want = int8(*batch), denoiser(*batch)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert 1e-7 < rel_mse(got, want) < INT8_EPS_REL_MSE  # quantized (not the fp32 forward), and close
    ops = {str(n.target) for n in int8._int8.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops), ops


@needs_int8_dot
def test_int8_keeps_the_first_and_last_convolutions_fp32(loaded, int8):
    """Every convolution reads an int8 weight (through a dequantize) but conv_in and conv_out, whose weights
    are the float parameters themselves."""
    convs = [n for n in int8._int8.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    float_weights = [n for n in convs if n.args[1].op == "get_attr"]
    unet = loaded.unet
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    assert sorted(tuple(n.args[1].meta["val"].shape) for n in float_weights) == sorted(
        [tuple(unet.conv_in.weight.shape), tuple(unet.conv_out.weight.shape)]
    )


@needs_int8_dot
def test_int8_rows_do_not_depend_on_their_batch(loaded, int8):
    x, t, y = random_batch(loaded, 9, seed=11)  # more than the largest bucket: chunks of 4, 4 and 1 (padded to 2)
    together = int8(x, t, y)
    alone = torch.cat([int8(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(9)])
    # Static activation scales: a row's int8 arithmetic is its own (measured: identical).
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert int8.buckets == (2, 4) and int8.chunk == 4


@needs_int8_dot
def test_int8_images_are_close_to_fp32(loaded, denoiser, int8):
    spec = SampleSpec(class_label=3, seeds=(1, 2), steps=20, guidance=DEFAULT_GUIDANCE)
    images = {}
    for name, d in (("fp32", denoiser), ("int8", int8)):
        run = make_run(loaded, spec)
        sample(d, [run])
        images[name] = run.images().astype(np.int16)
    diff = np.abs(images["int8"] - images["fp32"])
    assert 0 < diff.mean() <= INT8_IMAGE_MEAN_LEVELS, diff.mean()


@needs_int8_dot
def test_int8_with_embed_delta_runs_the_fp32_forward(loaded, denoiser, int8):
    x, t, y = random_batch(loaded, 2, seed=5)
    delta = torch.randn(2, denoiser.class_embedding(0).shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(int8(x, t, y, delta), denoiser(x, t, y, delta))


def test_int8_is_refused_where_it_cannot_run(dit_loaded, denoiser):
    with pytest.raises(Int8Unavailable, match="quantizes UNet checkpoints.*is a dit"):
        model_calibrator(dit_loaded, denoiser)
    with pytest.raises(PrecisionError, match="int8 runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="int8 needs calibrate"):
        FastDenoiser(denoiser, CPU, "int8")
    assert resolve_precision("auto", CPU) != "int8"  # opt-in by name only
    assert INT8_MAX_ROWS < 64  # diffusers' UNet branches on 64 rows, which the exported graph cannot cover


def test_int8_without_torchao_says_how_to_install_it(monkeypatch, loaded, denoiser):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", None)
    with pytest.raises(Int8Unavailable, match=r"needs torchao.*pip install -e '\.\[int8\]'"):
        model_calibrator(loaded, denoiser)
    with pytest.raises(Int8Unavailable, match="needs torchao"):
        quantize_int8(denoiser, [random_batch(loaded, 2)])


def test_int8_is_refused_without_int8_dot_products(monkeypatch):
    """On a CPU without VNNI or AMX, oneDNN's int8 convolutions saturate: the service refuses int8 and says why."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(PrecisionError, match="int8 dot products.*avx512_vnni.*use fp32"):
        resolve_precision("int8", CPU)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert resolve_precision("int8", CPU) == "int8"
