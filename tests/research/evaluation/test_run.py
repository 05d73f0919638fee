import numpy as np
import pytest

from research.evaluation.classifier import Scored
from research.evaluation.metrics import frechet_distance, gaussian_stats
from research.evaluation.run import score_scales


def test_score_scales_reads_images_as_class_major():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(6, 4))
    reference = gaussian_stats(rng.normal(size=(50, 4)))
    # Two classes, three images each: classes [0 0 0 1 1 1].
    right = Scored(features, np.array([0, 0, 0, 1, 1, 1]), mean_pixel=40.0)
    half = Scored(features, np.array([0, 1, 1, 1, 1, 0]))
    results = score_scales([right, half], [1.0, 3.0], reference, num_classes=2)
    assert [r.accuracy for r in results] == [1.0, 0.5]
    assert results[0].mean_pixel == 40.0
    assert results[1].accuracy_per_class == pytest.approx([1 / 3, 2 / 3])
    assert results[0].fid == pytest.approx(frechet_distance(gaussian_stats(features), reference))
