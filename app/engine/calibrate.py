"""int8's calibration: the inputs of the model's own sampling, recorded (app/models/quantize.py quantizes
with them). It samples, so it lives above app.models, which never imports the samplers."""

from __future__ import annotations

import torch

from app.models.attention import RowPerturbations
from app.models.precision import Calibrator, Inputs
from app.models.quantize import Int8Unavailable, torchao_pt2e
from app.sampling import DEFAULT_SAMPLER, GuidanceParams, SampleRun, SampleSpec, sample


class _Recorder:
    """A denoiser that records its inputs and answers with the wrapped one's eps."""

    def __init__(self, denoiser) -> None:
        self.denoiser = denoiser
        self.inputs: list[Inputs] = []

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        *extra: torch.Tensor,
        perturb: RowPerturbations | None = None,
    ) -> torch.Tensor:
        if extra or perturb is not None:  # calibration samples plain CFG: no CADS embed_delta, no perturbed rows
            raise ValueError("calibration records the three-input forward only")
        self.inputs.append((x.clone(), timesteps.clone(), class_labels.clone()))
        return self.denoiser(x, timesteps, class_labels)


def calibration_inputs(
    denoiser,
    scheduler_config: dict,
    image_shape: tuple[int, int, int],
    null_label: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    steps: int = 20,
    max_classes: int = 16,
    seed: int = 0,
) -> list[Inputs]:
    """The inputs of every forward while sampling one image of each of up to max_classes classes (spread
    over the label range), plain CFG at s = 3: 2 rows per class (at most 32) at each of `steps` steps."""
    count = min(num_classes, max_classes)
    labels = sorted({round(i * num_classes / count) for i in range(count)})
    recorder = _Recorder(denoiser)
    guidance = GuidanceParams(guidance_scale=3.0)
    specs = [
        SampleSpec(class_label=c, seeds=(seed + i,), steps=steps, sampler=DEFAULT_SAMPLER, guidance=guidance)
        for i, c in enumerate(labels)
    ]
    runs = [SampleRun(spec, scheduler_config, image_shape, null_label, device) for spec in specs]
    sample(recorder, runs)
    return recorder.inputs


def model_calibrator(model, denoiser) -> Calibrator:
    """The Calibrator of a loaded checkpoint (app.models.LoadedModel) and its fp32 denoiser: refuses, now,
    what int8 cannot run (a DiT, or no torchao), so that a service fails at startup with the reason."""
    m = model.manifest
    if m.kind != "unet":
        raise Int8Unavailable(
            f"precision int8 quantizes UNet checkpoints, and {m.name} is a {m.kind}: use bf16 or fp32"
        )
    torchao_pt2e()

    def calibrate() -> list[Inputs]:
        return calibration_inputs(
            denoiser, model.scheduler_config, m.sample_shape, m.null_label, m.num_classes, model.device
        )

    return calibrate
