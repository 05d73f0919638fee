"""What the precisions share: their errors, the int8 forward's row range and calibration types.

Its own module so that app.models.fast (which wraps any denoiser) and app.models.quantize (which builds the
int8 forward) both read it without importing each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
