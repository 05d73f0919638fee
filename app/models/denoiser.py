"""The part of the model adapters that the sampler's Denoiser signature asks of every class-conditional model."""

from __future__ import annotations

import torch


class HookedDenoiser:
    """(x, timesteps, class_labels[, embed_delta]) -> eps for a model whose class-embedding modules are
    `label_embedders`: embed_delta (rows, D) is added to their outputs (CADS) by forward hooks held only for
    that call, which is safe because all of a model's forwards run in one thread. Subclasses set
    label_embedders and implement _forward."""

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
        hooks = [
            e.register_forward_hook(lambda _m, _i, out: out + embed_delta.to(out.dtype)) for e in self.label_embedders
        ]
        try:
            return self._forward(x, timesteps, class_labels)
        finally:
            for hook in hooks:
                hook.remove()

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
