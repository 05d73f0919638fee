"""Attention perturbations (app/models/attention.py) on one layer, against hand-computed references, and on the
shipped UNet: the perturbed rows get what the papers define, every other row is the plain forward's, bit for
bit, and another thread's forward meanwhile is the model's own."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

from app.models import unet_denoiser
from app.models.attention import (
    Perturbation,
    PerturbationError,
    RowPerturbations,
    blur_tokens,
    check_perturbation,
    hook_blurred_queries,
    hook_identity_attention,
    perturbation_support,
    seg_kernel_size,
)
from tests.tiny_models import tiny_unet

PAG = Perturbation("pag")
SEG_INF = Perturbation("seg")
SEG_2 = Perturbation("seg", blur_sigma=2.0)


def batch(rows: int, seed: int = 0, shape=(1, 28, 28)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    labels = torch.randint(0, 11, (rows,), generator=g)
    return x, t, labels


# ---- one attention layer, by hand -------------------------------------------------------------------------


@pytest.fixture
def mid_attention(loaded):
    """The shipped UNet's mid-block self-attention: 128 channels over a 7x7 grid, 16 heads, a residual."""
    return loaded.unet.mid_block.attentions[0]


def layer_input(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 128, 7, 7, generator=torch.Generator().manual_seed(5))


