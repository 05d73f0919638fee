"""The metrics of an evaluation, as pure functions over classifier features and images.

FID is the Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017);
diversity is the mean pairwise feature distance within each class; accuracy is the share of images
the classifier puts in the requested class; mean grey is the images' mean grey level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GaussianStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {features.shape}")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1))


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition.

    Round-off can make tiny eigenvalues negative; they are clipped to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (Heusel et al. 2017, eq. 6;
    tr (S_a S_b)^1/2 equals tr (S_a^1/2 S_b S_a^1/2)^1/2, whose argument is symmetric PSD)."""
    root_a = sqrtm_psd(a.sigma)
    cross = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    mean_term = float(np.sum((a.mu - b.mu) ** 2))
    return max(0.0, mean_term + float(np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of distinct rows."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 rows, got {n}")
    return float(torch.pdist(x).mean())


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """mean_pairwise_distance within each class, averaged over the classes (each class weighs the same)."""
    labels = np.asarray(labels)
    return float(np.mean([mean_pairwise_distance(features[labels == c]) for c in np.unique(labels)]))


def accuracy(predictions: np.ndarray, labels: np.ndarray | int) -> float:
    """The share of predictions equal to labels (one label for all, or one each)."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def mean_grey(images: torch.Tensor) -> float:
    """The mean grey level, 0..255, of model-range images (-1..1)."""
    return float(images.mean().add(1).mul(127.5))


def split_real_baseline(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced subset of per_class images per class, and of the rest (the reference)."""
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class > members.size // 2:
            raise ValueError(f"--per-class {per_class} leaves too few test images of class {c} for the reference")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    subset = np.sort(np.concatenate(chosen))
    return subset, np.setdiff1d(np.arange(labels.size), subset)
