"""Sampler runs over a denoiser callable, built on diffusers' schedulers, one instance per request."""

from app.pixels import ImageDecoder, to_uint8
from app.sampling.run import SampleRun
from app.sampling.schedulers import DEFAULT_SAMPLER, SAMPLERS, make_scheduler, set_timesteps, step_kwargs
from app.sampling.spec import (
    DEFAULT_GUIDANCE,
    ClassEmbedding,
    Denoiser,
    GuidanceParams,
    ModelInput,
    Preview,
    SampleSpec,
    StepTrace,
)
from app.sampling.step import denoise_step, sample, skip_step

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "ClassEmbedding",
    "Denoiser",
    "GuidanceParams",
    "ImageDecoder",
    "ModelInput",
    "Preview",
    "SampleRun",
    "SampleSpec",
    "StepTrace",
    "denoise_step",
    "make_scheduler",
    "sample",
    "set_timesteps",
    "skip_step",
    "step_kwargs",
    "to_uint8",
]
