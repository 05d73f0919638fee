"""`python -m app.models import`: what it accepts, what it writes, what it refuses, and that what it writes
verifies and loads. The source folders are tiny random diffusers models (conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from app.models import (
    CheckpointError,
    UNetDenoiser,
    image_decoder,
    load_checkpoint,
    model_denoiser,
    read_manifest,
    sha256_file,
    verify_checkpoint,
)
from app.models.__main__ import main
from app.models.checkpoint import WEIGHTS_NAME
from tests.tiny_models import (
    IMAGENET_HEAD,
    save_dit_pipeline,
    save_unet_pipeline,
    tiny_dit,
    tiny_unet,
    tiny_vae,
)

REPO = Path(__file__).resolve().parents[2]


def run_import(capsys, src: Path, store: Path, name: str = "m", *extra: str) -> tuple[int, str, str]:
    status = main(["import", str(src), "--name", name, "--store", str(store), *extra])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_dit_pipeline_imports_with_its_shapes_classes_and_hashes(dit_source, dit_checkpoint):
    m = verify_checkpoint(dit_checkpoint).manifest
    assert m.kind == "dit" and m.latent and m.prediction_type == "epsilon"
    assert m.class_names[:3] == IMAGENET_HEAD and m.num_classes == 1000 and m.null_label == 1000
    assert m.latent_shape == [4, 8, 8] and m.sample_shape == (4, 8, 8) and m.image_shape == [3, 16, 16]
    assert m.vae_scaling_factor == pytest.approx(0.18215) and m.learned_sigma == "drop"
    assert m.source["pipeline"] == "DiTPipeline" and m.source["class_names_from"] == "id2label in model_index.json"
    weights = {"transformer/" + WEIGHTS_NAME, "vae/" + WEIGHTS_NAME}
    assert set(m.files) == weights and m.weights_sha256 == m.files["transformer/" + WEIGHTS_NAME]
    for relpath, sha in m.files.items():
        copy = dit_checkpoint / relpath
        assert (
            copy.is_file() and not copy.is_symlink() and sha == sha256_file(copy) == sha256_file(dit_source / relpath)
        )
    scheduler = json.loads((dit_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["clip_sample"] is False
    assert sorted(p.name for p in dit_checkpoint.parent.iterdir()) == ["tiny-dit"]  # no staging folder left


def test_dit_with_ten_classes_takes_its_own_null_label(tmp_path, capsys):
    """DiTPipeline hard-codes the null label 1000; a 10-class DiT's is 10 (num_embeds_ada_norm)."""
    src = save_dit_pipeline(tmp_path / "src", 10)  # no id2label: numbered names
    status, out, _ = run_import(capsys, src, tmp_path / "store", "dit10")
    assert status == 0 and "dit, 10 classes (null label 10), images 3x16x16, latents 4x8x8" in out
    assert "note: no class names given" in out
    loaded = load_checkpoint(tmp_path / "store" / "dit10")
    m = loaded.manifest
    assert m.null_label == 10 and m.class_names == [f"class {i}" for i in range(10)]
    table = loaded.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes and the null row
    eps = model_denoiser(loaded)(torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([3, 10]))
    assert eps.shape == (2, 4, 8, 8) and eps.isfinite().all()


def test_legacy_transformer2d_config_and_sharded_weights_import(tmp_path, capsys):
    """The Hub's DiT folders name their transformer Transformer2DModel; big weights come in shards."""
    src = save_dit_pipeline(tmp_path / "src", 10, learned_sigma=False)
    shutil.rmtree(src / "transformer")
    dit = tiny_dit(10, learned_sigma=False, seed=5)
    dit.save_pretrained(src / "transformer", max_shard_size="60KB")
    config = json.loads((src / "transformer" / "config.json").read_text())
    config |= {"_class_name": "Transformer2DModel", "cross_attention_dim": None, "use_linear_projection": False}
    (src / "transformer" / "config.json").write_text(json.dumps(config))
    status, _, err = run_import(capsys, src, tmp_path / "store")
    assert status == 0, err
    loaded = load_checkpoint(tmp_path / "store" / "m")
    shards = [f for f in loaded.manifest.files if f.startswith("transformer/")]
    assert len(shards) > 1 and loaded.manifest.learned_sigma == "none"
    assert isinstance(loaded.transformer, DiTTransformer2DModel)
    for key, value in dit.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key


