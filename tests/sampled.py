"""A request's images as the library draws them for it alone: what the service's images are compared with."""

from collections.abc import Mapping

import numpy as np

from app.sampling import Denoiser, SampleRun, SampleSpec, sample


def sampled_alone(loaded, denoiser, spec: SampleSpec, guides: Mapping[str, Denoiser] | None = None) -> np.ndarray:
    """spec's images (N, H, W) from SampleRun and `sample` with this denoiser (and guide models), nothing else in
    the batch: the reference a co-batched or served request must equal."""
    m = loaded.manifest
    embedding = getattr(denoiser, "class_embedding", None)
    run = SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, class_embedding=embedding)
    sample(denoiser, [run], guides=guides)
    return run.images()[..., 0]
