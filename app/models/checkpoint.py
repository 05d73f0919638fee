"""A checkpoint folder in model_store/, in diffusers' own layout plus a manifest:

    <name>/unet/config.json                 a UNet2DModel (research.train writes these), or
    <name>/transformer/config.json          a DiT (DiTTransformer2DModel), with
    <name>/vae/config.json                  the AutoencoderKL its latents decode with
    <name>/<each of those>/diffusion_pytorch_model.safetensors   (or safetensors shards)
    <name>/scheduler/scheduler_config.json
    <name>/manifest.json      class names, null label, shapes, every weight file's sha256, training or import record

`python -m app.models import` (app/models/importer.py) writes any of these from a diffusers folder.
Loading verifies every weight file's sha256 before reading it and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.models.deepcache import DeepCacheError, RowsOut, forward_rows, max_branch
from app.models.denoiser import HookedDenoiser, Hooks
from app.models.latent import DiTDenoiser, ImageDecoder, decode_latents, to_uint8

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
KINDS = ("unet", "dit")  # the denoiser: UNet2DModel, or DiTTransformer2DModel
LEARNED_SIGMA = ("none", "drop")
# Each component folder and the class its config and weights build.
MODEL_CLASSES: dict[str, type[ModelMixin]] = {
    "unet": UNet2DModel,
    "transformer": DiTTransformer2DModel,
    "vae": AutoencoderKL,
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file."""


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint holds. The first eight fields are those research.train has always written; the others
    default to what they mean for such a checkpoint (a pixel-space UNet), so older manifests load unchanged."""

    name: str
    class_names: list[str]
    null_label: int  # the label of the unconditional rows: the last class embedding
    image_size: int  # the denoiser's sample_size: the latents' size for a latent model
    in_channels: int  # the denoiser's input channels: the latent channels for a latent model
    prediction_type: str
    weights_sha256: str  # the denoiser's weights; for sharded weights, of their "sha256  path" lines
    training: dict[str, Any] = field(default_factory=dict)
    kind: str = "unet"  # the denoiser: "unet" (UNet2DModel) or "dit" (DiTTransformer2DModel)
    # Every weight file, path relative to the checkpoint -> sha256. Empty: {unet/WEIGHTS_NAME: weights_sha256}.
    files: dict[str, str] = field(default_factory=dict)
    image_shape: list[int] | None = None  # (C, H, W) of the images served; default: latent_shape
    latent_shape: list[int] | None = None  # (C, h, w) the sampler works in; default (in_channels, image_size x2)
    vae_scaling_factor: float | None = None  # a latent model's: images = vae.decode(latents / vae_scaling_factor)
    # "drop": the model outputs 2C channels, eps then a learned variance, and the variance is dropped (as DiTPipeline).
    learned_sigma: str = "none"
    source: dict[str, Any] = field(default_factory=dict)  # an import's record: folder, classes, versions, notes
    # The step cache of a request to this model that names none, as the request's `cache` field (None: none):
    # chosen by measuring this checkpoint (docs/caching.md), checked against what the model runs when it is served.
    default_cache: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.learned_sigma not in LEARNED_SIGMA:
            raise ValueError(f"learned_sigma must be one of {LEARNED_SIGMA}, not {self.learned_sigma!r}")
        # Frozen: the defaults that depend on other fields are filled here, once.
        latent_shape = self.latent_shape
        if latent_shape is None:
            latent_shape = [self.in_channels, self.image_size, self.image_size]
        object.__setattr__(self, "latent_shape", latent_shape)
        if self.image_shape is None:
            object.__setattr__(self, "image_shape", list(latent_shape))
        if not self.files:
            object.__setattr__(self, "files", {f"{self.denoiser_folder}/{WEIGHTS_NAME}": self.weights_sha256})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def latent(self) -> bool:
        """True where the sampler works in a VAE's latent space and the images are decoded from it."""
        return self.vae_scaling_factor is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one sample as the sampler and the denoiser see it: SampleRun's image_shape."""
        return _chw(self.latent_shape)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image served: the samples themselves, or a latent model's decoded images."""
        return _chw(self.image_shape)

    @property
    def denoiser_folder(self) -> str:
        return "transformer" if self.kind == "dit" else "unet"

    @property
    def components(self) -> tuple[str, ...]:
        """The component folders, each with a config.json and weights."""
        return (self.denoiser_folder, "vae") if self.latent else (self.denoiser_folder,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chw(shape: list[int] | None) -> tuple[int, int, int]:
    if shape is None:  # Manifest.__post_init__ fills both shapes
        raise ValueError("a manifest's shape was read before __post_init__ filled it")
    c, h, w = shape
    return (c, h, w)


@dataclass
class LoadedModel:
    """A loaded checkpoint. unet is set for a UNet checkpoint; transformer (and vae) for a DiT; vae for
    every latent model. model_denoiser() and image_decoder() adapt any of them to the sampler and the engine."""

    unet: UNet2DModel | None
    scheduler_config: dict[str, Any]
    manifest: Manifest
    path: Path
    device: torch.device
    transformer: DiTTransformer2DModel | None = None
    vae: AutoencoderKL | None = None

    @property
    def network(self) -> UNet2DModel | DiTTransformer2DModel:
        """The denoiser's network: the one app.models.attention perturbs (perturbation_support)."""
        return self.transformer if self.manifest.kind == "dit" else self.unet


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_unet(image_size: int, num_classes: int, block_out_channels=(32, 64, 128)) -> UNet2DModel:
    """The class-conditional UNet: num_classes labels plus one null label (index num_classes)."""
    depth = len(block_out_channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * depth,
        up_block_types=("UpBlock2D",) * depth,
        num_class_embeds=num_classes + 1,
        norm_num_groups=8,
    )


def build_dit(
    image_size: int, num_classes: int, num_layers: int = 6, heads: int = 4, head_dim: int = 48, patch_size: int = 2
) -> DiTTransformer2DModel:
    """A pixel-space class-conditional DiT (adaLN-Zero) for one-channel images: num_classes labels plus one null
    label (index num_classes: diffusers' label embedding adds it). Trained by research.train --arch dit."""
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=image_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )


