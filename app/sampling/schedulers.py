"""The samplers: diffusers schedulers built from a checkpoint's scheduler config, one instance per request."""

from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any, Final

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from app.sampling.device import to_device

# "trailing" spacing starts every sampler at the last training timestep (Lin et al. 2023, table 2),
# which matters at the small step counts a service runs.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing"}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    ),
    "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    # DPM-Solver++ 2M on Karras et al.'s (2022) sigmas: rho = 7 spacing from the largest training sigma to
    # the smallest, denser at low noise, where this model's images take their detail (docs/steps-karras.md).
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}


# Keyword arguments of each sampler's step(). DDIM clips its x0 prediction to the data range
# (clip_sample in the training config); without use_clipped_model_output it then pairs that clipped
# x0 with the unclipped eps, and at high guidance scales the mismatch drifts every image to grey.
STEP_KWARGS: dict[str, dict[str, Any]] = {"ddim": {"use_clipped_model_output": True}}


def step_kwargs(sampler: str) -> dict[str, Any]:
    return STEP_KWARGS.get(sampler, {})


# The default everywhere (API, generate, evaluate). Issue 12 asked for the fewest default steps whose FID is
# within 10% of dpmpp_2m's at 50 steps. On the shipped model (n = 640, the default guidance) dpmpp_2m itself is
# 1.38x off at 20 steps; on Karras sigmas the same solver is within it at 15 and 20 steps (FID 8.03 and 8.84
# against 9.44) and not at 10. 20 it is: at 15 only 2 steps fall in the guidance interval and accuracy drops to
# 0.966, under issue 13's 0.97 (docs/steps-karras.md, docs/steps-dpmpp_2m.md, docs/benchmarks.md).
DEFAULT_SAMPLER: Final = "dpmpp_2m_karras"


def make_scheduler(sampler: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler instance: its step index and history belong to one request.

    It is a deep copy of a prototype built once per (sampler, config): diffusers' from_config
    inspects signatures and validates the config on every call (~1 ms, 5x a copy), and in the
    service that work runs on the event loop's thread, taking CPU from the forward on a small CPU.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return copy.deepcopy(_prototype(sampler, config_key(scheduler_config)))


def config_key(scheduler_config: dict[str, Any]) -> str:
    """A scheduler config as the key of the caches below (a dict is not hashable).

    Every request of a model passes the same dict, so the key is kept per dict object and reused while the
    dict still equals the copy taken with it (json.dumps costs ~10 us a call on the event loop's thread)."""
    hit = _CONFIG_KEYS.get(id(scheduler_config))
    if hit is not None and hit[0] is scheduler_config and hit[1] == scheduler_config:
        return hit[2]
    key = json.dumps(scheduler_config, sort_keys=True, default=str)
    if len(_CONFIG_KEYS) >= 64:
        _CONFIG_KEYS.clear()
    # The dict itself is held, so that its id is not reused by another while the entry lives.
    _CONFIG_KEYS[id(scheduler_config)] = (scheduler_config, copy.deepcopy(scheduler_config), key)
    return key


_CONFIG_KEYS: dict[int, tuple[dict[str, Any], dict[str, Any], str]] = {}


@functools.lru_cache(maxsize=64)
def _prototype(sampler: str, scheduler_config_json: str) -> SchedulerMixin:
    """Never handed out: make_scheduler returns copies."""
    cls, overrides = SAMPLERS[sampler]
    return cls.from_config(json.loads(scheduler_config_json), **overrides)


def set_timesteps(scheduler: SchedulerMixin, steps: int, device: torch.device | str = "cpu") -> None:
    """scheduler.set_timesteps, keeping Euler-ancestral sigmas in float64.

    The schedule is computed on the host and only the timesteps go to the device, where diffusers puts them
    (every other tensor of these schedulers stays on the host; their Euler sigmas come back to it), with a
    copy that does not wait for the device (app/sampling/device.py).

    With trailing spacing and a cosine training schedule the first sigma is ~2e4. Euler ancestral's
    sigma_down = sqrt(sigma_to^2 - sigma_up^2) then cancels catastrophically in float32 and can go
    NaN; the same formula in float64 is exact enough. The latents stay float32.
    """
    scheduler.set_timesteps(steps, device="cpu")
    scheduler.timesteps = to_device(scheduler.timesteps, device)
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):
        scheduler.sigmas = scheduler.sigmas.to(torch.float64)


