"""The denoisers' CADS hook: its embedding delta reaches only the forward that asked for it.

A request is built (its class embedding read) in the event loop's thread while the compute thread runs a
forward; a CADS forward's hook sits on the model's class-embedding module, which every thread sees. Two CADS
requests once changed each other's images that way (the second one's embedding read through the first one's
hook). These tests hold another thread's read in the middle of a hooked forward, deterministically."""

import threading

import pytest
import torch

from app.models.checkpoint import UNetDenoiser

pytestmark = pytest.mark.integration


def read_during_a_cads_forward(denoiser: UNetDenoiser, read):
    """Run a CADS forward and, while its hook is registered, call read() in another thread; returns what
    read() gave there."""
    got: dict[str, object] = {}

    def during_forward(_module, _inputs, _out):
        t = threading.Thread(target=lambda: got.setdefault("value", read()))
        t.start()
        t.join()

    handle = denoiser.unet.mid_block.register_forward_hook(during_forward)
    try:
        rows = 3
        x = torch.randn(rows, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        delta = torch.full((rows, denoiser.unet.class_embedding.weight.shape[1]), 5.0)
        denoiser(x, torch.full((rows,), 500), torch.tensor([1, 2, 3]), delta)
    finally:
        handle.remove()
    return got["value"]


def test_a_class_embedding_read_during_a_cads_forward_is_the_models_own(denoiser):
    got = read_during_a_cads_forward(denoiser, lambda: denoiser.class_embedding(7))
    assert torch.equal(got, denoiser.unet.class_embedding.weight[7].float())


def test_the_cads_hook_changes_only_the_forward_that_holds_it(denoiser):
    """The embedding module called from another thread meanwhile gives its plain output (no delta added)."""
    table = denoiser.unet.class_embedding
    got = read_during_a_cads_forward(denoiser, lambda: table(torch.tensor([7, 7, 7])).clone())
    assert torch.equal(got, table.weight[7].expand(3, -1))


def test_the_cads_hook_adds_its_delta_in_the_forward(denoiser):
    """Guards the two tests above against a hook that adds nothing at all."""
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t, labels = torch.full((2,), 500), torch.tensor([4, 4])
    plain = denoiser(x, t, labels)
    delta = torch.zeros(2, denoiser.unet.class_embedding.weight.shape[1])
    delta[1] = 1.0
    hooked = denoiser(x, t, labels, delta)
    assert torch.equal(hooked[0], plain[0]) and not torch.allclose(hooked[1], plain[1])


def test_a_denoiser_takes_one_tensor_after_the_labels_at_most(denoiser):
    """The Denoiser protocol's *extra is the optional embed_delta alone: a second tensor is a caller's mistake,
    not something to ignore."""
    x, t, labels = torch.zeros(1, 1, 28, 28), torch.full((1,), 500), torch.tensor([4])
    delta = torch.zeros(1, denoiser.unet.class_embedding.weight.shape[1])
    with pytest.raises(TypeError, match="at most one tensor after class_labels"):
        denoiser(x, t, labels, delta, delta)
