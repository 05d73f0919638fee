"""Real images spoiled on purpose, to see what a judge notices: brighter, blurred, or two classes in one.

Each function takes uint8 images (N, H, W, C) with their labels and returns new uint8 images; a class mix
keeps the first image's label as the requested class, so a judge that sees the mix as that class
scores it as correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def brighten_add(images: np.ndarray, levels: int) -> np.ndarray:
    """Every pixel, background included, levels grey levels brighter (clipped at 255)."""
    return np.clip(images.astype(np.int16) + levels, 0, 255).astype(np.uint8)


def brighten_gain(images: np.ndarray, gain: float) -> np.ndarray:
    """Every pixel times gain (clipped at 255): the black background stays black, the garment brightens,
    as it does under strong guidance."""
    return np.clip(np.rint(images.astype(np.float64) * gain), 0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of standard deviation sigma pixels, over a black border."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0)), taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius)), taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def mirror(images: np.ndarray) -> np.ndarray:
    """Left and right swapped: Fashion-MNIST's shoes all face one way, the diffusion model's either way."""
    return images[:, :, ::-1].copy()


def facing_as_class_mean(images: np.ndarray, requested: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """For each image, whether it correlates better with its class's mean image than with that mean
    mirrored: for the shoe classes, whether it faces the way the data set's shoes face."""
    x = images.reshape(len(images), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    means = class_means[requested].reshape(len(images), -1)
    mirrored = class_means[requested][:, :, ::-1].reshape(len(images), -1)
    centred = [m - m.mean(axis=1, keepdims=True) for m in (means, mirrored)]
    return np.einsum("nd,nd->n", x, centred[0]) > np.einsum("nd,nd->n", x, centred[1])


def other_class_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each image, the index of an image of another class (a random one, seeded)."""
    rng = np.random.default_rng(seed)
    partners = np.empty(labels.size, dtype=np.int64)
    for i, label in enumerate(labels):
        partners[i] = rng.choice(np.flatnonzero(labels != label))
    return partners


def mix_average(images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Each image averaged, pixel by pixel, with an image of another class."""
    partners = other_class_partners(labels, seed)
    return ((images.astype(np.uint16) + images[partners]) // 2).astype(np.uint8)


def mix_halves(images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Each image's top half over the bottom half of an image of another class."""
    partners = other_class_partners(labels, seed)
    mixed = images[partners].copy()
    half = images.shape[1] // 2
    mixed[:, :half] = images[:, :half]
    return mixed


@dataclass(frozen=True)
class Degradation:
    name: str
    apply: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (images, labels) -> images


def degradations(seed: int) -> list[Degradation]:
    """The degraded sets of docs/judges-check.md."""
    return [
        Degradation("brighter +24 (every pixel)", lambda x, y: brighten_add(x, 24)),
        Degradation("brighter x1.25 (garment only)", lambda x, y: brighten_gain(x, 1.25)),
        Degradation("mirrored (left-right)", lambda x, y: mirror(x)),
        Degradation("blur sigma 1", lambda x, y: gaussian_blur(x, 1.0)),
        Degradation("blur sigma 2", lambda x, y: gaussian_blur(x, 2.0)),
        Degradation("mix: mean of two classes", lambda x, y: mix_average(x, y, seed)),
        Degradation("mix: top half + other class's bottom", lambda x, y: mix_halves(x, y, seed)),
    ]
