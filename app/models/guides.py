"""Which served checkpoint may guide which (autoguidance, docs/autoguidance.md): a guide is read at the main
model's inputs, so it must be the same task: the same classes in the same order, the same null label, the same
sample shape and space, the same prediction type and the same training noise schedule (the timesteps of a
request's sampler come from the main model's scheduler, and mean the same noise level to the guide only then)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from app.models.checkpoint import Manifest

# The scheduler settings that fix the training noise schedule (alpha_bar at each timestep).
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
)


class Checkpoint(Protocol):
    """What the check reads of a checkpoint: a VerifiedCheckpoint (before loading) or a LoadedModel."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def scheduler_config(self) -> dict[str, Any]: ...


def guide_mismatch(main: Checkpoint, guide: Checkpoint) -> str | None:
    """Why `guide` cannot guide `main`, in a few words; None where it can."""
    m, g = main.manifest, guide.manifest
    if m.name == g.name:
        return "a model cannot guide itself"
    checks: list[tuple[str, Any, Any]] = [
        ("class names", m.class_names, g.class_names),
        ("null label", m.null_label, g.null_label),
        ("sample shape", m.sample_shape, g.sample_shape),
        ("latent space (VAE scaling factor)", m.vae_scaling_factor, g.vae_scaling_factor),
        ("prediction type", m.prediction_type, g.prediction_type),
    ]
    checks += [(f"noise schedule ({key})", main.scheduler_config.get(key), guide.scheduler_config.get(key))
               for key in NOISE_SCHEDULE_KEYS]  # fmt: skip
    for what, ours, theirs in checks:
        if ours != theirs:
            return f"other {what}: {theirs!r}, where {m.name} has {ours!r}"
    return None


def guide_pairs(checkpoints: Sequence[Checkpoint]) -> dict[str, dict[str, str | None]]:
    """main name -> {other served name: why it cannot guide main, or None where it can}."""
    return {
        main.manifest.name: {
            other.manifest.name: guide_mismatch(main, other)
            for other in checkpoints
            if other.manifest.name != main.manifest.name
        }
        for main in checkpoints
    }
