"""Attention perturbations (app/models/attention.py) on a DiT: skip-layer rows are the DiT without those
blocks, PAG rows diffusers' identity-attention processor's, and the plain rows the plain forward's, bit for bit,
in fp32 and under bf16 autocast. A tiny random DiT (tests/tiny_models.py) stands in for users' DiT checkpoints,
which are gigabytes; the code path is the same."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

from app.models import DiTDenoiser
from app.models.attention import Perturbation, RowPerturbations, perturbation_support
from app.models.fast import FastDenoiser
from tests.tiny_models import tiny_dit

LAYERS = 3


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(10, learned_sigma=False, num_layers=LAYERS).eval()


@pytest.fixture(scope="module")
def dit_denoiser(dit) -> DiTDenoiser:
    return DiTDenoiser(dit)


def batch(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    return x, torch.randint(0, 1000, (rows,), generator=g), torch.arange(rows) % 11


def without_blocks(dit, skipped: set[int]):
    """A copy of the DiT with those blocks taken out (block 0 stays: the output layer reads its embedder)."""
    pruned = copy.deepcopy(dit)
    blocks = [b for i, b in enumerate(pruned.transformer_blocks) if i not in skipped]
    pruned.transformer_blocks = torch.nn.ModuleList(blocks)
    return pruned


def test_a_dit_runs_every_perturbation_on_its_blocks(dit, dit_loaded):
    support = perturbation_support(dit)
    assert support["pag"].layers == support["seg"].layers == tuple(f"transformer_blocks.{i}.attn1" for i in range(3))
    assert support["slg"].layers == tuple(f"transformer_blocks.{i}" for i in range(3))
    assert all(s.supported and s.default_layers == (1,) for s in support.values())  # the middle block
    assert all(s.supported for s in perturbation_support(dit_loaded.network).values())  # an imported DiT


@pytest.mark.parametrize("skipped", [(1,), (1, 2)])
def test_skip_layer_rows_are_the_dit_without_those_blocks(dit, dit_denoiser, skipped):
    x, t, labels = batch(4)
    slg = Perturbation("slg", layers=skipped)
    got = dit_denoiser(x, t, labels, perturb=RowPerturbations.from_rows([slg, None, slg, None], "cpu"))
    want = DiTDenoiser(without_blocks(dit, set(skipped)))(x, t, labels)
    assert torch.equal(got[[0, 2]], want[[0, 2]])
    plain = dit_denoiser(x, t, labels)
    assert torch.equal(got[[1, 3]], plain[[1, 3]])
    assert (got[0] - plain[0]).abs().max() > 0.01


def test_pag_rows_match_diffusers_identity_processor_on_that_block(dit, dit_denoiser):
    x, t, labels = batch(2)
    pag = Perturbation("pag", layers=(2,))
    got = dit_denoiser(x, t, labels, perturb=RowPerturbations.from_rows([pag, pag], "cpu"))
    ref = copy.deepcopy(dit)
    ref.transformer_blocks[2].attn1.set_processor(PAGIdentitySelfAttnProcessor2_0())
    want = DiTDenoiser(ref)(x.repeat(2, 1, 1, 1), t.repeat(2), labels.repeat(2))[2:]  # the perturbed half
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - dit_denoiser(x, t, labels)).abs().max() > 0.01


def mixed_rows() -> list[Perturbation | None]:
    """Several requests of each kind with different settings, and plain rows, in one forward."""
    return [
        Perturbation("slg"),
        None,
        Perturbation("slg", layers=(0, 2)),
        Perturbation("pag"),
        None,
        Perturbation("pag", layers=(0,)),
        Perturbation("seg", blur_sigma=1.0),
        Perturbation("seg"),
        None,
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plain_rows_of_a_mixed_dit_forward_are_the_plain_forward_bit_for_bit(dit_denoiser, precision):
    """Under bf16 autocast too: the hooks select rows in the autocast dtype, so the plain rows see no cast."""
    denoiser = FastDenoiser(dit_denoiser, torch.device("cpu"), precision)
    per_row = mixed_rows()
    plain_rows = [i for i, p in enumerate(per_row) if p is None]
    x, t, labels = batch(len(per_row))
    got = denoiser(x, t, labels, perturb=RowPerturbations.from_rows(per_row, "cpu"))
    plain = denoiser(x, t, labels)
    assert got.dtype == torch.float32
    assert torch.equal(got[plain_rows], plain[plain_rows])
    for i, p in enumerate(per_row):
        if p is not None:
            assert (got[i] - plain[i]).abs().max() > 1e-3, (i, p)
    # Each row is its own: with other inputs and other perturbations in the other rows, row 3 (PAG) is unchanged.
    x2, t2, labels2 = batch(len(per_row), seed=4)
    x2[3], t2[3], labels2[3] = x[3], t[3], labels[3]
    others = [Perturbation("seg", blur_sigma=3.0)] * 3 + [per_row[3]] + [Perturbation("slg", layers=(0,))] * 5
    again = denoiser(x2, t2, labels2, perturb=RowPerturbations.from_rows(others, "cpu"))
    assert torch.equal(again[3], got[3])


def test_a_plain_dit_forward_in_another_thread_meanwhile_is_the_plain_forward(dit, dit_denoiser):
    """Another thread's forward runs while block 1 (skipped by this forward's rows) holds the hooks."""
    x, t, labels = batch(3)
    perturb = RowPerturbations.from_rows([Perturbation("slg"), None, Perturbation("pag")], "cpu")
    want_plain, want_perturbed = dit_denoiser(x, t, labels), dit_denoiser(x, t, labels, perturb=perturb)
    got = {}

    def during_forward(_module, _inputs):
        if "other" not in got:
            got["other"] = None
            thread = threading.Thread(target=lambda: got.update(other=dit_denoiser(x, t, labels).clone()))
            thread.start()
            thread.join()

    handle = dit.transformer_blocks[1].register_forward_pre_hook(during_forward)
    try:
        eps = dit_denoiser(x, t, labels, perturb=perturb)
    finally:
        handle.remove()
    assert torch.equal(got["other"], want_plain)
    assert torch.equal(eps, want_perturbed)
