import numpy as np

from research.evaluation.judges.degrade import (
    brighten_add,
    brighten_gain,
    facing_as_class_mean,
    gaussian_blur,
    mirror,
    mix_average,
    mix_halves,
    other_class_partners,
)


def images_of(*levels: int) -> np.ndarray:
    return np.stack([np.full((28, 28, 1), v, dtype=np.uint8) for v in levels])


def test_brightening_adds_to_every_pixel_or_scales_and_clips_at_white():
    x = images_of(0, 100, 250)
    np.testing.assert_array_equal(brighten_add(x, 24)[:, 0, 0, 0], [24, 124, 255])
    np.testing.assert_array_equal(brighten_gain(x, 1.25)[:, 0, 0, 0], [0, 125, 255])  # black stays black


def test_blur_keeps_a_lines_mass_and_spreads_it_by_sigma():
    x = np.zeros((1, 28, 28, 1), dtype=np.uint8)
    x[0, :, 14, 0] = 255  # a vertical line: blurred across, a Gaussian of standard deviation sigma
    for sigma in (1.0, 2.0):
        across = gaussian_blur(x, sigma)[0, 14, :, 0].astype(np.float64)
        assert abs(across.sum() - 255) <= 14 * 0.5  # each pixel rounded by at most 0.5 over the spread
        spread = np.sqrt((across * (np.arange(28) - 14) ** 2).sum() / across.sum())
        assert abs(spread - sigma) < 0.05
    flat = images_of(80)
    assert (gaussian_blur(flat, 1.0)[0, 4:-4, 4:-4] == 80).all()  # away from the black border


def test_class_mixes_pair_each_image_with_another_class():
    labels = np.repeat(np.arange(10), 3)
    partners = other_class_partners(labels, seed=0)
    assert (labels[partners] != labels).all()
    np.testing.assert_array_equal(partners, other_class_partners(labels, seed=0))  # seeded
    x = images_of(*(labels * 20))
    mean = mix_average(x, labels, seed=0)
    np.testing.assert_array_equal(mean[:, 0, 0, 0], (labels * 20 + labels[partners] * 20) // 2)
    halves = mix_halves(x, labels, seed=0)
    np.testing.assert_array_equal(halves[:, 13, 0, 0], labels * 20)  # the top half is the image's own
    np.testing.assert_array_equal(halves[:, 14, 0, 0], labels[partners] * 20)  # the bottom, its partner's


def test_an_image_faces_the_way_of_the_class_mean_it_correlates_with_best():
    shoe = np.zeros((1, 28, 28, 1), dtype=np.uint8)
    shoe[0, 20:24, 4:24] = 200  # a sole
    shoe[0, 10:20, 4:12] = 200  # a heel on the left
    means = shoe.astype(np.float64)  # class 0's mean: heel on the left
    both = np.concatenate([shoe, mirror(shoe)])
    np.testing.assert_array_equal(mirror(shoe)[0, 15, 20:24, 0], [200] * 4)  # the heel moved right
    np.testing.assert_array_equal(facing_as_class_mean(both, np.array([0, 0]), means), [True, False])
