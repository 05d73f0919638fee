"""app.models.deepcache on the shipped UNet: per-row DeepCache in one forward. Full rows equal the UNet's own
output; cached rows skip the deep part (counted by a hook on the mid block); a forward that mixes full and
cached rows gives each row what it gets alone; the FLOPs of a cached row (torch's FLOP counter)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from app.config import DEFAULT_MODEL_PATH
from app.models import load_checkpoint
from app.models.deepcache import DeepCacheError, check_branch, forward_rows, max_branch

pytestmark = pytest.mark.integration  # the shipped UNet's own layers are the subject

ROWS = 6


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return load_checkpoint(DEFAULT_MODEL_PATH, "cpu").unet


def inputs(seed: int, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    labels = torch.randint(0, 11, (rows,), generator=g)  # 10: the null label
    return x, t, labels


def mid_calls(unet: UNet2DModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The row counts of the mid block's calls (the deep part runs it once per forward with full rows)."""
    calls: list[int] = []
    handle = unet.mid_block.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    return calls, handle


@torch.inference_mode()
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_full_rows_equal_the_unets_own_forward(unet, branch):
    x, t, labels = inputs(1)
    out = forward_rows(unet, x, t, labels, branch, [None] * ROWS)
    want = unet(x, t, class_labels=labels).sample
    assert out.full_rows == ROWS and all(d is not None for d in out.deep)
    torch.testing.assert_close(out.eps, want, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_a_cached_row_reusing_its_own_step_s_features_gives_that_step_s_output(unet, branch):
    x, t, labels = inputs(2)
    full = forward_rows(unet, x, t, labels, branch, [None] * ROWS)
    calls, handle = mid_calls(unet)
    try:
        again = forward_rows(unet, x, t, labels, branch, list(full.deep))
    finally:
        handle.remove()
    assert calls == [] and again.full_rows == 0  # no row ran the deep part
    torch.testing.assert_close(again.eps, full.eps, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_mixed_full_and_cached_rows_in_one_forward_give_each_row_what_it_gets_alone(unet):
    branch = 0
    x0, t0, labels = inputs(3)
    step0 = forward_rows(unet, x0, t0, labels, branch, [None] * ROWS)  # every row's cache, from a first step
    x1, t1, _ = inputs(4)
    reuse = [0, 2, 3]  # these rows reuse their cache at the second step; the others run in full
    cached = [step0.deep[i] if i in reuse else None for i in range(ROWS)]
    calls, handle = mid_calls(unet)
    try:
        mixed = forward_rows(unet, x1, t1, labels, branch, cached)
    finally:
        handle.remove()
    assert calls == [ROWS - len(reuse)] and mixed.full_rows == ROWS - len(reuse)  # the deep part: full rows only
    for i in range(ROWS):
        alone = forward_rows(unet, x1[i : i + 1], t1[i : i + 1], labels[i : i + 1], branch, [cached[i]])
        torch.testing.assert_close(mixed.eps[i : i + 1], alone.eps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed.deep[i], alone.deep[0], atol=1e-5, rtol=1e-5)
    # A reused row's output is not the full forward's: the cache is really used.
    full = unet(x1, t1, class_labels=labels).sample
    assert all((mixed.eps[i] - full[i]).abs().max() > 1e-3 for i in reuse)
    assert all(torch.equal(mixed.deep[i], step0.deep[i]) for i in reuse)


@torch.inference_mode()
def test_a_channels_last_unet_takes_its_cached_rows_in_channels_last(unet):
    # The cached rows join the rows coming up from below in the network's own memory format: stacked NCHW,
    # they made the up block's concatenation and convolutions copy (a tenth of a cached forward's time).
    from app.models.fast import to_channels_last

    nhwc = to_channels_last(copy.deepcopy(unet))
    x0, t0, labels = inputs(9)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    step0 = forward_rows(nhwc, x0, t0, labels, 0, [None] * ROWS)
    entering: list[torch.Tensor] = []
    handle = nhwc.up_blocks[-1].register_forward_hook(lambda _m, args, _o: entering.append(args[0]))
    try:
        mixed = forward_rows(nhwc, x0, t0, labels, 0, [d if i % 2 else None for i, d in enumerate(step0.deep)])
    finally:
        handle.remove()
    (batch,) = entering
    assert not batch.is_contiguous() and batch.is_contiguous(memory_format=torch.channels_last)
    plain = forward_rows(unet, x0.contiguous(), t0, labels, 0, [d if i % 2 else None for i, d in enumerate(step0.deep)])
    torch.testing.assert_close(mixed.eps, plain.eps, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_cached_row_costs_a_quarter_of_the_flops_and_interval_3_cuts_them_1_8x(unet):
    # Issue 27: the shallow path is about 143 of the forward's 558 MFLOP per row; at interval 3 (one full step,
    # two cached) the FLOPs per image fall at least 1.8x.
    x, t, labels = inputs(5, rows=1)
    full = forward_rows(unet, x, t, labels, 0, [None])
    with FlopCounterMode(display=False) as counted_full:
        forward_rows(unet, x, t, labels, 0, [None])
    with FlopCounterMode(display=False) as counted_cached:
        forward_rows(unet, x, t, labels, 0, [full.deep[0]])
    full_flops, cached_flops = counted_full.get_total_flops(), counted_cached.get_total_flops()
    assert 500e6 < full_flops < 620e6, full_flops
    assert cached_flops / full_flops < 0.3, cached_flops / full_flops
    assert 3 * full_flops / (full_flops + 2 * cached_flops) >= 1.8


@torch.inference_mode()
def test_rows_of_different_branches_in_one_forward_give_each_row_what_it_gets_alone(unet):
    x0, t0, labels = inputs(6)
    branches = [0, 1, 2, 0, 1, 2]
    step0 = forward_rows(unet, x0, t0, labels, branches, [None] * ROWS)
    for i, b in enumerate(branches):  # each row's features at its own branch: channels and size of that level
        assert step0.deep[i].shape == forward_rows(unet, x0[:1], t0[:1], labels[:1], b, [None]).deep[0].shape
    x1, t1, _ = inputs(7)
    reuse = [1, 2, 3]
    cached = [step0.deep[i] if i in reuse else None for i in range(ROWS)]
    calls, handle = mid_calls(unet)
    try:
        mixed = forward_rows(unet, x1, t1, labels, branches, cached)
        everything = forward_rows(unet, x1, t1, labels, branches, cached, deep_all=True)
    finally:
        handle.remove()
    assert calls == [ROWS - len(reuse), ROWS] and mixed.full_rows == ROWS - len(reuse) and everything.full_rows == ROWS
    for i, b in enumerate(branches):
        alone = forward_rows(unet, x1[i : i + 1], t1[i : i + 1], labels[i : i + 1], b, [cached[i]])
        torch.testing.assert_close(mixed.eps[i : i + 1], alone.eps, atol=1e-5, rtol=1e-5)
        # deep_all (a forward with perturbed rows) runs the deep part for every row, and changes no output
        torch.testing.assert_close(everything.eps[i : i + 1], alone.eps, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_forward_of_cached_rows_only_runs_no_deep_layer(unet):
    x, t, labels = inputs(8)
    full = forward_rows(unet, x, t, labels, 0, [None] * ROWS)
    calls: list[int] = []
    handles = [b.register_forward_hook(lambda _m, a, _o: calls.append(1)) for b in unet.down_blocks[1:]]
    try:
        again = forward_rows(unet, x, t, labels, 0, list(full.deep))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [] and again.full_rows == 0
    torch.testing.assert_close(again.eps, full.eps, atol=1e-5, rtol=1e-5)


def tiny_unet(**config) -> UNet2DModel:
    plain = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    return UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, **{**plain, **config})


def test_the_branches_a_unet_can_be_split_at_are_checked(unet):
    assert max_branch(unet) == 2
    with pytest.raises(DeepCacheError, match=r"branch must be 0\.\.2"):
        check_branch(unet, 3)
    assert max_branch(tiny_unet()) == 1
    with pytest.raises(DeepCacheError, match="class_embed_type"):
        max_branch(tiny_unet(class_embed_type="timestep"))
    skip = tiny_unet(down_block_types=("SkipDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "SkipUpBlock2D"))
    with pytest.raises(DeepCacheError, match="DownBlock2D or AttnDownBlock2D"):
        max_branch(skip)