def test_unet_folder_with_a_classes_file(tmp_path, capsys):
    src = tmp_path / "unet"
    tiny_unet(num_class_embeds=4).save_pretrained(src)
    (tmp_path / "classes.txt").write_text("tench, Tinca tinca\nBag\nAnkle boot\n")
    (tmp_path / "scheduler.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "linear"}))
    extra = ("--classes", str(tmp_path / "classes.txt"), "--scheduler", str(tmp_path / "scheduler.json"))
    status, out, err = run_import(capsys, src, tmp_path / "store", "unet3", *extra)
    assert status == 0, err
    loaded = load_checkpoint(tmp_path / "store" / "unet3")
    m = loaded.manifest
    assert m.kind == "unet" and not m.latent and m.vae_scaling_factor is None
    assert m.class_names == ["tench, Tinca tinca", "Bag", "Ankle boot"] and m.null_label == 3
    assert m.sample_shape == (3, 8, 8) and m.image_shape == [3, 8, 8] and m.learned_sigma == "none"
    assert m.files == {"unet/" + WEIGHTS_NAME: m.weights_sha256}
    denoiser = model_denoiser(loaded)
    assert isinstance(denoiser, UNetDenoiser) and denoiser.class_embedding(3).shape == (
        loaded.unet.time_embedding.linear_2.out_features,
    )
    images = image_decoder(loaded)(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert images.shape == (2, 8, 8, 3) and images.dtype.name == "uint8"


def test_unet_pipeline_without_class_names_takes_the_last_embedding_as_null(tmp_path, capsys):
    src = save_unet_pipeline(tmp_path / "src", num_class_embeds=5)
    status, out, _ = run_import(capsys, src, tmp_path / "store")
    assert status == 0 and "unet, 4 classes (null label 4), images 3x8x8" in out
    assert "the last embedding (4) taken as the null label" in out
    m = verify_checkpoint(tmp_path / "store" / "m").manifest
    assert m.class_names == ["class 0", "class 1", "class 2", "class 3"] and m.source["pipeline"] == "DDPMPipeline"


def test_unet_pipeline_in_a_vaes_latents(tmp_path, capsys):
    """A class-conditional UNet that works in an AutoencoderKL's latents: decoded like a DiT's."""
    src = tmp_path / "src"
    tiny_unet(num_class_embeds=3, channels=4).save_pretrained(src / "unet")
    tiny_vae().save_pretrained(src / "vae")
    DDPMScheduler().save_pretrained(src / "scheduler")  # clip_sample on: right for pixels, not latents
    index = {"_class_name": "MyPipeline", "unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    index["id2label"] = {"0": "cat", "1": "dog"}
    (src / "model_index.json").write_text(json.dumps(index))
    status, out, err = run_import(capsys, src, tmp_path / "store")
    assert status == 0, err
    assert "note: clip_sample turned off in the scheduler config" in out
    loaded = load_checkpoint(tmp_path / "store" / "m")
    m = loaded.manifest
    assert m.kind == "unet" and m.latent and m.class_names == ["cat", "dog"] and m.null_label == 2
    assert m.sample_shape == (4, 8, 8) and m.image_shape == [3, 16, 16] and loaded.vae is not None
    assert loaded.scheduler_config["clip_sample"] is False
    assert image_decoder(loaded)(torch.randn(2, 4, 8, 8)).shape == (2, 16, 16, 3)


def text_conditional_pipeline(path: Path) -> Path:
    path.mkdir()
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def conditional_unet_folder(path: Path) -> Path:
    UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(path)
    return path


def pickle_unet_folder(path: Path) -> Path:
    tiny_unet(num_class_embeds=4).save_pretrained(path, safe_serialization=False)
    return path


def dit_without_vae(path: Path) -> Path:
    tiny_dit(10).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            text_conditional_pipeline,
            "needs a class-conditional model: .* is a text-conditional pipeline "
            r"\(StableDiffusionPipeline with text_encoder, tokenizer\)",
        ),
        (conditional_unet_folder, "needs a class-conditional model: .* is a UNet2DConditionModel"),
        (lambda p: save_unet_pipeline(p, None), "needs a class-conditional model: .* is an unconditional UNet2DModel"),
        (pickle_unet_folder, "only safetensors weights are loaded, never pickle: .* has diffusion_pytorch_model.bin"),
        (dit_without_vae, "a DiT works in a VAE's latents: import its DiTPipeline folder"),
    ],
    ids=["text-pipeline", "text-unet", "unconditional", "pickle-only", "dit-without-vae"],
)
def test_refusals_are_one_line_with_exit_status_2(tmp_path, capsys, make, message):
    src = make(tmp_path / "src")
    status, out, err = run_import(capsys, src, tmp_path / "store")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"cannot import {src}: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_unet_without_a_null_embedding_is_refused(tmp_path, capsys):
    src = tmp_path / "unet"
    tiny_unet(num_class_embeds=3).save_pretrained(src)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    status, _, err = run_import(capsys, src, tmp_path / "store", "m", "--classes", str(tmp_path / "classes.txt"))
    assert status == 2
    assert "num_class_embeds 3 for 3 classes; classifier-free guidance needs classes + 1" in err


