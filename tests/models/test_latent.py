"""The latent path on an imported tiny DiT: this project's SampleRun and denoise_step with the DiT denoiser
and the VAE decode, against diffusers' own DiTPipeline, and the batching guarantees the UNet path has."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from app.guidance import Cads
from app.models import DiTDenoiser, decode_latents, image_decoder, model_denoiser
from app.models.latent import vae_decode
from app.sampling import GuidanceParams, SampleRun, SampleSpec, make_scheduler, sample
from tests.tiny_models import tiny_dit

# Both sides run the same float32 ops in the same order on the CPU; what differs is DDIM's eps, which the
# service recomputes from the x0 prediction (use_clipped_model_output, a no-op with clip_sample off) and
# the pipeline does not. Measured: at most 4e-7 on images in [0, 1]; a wrong null label moves them by 0.7.
PIPELINE_ATOL = 1e-4
# Batched and unbatched matmuls round differently (as tests/sampling/test_run.py bounds for the UNet).
BATCH_ATOL = 1e-4
BATCH_RTOL = 1e-4


def make_run(loaded, spec: SampleSpec, denoiser=None) -> SampleRun:
    m = loaded.manifest
    embedding = denoiser.class_embedding if denoiser is not None else None
    return SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, class_embedding=embedding)


@pytest.mark.integration  # image equality with DiTPipeline
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_sampling_matches_dit_pipeline(dit_source, dit_loaded, guidance_scale):
    """SampleRun + sample() + the DiT denoiser + the VAE decode give DiTPipeline's images.

    Where they must agree, this compares: DiTPipeline draws its latents as SampleRun does (randn_tensor over
    the per-image generators), guides all C latent channels with eps_u + s (eps_c - eps_u) as the service
    does, and drops the learned sigma channels before the scheduler step. Set here to match:
      - the scheduler: the service builds its own DDIM from the checkpoint's config with "trailing" timestep
        spacing; the pipeline gets that same scheduler.
      - the null label: DiTPipeline hard-codes 1000, so this DiT has 1000 classes.
    Where the service intentionally differs (not exercised here):
      - s < 1: DiTPipeline guides only when s > 1 (s <= 1 is the conditional model alone); the service
        combines with the unconditional rows for any s != 1 (s = 0 is the unconditional model).
      - init_noise_sigma: DiTPipeline does not scale its initial latents by it (wrong for Euler-type
        schedulers, where it is not 1); SampleRun does.
      - stochastic samplers: DiTPipeline's scheduler.step gets no generator (global RNG); SampleRun passes
        each image's own.
      - the original DiT code (facebookresearch/DiT, forward_with_cfg) guides only the first 3 of 4 latent
        channels; diffusers' DiTPipeline 0.42 and the service guide all of them.
    """
    m = dit_loaded.manifest
    seeds, label, steps = (3, 4), 1, 8
    pipe = DiTPipeline.from_pretrained(dit_source)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", dit_loaded.scheduler_config)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = {"guidance_scale": guidance_scale, "num_inference_steps": steps, "output_type": "pt"}
    want = pipe(class_labels=[label] * len(seeds), generator=generators, **kwargs).images  # [0, 1]

    spec = SampleSpec(label, seeds, steps, "ddim", GuidanceParams(guidance_scale=guidance_scale))
    run = make_run(dit_loaded, spec)
    sample(model_denoiser(dit_loaded), [run])
    got = (vae_decode(dit_loaded.vae, run.latents, m.vae_scaling_factor) + 1) / 2
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert torch.allclose(got, want, atol=PIPELINE_ATOL), (got - want).abs().max()
    as_uint8 = (want * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    diff = np.abs(image_decoder(dit_loaded)(run.latents).astype(int) - as_uint8.astype(int))
    assert diff.max() <= 1  # rounding at the half-way points only


def test_guidance_changes_the_tiny_dits_images(dit_loaded):
    """The equivalence above would be vacuous if cond and uncond agreed: here s = 4 moves the images."""
    denoiser = model_denoiser(dit_loaded)
    runs = [make_run(dit_loaded, SampleSpec(1, (3,), 8, "ddim", GuidanceParams(s))) for s in (1.0, 4.0)]
    sample(denoiser, runs)
    assert (runs[0].latents - runs[1].latents).abs().max() > 0.1


def test_images_come_out_at_the_vaes_size(dit_loaded):
    m = dit_loaded.manifest
    run = make_run(dit_loaded, SampleSpec(0, (1, 2, 3), 2, "dpmpp_2m", GuidanceParams(3.0)))
    sample(model_denoiser(dit_loaded), [run])
    images = image_decoder(dit_loaded)(run.latents)
    assert run.latents.shape == (3, *m.sample_shape) == (3, 4, 8, 8)
    c, h, w = m.image_shape
    assert images.shape == (3, h, w, c) == (3, 16, 16, 3) and images.dtype == np.uint8


def test_learned_sigma_channels_are_dropped(dit_loaded):
    x, t, labels = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 1]), torch.tensor([0, 7, 1000])
    with torch.inference_mode():
        raw = dit_loaded.transformer(x, timestep=t, class_labels=labels).sample
    eps = model_denoiser(dit_loaded)(x, t, labels)
    assert raw.shape[1] == 8 and torch.equal(eps, raw[:, :4])


def test_latent_path_is_batch_invariant(dit_loaded):
    denoiser = model_denoiser(dit_loaded)
    spec = SampleSpec(2, (42, 43), 6, "dpmpp_2m", GuidanceParams(4.0, noise_level=0.2, guidance_rescale=0.5))
    alone = make_run(dit_loaded, spec)
    sample(denoiser, [alone])
    crowd = [
        make_run(dit_loaded, SampleSpec(0, (1, 2, 3), 4, "ddim")),
        make_run(dit_loaded, spec),
        make_run(dit_loaded, SampleSpec(None, (9,), 8, "euler_a")),
    ]
    sample(denoiser, crowd)
    assert torch.allclose(crowd[1].latents, alone.latents, atol=BATCH_ATOL, rtol=BATCH_RTOL)
    # Each image depends only on its own seed: image 1 alone equals image 1 of the pair.
    single = make_run(dit_loaded, SampleSpec(**{**spec.__dict__, "seeds": (43,)}))
    sample(denoiser, [single])
    assert torch.allclose(single.latents[0], alone.latents[1], atol=BATCH_ATOL, rtol=BATCH_RTOL)
    # And the decode: alone, or in one VAE batch with other requests' latents.
    decode = image_decoder(dit_loaded)
    together = decode(torch.cat([crowd[0].latents, alone.latents, crowd[2].latents]))
    assert np.abs(together[3:5].astype(int) - decode(alone.latents).astype(int)).max() <= 1


def test_decode_in_chunks_equals_one_batch(dit_loaded):
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae, scale = dit_loaded.vae, dit_loaded.manifest.vae_scaling_factor
    chunked = vae_decode(vae, latents, scale, batch_size=2)
    assert torch.allclose(chunked, vae_decode(vae, latents, scale, batch_size=8), atol=1e-5)
    assert decode_latents(vae, latents, scale).shape == (5, 16, 16, 3)


def test_cads_noise_reaches_every_blocks_class_embedding(dit_loaded):
    """embed_delta on label L's rows equals a DiT whose every block's table row L is moved by delta."""
    denoiser = model_denoiser(dit_loaded)
    table = dit_loaded.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert torch.equal(denoiser.class_embedding(5), table[5])
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([900, 900]), torch.tensor([5, 5])
    delta = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(1))
    assert torch.equal(denoiser(x, t, labels, torch.zeros(2, table.shape[1])), denoiser(x, t, labels))
    moved = copy.deepcopy(dit_loaded.transformer)
    with torch.no_grad():
        for block in moved.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight[5] += delta
    want = DiTDenoiser(moved, eps_channels=4)(x, t, labels)
    got = denoiser(x, t, labels, delta.expand(2, -1))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, denoiser(x, t, labels), atol=1e-3)


def test_cads_runs_on_the_dit_and_needs_one_shared_embedding(dit_loaded):
    denoiser = model_denoiser(dit_loaded)
    spec = SampleSpec(1, (5,), 6, "ddim", GuidanceParams(3.0))
    with_cads = SampleSpec(**{**spec.__dict__, "guidance": GuidanceParams(3.0, cads=Cads(noise_scale=1.0))})
    plain, cads = make_run(dit_loaded, spec), make_run(dit_loaded, with_cads, denoiser)
    sample(denoiser, [plain, cads])
    assert cads.latents.isfinite().all() and (cads.latents - plain.latents).abs().max() > 1e-3
    untied = tiny_dit(10)
    with torch.no_grad():
        untied.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.mul_(2)
    with pytest.raises(ValueError, match="CADS needs one class embedding"):
        DiTDenoiser(untied).class_embedding(0)


def test_cuda_graphs_are_captured_for_unet_checkpoints_only(loaded, dit_loaded):
    """CFG_CUDA_GRAPHS applies to the verified path (a UNet, tests/test_cuda.py); a DiT runs eager until its
    capture has run on a card."""
    from app.config import Settings
    from app.loading import captures_cuda_graphs

    assert captures_cuda_graphs(Settings(), loaded) is True
    assert captures_cuda_graphs(Settings(cuda_graphs=False), loaded) is False
    assert captures_cuda_graphs(Settings(), dit_loaded) is False