def save_checkpoint(
    path: Path,
    network: UNet2DModel | DiTTransformer2DModel,
    noise_scheduler: ConfigMixin,
    manifest_fields: dict[str, Any],
) -> Manifest:
    """Write a checkpoint folder, a UNet's or a pixel-space DiT's: the manifest's kind follows the network, and its
    weights_sha256 is computed from the written file."""
    path = Path(path)
    kind = "dit" if isinstance(network, DiTTransformer2DModel) else "unet"
    folder = "transformer" if kind == "dit" else "unet"  # Manifest.denoiser_folder
    (path / folder).mkdir(parents=True, exist_ok=True)
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    network.save_config(path / folder)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    save_file(state, path / folder / WEIGHTS_NAME)
    noise_scheduler.save_config(path / "scheduler")
    manifest = Manifest(**manifest_fields, kind=kind, weights_sha256=sha256_file(path / folder / WEIGHTS_NAME))
    (path / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file is not valid JSON: {path} ({exc})") from exc


@dataclass(frozen=True)
class VerifiedCheckpoint:
    manifest: Manifest
    configs: dict[str, dict[str, Any]]  # component folder -> its config.json
    scheduler_config: dict[str, Any]
    weight_files: dict[str, list[Path]]  # component folder -> its verified weight files

    @property
    def unet_config(self) -> dict[str, Any]:
        return self.configs["unet"]

    @property
    def weights(self) -> Path:
        """The denoiser's (first) weight file."""
        return self.weight_files[self.manifest.denoiser_folder][0]


def read_manifest(checkpoint: Path | str) -> Manifest:
    """A checkpoint's manifest alone, weights unverified: for what must be known before loading (class
    names, shapes) without hashing gigabytes twice; load_checkpoint verifies everything."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint folder missing: {checkpoint}")
    return _read_manifest(checkpoint / "manifest.json")


def _read_manifest(path: Path) -> Manifest:
    raw = _read_json(path)
    try:
        return Manifest(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest has wrong fields: {path} ({exc})") from exc


def _checkpoint_file(folder: Path, relpath: str, manifest: Manifest, manifest_path: Path) -> Path:
    """A manifest's relative path, refused unless it lies in one of the checkpoint's component folders."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2 or rel.parts[0] not in manifest.components:
        raise CheckpointError(
            f"checkpoint manifest names a weight file outside {', '.join(manifest.components)}/: "
            f"{relpath!r} in {manifest_path}"
        )
    return folder / rel.parts[0] / rel.parts[1]


def verify_checkpoint(path: Path | str) -> VerifiedCheckpoint:
    """Check every file of a checkpoint folder and every weight file's sha256, without loading them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder missing: {path}")
    manifest_path = path / "manifest.json"
    manifest = _read_manifest(manifest_path)
    configs = {c: _read_json(path / c / "config.json") for c in manifest.components}
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    weight_files: dict[str, list[Path]] = {}
    for relpath, expected in manifest.files.items():
        weights = _checkpoint_file(path, relpath, manifest, manifest_path)
        if not weights.is_file():
            raise CheckpointError(f"checkpoint file missing: {weights}")
        actual = sha256_file(weights)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint weights fail verification: {weights} has sha256 {actual[:12]}..., "
                f"{manifest_path.name} expects {expected[:12]}..."
            )
        weight_files.setdefault(PurePosixPath(relpath).parts[0], []).append(weights)
    for component in manifest.components:
        if component not in weight_files:
            raise CheckpointError(f"checkpoint manifest lists no weights for {path / component}: {manifest_path}")
    return VerifiedCheckpoint(manifest, configs, scheduler_config, weight_files)


def _load_module(
    component: str, config: dict[str, Any], weight_files: list[Path], folder: Path, device: torch.device
) -> ModelMixin:
    """Build a component from its config and load its (verified) safetensors into it, strictly."""
    state: dict[str, torch.Tensor] = {}
    for weights in weight_files:
        try:
            state.update(load_file(weights))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint weights unreadable: {weights} ({exc})") from exc
    model = MODEL_CLASSES[component].from_config(config)
    # VAEs saved before diffusers 0.14 name their attention weights query/key/value/proj_attn; diffusers'
    # own from_pretrained renames them with this (private, recent) method, so a strict load of such a VAE works too.
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        fix_keys(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match {folder / 'config.json'}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify and load any checkpoint folder onto `device`, in eval mode, float32. Never unpickles."""
    path = Path(path)
    ckpt = verify_checkpoint(path)
    device = torch.device(device)
    modules = {
        c: _load_module(c, ckpt.configs[c], ckpt.weight_files[c], path / c, device) for c in ckpt.manifest.components
    }
    return LoadedModel(
        unet=modules.get("unet"),
        scheduler_config=ckpt.scheduler_config,
        manifest=ckpt.manifest,
        path=path,
        device=device,
        transformer=modules.get("transformer"),
        vae=modules.get("vae"),
    )


class UNetDenoiser(HookedDenoiser):
    """Adapt the UNet to the sampler's Denoiser signature: (x, timesteps, class_labels[, embed_delta]) -> eps.

    embed_delta (rows, D) is added to the rows' class embeddings (CADS) by a forward hook on the UNet's
    class_embedding, held only for that call: all of a model's forwards run in one thread. eps_channels,
    where given, keeps that many leading output channels (a UNet with a learned variance)."""

    def __init__(self, unet: UNet2DModel, eps_channels: int | None = None) -> None:
        self.unet = unet
        self.eps_channels = eps_channels
        self.label_embedders = [unet.class_embedding]

    @property
    def network(self) -> UNet2DModel:
        return self.unet

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, timesteps, class_labels=class_labels).sample
        return out if self.eps_channels is None else out[:, : self.eps_channels]

    def cache_support(self) -> dict[str, str | None]:
        support = super().cache_support()
        try:
            max_branch(self.unet)
        except DeepCacheError as exc:
            return {**support, "deepcache": str(exc)}
        return {**support, "deepcache": None}

    def deepcache_branches(self) -> int:
        return max_branch(self.unet)

    def _forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
        hooks: Hooks,
    ) -> RowsOut:
        """deepcache: the class embedding is computed once for all rows, so only perturbed rows' hooks make
        every row run the deep part."""
        branches = cast(Sequence[int | None], settings)
        out = forward_rows(self.unet, x, timesteps, class_labels, branches, cached, deep_all=hooks.perturb)
        return out if self.eps_channels is None else replace(out, eps=out.eps[:, : self.eps_channels])

    @torch.inference_mode()
    def class_embedding(self, label: int) -> torch.Tensor:
        """The model's embedding of one class label, shape (D,): the table's row, read without calling the
        module, whose CADS hook a forward in the compute thread may hold meanwhile."""
        return self.unet.class_embedding.weight[label].float().clone()


def unet_denoiser(unet: UNet2DModel) -> UNetDenoiser:
    return UNetDenoiser(unet)


def model_denoiser(model: LoadedModel) -> UNetDenoiser | DiTDenoiser:
    """The Denoiser for any loaded checkpoint: eps of the sample_shape channels, learned variance dropped.
    Both adapters have class_embedding(label) for CADS."""
    m = model.manifest
    eps_channels = m.sample_shape[0] if m.learned_sigma == "drop" else None
    if m.kind == "dit":
        return DiTDenoiser(model.transformer, eps_channels)
    return UNetDenoiser(model.unet, eps_channels)


def image_decoder(model: LoadedModel) -> ImageDecoder:
    """finished samples (N, C, h, w) -> uint8 images (N, H, W, C'): the VAE's decode for a latent model,
    else the samples themselves. Runs the VAE: call it in the model's thread."""
    vae, scaling_factor = model.vae, model.manifest.vae_scaling_factor
    if scaling_factor is not None:  # manifest.latent

        def decode(latents: torch.Tensor) -> np.ndarray:
            return decode_latents(vae, latents, scaling_factor)

        return decode
    return to_uint8