def test_an_existing_name_is_not_overwritten(dit_source, dit_checkpoint, capsys):
    before = sha256_file(dit_checkpoint / "manifest.json")
    status, _, err = run_import(capsys, dit_source, dit_checkpoint.parent, "tiny-dit")
    assert status == 2 and "already exists" in err
    assert sha256_file(dit_checkpoint / "manifest.json") == before


@pytest.mark.slow  # python -m app.models in subprocesses
def test_the_command_line_refuses_without_a_traceback(tmp_path):
    src = pickle_unet_folder(tmp_path / "src")
    cmd = [sys.executable, "-m", "app.models", "import", str(src), "--name", "x", "--store", str(tmp_path / "store")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "only safetensors weights are loaded, never pickle" in lines[0], proc.stderr


@pytest.mark.parametrize("relpath", [f"vae/{WEIGHTS_NAME}", f"transformer/{WEIGHTS_NAME}"])
def test_a_corrupt_or_missing_weight_file_is_named(dit_checkpoint, tmp_path, relpath):
    ckpt = Path(shutil.copytree(dit_checkpoint, tmp_path / "ckpt"))
    weights = ckpt / relpath
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fail verification") as err:
        load_checkpoint(ckpt)
    assert str(weights) in str(err.value)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_checkpoint(ckpt)
    assert str(weights) in str(err.value)


def test_a_missing_vae_config_and_a_manifest_path_outside_are_named(dit_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(dit_checkpoint, tmp_path / "ckpt"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"outside transformer, vae/: '\.\./\.\./etc/passwd'"):
        verify_checkpoint(ckpt)
    (ckpt / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        verify_checkpoint(ckpt)
    assert str(ckpt / "vae" / "config.json") in str(err.value)


def test_a_manifest_from_before_the_import_fields_reads_as_a_pixel_space_unet(checkpoint_path, tmp_path):
    """Manifests written before `python -m app.models import` existed lack kind, files and the shapes; they
    take the values that describe a pixel-space UNet. (The shipped one has them since its issue-10 run.)"""
    old = Path(shutil.copytree(checkpoint_path, tmp_path / "old"))
    on_disk = json.loads((old / "manifest.json").read_text())
    new_fields = ("kind", "files", "image_shape", "latent_shape", "vae_scaling_factor", "learned_sigma", "source")
    on_disk = {k: v for k, v in on_disk.items() if k not in new_fields}
    (old / "manifest.json").write_text(json.dumps(on_disk))
    m = verify_checkpoint(old).manifest
    assert read_manifest(old) == m
    assert m.kind == "unet" and not m.latent and m.learned_sigma == "none" and m.vae_scaling_factor is None
    assert m.sample_shape == (1, 28, 28) and m.image_shape == [1, 28, 28]
    assert m.files == {f"unet/{WEIGHTS_NAME}": on_disk["weights_sha256"]}


def test_a_vae_with_pre_0_14_attention_names_loads(dit_checkpoint, tmp_path):
    """Older VAE files (the Hub's sd-vae-ft-* among them) name attention weights query/key/value/proj_attn."""
    ckpt = Path(shutil.copytree(dit_checkpoint, tmp_path / "ckpt"))
    weights = ckpt / "vae" / WEIGHTS_NAME
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(weights)
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, weights)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][f"vae/{WEIGHTS_NAME}"] = sha256_file(weights)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_checkpoint(ckpt)
    for key, value in load_file(dit_checkpoint / "vae" / WEIGHTS_NAME).items():
        assert torch.equal(loaded.vae.state_dict()[key], value), key
