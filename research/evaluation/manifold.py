"""Fidelity and diversity as k-nearest-neighbour manifolds in a judge's feature space.

Precision and recall (Kynkaanniemi et al. 2019): the share of generated samples inside the real
manifold, and of real samples inside the generated one, each manifold being the union of balls around
its points reaching to their k-th nearest neighbour. Density and coverage (Naeem et al. 2020): how many
real balls hold a generated sample on average (over k; 1 when generated samples are spread like real
ones, above 1 where they crowd the dense regions), and the share of real balls that hold at least one
generated sample (robust to the outliers that inflate recall). A point is inside a ball when its
distance is at most the radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PRECISION_RECALL_K = 3  # Kynkaanniemi et al.'s choice
DENSITY_COVERAGE_K = 5  # Naeem et al.'s choice


@dataclass(frozen=True)
class Manifold:
    precision: float
    recall: float
    density: float
    coverage: float


def _distances(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(a, dtype=np.float64))
    y = torch.as_tensor(np.asarray(b, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, D) feature sets of the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    return torch.cdist(x, y)


def kth_neighbour_distances(features: np.ndarray, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be between 1 and {len(features) - 1} for {len(features)} rows, got {k}")
    # The k+1-th smallest distance of a row counts the row itself (distance 0) as the first.
    return _distances(features, features).kthvalue(k + 1, dim=1).values


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PRECISION_RECALL_K) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, eq. 1-2: fake inside the real manifold; real inside the fake manifold."""
    d = _distances(real, fake)  # (N real, M fake)
    precision = (d <= kth_neighbour_distances(real, k)[:, None]).any(dim=0).double().mean()
    recall = (d <= kth_neighbour_distances(fake, k)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = DENSITY_COVERAGE_K) -> tuple[float, float]:
    """Naeem et al. 2020, eq. 3-4: real balls holding each fake sample, over k; real balls holding any."""
    d = _distances(real, fake)
    inside = d <= kth_neighbour_distances(real, k)[:, None]
    density = inside.sum(dim=0).double().mean() / k
    coverage = inside.any(dim=1).double().mean()
    return float(density), float(coverage)


def manifold_metrics(real: np.ndarray, fake: np.ndarray) -> Manifold:
    """Precision and recall at k = 3, density and coverage at k = 5."""
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    return Manifold(precision, recall, density, coverage)