def projections(attn, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (rows, tokens, channels) as the layer computes them: group norm, then the projections."""
    rows, channels = hidden.shape[:2]
    tokens = attn.group_norm(hidden.view(rows, channels, -1)).transpose(1, 2)
    return attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)


def layer_output(attn, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output for an attention result (rows, tokens, channels): projection, residual, rescale."""
    out = attn.to_out[0](attended).transpose(1, 2).reshape(hidden.shape)
    return (out + hidden) / attn.rescale_output_factor


def with_hooks(hooks, call):
    try:
        return call()
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def test_identity_attention_gives_the_output_projection_of_the_values(mid_attention):
    hidden = layer_input()
    mask = torch.tensor([False, True, False])
    plain = mid_attention(hidden)
    got = with_hooks(hook_identity_attention(mid_attention, mask, threading.get_ident()), lambda: mid_attention(hidden))
    _, _, v = projections(mid_attention, hidden)
    want = layer_output(mid_attention, hidden, v)
    assert torch.allclose(got[1], want[1], atol=1e-6), (got[1] - want[1]).abs().max()
    assert (got[1] - plain[1]).abs().max() > 0.1  # the perturbation does something here
    assert torch.equal(got[[0, 2]], plain[[0, 2]])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out: (rows, tokens, channels) in and out."""
    rows, _, channels = q.shape
    d = channels // heads

    def split(t):
        return t.reshape(rows, -1, heads, d).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(rows, -1, channels)


@torch.inference_mode()
def test_seg_with_infinite_blur_gives_every_token_the_mean_querys_attention(mid_attention):
    """sigma -> inf: every query is the mean query, so every token's attention weights are one row,
    softmax(mean(q) k^T / sqrt(d)), and the attention output is the same at every token."""
    hidden = layer_input()
    mask = torch.tensor([True, False, True])
    plain = mid_attention(hidden)
    hooks = hook_blurred_queries(mid_attention, [(math.inf, mask)], threading.get_ident())
    got = with_hooks(hooks, lambda: mid_attention(hidden))
    q, k, v = projections(mid_attention, hidden)
    attended = attend(q.mean(dim=1, keepdim=True).expand_as(q), k, v, mid_attention.heads)
    assert torch.allclose(attended, attended[:, :1].expand_as(attended), atol=1e-6)
    want = layer_output(mid_attention, hidden, attended)
    assert torch.allclose(got[[0, 2]], want[[0, 2]], atol=1e-5), (got[[0, 2]] - want[[0, 2]]).abs().max()
    assert (got[0] - plain[0]).abs().max() > 0.01
    assert torch.equal(got[1], plain[1])


def reference_blur(q: np.ndarray, sigma: float) -> np.ndarray:
    """SEG's Gaussian blur of a (tokens, channels) square grid, written independently: separable 1D passes
    with numpy's reflect padding, the kernel size and weights as SEG-SDXL's gaussian_blur_2d gives them."""
    tokens, channels = q.shape
    side = math.isqrt(tokens)
    size = seg_kernel_size(sigma, side)
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    grid = q.reshape(side, side, channels).astype(np.float64)
    pad = size // 2
    for axis in (0, 1):
        padded = np.pad(grid, [(pad, pad) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        grid = sum(w[i] * np.take(padded, range(i, i + side), axis=axis) for i in range(size))
    return grid.reshape(tokens, channels)


@pytest.mark.parametrize(("side", "sigma"), [(7, 0.5), (7, 1.0), (7, 3.0), (4, 1.0), (8, 10.0)])
def test_seg_blur_is_a_gaussian_blur_over_the_token_grid(side, sigma):
    q = torch.randn(2, side * side, 6, generator=torch.Generator().manual_seed(side))
    got = blur_tokens(q, sigma)
    for row in range(2):
        want = reference_blur(q[row].numpy(), sigma)
        assert np.allclose(got[row].numpy(), want, atol=1e-5), np.abs(got[row].numpy() - want).max()


def test_seg_kernel_size_follows_seg_and_fits_the_grid():
    assert [seg_kernel_size(s, 64) for s in (0.5, 1.0, 1.2, 3.0)] == [3, 7, 9, 19]
    assert seg_kernel_size(10.0, 7) == 7 and seg_kernel_size(10.0, 8) == 9  # reflect padding stays in the grid


def test_seg_refuses_a_token_count_that_is_not_a_square_grid():
    with pytest.raises(PerturbationError, match="square token grid.*12 tokens"):
        blur_tokens(torch.zeros(1, 12, 4), 1.0)


# ---- the shipped UNet ---------------------------------------------------------------------------------------


def test_pag_on_the_unet_matches_diffusers_identity_processor(loaded, denoiser):
    """diffusers' PAGIdentitySelfAttnProcessor2_0 on the mid block, over a batch of (plain, perturbed) halves."""
    x, t, labels = batch(3)
    got = denoiser(x, t, labels, perturb=RowPerturbations.from_rows([PAG, None, PAG], "cpu"))
    unet = copy.deepcopy(loaded.unet)
    unet.mid_block.attentions[0].set_processor(PAGIdentitySelfAttnProcessor2_0())
    want = unet_denoiser(unet)(x.repeat(2, 1, 1, 1), t.repeat(2), labels.repeat(2))[3:]
    assert torch.allclose(got[[0, 2]], want[[0, 2]], atol=1e-5), (got[[0, 2]] - want[[0, 2]]).abs().max()
    assert (got[0] - denoiser(x[:1], t[:1], labels[:1])[0]).abs().max() > 0.01


def mixed_rows() -> list[Perturbation | None]:
    """Several requests' rows of each kind the UNet runs, with different settings, and plain rows."""
    return [None, PAG, SEG_2, None, SEG_INF, PAG, Perturbation("seg", blur_sigma=0.7), None]


def test_the_plain_rows_of_a_perturbed_forward_are_the_plain_forward_bit_for_bit(denoiser):
    per_row = mixed_rows()
    plain_rows = [i for i, p in enumerate(per_row) if p is None]
    x, t, labels = batch(len(per_row))
    got = denoiser(x, t, labels, perturb=RowPerturbations.from_rows(per_row, "cpu"))
    assert torch.equal(got[plain_rows], denoiser(x, t, labels)[plain_rows])
    # Whatever the other rows hold: a plain forward at the same row count with other inputs there.
    x2, t2, labels2 = batch(len(per_row), seed=9)
    x2[plain_rows], t2[plain_rows], labels2[plain_rows] = x[plain_rows], t[plain_rows], labels[plain_rows]
    assert torch.equal(got[plain_rows], denoiser(x2, t2, labels2)[plain_rows])
    # Alone, at another row count, the kernels may sum in another order (as for any plain forward).
    alone = denoiser(x[plain_rows], t[plain_rows], labels[plain_rows])
    assert torch.allclose(got[plain_rows], alone, atol=1e-5)


def test_a_perturbed_row_does_not_depend_on_its_neighbours(denoiser):
    per_row = mixed_rows()
    x, t, labels = batch(len(per_row))
    got = denoiser(x, t, labels, perturb=RowPerturbations.from_rows(per_row, "cpu"))
    # Other inputs and other perturbations in every other row (at the same row count and positions, where even
    # a plain forward is bit-stable): each perturbed row is unchanged.
    for i, p in enumerate(per_row):
        if p is not None:
            x2, t2, labels2 = batch(len(per_row), seed=4 + i)
            x2[i], t2[i], labels2[i] = x[i], t[i], labels[i]
            others = [q if j == i else (PAG if q is None else None) for j, q in enumerate(per_row)]
            again = denoiser(x2, t2, labels2, perturb=RowPerturbations.from_rows(others, "cpu"))
            assert torch.equal(again[i], got[i]), (i, p)
    plain = denoiser(x, t, labels)
    for i, p in enumerate(per_row):
        if p is not None:
            assert (got[i] - plain[i]).abs().max() > 1e-3, (i, p)  # every perturbation moves its row


def test_equal_perturbations_share_one_mask():
    seg = Perturbation("seg", layers=[0], blur_sigma=2.0)  # layers from JSON, a list: kept hashable
    per = RowPerturbations.from_rows([PAG, None, Perturbation("pag"), seg, Perturbation("seg", (0,), 2.0)], "cpu")
    assert [(p, m.tolist()) for p, m in per.groups] == [
        (PAG, [True, False, True, False, False]),
        (seg, [False, False, False, True, True]),
    ]


def test_a_forward_whose_perturbation_covers_other_rows_is_refused(denoiser):
    x, t, labels = batch(2)
    with pytest.raises(ValueError, match="perturb covers 3 rows, and the forward has 2"):
        denoiser(x, t, labels, perturb=RowPerturbations.from_rows([PAG, None, None], "cpu"))


# ---- what a model supports ----------------------------------------------------------------------------------


def test_the_shipped_unet_runs_pag_and_seg_on_its_mid_block_and_no_slg(loaded):
    support = perturbation_support(loaded.network)
    for kind in ("pag", "seg"):
        assert support[kind].supported
        assert support[kind].layers == ("mid_block.attentions.0",) and support[kind].default_layers == (0,)
    assert not support["slg"].supported
    assert support["slg"].reason == "it skips transformer blocks, and this UNet2DModel has none"


def test_a_unet_without_attention_is_reported_unsupported_and_its_forward_refused():
    unet = tiny_unet(num_class_embeds=4, attention=False).eval()
    support = perturbation_support(unet)
    assert not any(s.supported for s in support.values())
    assert support["pag"].reason == "it perturbs self-attention, and this UNet2DModel has no self-attention layer"
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PerturbationError, match="pag cannot run on this model: .*no self-attention layer"):
        perturb = RowPerturbations.from_rows([PAG, None], "cpu")
        unet_denoiser(unet)(x, torch.tensor([5, 5]), torch.tensor([0, 3]), perturb=perturb)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())  # none left behind
    assert perturbation_support(tiny_unet(num_class_embeds=4))["pag"].supported  # the same UNet with attention


