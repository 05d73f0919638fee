"""Sampler runs over a denoiser callable, built on diffusers' schedulers, one instance per request."""

from app.sampling.run import (
    DEFAULT_GUIDANCE,
    ClassEmbedding,
    Denoiser,
    GuidanceParams,
    ImageDecoder,
    ModelInput,
    Preview,
    SampleRun,
    SampleSpec,
    StepTrace,
    denoise_step,
    sample,
    to_uint8,
)
from app.sampling.schedulers import DEFAULT_SAMPLER, SAMPLERS, make_scheduler, set_timesteps, step_kwargs

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
    "step_kwargs",
    "to_uint8",
]
