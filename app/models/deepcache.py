"""DeepCache (Ma et al., CVPR 2024) for a UNet2DModel, decided row by row (issue 27, its first part).

A UNet's deep features change slowly between neighbouring steps, its shallow path does not. At branch k the
network is split where up block -(k+1) (counted from the output end) takes its input:

- the shallow path: the time and class embedding, conv_in, down blocks 0..k (block k without its
  downsampler), up blocks -(k+1)..-1 and the output convolution; at branch 0 on the shipped UNet, 25% of the
  forward's FLOPs (139 of 558 MFLOP per row, torch's FLOP counter);
- the deep part: down block k's downsampler, the down blocks after it, the mid block, and the up blocks
  before -(k+1). Its output, the features entering up block -(k+1), is what a row caches.

`forward_rows` runs one forward in which each row chooses for itself, its branch included: a row without a
cached tensor runs the whole network and returns its new deep features at its branch, to be cached; a row with
one runs only its shallow path and reuses them. The network is walked level by level (a level: one down block's
resolution and the up block that mirrors it); each level's layers run once, on the gathered rows that reach it,
so the deep part runs only on the rows that need it. Every op is row-wise: nothing of a row depends on the other
rows of the forward, so a request's images don't depend on what it was batched with, and the cache lives wherever
the caller keeps it (the request's run, which frees it when the run leaves).

With deep_all (a forward with perturbed rows, whose hooks select rows by their index in the whole forward) every
row runs the deep part, and a cached row still takes its cached features at its branch: the same outputs, at the
full forward's cost.
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
    deep: tuple[torch.Tensor | None, ...]  # per row: its features entering up block -(branch + 1), to cache
    full_rows: int  # rows whose deep part this forward computed
    shallow: tuple[bool, ...]  # per row: whether it ran only its shallow path (not computed: its cached part)


def _levels(unet: UNet2DModel) -> int:
    """The UNet's levels, where each up block takes exactly the skips its level's down path gives (the
    level-by-level walk needs it; true of diffusers' layouts); DeepCacheError where it does not."""
    down, up = unet.down_blocks, unet.up_blocks
    for level, block in enumerate(down):
        given = 1 + len(block.resnets)  # conv_in's output or the previous level's downsampler's, then the resnets'
        if level > 0 and down[level - 1].downsamplers is None:
            given -= 1
        if given != len(up[len(up) - 1 - level].resnets):
            raise DeepCacheError(f"this UNet's skip connections cross its levels at level {level}")
    return len(down)


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
    _levels(unet)
    return branches - 1


def check_branch(unet: UNet2DModel, branch: int) -> None:
    """DeepCacheError naming the allowed branches where this one is not."""
    deepest = max_branch(unet)
    if not 0 <= branch <= deepest:
        raise DeepCacheError(f"deepcache branch must be 0..{deepest} for this UNet (got {branch})")


def _embedding(unet: UNet2DModel, timesteps: torch.Tensor, class_labels: torch.Tensor, rows: int) -> torch.Tensor:
    """diffusers' UNet2DModel.forward, its step 1: the time embedding plus the class embedding."""
    if timesteps.dim() == 0:
        timesteps = timesteps[None]
    timesteps = timesteps.to(class_labels.device) * torch.ones(rows, dtype=timesteps.dtype, device=class_labels.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    return emb


def _resnets(block: torch.nn.Module, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A down block's resnets (and attentions), not its downsampler: its output and the skips it gives."""
    outputs: tuple = ()
    attentions = getattr(block, "attentions", None)
    resnets: torch.nn.ModuleList = block.resnets  # type: ignore[assignment]
    for i, resnet in enumerate(resnets):
        h = resnet(h, emb)
        if attentions is not None:
            h = attentions[i](h)
        outputs += (h,)
    return h, outputs


def _narrow(t: torch.Tensor, have: list[int], keep: list[int]) -> torch.Tensor:
    """The rows `keep` of t, whose rows are `have` (keep a subsequence of have): t itself where they are all."""
    if len(keep) == len(have):
        return t
    where = {row: i for i, row in enumerate(have)}
    return t.index_select(0, torch.tensor([where[row] for row in keep], device=t.device))


def _stack_like(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The rows stacked into one batch in the memory format of `like` (a skip the batch is concatenated with):
    channels_last where the network runs in it. torch.stack alone gives NCHW, and a concatenation or a
    convolution mixing the two formats copies (9% and 7% of a cached forward's time at branch 0, 32 rows)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return torch.stack([row.permute(1, 2, 0) for row in rows]).permute(0, 3, 1, 2)
    return torch.stack(rows)


def forward_rows(
    unet: UNet2DModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    branch: int | Sequence[int | None],
    cached: Sequence[torch.Tensor | None],
    deep_all: bool = False,
) -> RowsOut:
    """One forward of the rows of `sample`. branch: every row's, or each row's (None: a row that caches nothing,
    run in full); cached[i]: row i's deep features at its branch to reuse, or None to run the deep part for it
    (whose features come back in deep[i]). A full row's output equals the UNet's own (the same ops, on the
    gathered rows)."""
    rows = sample.shape[0]
    branches = [branch] * rows if isinstance(branch, int) else list(branch)
    if len(cached) != rows or len(branches) != rows:
        raise ValueError(f"cached has {len(cached)} entries and branch {len(branches)} for {rows} rows")
    for b in set(branches) - {None}:
        check_branch(unet, b)  # type: ignore[arg-type]
    if any(b is None and c is not None for b, c in zip(branches, cached, strict=True)):
        raise ValueError("a row with cached features needs the branch they were cached at")
    levels = len(unet.down_blocks)
    # The deepest level each row's layers run at (levels: the mid block too), and where a cached row's features
    # enter the up path.
    depth: list[int] = [levels if c is None or deep_all else b for b, c in zip(branches, cached, strict=True)]  # type: ignore[misc]
    enter = [None if c is None else b for b, c in zip(branches, cached, strict=True)]
    emb_all = _embedding(unet, timesteps, class_labels, rows)

    h = unet.conv_in(sample)
    alive = list(range(rows))  # the rows of h, in order
    first: tuple = (h,)
    skips: list[tuple[list[int], tuple]] = []  # per level: its rows and the skips its up block takes
    for level, block in enumerate(unet.down_blocks):
        h, outputs = _resnets(block, h, _narrow(emb_all, list(range(rows)), alive))
        skips.append((alive, first + outputs))
        deeper = [i for i in alive if depth[i] > level]
        alive = deeper
        if not deeper:  # every row is cached at this level or above: the levels below run no row
            skips += [([], ())] * (levels - 1 - level)
            break
        h = _narrow(h, skips[-1][0], deeper)
        first = ()
        if block.downsamplers is not None:
            for downsampler in block.downsamplers:
                h = downsampler(h)
            first = (h,)
    if alive and unet.mid_block is not None:
        h = unet.mid_block(h, _narrow(emb_all, list(range(rows)), alive))

    deep: list[torch.Tensor | None] = [None] * rows
    for level in reversed(range(levels)):
        level_rows, taken = skips[level]
        if not level_rows:
            continue
        entering = [i for i in level_rows if enter[i] == level]
        if entering:  # the cached rows entering here join the rows coming up from below, in row order
            coming = {row: j for j, row in enumerate(alive)}
            parts = [cached[i] if enter[i] == level else h[coming[i]] for i in level_rows]
            h = _stack_like(parts, taken[-1])  # type: ignore[arg-type]
        for j, i in enumerate(level_rows):
            if cached[i] is None and branches[i] == level:
                deep[i] = h[j].clone()  # a row of its own: the batch's tensor is not kept alive by it
            elif enter[i] == level:
                deep[i] = cached[i]
        up = unet.up_blocks[levels - 1 - level]
        h = up(h, taken, _narrow(emb_all, list(range(rows)), level_rows))
        alive = level_rows
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    shallow = tuple(d < levels for d in depth)
    return RowsOut(out, tuple(deep), sum(1 for d in depth if d == levels), shallow)
