"""The classifier that scores samples: a small CNN trained on the Fashion-MNIST train split once and
cached as safetensors, whose penultimate features feed FID and diversity."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from research.evaluation.metrics import mean_grey
from research.generate import positive_int

DEFAULT_CLASSIFIER_CACHE = Path("~/.cache/cfg-serve/classifier.safetensors")
DEFAULT_CLASSIFIER_EPOCHS = 3
CLASSIFIER_ARCH = "cnn-32-64-64-fc128-v1"
# The default setup's classifier, committed with a manifest (research/evaluation/judges/cnn-fmnist/): trained again
# on another CPU it is not bit-identical (test accuracy 0.9177 on an AMD EPYC, 0.9189 on the Intel Xeon that trained
# this one), so the default judge 1 is this file on every machine. Other setups (tests' short trainings) train.
COMMITTED_CLASSIFIER_DIR = Path(__file__).resolve().parent / "judges" / "cnn-fmnist"


class FeatureClassifier(Protocol):
    """A judge's network: features() of images, and a head that is linear in eval mode."""

    @property
    def head(self) -> nn.Module: ...  # read-only here: a judge's may be any module (Linear, Sequential)

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


class FashionClassifier(nn.Module):
    """A small CNN; features() is the penultimate layer used for FID and diversity."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(
            block(1, 32), block(32, 64), nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> FashionClassifier:
    """Adam with a cosine learning rate; random horizontal flips, as the diffusion model was trained."""
    torch.manual_seed(seed)
    model = FashionClassifier(num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0])
        for start in range(0, images.shape[0], batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_batch is not None:
                on_batch()
    return model.eval().requires_grad_(False)


def save_classifier(model: FashionClassifier, path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"arch": CLASSIFIER_ARCH, **metadata})


def load_classifier(path: Path, expect: dict[str, str]) -> FashionClassifier | None:
    """The cached classifier, or None where it is missing, unreadable, or was trained differently."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError):
        return None
    if any(metadata.get(k) != v for k, v in {"arch": CLASSIFIER_ARCH, **expect}.items()):
        return None
    model = FashionClassifier(num_classes=int(metadata.get("num_classes", 10)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        return None
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Scored:
    features: np.ndarray  # (N, D) float64
    predictions: np.ndarray  # (N,) int
    mean_pixel: float = float("nan")  # mean grey level of the images, 0..255


@torch.inference_mode()
def score(model: FeatureClassifier, images: torch.Tensor, batch_size: int = 1000) -> Scored:
    """Features and predicted classes of float images (N, 1, H, W) in [-1, 1], averaged over the image
    and its mirror: the diffusion model learned mirrored garments, and a mirrored shoe is a correct shoe."""
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        f = (model.features(x) + model.features(x.flip(-1))) / 2
        features.append(f)
        logits.append(model.head(f))  # the head is linear in eval mode: the mean of the two images' logits
    return Scored(torch.cat(features).double().numpy(), torch.cat(logits).argmax(1).numpy(), mean_grey(images))


def uint8_to_model_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the scaling of research.data."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def get_classifier(
    cache: Path, epochs: int, train_images: int | None, data: tuple[torch.Tensor, torch.Tensor]
) -> FashionClassifier:
    """The cached classifier, or a new one trained on the train split (its first train_images where
    given) and cached."""
    path = cache.expanduser()
    images, labels = data
    if train_images:
        images, labels = images[:train_images], labels[:train_images]
    setup = classifier_setup(epochs, train_images, len(data[0]))
    committed = load_committed_classifier(setup)
    if committed is not None:
        print(f"classifier: committed {COMMITTED_CLASSIFIER_DIR}")
        return committed
    model = load_classifier(path, setup)
    if model is not None:
        print(f"classifier: cached {path}")
        return model
    batches = epochs * -(-images.shape[0] // 128)
    with tqdm(total=batches, desc="classifier", unit="batch", dynamic_ncols=True, mininterval=2.0) as bar:
        model = train_classifier(images, labels, epochs, on_batch=bar.update)
    save_classifier(model, path, {**setup, "num_classes": str(int(labels.max()) + 1)})
    print(f"classifier: trained and cached at {path}")
    return model


def classifier_setup(epochs: int, train_images: int | None, available: int) -> dict[str, str]:
    """How get_classifier's classifier is trained (the first train_images of the available ones, or all), as its
    safetensors metadata and the committed one's manifest record it."""
    used = min(train_images, available) if train_images else available
    return {"epochs": str(epochs), "train_images": str(used), "seed": "0"}


def committed_setup(setup: dict[str, str], folder: Path = COMMITTED_CLASSIFIER_DIR) -> bool:
    """Whether the committed classifier was trained with this setup (so get_classifier returns it)."""
    return _committed_manifest(setup, folder) is not None


def _committed_manifest(setup: dict[str, str], folder: Path) -> dict | None:
    manifest = json.loads((folder / "manifest.json").read_text())
    training = manifest["training"]
    return manifest if all(str(training.get(k)) == v for k, v in setup.items()) else None


def load_committed_classifier(
    setup: dict[str, str], folder: Path = COMMITTED_CLASSIFIER_DIR
) -> FashionClassifier | None:
    """The committed classifier where it was trained with this setup, after checking its weights' sha256 against
    its manifest (a mismatch raises: the committed judge was changed without its manifest); None for another setup."""
    manifest = _committed_manifest(setup, folder)
    if manifest is None:
        return None
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise ValueError(f"{weights} has sha256 {digest}, its manifest says {manifest['weights_sha256']}")
    model = load_classifier(weights, setup)
    if model is None:
        raise ValueError(f"{weights} is not a {CLASSIFIER_ARCH} classifier trained with {setup}")
    return model


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """The scoring classifier's flags, the same for every evaluation command."""
    parser.add_argument("--classifier-cache", type=Path, default=DEFAULT_CLASSIFIER_CACHE)
    parser.add_argument("--classifier-epochs", type=positive_int, default=DEFAULT_CLASSIFIER_EPOCHS)
    parser.add_argument(
        "--classifier-train-images", type=positive_int, default=None, help="train on the first N only (tests)"
    )
