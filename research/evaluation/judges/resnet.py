"""The second judge: a small residual network (He et al. 2016) trained with crops, flips and one-cycle SGD,
committed beside this module (resnet-fmnist/) with a manifest that pins its weights by sha256.

It differs from the first judge (research/evaluation/classifier.py, a plain CNN with a fully connected
128-d feature layer, Adam, flips only, 3 epochs, trained on the fly) in architecture, features (the
128-d global average of the last stage, so a feature is a spatial mean, not a position-bound unit),
augmentation and schedule."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

JUDGE_DIR = Path(__file__).parent / "resnet-fmnist"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
RESNET_ARCH = "resnet-basic-v1"  # ResNetJudge; its stem and widths are in the manifest


class JudgeLoadError(RuntimeError):
    """The committed judge is missing, altered, or not the architecture this code builds."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetJudge(nn.Module):
    """A 3x3 stem at 28x28, then three stages of one block each at 14x14, 7x7 and 4x4 (widths
    channels): the first stage strides at once because a full-resolution stage costs 4x more and the
    CPUs it is trained on are two shared cores. features() is the global average of the last stage."""

    def __init__(self, num_classes: int = 10, stem: int = 32, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        blocks, c_in = [], stem
        for width in widths:
            blocks.append(BasicBlock(c_in, width, stride=2))
            c_in = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class JudgeManifest:
    arch: str
    weights_sha256: str
    test_accuracy: float
    num_classes: int
    stem: int
    widths: tuple[int, ...]
    training: dict[str, Any]  # command, seed, commit, time, machine, hyperparameters

    @classmethod
    def read(cls, path: Path) -> JudgeManifest:
        data = json.loads(path.read_text())
        return cls(
            arch=data["arch"],
            weights_sha256=data["weights_sha256"],
            test_accuracy=float(data["test_accuracy"]),
            num_classes=int(data["num_classes"]),
            stem=int(data["stem"]),
            widths=tuple(int(w) for w in data["widths"]),
            training=dict(data["training"]),
        )


def load_resnet_judge(judge_dir: Path = JUDGE_DIR) -> tuple[ResNetJudge, JudgeManifest]:
    """The committed judge in eval mode, after checking its weights' sha256 and architecture against
    the manifest; JudgeLoadError says what does not match."""
    weights, manifest_path = judge_dir / WEIGHTS_FILE, judge_dir / MANIFEST_FILE
    for f in (weights, manifest_path):
        if not f.is_file():
            raise JudgeLoadError(f"judge file missing: {f}; train it with python -m research.evaluation.judges.train")
    try:
        manifest = JudgeManifest.read(manifest_path)
    except (ValueError, KeyError, TypeError) as exc:
        raise JudgeLoadError(f"unreadable judge manifest {manifest_path}: {exc}") from None
    if manifest.arch != RESNET_ARCH:
        raise JudgeLoadError(f"{manifest_path} is for architecture {manifest.arch!r}; this code builds {RESNET_ARCH!r}")
    digest = file_sha256(weights)
    if digest != manifest.weights_sha256:
        raise JudgeLoadError(f"{weights} has sha256 {digest}, the manifest says {manifest.weights_sha256}")
    model = ResNetJudge(manifest.num_classes, manifest.stem, manifest.widths)
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as exc:  # the manifest's shapes are not the weights'
        raise JudgeLoadError(f"{weights} does not fit {manifest_path}: {exc}") from None
    return model.eval().requires_grad_(False), manifest
