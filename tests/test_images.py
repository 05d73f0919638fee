import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.images import GRID_PADDING, PNG_SIGNATURE, labelled_grid, make_grid, to_pil, to_png_bytes, upscale


def images(n: int, h: int = 28, w: int = 28, c: int = 1) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize(
    "shape, mode",
    [
        ((28, 28), "L"),  # written by to_png_bytes itself (DIRECT_PNG_MAX_PIXELS) ...
        ((28, 28, 1), "L"),
        ((5, 7, 3), "RGB"),
        ((64, 64, 3), "RGB"),
        ((65, 64), "L"),  # ... and by PIL, past it
        ((122, 122, 3), "RGB"),
    ],
)
def test_png_bytes_round_trip(shape, mode):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    data = to_png_bytes(array)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == mode
    assert decoded.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(decoded), array.reshape(decoded.size[1], decoded.size[0], -1).squeeze())


@pytest.mark.parametrize("bad", [np.zeros((28, 28), np.float32), np.zeros((2, 28, 28, 1), np.uint8)])
def test_to_pil_rejects_wrong_dtype_or_shape(bad):
    with pytest.raises(ValueError):
        to_pil(bad)


def test_make_grid_places_images_row_by_row():
    stack = images(5)
    grid = make_grid(stack, ncols=3)
    p = GRID_PADDING
    assert grid.shape == (2 * (28 + p) + p, 3 * (28 + p) + p, 1)
    assert grid.dtype == np.uint8
    for i in range(5):
        top, left = p + (i // 3) * (28 + p), p + (i % 3) * (28 + p)
        np.testing.assert_array_equal(grid[top : top + 28, left : left + 28], stack[i])
    # The sixth cell is empty: padding colour.
    assert (grid[p + 30 : p + 58, p + 60 : p + 88] == 255).all()


def test_make_grid_accepts_a_list_and_caps_columns():
    stack = images(2)
    grid = make_grid(list(stack), ncols=8)
    assert grid.shape == (28 + 2 * GRID_PADDING, 2 * 28 + 3 * GRID_PADDING, 1)


@pytest.mark.parametrize("ncols", [0, -1])
def test_make_grid_rejects_bad_columns(ncols):
    with pytest.raises(ValueError):
        make_grid(images(2), ncols)


def test_upscale_is_nearest_neighbour():
    array = np.array([[[1], [2]], [[3], [4]]], np.uint8)
    big = upscale(array, 3)
    assert big.shape == (6, 6, 1)
    assert (big[:3, :3] == 1).all() and (big[3:, 3:] == 4).all()


def test_labelled_grid_puts_the_grid_bottom_right():
    stack = images(6)
    zoom = 2
    picture = labelled_grid(stack, 3, row_labels=["Sneaker", "Bag"], col_labels=["s=0", "s=1", "s=3"], zoom=zoom)
    expected = upscale(make_grid(stack, 3), zoom)[:, :, 0]
    pixels = np.asarray(picture)
    h, w = expected.shape
    assert pixels.shape[0] > h and pixels.shape[1] > w  # room for the labels
    np.testing.assert_array_equal(pixels[-h:, -w:], expected)
    # Labels are drawn in black in the margins.
    assert (pixels[: pixels.shape[0] - h] == 0).any()
    assert (pixels[:, : pixels.shape[1] - w] == 0).any()


def test_labelled_grid_without_labels_is_the_grid():
    stack = images(4)
    picture = labelled_grid(stack, 2)
    np.testing.assert_array_equal(np.asarray(picture), make_grid(stack, 2)[:, :, 0])


def test_small_png_is_a_valid_file_that_pil_reads_back():
    """The directly written PNG, chunk by chunk: each chunk's CRC checks out and PIL verifies the file."""
    data = to_png_bytes(images(1, 28, 28, 3)[0])
    assert data.startswith(PNG_SIGNATURE)
    at, kinds = len(PNG_SIGNATURE), []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        at += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    Image.open(io.BytesIO(data)).verify()
