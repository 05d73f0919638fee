"""The part of the model adapters that the sampler's Denoiser signature asks of every class-conditional model."""

from __future__ import annotations

import threading

import torch


class HookedDenoiser:
    """(x, timesteps, class_labels[, embed_delta]) -> eps for a model whose class-embedding modules are
    `label_embedders`: embed_delta (rows, D) is added to their outputs (CADS) by forward hooks held only for
    that call. A hook is on the module, seen by every thread: it adds the delta only in the thread that holds
    the forward, so a class embedding read elsewhere meanwhile (a request being built in the event loop) is the
    model's own. Subclasses set label_embedders and implement _forward and class_embedding."""

    label_embedders: list[torch.nn.Module]

    @torch.inference_mode()
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        embed_delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if embed_delta is None:
            return self._forward(x, timesteps, class_labels)
        owner = threading.get_ident()

        def add_delta(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + embed_delta.to(out.dtype) if threading.get_ident() == owner else out

        hooks = [e.register_forward_hook(add_delta) for e in self.label_embedders]
        try:
            return self._forward(x, timesteps, class_labels)
        finally:
            for hook in hooks:
                hook.remove()

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_embedding(self, label: int) -> torch.Tensor:
        """The model's embedding of one class label, shape (D,), as CADS perturbs it."""
        raise NotImplementedError
