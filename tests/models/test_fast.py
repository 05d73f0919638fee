"""The faster forwards of app/models/fast.py, on the real shipped checkpoint."""

import numpy as np
import pytest
import torch

from app.models import unet_denoiser
from app.models.attention import Perturbation, PerturbationError, RowPerturbations
from app.models.fast import FastDenoiser, PrecisionError, fast_denoiser, pad_rows, resolve_precision, row_buckets
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleRun, SampleSpec, sample

pytestmark = pytest.mark.integration  # compiled forwards, bit-equal to eager

SHAPE = (1, 28, 28)
CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: eps differs from fp32's by up to ~0.03 on this model, and a 20-step run's
# images by about a grey level on average, a few pixels by more (measured on the 3453-step weights: at most 3
# of 255 with DDIM and DDPM; after 2173 more (issue 10): mean 0.91, 99th percentile 6, max 9 with DDIM).
BF16_EPS_ATOL = 0.1
BF16_IMAGE_MEAN_LEVELS = 2.0
BF16_IMAGE_LEVELS = 16
# Under bf16 an image should still not depend on what it was batched with. oneDNN's bf16 convolutions on
# this CPU round each row alike whatever the batch (measured: identical latents), but another CPU's kernels
# (AMX) may block rows differently; this bounds what we accept: below one bf16 rounding step of the latents.
BF16_BATCH_ATOL = 4e-3
BF16_BATCH_RTOL = 4e-3


def make_run(loaded, spec):
    return SampleRun(spec, loaded.scheduler_config, SHAPE, loaded.manifest.null_label)


