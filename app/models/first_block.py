"""First-Block Cache for a DiT (DiTTransformer2DModel), decided row by row (issue 27, its second part).

As ParaAttention's and diffusers' FirstBlockCache: a step runs the first transformer block, and where the change
of that block's residual since the row's last full step is small, skips the other blocks and adds their residual
from that full step instead:

    r1 = block_0(h) - h                                          the first block's residual
    change = mean|r1 - r1_full| / mean|r1_full|                  r1_full: at the row's last full step
    change < threshold:  h_out = block_0(h) + r_rest_full        the other blocks skipped
    otherwise:           h_out = blocks_1..n(block_0(h)),  r1_full, r_rest_full = r1, h_out - block_0(h)

Each row decides for itself, from its own residuals only (the mean runs over its tokens and channels, not over
the batch as diffusers' hook does), and keeps its own state: one tensor (2, tokens, channels) holding r1_full
and r_rest_full. So a row's output does not depend on what it was batched with. The blocks after the first run
once, on the gathered rows that need them; the patch embedding, the first block and the final layer run on all
rows. With all_rows (a forward whose hooks select rows by their index in the whole forward: CADS's embedding
delta, perturbed attention, skipped layers) every row runs every block, and a row that skips takes its cached
residual all the same: the same outputs, at the full forward's cost.

A decision is a comparison of a float with the threshold: a row's residuals are the same ops on the same row in
any batch, within the last bits of a matmul whose row count changed, so a row whose change lies within about
1e-6 of its threshold could decide the other way in another batch. The chance is of that order per row and step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from app.models.deepcache import RowsOut


class FirstBlockError(ValueError):
    """A transformer first_block can't run; the message says why."""


def check_first_block(transformer: torch.nn.Module) -> None:
    """FirstBlockError where `transformer` is not a DiT this module can walk block by block."""
    if not isinstance(transformer, DiTTransformer2DModel):
        name = type(transformer).__name__
        raise FirstBlockError(f"first_block skips a DiT's transformer blocks, and this is a {name}")
    if transformer.config.norm_type != "ada_norm_zero":
        raise FirstBlockError(f"first_block needs a DiT with ada_norm_zero blocks, not {transformer.config.norm_type}")
    if len(transformer.transformer_blocks) < 2:
        raise FirstBlockError("first_block needs a DiT of at least two transformer blocks")


def relative_change(r1: torch.Tensor, held: Sequence[torch.Tensor | None]) -> list[float | None]:
    """Per row i: mean|r1[i] - r1_full| / mean|r1_full|, r1_full its state's first residual (held[i][0])."""
    rows = [i for i, h in enumerate(held) if h is not None]
    out: list[float | None] = [None] * len(held)
    if not rows:
        return out
    before = torch.stack([held[i][0] for i in rows]).float()  # type: ignore[index]
    now = r1[rows].float()
    change = (now - before).abs().flatten(1).mean(1) / before.abs().flatten(1).mean(1).clamp_min(1e-12)
    for i, value in zip(rows, change.tolist(), strict=True):
        out[i] = value
    return out


def forward_rows(
    transformer: DiTTransformer2DModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    thresholds: Sequence[float | None],
    held: Sequence[torch.Tensor | None],
    all_rows: bool = False,
) -> RowsOut:
    """One forward of the rows of `sample`. thresholds[i]: row i's (None: a row that caches nothing, run in
    full); held[i]: its state from its last full step, (2, tokens, channels), or None (it runs in full). A row
    run in full with a threshold returns its new state in deep[i]; a row that skipped returns its held state."""
    rows = sample.shape[0]
    if len(thresholds) != rows or len(held) != rows:
        raise ValueError(f"held has {len(held)} entries and thresholds {len(thresholds)} for {rows} rows")
    if any(t is None and h is not None for t, h in zip(thresholds, held, strict=True)):
        raise ValueError("a row with a held state needs a threshold")
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(rows)
    dtype = transformer.dtype
    blocks = transformer.transformer_blocks
    patch = transformer.patch_size

    def block(b: torch.nn.Module, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return b(h, timestep=t, class_labels=y)

    h0 = transformer.pos_embed(sample.to(dtype))
    h1 = block(blocks[0], h0, timesteps, class_labels)
    r1 = h1 - h0
    change = relative_change(r1, held)
    skip = [c is not None and c < t for c, t in zip(change, thresholds, strict=True)]  # type: ignore[operator]
    run = list(range(rows)) if all_rows else [i for i in range(rows) if not skip[i]]
    h = h1
    if run:
        index = torch.tensor(run, device=sample.device)
        h_run = h1 if len(run) == rows else h1.index_select(0, index)
        t_run = timesteps if len(run) == rows else timesteps.index_select(0, index)
        y_run = class_labels if len(run) == rows else class_labels.index_select(0, index)
        for b in blocks[1:]:
            h_run = block(b, h_run, t_run, y_run)
        h = h_run if len(run) == rows else h1.index_copy(0, index, h_run)
    deep: list[torch.Tensor | None] = [None] * rows
    parts = []
    for i in range(rows):
        if skip[i]:
            state = held[i]
            assert state is not None  # a row skips only with a held state
            deep[i] = state
            parts.append(h1[i] + state[1].to(h1.dtype))
        else:
            if thresholds[i] is not None:
                deep[i] = torch.stack([r1[i], h[i] - h1[i]])  # a tensor of its own: not a view of the batch's
            parts.append(h[i])
    if any(skip):
        h = torch.stack(parts)
    out = _final_layer(transformer, h, timesteps, class_labels, patch)
    return RowsOut(out, tuple(deep), len(run), tuple(skip[i] and not all_rows for i in range(rows)))


def _final_layer(
    transformer: DiTTransformer2DModel, h: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor, patch: int
) -> torch.Tensor:
    """diffusers' DiTTransformer2DModel.forward, its step 3: the adaLN output layer and the unpatchify."""
    conditioning = transformer.transformer_blocks[0].norm1.emb(timesteps, class_labels, hidden_dtype=h.dtype)
    shift, scale = transformer.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    h = transformer.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
    h = transformer.proj_out_2(h)
    side = int(h.shape[1] ** 0.5)
    channels = transformer.out_channels
    h = h.reshape(-1, side, side, patch, patch, channels)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(-1, channels, side * patch, side * patch)
