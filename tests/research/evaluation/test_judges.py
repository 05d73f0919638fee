import json
import shutil

import numpy as np
import pytest
import torch

from research.data import load_fashion_mnist
from research.evaluation.classifier import score
from research.evaluation.judges.resnet import JUDGE_DIR, JudgeLoadError, file_sha256, load_resnet_judge
from research.evaluation.judges.train import main as train_main
from research.evaluation.metrics import accuracy

pytestmark = pytest.mark.integration  # the committed judges' numerics on the test split


def test_the_committed_judge_scores_the_test_split_as_its_manifest_records():
    model, manifest = load_resnet_judge()
    images, labels = load_fashion_mnist("test")
    measured = accuracy(score(model, images).predictions, labels.numpy())
    assert measured == pytest.approx(manifest.test_accuracy, abs=1e-4)
    assert measured >= 0.93
    assert manifest.training["test_images"] == 10000 and manifest.training["train_images"] == 60000
    assert (JUDGE_DIR / "model.safetensors").stat().st_size < 4 * 2**20


def test_the_committed_cnn_judge_is_judge_1_and_scores_the_test_split_as_its_manifest_records():
    """With the default --classifier-* flags, judge 1 is the committed CNN on every machine
    (research/evaluation/judges/cnn-fmnist)."""
    import argparse

    from research.evaluation.classifier import COMMITTED_CLASSIFIER_DIR, DEFAULT_CLASSIFIER_CACHE
    from research.evaluation.judges import load_judges

    args = argparse.Namespace(
        classifier_cache=DEFAULT_CLASSIFIER_CACHE, classifier_epochs=3, classifier_train_images=None
    )
    cnn = load_judges(args, load_fashion_mnist("train"))[0]
    assert cnn.name == "cnn" and "cnn-fmnist, committed" in cnn.source
    manifest = json.loads((COMMITTED_CLASSIFIER_DIR / "manifest.json").read_text())
    images, labels = load_fashion_mnist("test")
    measured = accuracy(score(cnn.model, images).predictions, labels.numpy())
    assert measured == pytest.approx(manifest["test_accuracy"], abs=1e-4)


def test_a_judge_whose_weights_changed_is_refused(tmp_path):
    judge = tmp_path / "judge"
    shutil.copytree(JUDGE_DIR, judge)
    weights = judge / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(JudgeLoadError, match="sha256"):
        load_resnet_judge(judge)


def test_a_judge_of_another_architecture_is_refused(tmp_path):
    judge = tmp_path / "judge"
    shutil.copytree(JUDGE_DIR, judge)
    manifest = json.loads((judge / "manifest.json").read_text())
    (judge / "manifest.json").write_text(json.dumps({**manifest, "arch": "resnet-v0"}))
    with pytest.raises(JudgeLoadError, match="architecture 'resnet-v0'"):
        load_resnet_judge(judge)
    wider = [2 * w for w in manifest["widths"]]
    (judge / "manifest.json").write_text(json.dumps({**manifest, "widths": wider}))
    with pytest.raises(JudgeLoadError, match="does not fit"):
        load_resnet_judge(judge)
    (judge / "manifest.json").unlink()
    with pytest.raises(JudgeLoadError, match="judge file missing"):
        load_resnet_judge(judge)


def test_training_twice_with_one_seed_gives_the_same_weights_and_records_how(tmp_path):
    # A tiny subset and one epoch: this checks the command, not the judge's quality.
    argv = ["--epochs", "1", "--train-images", "256", "--test-images", "100"]
    train_main([*argv, "--out", str(tmp_path / "a")])
    train_main([*argv, "--out", str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("a", "b"))
    assert a["weights_sha256"] == b["weights_sha256"] == file_sha256(tmp_path / "a" / "model.safetensors")
    assert a["test_accuracy"] == b["test_accuracy"]
    t = a["training"]
    assert t["command"].startswith("python -m research.evaluation.judges.train --epochs 1 --train-images 256")
    assert t["seed"] == 0 and t["train_images"] == 256 and t["test_images"] == 100 and t["epochs"] == 1
    assert t["git_commit"] and "CPU" in t["machine"] and t["wall_time_s"] > 0
    model, manifest = load_resnet_judge(tmp_path / "a")
    assert manifest.test_accuracy == a["test_accuracy"]
    train_main([*argv, "--seed", "1", "--out", str(tmp_path / "c")])
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["weights_sha256"] != a["weights_sha256"]


def test_the_judge_features_are_the_mean_of_the_last_stage():
    model, _ = load_resnet_judge()
    x = torch.randn(3, 1, 28, 28)
    last = model.stages(model.stem(x))
    torch.testing.assert_close(model.features(x), last.mean(dim=(2, 3)))
    assert model.features(x).shape == (3, 128)
    np.testing.assert_allclose(model(x).numpy(), model.head(model.features(x)).numpy())
