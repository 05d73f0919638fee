"""Sampler runs over a denoiser callable, built on diffusers' schedulers, one instance per request."""

from app.sampling.run import (
    Denoiser,
    GuidanceParams,
    ModelInput,
    SampleRun,
    SampleSpec,
    denoise_step,
    sample,
)
from app.sampling.schedulers import DEFAULT_SAMPLER, SAMPLERS, make_scheduler, set_timesteps

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "Denoiser",
    "GuidanceParams",
    "ModelInput",
    "SampleRun",
    "SampleSpec",
    "denoise_step",
    "make_scheduler",
    "sample",
    "set_timesteps",
]
