"""First-Block Cache (app/models/first_block.py) on a tiny DiT of four blocks, random weights (a real DiT is
gigabytes; the code path is the same): rows without a threshold are the DiT's own forward; a row whose first
block's residual did not change skips the other blocks (their calls counted); rows mixed in one forward equal
each row computed alone; with the hooks of CADS or perturbed rows every row runs every block, to the same
outputs."""

from __future__ import annotations

import pytest
import torch

from app.models.denoiser import Hooks
from app.models.first_block import FirstBlockError, check_first_block, forward_rows, relative_change
from app.models.latent import DiTDenoiser
from tests.tiny_models import tiny_dit, tiny_unet

ATOL = 1e-5  # batched and unbatched matmuls round differently (tests/models/test_latent.py)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(10, num_layers=4).eval()


def inputs(rows: int, seed: int = 0, t: int = 500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    return x, torch.full((rows,), t), torch.arange(rows) % 10


def rows_into_block_1(dit) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = dit.transformer_blocks[1].register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    return calls, handle


@torch.inference_mode()
def test_rows_without_a_threshold_are_the_dits_own_forward(dit):
    x, t, y = inputs(3)
    out = forward_rows(dit, x, t, y, [None] * 3, [None] * 3)
    assert torch.equal(out.eps, dit(x, timestep=t, class_labels=y).sample)
    assert out.deep == (None, None, None) and out.full_rows == 3 and out.shallow == (False,) * 3


@torch.inference_mode()
def test_a_row_whose_first_residual_did_not_change_skips_the_other_blocks(dit):
    x, t, y = inputs(2)
    full = forward_rows(dit, x, t, y, [0.1, 0.1], [None, None])
    assert full.full_rows == 2 and all(s is not None and s.shape == (2, 16, 16) for s in full.deep)
    calls, handle = rows_into_block_1(dit)
    try:
        again = forward_rows(dit, x, t, y, [0.1, 0.1], list(full.deep))  # the same inputs: change 0
    finally:
        handle.remove()
    assert calls == [] and again.full_rows == 0 and again.shallow == (True, True)
    assert again.deep[0] is full.deep[0]  # a row that skipped keeps its state
    # first block + the other blocks' residual from the full step is that step's output again.
    assert torch.allclose(again.eps, full.eps, atol=ATOL)


@torch.inference_mode()
def test_the_change_is_each_rows_own_relative_mean_absolute_difference(dit):
    r1 = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    before = r1 * 1.25
    held = [None, torch.stack([before[1], before[1]]), torch.stack([r1[2], r1[2]])]
    change = relative_change(r1, held)
    want = ((r1[1] - before[1]).abs().mean() / before[1].abs().mean()).item()
    assert change[0] is None and change[1] == pytest.approx(want) and change[1] == pytest.approx(0.2)
    assert change[2] == 0.0


@torch.inference_mode()
def test_mixed_rows_in_one_forward_equal_each_rows_own_computation(dit):
    x, t, y = inputs(4, seed=1)
    earlier = forward_rows(dit, *inputs(4, seed=1, t=520), [0.5] * 4, [None] * 4)
    # Row 0 caches nothing; row 1 has no state yet; rows 2 and 3 hold one from a nearby step, row 2 with a
    # threshold above its change (it skips) and row 3 below it (it runs in full and refreshes).
    held = [None, None, earlier.deep[2], earlier.deep[3]]
    now = forward_rows(dit, x, t, y, [1.0] * 4, [None] * 4).deep
    change = relative_change(torch.stack([s[0] for s in now]), held)
    assert change[2] is not None and change[3] is not None and change[2] > 0 and change[3] > 0
    thresholds = [None, 0.1, change[2] * 1.5, change[3] * 0.5]
    calls, handle = rows_into_block_1(dit)
    try:
        mixed = forward_rows(dit, x, t, y, thresholds, held)
    finally:
        handle.remove()
    assert calls == [3] and mixed.full_rows == 3 and mixed.shallow == (False, False, True, False)
    for i in range(4):
        one = forward_rows(dit, x[i : i + 1], t[i : i + 1], y[i : i + 1], thresholds[i : i + 1], held[i : i + 1])
        assert torch.allclose(mixed.eps[i], one.eps[0], atol=ATOL), f"row {i}"
        if one.deep[0] is None:
            assert mixed.deep[i] is None
        else:
            assert torch.allclose(mixed.deep[i], one.deep[0], atol=ATOL), f"row {i}'s state"
    assert mixed.deep[2] is held[2] and mixed.deep[3] is not held[3]


@torch.inference_mode()
def test_with_hooks_every_row_runs_every_block_to_the_same_outputs(dit):
    x, t, y = inputs(3, seed=2)
    full = forward_rows(dit, x, t, y, [0.2] * 3, [None] * 3)
    held = [full.deep[0], None, full.deep[2]]
    gathered = forward_rows(dit, x, t, y, [0.2, None, 0.2], held)
    calls, handle = rows_into_block_1(dit)
    try:
        every = forward_rows(dit, x, t, y, [0.2, None, 0.2], held, all_rows=True)
    finally:
        handle.remove()
    assert calls == [3] and every.full_rows == 3 and every.shallow == (False,) * 3  # computed: counted full
    assert torch.allclose(every.eps, gathered.eps, atol=ATOL)


@torch.inference_mode()
def test_the_dit_denoiser_runs_first_block_and_a_cads_delta_reaches_every_row(dit):
    denoiser = DiTDenoiser(dit, eps_channels=4)
    assert denoiser.cache_support()["first_block"] is None
    assert denoiser.cache_support()["deepcache"].startswith("deepcache splits a UNet")
    x, t, y = inputs(2, seed=3)
    out = denoiser.forward_cached(x, t, y, kind="first_block", settings=[None, None], cached=[None, None])
    assert out.eps.shape == (2, 4, 8, 8) and torch.equal(out.eps, denoiser(x, t, y))
    delta = torch.randn(2, dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.shape[1])
    calls, handle = rows_into_block_1(dit)
    try:
        with_delta = denoiser.forward_cached(x, t, y, delta, kind="first_block", settings=[0.1, 0.1], cached=[None] * 2)
    finally:
        handle.remove()
    assert calls == [2] and torch.allclose(with_delta.eps, denoiser(x, t, y, delta), atol=ATOL)
    with pytest.raises(ValueError, match="deepcache splits a UNet"):
        denoiser.forward_cached(x, t, y, kind="deepcache", settings=[0, 0], cached=[None] * 2)
    assert Hooks(delta=True, perturb=False).delta


def test_only_a_dit_of_ada_norm_zero_blocks_and_two_blocks_or_more_runs_it():
    with pytest.raises(FirstBlockError, match="this is a UNet2DModel"):
        check_first_block(tiny_unet(10))
    with pytest.raises(FirstBlockError, match="at least two transformer blocks"):
        check_first_block(tiny_dit(10, num_layers=1))
    check_first_block(tiny_dit(10, num_layers=2))