def random_batch(loaded, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *SHAPE, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    labels = torch.randint(0, loaded.manifest.null_label + 1, (rows,), generator=g)
    return x, t, labels


# ---- precision settings ----------------------------------------------------------------------------------


def test_fp32_is_fp32_everywhere():
    assert resolve_precision("fp32", CPU) == "fp32"


def test_fp16_on_the_cpu_is_a_clear_error():
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device.*use bf16 or fp32"):
        resolve_precision("fp16", CPU)


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8, auto"):
        resolve_precision("int4", CPU)


def test_cuda_graphs_need_a_cuda_device(denoiser):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        FastDenoiser(denoiser, CPU, cuda_graphs=True)
    assert fast_denoiser(denoiser, CPU, cuda_graphs=True).cuda_graphs is False  # the service's setting: ignored


def test_auto_is_bf16_on_a_cpu_with_amx_and_fp32_on_others(monkeypatch):
    """bf16 autocast served 1.4x fp32's images/s on an Intel CPU with AMX-BF16 at the same quality, and 0.87x on an
    AVX512-BF16 CPU without AMX (docs/benchmarks.md): auto picks it where the CPU has AMX only (on a GPU, fp16:
    tests/test_cuda.py). Never int8."""
    from app.models import fast
    from app.models.precision import cpu_flags

    expected = "bf16" if "amx_bf16" in cpu_flags() else "fp32"
    assert resolve_precision("auto", CPU) == expected  # this machine's own flags
    monkeypatch.setattr(fast, "cpu_has_amx_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(fast, "cpu_has_amx_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CPU) == "fp32"  # a precision named is kept


# ---- buckets and padding ---------------------------------------------------------------------------------


def test_row_buckets_are_powers_of_two_up_to_max_rows():
    assert row_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert row_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert row_buckets(1) == (1,)


def test_each_row_count_runs_at_the_next_bucket(denoiser):
    assert FastDenoiser(denoiser, CPU, max_rows=32).buckets == ()  # eager: every call at its own row count
    fast = FastDenoiser(denoiser, CPU, compile=True, max_rows=32)  # compiles at the first call, not here
    assert [fast.bucket(r) for r in (1, 2, 3, 5, 16, 17, 32, 40)] == [1, 2, 4, 8, 16, 32, 32, 40]


def test_padding_repeats_the_last_row_and_keeps_the_rows():
    x, t = torch.arange(6.0).reshape(3, 2), torch.tensor([5, 6, 7])
    px, pt = pad_rows((x, t), 4)
    assert px.shape == (4, 2) and torch.equal(px[:3], x) and torch.equal(px[3], x[2])
    assert pt.tolist() == [5, 6, 7, 7]
    same = pad_rows((x, t), 3)[0]
    assert torch.equal(same, x) and same is not x  # a new tensor either way (see pad_rows)


# ---- the forward -----------------------------------------------------------------------------------------


def test_fp32_wrapper_is_the_plain_forward(loaded, denoiser):
    fast = fast_denoiser(denoiser, CPU, "fp32")
    x, t, labels = random_batch(loaded, 6)
    assert torch.equal(fast(x, t, labels), denoiser(x, t, labels))


def test_channels_last_gives_the_same_eps(loaded):
    import copy

    from app.models.fast import to_channels_last

    plain = unet_denoiser(loaded.unet)
    nhwc = FastDenoiser(unet_denoiser(to_channels_last(copy.deepcopy(loaded.unet))), CPU, channels_last=True)
    x, t, labels = random_batch(loaded, 5)
    eps = nhwc(x, t, labels)
    assert eps.is_contiguous() and torch.allclose(eps, plain(x, t, labels), atol=1e-4)


def test_bf16_forward_returns_fp32_close_to_fp32(loaded, denoiser):
    fast = fast_denoiser(denoiser, CPU, "bf16")
    x, t, labels = random_batch(loaded, 8)
    eps = fast(x, t, labels)
    want = denoiser(x, t, labels)
    assert eps.dtype == torch.float32 and eps.shape == want.shape
    assert (eps - want).abs().max() < BF16_EPS_ATOL
    assert not torch.equal(eps, want)  # autocast did run the forward in bf16


def test_bf16_keeps_the_latents_fp32_and_the_images_close(loaded, denoiser):
    spec = SampleSpec(class_label=7, seeds=(5, 6), steps=20, sampler="ddim", guidance=DEFAULT_GUIDANCE)
    runs = {precision: make_run(loaded, spec) for precision in ("fp32", "bf16")}
    for precision, run in runs.items():
        sample(fast_denoiser(denoiser, CPU, precision), [run])
    assert runs["bf16"].latents.dtype == torch.float32
    diff = np.abs(runs["bf16"].images().astype(int) - runs["fp32"].images().astype(int))
    assert diff.mean() <= BF16_IMAGE_MEAN_LEVELS and diff.max() <= BF16_IMAGE_LEVELS, (diff.mean(), diff.max())


def test_bf16_request_is_batch_invariant_to_a_tolerance(loaded, denoiser):
    """The bf16 counterpart of tests/sampling/test_run.py's batch-invariance test, at BF16_BATCH_* tolerance."""
    fast = fast_denoiser(denoiser, CPU, "bf16")
    spec = SampleSpec(class_label=2, seeds=(42, 43), steps=8, sampler="dpmpp_2m", guidance=GuidanceParams(3.0))
    alone = make_run(loaded, spec)
    sample(fast, [alone])
    crowd = [
        make_run(loaded, SampleSpec(class_label=0, seeds=(1, 2, 3), steps=5, sampler="ddpm")),
        make_run(loaded, spec),
        make_run(loaded, SampleSpec(class_label=None, seeds=(9,), steps=12, sampler="euler_a")),
    ]
    sample(fast, crowd)
    assert torch.allclose(crowd[1].latents, alone.latents, atol=BF16_BATCH_ATOL, rtol=BF16_BATCH_RTOL)
    single = make_run(loaded, SampleSpec(class_label=2, seeds=(43,), steps=8, sampler="dpmpp_2m"))
    sample(fast, [single])
    assert torch.allclose(single.latents[0], alone.latents[1], atol=BF16_BATCH_ATOL, rtol=BF16_BATCH_RTOL)


def test_embed_delta_reaches_the_model_under_autocast(loaded, denoiser):
    fast = fast_denoiser(denoiser, CPU, "bf16")
    x, t, labels = random_batch(loaded, 3)
    width = loaded.unet.class_embedding.weight.shape[1]
    assert (fast(x, t, labels, torch.ones(3, width)) - fast(x, t, labels)).abs().max() > 0.01


@pytest.mark.slow
def test_compiled_forward_reuses_its_buckets_and_matches_eager(loaded, denoiser):
    """Compiled at max_rows 4 (buckets 1, 2, 4): the engine's warmup, one call at every row count, compiles
    every graph; serving calls after it compile nothing, and every row count matches the eager forward.
    About a minute on 2 CPU cores with an empty inductor cache."""
    from torch._dynamo.utils import counters

    fast = fast_denoiser(denoiser, CPU, "fp32", compile=True, max_rows=4)
    before = counters["stats"]["unique_graphs"]
    for rows in range(1, 5):  # as Engine.warmup
        fast(torch.zeros(rows, *SHAPE), torch.full((rows,), 500), torch.full((rows,), loaded.manifest.null_label))
    compiled = counters["stats"]["unique_graphs"]
    assert compiled - before == len(fast.buckets) == 3  # one graph per bucket, padded calls or not
    for rows in (3, 1, 4, 2):
        x, t, labels = random_batch(loaded, rows, seed=rows)
        if rows == 4:  # inputs made under inference_mode, as a caller inside it would pass them
            with torch.inference_mode():
                x, t, labels = (v.clone() for v in (x, t, labels))
        eps = fast(x, t, labels)
        assert eps.shape == x.shape and torch.allclose(eps, denoiser(x, t, labels), atol=1e-4), rows
    assert counters["stats"]["unique_graphs"] == compiled


# ---- perturbed forwards (app/models/attention.py) -------------------------------------------------------------


def test_int8_refuses_a_perturbed_forward(loaded, denoiser):
    """The int8 forward is a quantized graph the perturbation's hooks never reach; running the batch in fp32
    instead would change its other rows' images. Refused before any quantization or calibration."""
    fast = FastDenoiser(denoiser, CPU, "int8", calibrate=lambda: pytest.fail("a refused forward calibrates nothing"))
    x, t, labels = random_batch(loaded, 2)
    with pytest.raises(PerturbationError, match="precision int8 runs a quantized graph"):
        fast(x, t, labels, perturb=RowPerturbations.from_rows([Perturbation("pag"), None], CPU))
    assert fast._int8 is None


@pytest.mark.slow
def test_a_perturbed_forward_runs_eager_and_leaves_the_compiled_graph_as_it_was(loaded, denoiser):
    """A compiled graph would not see hooks registered after it was traced (dynamo does not guard on them), so
    a perturbed forward runs eager; the compiled forward before and after it is the same graph, unchanged.
    About 30 s on 2 CPU cores with an empty inductor cache."""
    from torch._dynamo.utils import counters

    fast = fast_denoiser(denoiser, CPU, "fp32", compile=True, max_rows=2)
    x, t, labels = random_batch(loaded, 2)
    before = fast(x, t, labels)
    graphs = counters["stats"]["unique_graphs"]
    perturb = RowPerturbations.from_rows([Perturbation("pag"), Perturbation("seg", blur_sigma=1.0)], CPU)
    got = fast(x, t, labels, perturb=perturb)
    assert torch.equal(got, denoiser(x, t, labels, perturb=perturb))
    assert (got - before).abs().max() > 0.01
    assert torch.equal(fast(x, t, labels), before)
    assert counters["stats"]["unique_graphs"] == graphs