def test_layers_out_of_range_name_the_models_layers(loaded):
    with pytest.raises(PerturbationError, match=r"pag layers \[1\] out of range: this model's are 0..0 \(mid_block"):
        check_perturbation(loaded.network, Perturbation("pag", layers=(0, 1)))
    check_perturbation(loaded.network, Perturbation("seg", layers=(0,), blur_sigma=1.0))


def test_no_perturbation_runs_at_int8(loaded):
    support = perturbation_support(loaded.network, "int8")
    assert all("precision int8" in s.reason for s in support.values())


@pytest.mark.parametrize("bad", [{"kind": "sag"}, {"kind": "seg", "blur_sigma": 0.0}, {"kind": "pag", "layers": ()}])
def test_a_perturbation_with_unknown_settings_is_refused(bad):
    with pytest.raises(PerturbationError):
        Perturbation(**bad)


# ---- threads ------------------------------------------------------------------------------------------------


def forward_during_a_perturbed_forward(denoiser, perturb, x, t, labels, other):
    """A perturbed forward that runs other() in another thread in the middle of its mid-block attention (before
    its output projection, while the perturbation's hooks are registered and hold this forward's values);
    returns (the perturbed eps, other())."""
    got = {}

    def during_forward(_module, _inputs):
        if "other" not in got:
            got["other"] = None
            thread = threading.Thread(target=lambda: got.update(other=other()))
            thread.start()
            thread.join()

    handle = denoiser.unet.mid_block.attentions[0].to_out[0].register_forward_pre_hook(during_forward)
    try:
        eps = denoiser(x, t, labels, perturb=perturb)
    finally:
        handle.remove()
    return eps, got["other"]


def test_a_plain_forward_in_another_thread_meanwhile_is_the_plain_forward(denoiser):
    per_row = [PAG, None, SEG_2]
    x, t, labels = batch(3)
    x2, t2, labels2 = batch(3, seed=1)  # the other thread's own inputs
    perturb = RowPerturbations.from_rows(per_row, "cpu")
    want_plain, want_perturbed = denoiser(x2, t2, labels2), denoiser(x, t, labels, perturb=perturb)
    eps, other = forward_during_a_perturbed_forward(
        denoiser, perturb, x, t, labels, lambda: denoiser(x2, t2, labels2).clone()
    )
    assert torch.equal(other, want_plain)
    assert torch.equal(eps, want_perturbed)  # nor did the other thread's pass touch this forward's kept values
    assert not torch.equal(denoiser(x, t, labels), want_perturbed)


def test_cads_and_a_perturbation_act_together(loaded, denoiser):
    """The perturbed row of a CADS request gets the conditional row's embedding delta too."""
    x, t, labels = batch(2)
    delta = torch.zeros(2, loaded.unet.class_embedding.weight.shape[1])
    delta[0] = 1.0
    perturb = RowPerturbations.from_rows([PAG, PAG], "cpu")
    both, pag_only = denoiser(x, t, labels, delta, perturb=perturb), denoiser(x, t, labels, perturb=perturb)
    assert torch.equal(both[1], pag_only[1]) and (both[0] - pag_only[0]).abs().max() > 0.01
