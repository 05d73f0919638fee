"""A checkpoint folder in model_store/, in diffusers' own layout plus a manifest:

    <name>/unet/config.json
    <name>/unet/diffusion_pytorch_model.safetensors
    <name>/scheduler/scheduler_config.json
    <name>/manifest.json      class names, null label, image size, training settings, weights sha256

Loading verifies the sha256 before reading the weights and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file."""


@dataclass(frozen=True)
class Manifest:
    name: str
    class_names: list[str]
    null_label: int
    image_size: int
    in_channels: int
    prediction_type: str
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    manifest: Manifest
    path: Path
    device: torch.device


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


def save_checkpoint(
    path: Path, unet: UNet2DModel, noise_scheduler: ConfigMixin, manifest_fields: dict[str, Any]
) -> Manifest:
    """Write a checkpoint folder; the manifest's weights_sha256 is computed from the written file."""
    path = Path(path)
    (path / "unet").mkdir(parents=True, exist_ok=True)
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    unet.save_config(path / "unet")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, path / "unet" / WEIGHTS_NAME)
    noise_scheduler.save_config(path / "scheduler")
    manifest = Manifest(**manifest_fields, weights_sha256=sha256_file(path / "unet" / WEIGHTS_NAME))
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
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    weights: Path


def verify_checkpoint(path: Path | str) -> VerifiedCheckpoint:
    """Check every file of a checkpoint folder and the weights' sha256, without loading them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder missing: {path}")
    manifest_path = path / "manifest.json"
    raw = _read_json(manifest_path)
    try:
        manifest = Manifest(**raw)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint manifest has wrong fields: {manifest_path} ({exc})") from exc
    unet_config = _read_json(path / "unet" / "config.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    weights = path / "unet" / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"checkpoint file missing: {weights}")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"checkpoint weights fail verification: {weights} has sha256 {actual[:12]}..., "
            f"{manifest_path.name} expects {manifest.weights_sha256[:12]}..."
        )
    return VerifiedCheckpoint(manifest, unet_config, scheduler_config, weights)


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify and load a checkpoint folder onto `device`, in eval mode. Never unpickles."""
    path = Path(path)
    ckpt = verify_checkpoint(path)
    try:
        state = load_file(ckpt.weights)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint weights unreadable: {ckpt.weights} ({exc})") from exc
    unet = UNet2DModel.from_config(ckpt.unet_config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match {path / 'unet' / 'config.json'}: {exc}") from exc
    device = torch.device(device)
    unet.to(device).eval().requires_grad_(False)
    return LoadedModel(
        unet=unet, scheduler_config=ckpt.scheduler_config, manifest=ckpt.manifest, path=path, device=device
    )


class UNetDenoiser:
    """Adapt the UNet to the sampler's Denoiser signature: (x, timesteps, class_labels[, embed_delta]) -> eps.

    embed_delta (rows, D) is added to the rows' class embeddings (CADS) by a forward hook on the UNet's
    class_embedding, held only for that call: all of a model's forwards run in one thread."""

    def __init__(self, unet: UNet2DModel) -> None:
        self.unet = unet

    @torch.inference_mode()
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        embed_delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if embed_delta is None:
            return self.unet(x, timesteps, class_labels=class_labels).sample
        hook = self.unet.class_embedding.register_forward_hook(lambda _m, _i, out: out + embed_delta.to(out.dtype))
        try:
            return self.unet(x, timesteps, class_labels=class_labels).sample
        finally:
            hook.remove()

    @torch.inference_mode()
    def class_embedding(self, label: int) -> torch.Tensor:
        """The model's embedding of one class label, shape (D,)."""
        table = self.unet.class_embedding
        return table(torch.tensor([label], device=table.weight.device))[0].float().clone()


def unet_denoiser(unet: UNet2DModel) -> UNetDenoiser:
    return UNetDenoiser(unet)
