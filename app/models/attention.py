"""Guidance from the model's own attention: ONE forward in which chosen rows run with perturbed self-attention
and every other row exactly as in the plain forward.

  pag  Perturbed-attention guidance (Ahn et al. 2024): a perturbed row's self-attention map is the identity,
       softmax(Q K^T / sqrt(d)) -> I, so the layer gives to_out(V) (diffusers' PAGIdentitySelfAttnProcessor2_0).
  seg  Smoothed energy guidance (Hong 2024): a perturbed row's queries are blurred over the token grid by a 2D
       Gaussian of std blur_sigma, which blurs its attention logits (they are linear in Q). Above SEG's own
       threshold (SEG_INF_SIGMA) a query becomes its mean over the tokens: every token attends alike.
  slg  Skip-layer guidance (Stable Diffusion 3.5; diffusers' SkipLayerGuidance): a perturbed row skips chosen
       transformer blocks, whose output is then their input.

Where (perturbation_support): pag and seg on a model's self-attention layers, numbered in module order (a
UNet's: by default those of its mid block; a DiT's: block i's attn1, by default the middle block's); slg on a
DiT's transformer blocks (by default the middle one). A UNet has no transformer blocks to skip.

How: forward hooks on the layers' projections (to_q for seg; to_v and to_out[0] for pag) and on the blocks
(slg), registered for one call and acting only in the thread that made it, as CADS's hook does
(app/models/denoiser.py). Every hook lets the plain op run over all rows and then picks each perturbed row's
replacement with torch.where over a per-row mask: the other rows pass through exactly the plain forward's ops at
the same row count, so they are bit-equal to it, and a perturbed row depends on no other row either.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch.utils.hooks import RemovableHandle

PerturbationKind = Literal["pag", "seg", "slg"]
KINDS: tuple[str, ...] = ("pag", "seg", "slg")
# SEG-SDXL's inf_blur_threshold: a blur_sigma above it stands for infinity (the query replaced by its mean).
SEG_INF_SIGMA = 9999.0
# The attention processors whose forward calls to_q, to_v and to_out[0] once each on (rows, tokens, channels)
# tensors, in one channel layout: the hooks rely on it.
KNOWN_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
# int8's forward is a quantized graph (app/models/quantize.py), not the modules the hooks are on.
INT8_REASON = "precision int8 runs a quantized graph that the perturbation's hooks cannot reach: use fp32 or bf16"


class PerturbationError(ValueError):
    """A perturbation this model or this precision cannot run, or layers it does not have. The message names
    the allowed values."""


@dataclass(frozen=True)
class Perturbation:
    """What one request's perturbed rows get. layers: indices into perturbation_support(...)[kind].layers;
    None: its default_layers. blur_sigma: seg only."""

    kind: PerturbationKind
    layers: tuple[int, ...] | None = None
    blur_sigma: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PerturbationError(f"perturbation kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.blur_sigma > 0:
            raise PerturbationError(f"blur_sigma must be > 0, not {self.blur_sigma!r}")
        if self.layers is not None:
            if not self.layers:
                raise PerturbationError("layers must name at least one layer (or be None for the model's default)")
            object.__setattr__(self, "layers", tuple(self.layers))  # a list from JSON: kept hashable


class RowPerturbations:
    """Which rows of one forward are perturbed, and how: each distinct Perturbation with the bool mask (rows,)
    of its rows, on the forward's device. The rows of no group run plain."""

    def __init__(self, groups: Sequence[tuple[Perturbation, torch.Tensor]], rows: int) -> None:
        for _, mask in groups:
            if mask.dtype != torch.bool or mask.shape != (rows,):
                raise ValueError(f"each mask must be bool of shape ({rows},), not {mask.dtype} {tuple(mask.shape)}")
        self.groups = tuple(groups)
        self.rows = rows

    @classmethod
    def from_rows(cls, per_row: Sequence[Perturbation | None], device: torch.device | str) -> RowPerturbations:
        """One entry per row of the forward (None: plain), grouped by equal perturbation into masks."""
        indices: dict[Perturbation, list[int]] = {}
        for i, perturbation in enumerate(per_row):
            if perturbation is not None:
                indices.setdefault(perturbation, []).append(i)
        groups = []
        for perturbation, rows in indices.items():
            mask = torch.zeros(len(per_row), dtype=torch.bool)
            mask[rows] = True
            groups.append((perturbation, mask.to(device)))
        return cls(groups, len(per_row))


