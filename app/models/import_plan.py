"""What `python -m app.models import` accepts, read and checked before anything is written (ImportPlan);
app/models/importer.py copies a plan into the store as a checkpoint this service loads (app/models/checkpoint.py).

Accepted:
  - a DiTPipeline folder: model_index.json, transformer/ (DiTTransformer2DModel, or the Transformer2DModel
    with norm_type "ada_norm_zero" that older DiT folders name), vae/ (AutoencoderKL), scheduler/;
  - a pipeline folder with a class-conditional UNet2DModel (model_index.json, unet/, scheduler/, and vae/
    where the UNet works in an AutoencoderKL's latents);
  - a bare class-conditional UNet2DModel folder (config.json and its weights).
Everything else is refused with one line (ImportRefused): text-conditional or unconditional models, other
architectures, weights that exist only as pickles, models that predict anything but eps.

Class names come from --classes, else from id2label in model_index.json (the Hub's DiT folders carry it;
DiTPipeline.save_pretrained does not write it), else "class 0", "class 1", ...
The null label: a DiT's is num_embeds_ada_norm, its embedding table's extra last row. A UNet's is its last
class embedding, num_class_embeds - 1: a UNet trained for CFG with this project's convention (research.train) has
num_class_embeds = classes + 1. With --classes or id2label the count must match; without, the last
embedding is taken to be the null label, and the import says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import diffusers
from diffusers import DDPMScheduler
from diffusers.schedulers import KarrasDiffusionSchedulers

from app.models.checkpoint import WEIGHTS_NAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# The discrete-time noise-prediction schedulers: the service's samplers rebuild any of these from its config.
SCHEDULER_CLASSES = frozenset({"DDIMScheduler", *(s.name for s in KarrasDiffusionSchedulers)})
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NEEDS_CLASSES = "needs a class-conditional model"


class ImportRefused(ValueError):
    """The folder is not one this service can serve; the message says why, in one line."""


@dataclass
class ImportPlan:
    """What an import will write, read from the source folder before anything is copied."""

    kind: str  # "unet" or "dit"
    denoiser_dir: Path
    denoiser_config: dict[str, Any]
    denoiser_weights: list[Path]
    vae_dir: Path | None
    vae_config: dict[str, Any] | None
    vae_weights: list[Path]
    scheduler_config: dict[str, Any]
    class_names: list[str]
    null_label: int
    learned_sigma: str
    latent_shape: list[int]
    image_shape: list[int]
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def denoiser_folder(self) -> str:
        return "transformer" if self.kind == "dit" else "unet"


def read_classes_file(path: Path | str) -> list[str]:
    """One class name per line; blank lines at the end are ignored, blank lines within are refused."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"cannot read the classes file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or not all(names):
        raise ImportRefused(f"{path} must hold one class name per line, with no blank lines between them")
    return names


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImportRefused(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ImportRefused(f"{path} is not a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """A component folder's safetensors: the shards its index lists, the one canonical file, or the one
    variant file (e.g. .fp16.safetensors). Refused where there are only pickles, or nothing."""
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise ImportRefused(f"{index} lists shards that are not there: {', '.join(missing) or 'none'}")
        return [folder / s for s in shards]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    if len(found) == 1:
        return found
    if found:
        names = ", ".join(p.name for p in found)
        raise ImportRefused(f"{folder} holds several safetensors files and no {INDEX_NAME}: {names}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ImportRefused(
            f"only safetensors weights are loaded, never pickle: {folder} has {', '.join(pickles)}; "
            "re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    raise ImportRefused(f"no weights in {folder}: expected {WEIGHTS_NAME}")


def _denoiser_kind(config: dict[str, Any], folder: Path) -> str:
    """ "unet" or "dit" for a class-conditional denoiser's config; refused otherwise."""
    cls = config.get("_class_name")
    if cls == "UNet2DConditionModel":
        raise ImportRefused(f"{NEEDS_CLASSES}: {folder} is a UNet2DConditionModel (text-conditional)")
    if cls == "UNet2DModel":
        if config.get("class_embed_type") is not None:
            raise ImportRefused(
                f"{NEEDS_CLASSES} with a class-embedding table: {folder} has class_embed_type "
                f"{config['class_embed_type']!r}"
            )
        if not config.get("num_class_embeds"):
            raise ImportRefused(f"{NEEDS_CLASSES}: {folder} is an unconditional UNet2DModel (no num_class_embeds)")
        return "unet"
    if cls in DIT_CLASSES:
        if config.get("cross_attention_dim") or config.get("caption_channels"):
            raise ImportRefused(f"{NEEDS_CLASSES}: {folder} is a text-conditional {cls} (cross-attention)")
        norm_type = config.get("norm_type", "ada_norm_zero" if cls == "DiTTransformer2DModel" else "layer_norm")
        if norm_type != "ada_norm_zero" or not config.get("num_embeds_ada_norm") or not config.get("patch_size"):
            raise ImportRefused(
                f"{NEEDS_CLASSES}: {folder} is a {cls} with norm_type {norm_type!r}, not a DiT "
                "(norm_type 'ada_norm_zero', num_embeds_ada_norm, patch_size)"
            )
        return "dit"
    raise ImportRefused(
        f"{NEEDS_CLASSES}: {folder} is a {cls}; this service serves DiT (DiTTransformer2DModel) and "
        "UNet2DModel with num_class_embeds"
    )


def _learned_sigma(config: dict[str, Any], folder: Path) -> str:
    in_channels = config.get("in_channels")
    if not isinstance(in_channels, int):
        raise ImportRefused(f"{folder / 'config.json'} has no in_channels")
    out_channels = config.get("out_channels") or in_channels
    if out_channels == in_channels:
        return "none"
    if out_channels == 2 * in_channels:
        return "drop"
    raise ImportRefused(
        f"{folder} outputs {out_channels} channels for {in_channels} input channels; expected "
        f"{in_channels} (eps) or {2 * in_channels} (eps and a learned variance)"
    )


def _sample_hw(config: dict[str, Any], folder: Path) -> tuple[int, int]:
    size = config.get("sample_size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ImportRefused(f"{folder / 'config.json'} has sample_size {size!r}: set the size the model was trained at")


def _id2label_names(id2label: dict[str, str], source: Path) -> list[str]:
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as exc:
        raise ImportRefused(f"id2label in {source} has a key that is not an index: {exc}") from exc
    if sorted(by_index) != list(range(len(by_index))):
        raise ImportRefused(f"id2label in {source} must number its classes 0..N-1")
    return [by_index[i] for i in range(len(by_index))]


def _class_names_and_null(
    kind: str, config: dict[str, Any], given: list[str] | None, folder: Path, notes: list[str]
) -> tuple[list[str], int]:
    if kind == "dit":
        # DiTPipeline hard-codes 1000; the model's own null index is its class count.
        count = int(config["num_embeds_ada_norm"])
        if given is None:
            notes.append(f"no class names given (--classes, or id2label in model_index.json): {count} numbered classes")
        names = given or [f"class {i}" for i in range(count)]
        if len(names) != count:
            raise ImportRefused(f"{folder} has {count} classes (num_embeds_ada_norm) but {len(names)} class names")
        return names, count
    embeds = int(config["num_class_embeds"])
    if given is None:
        if embeds < 2:
            raise ImportRefused(f"{NEEDS_CLASSES} with a null label: {folder} has num_class_embeds {embeds}")
        notes.append(
            f"no class names given: {embeds - 1} numbered classes, the last embedding ({embeds - 1}) "
            "taken as the null label"
        )
        return [f"class {i}" for i in range(embeds - 1)], embeds - 1
    if embeds != len(given) + 1:
        raise ImportRefused(
            f"{NEEDS_CLASSES} trained with a null label: {folder} has num_class_embeds {embeds} for "
            f"{len(given)} classes; classifier-free guidance needs classes + 1, the last being the null label"
        )
    return given, len(given)


def _scheduler(config: dict[str, Any], origin: str, latent: bool, notes: list[str]) -> dict[str, Any]:
    cls = config.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise ImportRefused(
            f"{origin} is a {cls}; this service samples with DDPM-family noise schedules "
            "(DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, ...)"
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ImportRefused(
            f"{origin} has prediction_type {prediction_type!r}; this service serves eps-prediction models "
            "(its guidance methods and previews work on eps)"
        )
    config = {**config, "prediction_type": "epsilon"}
    if latent:
        # A latent is not an image in [-1, 1]: clipping it (DDPMScheduler's default) would destroy samples.
        for key in ("clip_sample", "thresholding"):
            if config.get(key):
                config[key] = False
                notes.append(f"{key} turned off in the scheduler config: latents are not clipped to [-1, 1]")
    return config


def _pipeline_components(src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """model_index.json and its components (name -> class name), text-conditional pipelines refused."""
    index = _json(src / "model_index.json")
    components = {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None}
    text = sorted(k for k in components if k.startswith(("text_encoder", "tokenizer")))
    if text:
        raise ImportRefused(
            f"{NEEDS_CLASSES}: {src} is a text-conditional pipeline ({index.get('_class_name')} with {', '.join(text)})"
        )
    return index, components


@dataclass
class _Folders:
    """Where a source folder keeps its parts."""

    denoiser_dir: Path
    vae_dir: Path | None
    scheduler_config: dict[str, Any]
    scheduler_origin: str
    class_names: list[str] | None
    class_names_from: str | None


def _pipeline_folders(src: Path, class_names: list[str] | None, source: dict[str, Any]) -> _Folders:
    index, components = _pipeline_components(src)
    source["pipeline"] = index.get("_class_name")
    denoisers = [k for k in ("transformer", "unet") if k in components]
    if len(denoisers) != 1:
        raise ImportRefused(f"{NEEDS_CLASSES}: {src} ({source['pipeline']}) has no transformer or unet")
    if "vqvae" in components:
        raise ImportRefused(f"{src} decodes with a VQ-VAE (vqvae); only AutoencoderKL latents are served")
    if "scheduler" not in components or not (src / "scheduler" / "scheduler_config.json").is_file():
        raise ImportRefused(f"{src} has no scheduler/scheduler_config.json")
    names_from = "--classes" if class_names is not None else None
    if class_names is None and isinstance(index.get("id2label"), dict):
        class_names = _id2label_names(index["id2label"], src / "model_index.json")
        names_from = "id2label in model_index.json"
    return _Folders(
        denoiser_dir=src / denoisers[0],
        vae_dir=src / "vae" if "vae" in components else None,
        scheduler_config=_json(src / "scheduler" / "scheduler_config.json"),
        scheduler_origin=str(src / "scheduler"),
        class_names=class_names,
        class_names_from=names_from,
    )


def _model_folders(src: Path, class_names: list[str] | None, scheduler_file: Path | str | None) -> _Folders:
    """A bare model folder: its scheduler from --scheduler, else DDPMScheduler's defaults."""
    if scheduler_file is not None:
        scheduler_config, origin = _json(Path(scheduler_file)), str(scheduler_file)
    else:
        defaults = {k: v for k, v in DDPMScheduler().config.items() if not k.startswith("_")}
        scheduler_config, origin = {"_class_name": "DDPMScheduler", **defaults}, "DDPMScheduler's defaults"
    return _Folders(src, None, scheduler_config, origin, class_names, "--classes" if class_names else None)


def _refuse_loose_files(src: Path) -> NoReturn:
    loose = sorted(p.name for p in src.iterdir() if p.suffix in (*PICKLE_SUFFIXES, ".safetensors"))
    if any(not name.endswith(".safetensors") for name in loose):
        raise ImportRefused(
            f"only safetensors weights are loaded, never pickle, and only from a diffusers folder: "
            f"{src} has {', '.join(loose)}"
        )
    raise ImportRefused(f"{src} is not a diffusers folder: no model_index.json or config.json")


def plan_import(
    src: Path | str, class_names: list[str] | None = None, scheduler_file: Path | str | None = None
) -> ImportPlan:
    """Read a diffusers folder and decide what to write; ImportRefused if it can't be served."""
    src = Path(src)
    if not src.is_dir():
        raise ImportRefused(f"{src} is not a folder")
    notes: list[str] = []
    source: dict[str, Any] = {"folder": str(src.resolve()), "imported_with_diffusers": diffusers.__version__}
    if (src / "model_index.json").is_file():
        folders = _pipeline_folders(src, class_names, source)
    elif (src / "config.json").is_file():
        folders = _model_folders(src, class_names, scheduler_file)
        if scheduler_file is None:
            notes.append("no --scheduler: DDPMScheduler's defaults, linear betas 1e-4..0.02 over 1000 steps")
    else:
        _refuse_loose_files(src)
    source["class_names_from"] = folders.class_names_from
    denoiser_dir, vae_dir = folders.denoiser_dir, folders.vae_dir
    denoiser_config = _json(denoiser_dir / "config.json")
    kind = _denoiser_kind(denoiser_config, denoiser_dir)
    source["denoiser"] = denoiser_config.get("_class_name")
    if kind == "dit" and vae_dir is None:
        raise ImportRefused(f"a DiT works in a VAE's latents: import its DiTPipeline folder, with vae/ (not {src})")
    learned_sigma = _learned_sigma(denoiser_config, denoiser_dir)
    latent_shape = [denoiser_config["in_channels"], *_sample_hw(denoiser_config, denoiser_dir)]
    vae_config: dict[str, Any] | None = None
    image_shape = list(latent_shape)
    if vae_dir is not None:
        vae_config = _json(vae_dir / "config.json")
        image_shape = _vae_image_shape(vae_config, vae_dir, latent_shape)
    names, null_label = _class_names_and_null(kind, denoiser_config, folders.class_names, denoiser_dir, notes)
    return ImportPlan(
        kind=kind,
        denoiser_dir=denoiser_dir,
        denoiser_config=denoiser_config,
        denoiser_weights=weight_files(denoiser_dir),
        vae_dir=vae_dir,
        vae_config=vae_config,
        vae_weights=weight_files(vae_dir) if vae_dir is not None else [],
        scheduler_config=_scheduler(folders.scheduler_config, folders.scheduler_origin, vae_dir is not None, notes),
        class_names=names,
        null_label=null_label,
        learned_sigma=learned_sigma,
        latent_shape=latent_shape,
        image_shape=image_shape,
        source=source,
        notes=notes,
    )


def _vae_image_shape(vae_config: dict[str, Any], vae_dir: Path, latent_shape: list[int]) -> list[int]:
    if vae_config.get("_class_name") != "AutoencoderKL":
        raise ImportRefused(f"{vae_dir} is a {vae_config.get('_class_name')}; only AutoencoderKL latents are served")
    if vae_config.get("latent_channels", 4) != latent_shape[0]:
        raise ImportRefused(
            f"{vae_dir} has {vae_config.get('latent_channels', 4)} latent channels, the denoiser {latent_shape[0]}"
        )
    # Each encoder block but the last halves the resolution (diffusers' vae_scale_factor).
    factor = 2 ** (len(vae_config.get("block_out_channels", [64])) - 1)
    return [int(vae_config.get("out_channels", 3)), latent_shape[1] * factor, latent_shape[2] * factor]
