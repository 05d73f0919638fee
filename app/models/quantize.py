"""int8 forwards on the CPU: static post-training quantization of a UNet's convolutions and linear layers.

The flow is PyTorch's PT2E quantization as torchao ships it (torchao.quantization.pt2e):

  1. calibration_inputs() (app/engine/calibrate.py) samples one image per class (up to 16 classes) with the
     model itself, plain CFG at s = 3 and the default sampler, and records the (x, timesteps, class_labels)
     of every forward: inputs at every noise level, with conditional and unconditional labels, as the service
     will see them. No dataset is needed, so any UNet checkpoint can be quantized where it is served.
  2. quantize_int8() exports the forward (torch.export, the row count symbolic), marks every Conv2d and
     Linear but the first and last convolutions for int8 with X86InductorQuantizer's default config
     (activations per tensor, asymmetric, static; weights per output channel, symmetric), runs the recorded
     inputs through the observers, and converts.
  3. The caller compiles the result with inductor's freezing (app/models/fast.py), which lowers each
     quantize / conv / dequantize pattern to oneDNN's int8 convolution (AVX512-VNNI on this machine's CPU).

The activation scales are fixed by the calibration, not computed per batch, so a row's output still does
not depend on the other rows of its forward: a seed draws the same image alone or batched (to the kernels'
summation order). Normalizations, attention's softmax, the embeddings and the sampler stay fp32.

Limits: the exported graph covers 2..63 rows (diffusers' UNet upsamplers branch on a batch of 64 or more,
and torch.export specializes a row count of 1), so FastDenoiser pads one row to two and runs bigger batches
in chunks of INT8_MAX_ROWS. UNet checkpoints only: a DiT is not quantized here (its forward is not exported
and its quality at int8 is unmeasured). torchao is an optional dependency: pip install -e '.[int8]'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.models.precision import INT8_MIN_ROWS, Inputs, PrecisionError

FP32_LAYERS = ("unet.conv_in", "unet.conv_out")  # module names under _Forward
EXPORT_MAX_ROWS = 63  # the exported graph's largest row count (see Limits above)


class Int8Unavailable(PrecisionError):
    """int8 was asked of a model or an environment that cannot run it."""


class _Forward(torch.nn.Module):
    """A denoiser's three-argument forward as a module, its networks registered so that export sees
    their weights as parameters."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser
        for name, value in vars(denoiser).items():
            if isinstance(value, torch.nn.Module):
                self.add_module(name, value)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.denoiser._forward(x, timesteps, class_labels)


def torchao_pt2e():
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise Int8Unavailable(f"precision int8 needs torchao ({e}): pip install -e '.[int8]'") from e
    return xiq, prepare_pt2e, convert_pt2e


def quantize_int8(denoiser, inputs: Sequence[Inputs]) -> torch.nn.Module:
    """The denoiser's three-argument forward with its Conv2d and Linear layers quantized to int8 and
    calibrated on `inputs`: a module (x, timesteps, class_labels) -> eps for 2..63 rows. Run it under
    torch.compile with freezing for int8 kernels; run eagerly it only simulates them."""
    xiq, prepare_pt2e, convert_pt2e = torchao_pt2e()
    quantizer = xiq.X86InductorQuantizer()
    config = xiq.get_default_x86_inductor_quantization_config()
    for layer in (torch.nn.Conv2d, torch.nn.Linear):
        quantizer.set_module_type_qconfig(layer, config)
    # The first and last convolutions stay fp32, as is usual: conv_in reads the noisy image itself (one
    # channel here), conv_out writes eps. On the shipped model this cuts eps's error 4x (mean square,
    # relative: 3.7e-4 to 9.3e-5 over 20 sampling steps) for two small layers' worth of compute.
    for name in FP32_LAYERS:
        quantizer.set_module_name_qconfig(name, None)
    rows = torch.export.Dim("rows", min=INT8_MIN_ROWS, max=EXPORT_MAX_ROWS)
    # Export and calibration build autograd-free graphs of ordinary tensors: leave the caller's inference
    # mode, and copy the recorded (inference) tensors out of it.
    with torch.inference_mode(False), torch.no_grad():
        batches = [
            tuple(t.clone() for t in batch) for batch in inputs if INT8_MIN_ROWS <= batch[0].shape[0] <= EXPORT_MAX_ROWS
        ]
        example = batches[0]
        exported = torch.export.export(
            _Forward(denoiser).eval(), example, dynamic_shapes=({0: rows}, {0: rows}, {0: rows})
        ).module()
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(*batch)
        return convert_pt2e(prepared)