@dataclass(frozen=True)
class PerturbationSupport:
    """Whether a model runs one kind of perturbation, on which layers, and if not, why."""

    kind: str
    layers: tuple[str, ...]  # module names; a Perturbation's layer i is layers[i]
    default_layers: tuple[int, ...]
    reason: str | None = None  # why it cannot run; None where it can

    @property
    def supported(self) -> bool:
        return self.reason is None


def self_attention_layers(network: torch.nn.Module) -> list[tuple[str, Attention]]:
    """The network's self-attention layers in module order: a DiT's blocks' attn1, a UNet's attention blocks."""
    return [(n, m) for n, m in network.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


def transformer_blocks(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A DiT's transformer blocks, in order; none for a UNet."""
    blocks = getattr(network, "transformer_blocks", None)
    return [] if blocks is None else [(f"transformer_blocks.{i}", b) for i, b in enumerate(blocks)]


@dataclass(frozen=True)
class PerturbationSites:
    """A network's perturbable modules and what it supports, found once (a walk of its modules per forward
    costs about a millisecond): the hooks' targets. Attention processors set after it was built are not seen."""

    support: dict[str, PerturbationSupport]  # at fp32: precision is the caller's (perturbation_support)
    attention: tuple[Attention, ...]  # support["pag"].layers' modules
    blocks: tuple[torch.nn.Module, ...]  # support["slg"].layers' modules


def perturbation_sites(network: torch.nn.Module) -> PerturbationSites:
    """The sites of a UNet2DModel or a DiTTransformer2DModel: its self-attention layers and transformer blocks,
    the default layers of each kind, and why a kind cannot run."""
    attention = self_attention_layers(network)
    blocks = transformer_blocks(network)
    names = tuple(n for n, _ in attention)
    if blocks:
        attn_default: tuple[int, ...] = (len(names) // 2,) if names else ()
    else:
        mid = tuple(i for i, n in enumerate(names) if n.startswith("mid_block."))
        attn_default = mid or tuple(range(len(names)))
    processors = {type(m.processor) for _, m in attention}
    unknown = sorted(p.__name__ for p in processors if not issubclass(p, KNOWN_PROCESSORS))
    no_attention = f"it perturbs self-attention, and this {type(network).__name__} has no self-attention layer"
    attn_reason = no_attention if not names else None
    if unknown:
        attn_reason = f"its hooks know diffusers' AttnProcessor2_0 and AttnProcessor, not {', '.join(unknown)}"
    block_names = tuple(n for n, _ in blocks)
    slg_reason = None if blocks else f"it skips transformer blocks, and this {type(network).__name__} has none"
    support = {
        "pag": PerturbationSupport("pag", names, attn_default, attn_reason),
        "seg": PerturbationSupport("seg", names, attn_default, attn_reason),
        "slg": PerturbationSupport("slg", block_names, (len(blocks) // 2,) if blocks else (), slg_reason),
    }
    return PerturbationSites(support, tuple(m for _, m in attention), tuple(b for _, b in blocks))


def perturbation_support(network: torch.nn.Module, precision: str = "fp32") -> dict[str, PerturbationSupport]:
    """For each kind in KINDS: whether `network` (a UNet2DModel or a DiTTransformer2DModel) served at
    `precision` can run it, its layers and default layers, or the reason it cannot (for the API's 422)."""
    support = perturbation_sites(network).support
    if precision == "int8":
        support = {k: PerturbationSupport(k, s.layers, s.default_layers, INT8_REASON) for k, s in support.items()}
    return support


def resolve_layers(support: PerturbationSupport, perturbation: Perturbation) -> tuple[int, ...]:
    """The perturbation's layer indices (its own, or the default), checked against the model's."""
    if not support.supported:
        raise PerturbationError(f"perturbation {perturbation.kind} cannot run on this model: {support.reason}")
    layers = support.default_layers if perturbation.layers is None else perturbation.layers
    bad = [i for i in layers if not 0 <= i < len(support.layers)]
    if bad:
        raise PerturbationError(
            f"{perturbation.kind} layers {bad} out of range: this model's are 0..{len(support.layers) - 1} "
            f"({', '.join(support.layers)})"
        )
    return tuple(sorted(set(layers)))


def check_perturbation(network: torch.nn.Module, perturbation: Perturbation, precision: str = "fp32") -> None:
    """PerturbationError where `network` at `precision` cannot run `perturbation` (its kind, its layers)."""
    resolve_layers(perturbation_support(network, precision)[perturbation.kind], perturbation)


def seg_kernel_size(blur_sigma: float, side: int) -> int:
    """SEG-SDXL's Gaussian kernel: odd, about 6 sigma wide, no wider than the token grid allows."""
    size = math.ceil(6 * blur_sigma) + 1 - math.ceil(6 * blur_sigma) % 2
    return min(size, side - (side % 2 - 1))


def blur_tokens(q: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """SEG's query blur (Hong 2024, SEG-SDXL's gaussian_blur_2d): q (rows, tokens, channels) on a square token
    grid, each channel blurred by a 2D Gaussian with reflect padding; above SEG_INF_SIGMA, its mean over tokens
    (broadcastable to q)."""
    rows, tokens, channels = q.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise PerturbationError(f"seg blurs a square token grid, and this layer has {tokens} tokens")
    if blur_sigma > SEG_INF_SIGMA:
        return q.mean(dim=1, keepdim=True)
    size = seg_kernel_size(blur_sigma, side)
    half = (size - 1) / 2
    x = torch.linspace(-half, half, size, device=q.device)
    pdf = torch.exp(-0.5 * (x / blur_sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel = (kernel1d[:, None] @ kernel1d[None, :]).to(q.dtype).expand(channels, 1, size, size)
    grid = q.transpose(1, 2).reshape(rows, channels, side, side)
    pad = size // 2
    grid = F.conv2d(F.pad(grid, [pad] * 4, mode="reflect"), kernel, groups=channels)
    return grid.reshape(rows, channels, tokens).transpose(1, 2)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (rows,) mask shaped to broadcast over a (rows, ...) tensor."""
    return mask.view(-1, *[1] * (like.ndim - 1))


def hook_identity_attention(attn: Attention, mask: torch.Tensor, owner: int) -> list[RemovableHandle]:
    """PAG on one layer: the masked rows' attention output replaced by V before the output projection."""
    kept: dict[str, torch.Tensor] = {}

    def keep_value(_module: torch.nn.Module, _inputs: tuple, value: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            kept["value"] = value

    def identity(_module: torch.nn.Module, inputs: tuple) -> tuple | None:
        if threading.get_ident() != owner:
            return None
        out, value = inputs[0], kept.pop("value")
        return (torch.where(_rows(mask, out), value.to(out.dtype), out), *inputs[1:])

    return [attn.to_v.register_forward_hook(keep_value), attn.to_out[0].register_forward_pre_hook(identity)]


def hook_blurred_queries(
    attn: Attention, blurs: Sequence[tuple[float, torch.Tensor]], owner: int
) -> list[RemovableHandle]:
    """SEG on one layer: each (blur_sigma, mask)'s rows get their queries blurred by blur_sigma."""

    def blur(_module: torch.nn.Module, _inputs: tuple, q: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != owner:
            return q
        out = q
        for blur_sigma, mask in blurs:
            out = torch.where(_rows(mask, q), blur_tokens(q, blur_sigma), out)
        return out

    return [attn.to_q.register_forward_hook(blur)]


def hook_skip_block(block: torch.nn.Module, mask: torch.Tensor, owner: int) -> list[RemovableHandle]:
    """SLG on one block: the masked rows' output is the block's input."""

    def skip(_module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != owner:
            return out
        hidden = args[0] if args else kwargs["hidden_states"]
        return torch.where(_rows(mask, out), hidden.to(out.dtype), out)

    return [block.register_forward_hook(skip, with_kwargs=True)]


def perturbation_hooks(sites: PerturbationSites, perturb: RowPerturbations, owner: int) -> list[RemovableHandle]:
    """The hooks that give perturb's rows their perturbations in the sites' network's next forwards in thread
    `owner`. Every perturbation is checked before any hook is registered; the caller removes them after."""
    support, attention, blocks = sites.support, sites.attention, sites.blocks
    identity: dict[int, torch.Tensor] = {}  # layer -> the rows with identity attention
    blurs: dict[int, list[tuple[float, torch.Tensor]]] = {}  # layer -> (blur_sigma, rows)
    skips: dict[int, torch.Tensor] = {}  # block -> the rows that skip it
    for perturbation, mask in perturb.groups:
        for i in resolve_layers(support[perturbation.kind], perturbation):
            if perturbation.kind == "pag":
                identity[i] = identity[i] | mask if i in identity else mask
            elif perturbation.kind == "seg":
                blurs.setdefault(i, []).append((perturbation.blur_sigma, mask))
            else:
                skips[i] = skips[i] | mask if i in skips else mask
    hooks = []
    for i, mask in identity.items():
        hooks += hook_identity_attention(attention[i], mask, owner)
    for i, sigma_masks in blurs.items():
        hooks += hook_blurred_queries(attention[i], sigma_masks, owner)
    for i, mask in skips.items():
        hooks += hook_skip_block(blocks[i], mask, owner)
    return hooks
