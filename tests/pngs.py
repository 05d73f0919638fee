"""Images as the API returns them: base64 PNGs (or data: URLs), decoded to arrays and compared.

An image is batch-invariant to one grey level, not to the byte: a forward over more rows may sum in another
order (oneDNN picks its kernels by batch size and thread count), and a pixel that lies at a rounding
half-way point then rounds the other way. Requests that ran at the same rows give identical bytes.
"""

import base64
import io

import numpy as np
from PIL import Image


def decode(b64: str) -> np.ndarray:
    """A base64 PNG, or a data: URL holding one, as a uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))))


def level_diff(a: str | np.ndarray, b: str | np.ndarray) -> int:
    """The largest per-pixel difference, in grey levels, between two images (base64 or arrays)."""
    a, b = (decode(x) if isinstance(x, str) else x for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def same_images(a: list[str], b: list[str]) -> bool:
    """Two requests' images (base64 PNGs) as the service promises them: pairwise within one grey level."""
    return len(a) == len(b) and all(level_diff(x, y) <= 1 for x, y in zip(a, b, strict=True))


def response_images(response) -> np.ndarray:
    """A /generate response's images, stacked (N, H, W): it must have succeeded."""
    assert response.status_code == 200, response.text
    return np.stack([decode(b) for b in response.json()["images"]])
