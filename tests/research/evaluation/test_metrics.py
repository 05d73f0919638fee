import numpy as np
import pytest

from research.evaluation.metrics import (
    GaussianStats,
    fid,
    frechet_distance,
    gaussian_stats,
    mean_pairwise_distance,
    split_real_baseline,
    sqrtm_psd,
    within_class_diversity,
)


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_sqrtm_psd_squares_back_also_when_singular():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 3))
    m = a @ a.T  # rank 3 of 6
    root = sqrtm_psd(m)
    np.testing.assert_allclose(root @ root, m, atol=1e-10)
    np.testing.assert_allclose(root, root.T, atol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(500, 16))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_mean_shift_is_the_squared_shift():
    x = np.random.default_rng(2).normal(size=(400, 8))
    shifts = [0.5, 1.0, 2.0]
    values = [fid(x, x + d) for d in shifts]
    # Same covariance, so only ||mu_a - mu_b||^2 = 8 d^2 remains.
    np.testing.assert_allclose(values, [8 * d**2 for d in shifts], rtol=1e-6)
    assert values == sorted(values)


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(3)
    d = 5
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.5, 3, size=d), rng.uniform(0.5, 3, size=d)
    # Closed form for commuting covariances: ||mu_a - mu_b||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    q = random_orthogonal(d, rng)  # a shared rotation changes neither distance nor trace
    a = GaussianStats(q @ mu_a, q @ np.diag(var_a) @ q.T)
    b = GaussianStats(q @ mu_b, q @ np.diag(var_b) @ q.T)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_gaussians_in_2d():
    # 2x2 closed form: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S_a S_b.
    s_a = np.array([[2.0, 0.3], [0.3, 1.0]])
    s_b = np.array([[1.0, -0.5], [-0.5, 3.0]])
    m = s_a @ s_b
    trace_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 1.0 + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt
    value = frechet_distance(GaussianStats(np.zeros(2), s_a), GaussianStats(np.array([1.0, 0.0]), s_b))
    assert value == pytest.approx(expected, rel=1e-9)


def test_fid_from_samples_approaches_the_gaussians_value():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20000, 3))
    y = rng.normal(size=(20000, 3)) * 2 + 1
    # mean term 3, trace term 3 * (2 - 1)^2
    assert fid(x, y) == pytest.approx(6.0, rel=0.05)


def test_gaussian_stats_needs_two_rows():
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 4)))


def test_mean_pairwise_distance():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 4, 3
    assert mean_pairwise_distance(points) == pytest.approx(4.0)
    assert mean_pairwise_distance(np.ones((5, 3))) == 0.0


def test_within_class_diversity_weighs_classes_equally():
    features = np.array([[0.0], [2.0], [10.0], [10.0], [10.0]])
    labels = np.array([0, 0, 1, 1, 1])
    assert within_class_diversity(features, labels) == pytest.approx((2.0 + 0.0) / 2)


def test_split_real_baseline_is_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    subset, rest = split_real_baseline(labels, per_class=7, seed=0)
    assert np.bincount(labels[subset], minlength=10).tolist() == [7] * 10
    assert np.intersect1d(subset, rest).size == 0
    assert subset.size + rest.size == labels.size
    with pytest.raises(ValueError):
        split_real_baseline(labels, per_class=60, seed=0)
