"""A request's guidance method settings, as the engine takes them (free of HTTP schemas)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuidanceMethod:
    """Which combine turns eps_cond and eps_uncond into the guided eps. The APG fields apply to apg."""

    kind: str = "cfg"  # a key of app.guidance.GUIDERS
    eta: float = 0.0  # the paper's recommendation: drop the parallel part, which oversaturates
    momentum: float = -0.5  # the paper's negative momentum
    # |dD| is clamped per image, over all pixels in x0 space. SDXL's r = 15 does not carry over to 28x28
    # images in [-1, 1]: sweeps on the shipped model (docs/guidance.md) had FID fall as r fell from 16 to
    # 0.25 at s = 5 (2.7x to 0.96x that of s = 1), with accuracy 0.98-1.0 throughout.
    norm_threshold: float = 0.25