def request_scheduler(
    sampler: str, scheduler_config: dict[str, Any], steps: int, device: torch.device | str = "cpu"
) -> SchedulerMixin:
    """A request's own scheduler to step, with its timesteps set (as set_timesteps sets them).

    A request is built in the event loop's thread, so this is on every request's path: the schedule
    (~0.6 ms of numpy for Karras sigmas) is computed once per (sampler, config, steps), and each request
    gets a copy that shares the prototype's tensors, which no step writes to, and owns its mutable state
    (step index, solver history); the device's timesteps are one shared tensor per device, queued to it
    once (app/sampling/device.py)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    key = config_key(scheduler_config)
    prototype, shared = _timed_prototype(sampler, key, steps)
    scheduler = copy.deepcopy(prototype, dict(shared))
    scheduler.timesteps = device_timesteps(sampler, key, steps, device)
    return scheduler


@functools.lru_cache(maxsize=256)
def _timed_prototype(sampler: str, scheduler_config_json: str, steps: int) -> tuple[SchedulerMixin, dict]:
    """Never handed out to step (timed_scheduler's readers only read it). With the deepcopy memo that makes
    copies share its tensors and frozen config."""
    scheduler = copy.deepcopy(_prototype(sampler, scheduler_config_json))
    set_timesteps(scheduler, steps)
    shared = {id(v): v for v in vars(scheduler).values() if torch.is_tensor(v)}
    shared[id(scheduler._internal_dict)] = scheduler._internal_dict
    return scheduler, shared


def timed_scheduler(sampler: str, scheduler_config_json: str, steps: int) -> SchedulerMixin:
    """The cached scheduler of (sampler, config_key, steps) after set_timesteps on the host: to read its
    schedule (every batched request of that schedule holds it), never to step (request_scheduler hands out
    the copies that step)."""
    return _timed_prototype(sampler, scheduler_config_json, steps)[0]


def device_timesteps(sampler: str, scheduler_config_json: str, steps: int, device: torch.device | str) -> torch.Tensor:
    """The timesteps of (sampler, config_key, steps) on the device: one tensor per device, shared by every
    request of that schedule (never written), queued to it once without a sync (app/sampling/device.py)."""
    return _device_timesteps(sampler, scheduler_config_json, steps, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _device_timesteps(sampler: str, scheduler_config_json: str, steps: int, device: str) -> torch.Tensor:
    return to_device(_timed_prototype(sampler, scheduler_config_json, steps)[0].timesteps, device)


@functools.lru_cache(maxsize=256)
def step_sigmas(sampler: str, scheduler_config_json: str, steps: int) -> tuple[float, ...]:
    """Each step's sigma as the sampler converts eps to x0 (x0 = (x - sigma eps) / alpha in the model input's
    scale, alpha = 1 / sqrt(1 + sigma^2)): its own `sigmas` where it keeps them (DPM-Solver and Euler; Karras's
    exactly, where the timesteps the model sees are rounded), else from alphas_cumprod at its timesteps (DDIM,
    DDPM)."""
    scheduler = timed_scheduler(sampler, scheduler_config_json, steps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return tuple(float(s) for s in sigmas[:steps])
    alpha_bars = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
    return tuple(((1 - alpha_bars) / alpha_bars).sqrt().tolist())


@functools.lru_cache(maxsize=256)
def schedule_values(
    sampler: str, scheduler_config_json: str, steps: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """alpha_bar and sigma at each step of (sampler, config_key, steps), computed once on the host: alphas_cumprod
    at the timesteps the model sees (rounded, for Karras's sigmas: step_sigmas has the unrounded ones)."""
    scheduler = timed_scheduler(sampler, scheduler_config_json, steps)
    alpha_bars = tuple(scheduler.alphas_cumprod.cpu()[scheduler.timesteps.long()].tolist())
    return alpha_bars, tuple(math.sqrt((1 - a) / a) for a in alpha_bars)
