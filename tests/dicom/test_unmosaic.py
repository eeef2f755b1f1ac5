"""The mosaic unpacking kernel against a naive numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.dicom.unmosaic import unmosaic


def naive_unmosaic(stored: np.ndarray, n_slices: int, tiles: int, slope: float,
                   intercept: float) -> np.ndarray:
    rows, cols = stored.shape[0] // tiles, stored.shape[1] // tiles
    out = np.zeros((cols, rows, n_slices), np.float32)
    for k in range(n_slices):
        tile = stored[(k // tiles) * rows:(k // tiles + 1) * rows,
                      (k % tiles) * cols:(k % tiles + 1) * cols]
        out[:, :, k] = tile.T.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:  # the DICOM rescale, in float32, two steps
        out *= np.float32(slope)
        out += np.float32(intercept)
    return out


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int32])
@pytest.mark.parametrize("n_slices, tiles", [(36, 6), (30, 6), (1, 1), (10, 4)])
@pytest.mark.parametrize("rescale", [(1.0, 0.0), (0.37, -12.5)])
def test_unmosaic_equals_naive(rng, dtype, n_slices, tiles, rescale):
    rows, cols = 12, 10  # non-square tiles: rows and columns cannot be swapped unseen
    info = np.iinfo(dtype)
    stored = rng.integers(max(info.min, -3000), min(info.max, 3000), size=(tiles * rows, tiles * cols),
                          dtype=dtype)
    got = unmosaic(stored, n_slices, tiles, *rescale)
    assert got.flags.f_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, naive_unmosaic(stored, n_slices, tiles, *rescale))


@pytest.mark.parametrize("dtype", [np.uint32, np.float32, np.int16])
@pytest.mark.parametrize("rescale", [(1.0, 0.0), (2.5, 7.25)])
def test_unmosaic_of_received_bytes_equals_naive(rng, dtype, rescale):
    """The benchmark's layout (72 slices in 9 x 9 tiles of 128 x 128, the last band
    part-filled), from read-only pixels as np.frombuffer gives them."""
    stored = rng.integers(0, 4000, size=(9 * 128, 9 * 128)).astype(dtype)
    received = np.frombuffer(stored.tobytes(), dtype).reshape(stored.shape)
    got = unmosaic(received, 72, 9, *rescale)
    assert got.flags.f_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, naive_unmosaic(stored, 72, 9, *rescale))
