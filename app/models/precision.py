"""What the precisions share: their errors, the int8 forward's row range and calibration types.

Its own module so that app.models.fast (which wraps any denoiser) and app.models.quantize (which builds the
int8 forward) both read it without importing each other."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# The rows an int8 forward runs (app/models/quantize.py): its exported graph covers 2..63 rows, because
# diffusers' UNet upsamplers branch on a batch of 64 or more and export specializes a row count of 1.
INT8_MIN_ROWS = 2
INT8_MAX_ROWS = 32

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x, timesteps, class_labels)
# () -> the calibration inputs; called in the model's compute thread, at the first int8 forward.
Calibrator = Callable[[], Sequence[Inputs]]


class PrecisionError(RuntimeError):
    """A precision the device cannot run (fp16 on the CPU, bf16 on a GPU without it)."""


# x86 CPU flags of int8 dot-product instructions, which oneDNN's int8 convolutions need for full precision.
# Without them (AVX2 alone) it multiplies u8 by s8 with vpmaddubsw, whose int16 sums saturate: measured on an
# AMD EPYC (Zen 3, AVX2, no VNNI) with the shipped model, a 20-step image moved 17.7 grey levels on average
# from fp32's (tests/models/test_quantize.py's bound is 4; 1.1 on an AVX512-VNNI CPU), eps's relative mean
# square error 2.5e-3 (bound 2e-3; 3e-5..4.5e-4 with VNNI).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles: there bf16 autocast served the shipped model at 1.4x
    fp32's images/s (an Intel Xeon, docs/benchmarks.md), where on an AVX512-BF16 CPU without AMX it was 0.87x."""
    return "amx_bf16" in cpu_flags()


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has VNNI (or AMX) int8 dot products: int8 is served only where it does."""
    return any(flag in cpu_flags() for flag in INT8_DOT_FLAGS)
