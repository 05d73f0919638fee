import numpy as np
import pytest

from research.evaluation.manifold import (
    density_coverage,
    kth_neighbour_distances,
    manifold_metrics,
    precision_recall,
)

# Four real points on the unit square: each one's nearest other point is 1 away (k = 1 radius 1).
SQUARE = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_kth_neighbour_distance_skips_the_point_itself():
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(kth_neighbour_distances(line, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(kth_neighbour_distances(line, 2), [3, 2, 3, 6])


def test_identical_sets_have_full_precision_recall_and_coverage_and_density_k_plus_1_over_k():
    x = np.random.default_rng(0).normal(size=(200, 8))
    m = manifold_metrics(x, x.copy())
    assert (m.precision, m.recall, m.coverage) == (1.0, 1.0, 1.0)
    # Each point lies in its own ball and in those of the real points it is among the 5 nearest of;
    # over the set that is k + 1 balls per point on average (every ball holds its centre and k others).
    assert m.density == pytest.approx(6 / 5)


def test_disjoint_far_apart_sets_score_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0
    m = manifold_metrics(real, fake)
    assert (m.precision, m.recall, m.density, m.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_a_small_2d_example_worked_by_hand():
    # (0.5, 0) is 0.5 from (0,0) and (1,0): inside their radius-1 balls, 1.118 from the other two.
    # (3, 3) is 2.83 or more from every real point: outside every ball.
    fake = np.array([[0.5, 0.0], [3.0, 3.0]])
    precision, recall = precision_recall(SQUARE, fake, k=1)
    assert precision == 0.5  # one of the two fake points is in the real manifold
    # The fake points are each other's nearest neighbour, sqrt(2.5^2 + 3^2) = 3.91 apart: balls that
    # large hold every real point, so the outlier makes recall 1 (Naeem et al.'s point).
    assert recall == 1.0
    density, coverage = density_coverage(SQUARE, fake, k=1)
    assert density == 1.0  # (2 balls + 0 balls) / (k = 1) / 2 fake points
    assert coverage == 0.5  # (0,0) and (1,0) hold a fake point; (0,1) and (1,1) hold none


def test_crowding_one_mode_keeps_precision_and_loses_coverage():
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 20])
    fake = rng.normal(size=(200, 2)) * 0.5  # every sample in the first mode's core
    m = manifold_metrics(real, fake)
    assert m.precision == 1.0 and m.density > 1.0  # faithful, and a little crowded into the dense centre
    assert m.coverage < 0.5 and m.recall < 0.5  # the second mode is missed: half the real balls hold nothing


@pytest.mark.parametrize("k", [0, 4])
def test_k_must_leave_a_neighbour(k):
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        kth_neighbour_distances(SQUARE, k)
