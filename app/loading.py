"""What turns a checkpoint folder into a served model's engine: the device, the load, the fast forward, the
Engine and the model's GET /v1/models entry. It runs in the process that owns the engines: the API's own
(CFG_ENGINE_PROCESS off) or the engine process (app/engine/process.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from app.api.clients import weights_by_client
from app.api.convert import guidance_body
from app.api.methods import CACHE_FIELD, cache_error
from app.api.options import CACHE_MODELS
from app.api.schemas import SAMPLER_NAMES, Limits
from app.config import Settings
from app.engine import Engine, SharedCompute
from app.engine.calibrate import model_calibrator
from app.guidance import NOISE_SCHEDULE_KINDS, form_fields, method_fields, method_kinds
from app.models import LoadedModel, Manifest, image_decoder, load_checkpoint, model_denoiser
from app.models.attention import PerturbationSupport, perturbation_support
from app.models.denoiser import HookedDenoiser
from app.models.fast import fast_denoiser, resolve_precision, to_channels_last
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
from app.sampling.cache import ANY_MODEL_CACHE_KINDS, CACHE_KINDS, CACHE_PARAMS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CFG_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


def model_info(
    settings: Settings,
    manifest: Manifest,
    device: torch.device,
    precision: str,
    channels_last: bool,
    cuda_graphs: bool = False,
    perturbations: Mapping[str, PerturbationSupport] | None = None,
    cache: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A served model's entry in GET /v1/models. perturbations: the model's perturbation_support at its precision
    (its attention-guidance methods' layers, or why it cannot run them); the methods it cannot run are not
    listed in guidance_methods, and the API refuses them (app/api/methods.py). cache: the model's step caches
    (cache_entry)."""
    attention = {
        kind: {
            "supported": support.supported,
            "layers": list(support.layers),
            "default_layers": list(support.default_layers),
            "reason": support.reason,
        }
        for kind, support in (perturbations or {}).items()
    }
    unsupported = {kind for kind, entry in attention.items() if not entry["supported"]}
    return {
        **manifest.to_dict(),
        "id": manifest.name,
        "object": "model",
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": settings.compile or precision == "int8",
        "cuda_graphs": cuda_graphs,
        "samplers": list(SAMPLER_NAMES),
        "schedules": ["constant", "linear", "cosine", "interval"],
        "guidance_methods": [kind for kind in method_kinds() if kind not in unsupported],
        "guidance_method_fields": {k: v for k, v in method_fields().items() if k not in unsupported},
        "attention_guidance": attention,
        "cache": dict(cache or cache_entry({})),
        "noise_schedules": list(NOISE_SCHEDULE_KINDS),
        "default_steps": settings.default_steps,
        "default_sampler": DEFAULT_SAMPLER,
        "default_guidance": {"guidance_scale": DEFAULT_GUIDANCE.guidance_scale, **guidance_body(DEFAULT_GUIDANCE)},
        "limits": {
            "max_images": settings.max_images,
            "max_steps": settings.max_steps,
            "max_guidance_scale": settings.max_guidance_scale,
            "max_noise_level": settings.max_noise_level,
            "max_batch_rows": settings.max_batch_rows,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


def cache_entry(support: Mapping[str, str | None], max_branch: int | None = None) -> dict[str, Any]:
    """A model's step caches in GET /v1/models: the kinds it runs (none always), and for each cache kind of the
    service whether it can run it (reason None), and deepcache's deepest branch; `fields`, the settings of each
    kind it runs as a form builds its inputs (the playground), deepcache's branch bounded by that branch. The
    kinds that enter no network (ANY_MODEL_CACHE_KINDS: uncond, skip) every model runs."""
    support = {**support, **dict.fromkeys(ANY_MODEL_CACHE_KINDS)}
    runs = ["none", *(kind for kind in CACHE_KINDS[1:] if kind in support and support[kind] is None)]  # in order
    entry: dict[str, Any] = {"kinds": runs}
    for kind in CACHE_KINDS[1:]:
        entry[kind] = {"reason": support.get(kind, "this model has no step cache")}
    entry["deepcache"]["max_branch"] = max_branch if entry["deepcache"]["reason"] is None else None
    entry["fields"] = {kind: form_fields(CACHE_MODELS[kind]) for kind in runs}
    for field in entry["fields"].get("deepcache", []):
        if field["name"] == "branch" and max_branch is not None:
            field["maximum"] = max_branch
    return entry


def default_cache(manifest: Manifest, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's default step cache (its manifest's default_cache), as the request's `cache` field: refused
    (a RuntimeError that fails the startup) where its settings are out of range or the model, at the precision
    served, does not run its kind or branch: checked as a request's cache is (the API's schema and cache_error),
    since every request that names no cache takes it."""
    chosen = dict(manifest.default_cache or {"kind": "none"})
    kind = str(chosen.get("kind"))
    if kind == "none":
        return chosen
    if kind not in entry["kinds"]:
        why = entry.get(kind, {}).get("reason") or "no such step cache"
        raise RuntimeError(f"model {manifest.name}: its manifest's default_cache is {kind}, which it can't run: {why}")
    refused = f"model {manifest.name}: its manifest's default_cache is refused"
    try:
        CACHE_PARAMS[kind](**{k: v for k, v in chosen.items() if k != "kind"})
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"{refused}: {exc}") from exc
    try:
        cache = CACHE_FIELD.validate_python(chosen)  # the API's ranges
    except ValidationError as exc:
        why = "; ".join(f"cache.{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        raise RuntimeError(f"{refused}: {why}") from exc
    if (error := cache_error({"id": manifest.name, "cache": entry}, cache)) is not None:
        raise RuntimeError(f"{refused}: {error['msg']}")
    return chosen


def model_cache_entry(denoiser: Any) -> dict[str, Any]:
    """cache_entry of a served model's denoiser (app/models/fast.py's FastDenoiser)."""
    support: dict[str, str | None] = denoiser.cache_support()
    return cache_entry(support, denoiser.deepcache_branches() if support.get("deepcache") is None else None)


def load_for_serving(path: Path, device: torch.device, channels_last: bool) -> tuple[LoadedModel, HookedDenoiser]:
    """load_checkpoint, a UNet's weights in channels_last where asked (a DiT's only convolution is its patch
    embedding, so it stays as it is), and the model's denoiser (a DiT's compares its blocks' class tables).
    All of it is torch work: run it in the compute thread."""
    loaded = load_checkpoint(path, device)
    if channels_last and loaded.unet is not None:
        to_channels_last(loaded.unet)
    return loaded, model_denoiser(loaded)


def captures_cuda_graphs(settings: Settings, loaded: LoadedModel) -> bool:
    """CFG_CUDA_GRAPHS for this model (fast_denoiser applies it on a CUDA device only): UNet checkpoints only,
    the path verified on a GPU (tests/test_cuda.py on an H200). A DiT's forward has not been captured on a
    card yet; it runs eager until it has."""
    return settings.cuda_graphs and loaded.unet is not None


async def build_engine(
    settings: Settings, path: Path, device: torch.device, compute: SharedCompute
) -> tuple[Engine, dict[str, Any]]:
    """Load a checkpoint in the compute thread (no torch compute may run in the event loop's thread: see
    app/engine/engine.py on OpenMP teams) and give it an engine of its own on the shared thread; with its
    GET /v1/models entry (model_info), which only the process that loaded it can tell."""
    precision = resolve_precision(settings.precision, device)  # before loading: fp16 on the CPU fails here
    loaded, model = await compute.call(load_for_serving, path, device, settings.channels_last)
    m = loaded.manifest
    channels_last = settings.channels_last and loaded.unet is not None
    # autocast, channels_last inputs and torch.compile over row buckets (app/models/fast.py); the warmup
    # compiles every bucket.
    # int8: calibrated on the model's own sampling at the warmup's first forward (app/models/quantize.py).
    calibrate = model_calibrator(loaded, model) if precision == "int8" else None
    perturbations = perturbation_support(loaded.network, precision)  # which attention methods it runs, and where
    denoiser = fast_denoiser(
        model,
        device,
        precision,
        channels_last,
        compile=settings.compile,  # int8 compiles whatever this says
        max_rows=settings.max_batch_rows,
        calibrate=calibrate,
        cuda_graphs=captures_cuda_graphs(settings, loaded),
    )
    engine = Engine(
        denoiser,
        scheduler_config=loaded.scheduler_config,
        image_shape=m.sample_shape,
        null_label=m.null_label,
        device=device,
        max_batch_rows=settings.max_batch_rows,
        max_queue=settings.max_queue,
        max_preempted_bytes=int(settings.max_preempted_mb * 2**20),
        client_weights=weights_by_client(settings.client_weight_table()),
        class_embedding=model.class_embedding,
        compute=compute,
        name=m.name,
        decode=image_decoder(loaded),
        perturbations=perturbations,
    )
    cache = model_cache_entry(denoiser)
    cache["default"] = default_cache(m, cache)
    info = model_info(settings, m, device, precision, channels_last, denoiser.cuda_graphs, perturbations, cache)
    return engine, info


def pair_guides(infos: dict[str, dict[str, Any]], engines: dict[str, Engine], limits: Limits) -> None:
    """Give each engine the denoisers of the served models that can guide it (autoguidance: Limits.guides),
    and list them in its /v1/models entry. A guide's forward runs in the same compute thread as every model's,
    with the guide's own precision, compiled buckets and CUDA graphs."""
    for name, info in infos.items():
        info["guides"] = list(limits.guides_of(name))
        for guide in info["guides"]:
            engines[name].add_guide(guide, engines[guide].denoiser)
        if not info["guides"]:  # nothing served can guide it: autoguidance is not among its methods
            info["guidance_methods"] = [k for k in info["guidance_methods"] if k != "autoguidance"]
            info["guidance_method_fields"].pop("autoguidance", None)


async def build_engines(
    settings: Settings, paths: list[Path], device: str, limits: Limits, compute: SharedCompute
) -> dict[str, tuple[Engine, dict[str, Any]]]:
    """Every served model's engine and entry, guides paired: what the engine process builds (EngineProcess's
    Build, given the settings, checkpoints, device and limits of the API process that starts it)."""
    built = {}
    for path in paths:
        engine, info = await build_engine(settings, path, torch.device(device), compute)
        built[engine.name] = (engine, info)
    pair_guides({n: info for n, (_, info) in built.items()}, {n: engine for n, (engine, _) in built.items()}, limits)
    return built
