"""Import a local diffusers folder into model_store/ as a checkpoint this service loads (app/models/checkpoint.py):
plan it (app/models/import_plan.py says what is accepted and why anything else is refused), copy its configs
and weights with their sha256 into a hidden folder, load it back, then rename it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from app.models.checkpoint import WEIGHTS_NAME, CheckpointError, LoadedModel, Manifest, load_checkpoint
from app.models.import_plan import (
    INDEX_NAME,
    NAME_PATTERN,
    NEEDS_CLASSES,
    ImportPlan,
    ImportRefused,
    plan_import,
    read_classes_file,
)

__all__ = ["ImportPlan", "ImportRefused", "import_model", "plan_import", "read_classes_file", "write_checkpoint"]


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy a file's bytes (following links: the Hub cache links to blobs) and return their sha256."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def _copy_component(
    src_dir: Path, config: dict[str, Any], files: list[Path], dst_dir: Path, folder: str
) -> dict[str, str]:
    """config.json and the weights of one component; returns {relative path: sha256} of the weights."""
    dst_dir.mkdir()
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(files) == 1:  # a lone variant file (.fp16.safetensors) is stored under the canonical name
        return {f"{folder}/{WEIGHTS_NAME}": _copy_hashed(files[0], dst_dir / WEIGHTS_NAME)}
    shutil.copyfile(src_dir / INDEX_NAME, dst_dir / INDEX_NAME)
    return {f"{folder}/{f.name}": _copy_hashed(f, dst_dir / f.name) for f in files}


def _denoiser_sha256(files: dict[str, str], folder: str) -> str:
    mine = {k: v for k, v in files.items() if k.startswith(folder + "/")}
    if len(mine) == 1:
        return next(iter(mine.values()))
    lines = "".join(f"{sha}  {path}\n" for path, sha in sorted(mine.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_checkpoint(plan: ImportPlan, dst: Path, name: str) -> Manifest:
    """Copy the plan's configs and weights into dst (which must not exist yet) and write its manifest."""
    dst.mkdir()
    folder = plan.denoiser_folder
    files = _copy_component(plan.denoiser_dir, plan.denoiser_config, plan.denoiser_weights, dst / folder, folder)
    if plan.vae_dir is not None and plan.vae_config is not None:  # both or neither
        files |= _copy_component(plan.vae_dir, plan.vae_config, plan.vae_weights, dst / "vae", "vae")
    (dst / "scheduler").mkdir()
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(plan.scheduler_config, indent=2) + "\n")
    manifest = Manifest(
        name=name,
        class_names=plan.class_names,
        null_label=plan.null_label,
        image_size=plan.latent_shape[1],
        in_channels=plan.latent_shape[0],
        prediction_type="epsilon",
        weights_sha256=_denoiser_sha256(files, plan.denoiser_folder),
        kind=plan.kind,
        files=files,
        image_shape=plan.image_shape,
        latent_shape=plan.latent_shape,
        vae_scaling_factor=float(plan.vae_config.get("scaling_factor", 0.18215)) if plan.vae_config else None,
        learned_sigma=plan.learned_sigma,
        source={**plan.source, "notes": plan.notes},
    )
    (dst / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def _check_null_embedding(model: LoadedModel) -> None:
    """The null label must have its own row in the class-embedding table."""
    m = model.manifest
    if model.transformer is not None:  # a DiT
        rows = model.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    elif model.unet is not None:
        rows = model.unet.class_embedding.num_embeddings
    else:
        raise ImportRefused(f"{model.path} holds no denoiser (manifest kind {m.kind!r})")
    if rows != m.null_label + 1:
        raise ImportRefused(
            f"{NEEDS_CLASSES} with a null label: its class embedding has {rows} rows for null label {m.null_label}"
        )


def import_model(
    src: Path | str,
    name: str,
    store: Path | str,
    class_names: list[str] | None = None,
    scheduler_file: Path | str | None = None,
) -> tuple[Path, Manifest]:
    """Import src as store/name: plan, copy into a hidden folder, load it back (every sha256 verified and
    every weight loaded strictly), then rename it into place. Nothing is left behind on a refusal."""
    if not NAME_PATTERN.fullmatch(name):
        raise ImportRefused(
            f"--name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    store = Path(store)
    dst = store / name
    if dst.exists():
        raise ImportRefused(f"{dst} already exists: choose another --name or remove it")
    plan = plan_import(src, class_names, scheduler_file)
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f".{name}.importing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = write_checkpoint(plan, staging, name)
        try:
            _check_null_embedding(load_checkpoint(staging, "cpu"))
        except CheckpointError as exc:
            raise ImportRefused(f"the copied checkpoint does not load: {exc}") from exc
        os.rename(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst, manifest
