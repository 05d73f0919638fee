"""An image set's metrics under one judge, against that judge's references on the test split.

The test split is cut three ways (real_split): n class-balanced images for the real row, n more
class-balanced images as the reference manifold of precision, recall, density and coverage (k-NN
metrics want sets of the same size: their radii shrink as a set grows), and the whole rest, the real
subset excluded, as the reference Gaussian of FID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from research.evaluation.classifier import Scored, score
from research.evaluation.judges import Judge
from research.evaluation.manifold import manifold_metrics
from research.evaluation.metrics import (
    GaussianStats,
    accuracy,
    frechet_distance,
    gaussian_stats,
    split_real_baseline,
    within_class_diversity,
)


@dataclass(frozen=True)
class RealSplit:
    subset: np.ndarray  # indices of the real row's test images
    rest: np.ndarray  # every other test image: FID's reference
    manifold: np.ndarray  # a class-balanced part of rest, as large as subset: the k-NN reference


def real_split(labels: np.ndarray, per_class: int, seed: int) -> RealSplit:
    subset, rest = split_real_baseline(labels, per_class, seed)
    rng = np.random.default_rng(seed + 1)
    manifold = np.sort(
        np.concatenate([rng.choice(rest[labels[rest] == c], size=per_class, replace=False) for c in np.unique(labels)])
    )
    return RealSplit(subset, rest, manifold)


@dataclass(frozen=True)
class JudgeReference:
    judge: Judge
    test: Scored  # the whole test split under this judge
    test_accuracy: float
    fid_reference: GaussianStats
    manifold_reference: np.ndarray  # (n, D) features
    num_classes: int


def judge_reference(
    judge: Judge, test_images: torch.Tensor, test_labels: np.ndarray, split: RealSplit
) -> JudgeReference:
    test = score(judge.model, test_images)
    return JudgeReference(
        judge=judge,
        test=test,
        test_accuracy=accuracy(test.predictions, test_labels),
        fid_reference=gaussian_stats(test.features[split.rest]),
        manifold_reference=test.features[split.manifold],
        num_classes=int(test_labels.max()) + 1,
    )


@dataclass
class JudgedMetrics:
    accuracy: float  # on the requested class
    fid: float
    diversity: float
    precision: float
    recall: float
    density: float
    coverage: float
    accuracy_per_class: list[float]


def judge_set(reference: JudgeReference, scored: Scored, requested: np.ndarray) -> JudgedMetrics:
    """The metrics of images (scored by reference's judge) whose requested classes are requested."""
    manifold = manifold_metrics(reference.manifold_reference, scored.features)
    return JudgedMetrics(
        accuracy=accuracy(scored.predictions, requested),
        fid=frechet_distance(gaussian_stats(scored.features), reference.fid_reference),
        diversity=within_class_diversity(scored.features, requested),
        precision=manifold.precision,
        recall=manifold.recall,
        density=manifold.density,
        coverage=manifold.coverage,
        accuracy_per_class=[accuracy(scored.predictions[requested == c], c) for c in range(reference.num_classes)],
    )


def judge_real_subset(reference: JudgeReference, test_labels: np.ndarray, split: RealSplit) -> JudgedMetrics:
    """The real row: the subset's own metrics under this judge."""
    t = reference.test
    subset = Scored(t.features[split.subset], t.predictions[split.subset])
    return judge_set(reference, subset, test_labels[split.subset])
