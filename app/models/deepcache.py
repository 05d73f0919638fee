"""DeepCache (Ma et al., CVPR 2024) for a UNet2DModel, decided row by row (issue 27, its first part).

A UNet's deep features change slowly between neighbouring steps, its shallow path does not. At branch k the
network is split where up block -(k+1) (counted from the output end) takes its input:

- the shallow path: the time and class embedding, conv_in, down blocks 0..k (block k without its
  downsampler), up blocks -(k+1)..-1 and the output convolution; at branch 0 on the shipped UNet, 25% of the
  forward's FLOPs (139 of 558 MFLOP per row, torch's FLOP counter);
- the deep part: down block k's downsampler, the down blocks after it, the mid block, and the up blocks
  before -(k+1). Its output, the features entering up block -(k+1), is what a row caches.

`forward_rows` runs one forward in which each row chooses for itself: a row without a cached tensor runs the
whole network (the deep part on the gathered full rows only, in one call) and returns its new deep features to
be cached; a row with one runs only the shallow path and reuses them. Nothing of a row depends on the other
rows of the forward, so a request's images don't depend on what it was batched with, and the cache lives
wherever the caller keeps it (the request's run, which frees it when the run leaves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

# The down blocks whose resnets (and attentions) this module runs without their downsampler, at the split.
SPLITTABLE_DOWN = {"DownBlock2D", "AttnDownBlock2D"}


class DeepCacheError(ValueError):
    """A UNet (or a branch of it) that deepcache can't split; the message says why."""


@dataclass(frozen=True)
class RowsOut:
    eps: torch.Tensor  # (rows, C, H, W): the network's output
    deep: torch.Tensor  # (rows, ...): each row's features entering up block -(branch + 1), to cache
    full_rows: int  # rows that ran the deep part in this forward


def max_branch(unet: UNet2DModel) -> int:
    """The deepest branch this UNet can be split at (DeepCacheError where it can't be at all)."""
    config = unet.config
    if config.time_embedding_type != "positional" or config.center_input_sample:
        raise DeepCacheError("deepcache needs a UNet2DModel with positional time embedding and no input centring")
    if config.class_embed_type is not None:
        raise DeepCacheError(f"deepcache does not support class_embed_type {config.class_embed_type!r}")
    branches = 0
    for block in unet.down_blocks:
        if type(block).__name__ not in SPLITTABLE_DOWN:
            break
        branches += 1
    if branches == 0 or len(unet.up_blocks) != len(unet.down_blocks):
        raise DeepCacheError("deepcache needs down blocks of type DownBlock2D or AttnDownBlock2D")
    return branches - 1


def check_branch(unet: UNet2DModel, branch: int) -> None:
    """DeepCacheError naming the allowed branches where this one is not."""
    deepest = max_branch(unet)
    if not 0 <= branch <= deepest:
        raise DeepCacheError(f"deepcache branch must be 0..{deepest} for this UNet (got {branch})")
    # The deep up blocks must take exactly the skips the deep down path gives (true of diffusers' layouts).
    block = unet.down_blocks[branch]
    given = int(block.downsamplers is not None)
    given += sum(len(b.resnets) + int(b.downsamplers is not None) for b in unet.down_blocks[branch + 1 :])
    taken = sum(len(b.resnets) for b in unet.up_blocks[: len(unet.up_blocks) - branch - 1])
    if given != taken:
        raise DeepCacheError(f"this UNet's skip connections cross its split at branch {branch}")


def _embedding(unet: UNet2DModel, timesteps: torch.Tensor, class_labels: torch.Tensor, rows: int) -> torch.Tensor:
    """diffusers' UNet2DModel.forward, its step 1: the time embedding plus the class embedding."""
    if timesteps.dim() == 0:
        timesteps = timesteps[None]
    timesteps = timesteps.to(class_labels.device) * torch.ones(rows, dtype=timesteps.dtype, device=class_labels.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    return emb


def _split_block(block: torch.nn.Module, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Down block k's resnets (and attentions), not its downsampler: its output and the skips it gives."""
    outputs: tuple = ()
    attentions = getattr(block, "attentions", None)
    resnets: torch.nn.ModuleList = block.resnets  # type: ignore[assignment]
    for i, resnet in enumerate(resnets):
        h = resnet(h, emb)
        if attentions is not None:
            h = attentions[i](h)
        outputs += (h,)
    return h, outputs


def forward_rows(
    unet: UNet2DModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    branch: int,
    cached: Sequence[torch.Tensor | None],
) -> RowsOut:
    """One forward of the rows of `sample`; cached[i] is row i's deep features to reuse, or None to run the
    deep part for it. The full rows equal the UNet's own output (the same ops, on the gathered rows)."""
    check_branch(unet, branch)
    rows = sample.shape[0]
    if len(cached) != rows:
        raise ValueError(f"cached has {len(cached)} entries for {rows} rows")
    emb = _embedding(unet, timesteps, class_labels, rows)
    h = unet.conv_in(sample)
    skips: tuple = (h,)
    for block in unet.down_blocks[:branch]:
        h, outputs = block(hidden_states=h, temb=emb)
        skips += outputs
    h, outputs = _split_block(unet.down_blocks[branch], h, emb)
    skips += outputs

    full = [i for i, c in enumerate(cached) if c is None]
    deep_rows: list[torch.Tensor | None] = list(cached)
    if full:
        index = torch.tensor(full, device=sample.device)
        deep = _deep(unet, branch, h.index_select(0, index), emb.index_select(0, index))
        for j, i in enumerate(full):
            deep_rows[i] = deep[j]
    deep_all = torch.stack([d for d in deep_rows if d is not None])

    # The up blocks of the shallow path take their skips from the end of what the shallow down path gave.
    up = deep_all
    remaining = skips
    for block in unet.up_blocks[len(unet.up_blocks) - branch - 1 :]:
        taken, remaining = remaining[-len(block.resnets) :], remaining[: -len(block.resnets)]
        up = block(up, taken, emb)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(up)))
    return RowsOut(out, deep_all, len(full))


def _deep(
    unet: UNet2DModel,
    branch: int,
    h: torch.Tensor,
    emb: torch.Tensor,
) -> torch.Tensor:
    """The deep part on the full rows (their h at the split and their embeddings, gathered)."""
    block = unet.down_blocks[branch]
    skips: tuple = ()
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            h = downsampler(h)
        skips += (h,)
    for deeper in unet.down_blocks[branch + 1 :]:
        h, outputs = deeper(hidden_states=h, temb=emb)
        skips += outputs
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb)
    remaining = skips  # the deep up blocks take exactly these (check_branch)
    for up in unet.up_blocks[: len(unet.up_blocks) - branch - 1]:
        taken, remaining = remaining[-len(up.resnets) :], remaining[: -len(up.resnets)]
        h = up(h, taken, emb)
    return h
