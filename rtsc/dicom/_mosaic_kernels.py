"""Numba kernel for unpacking Siemens mosaics (nogil: the receive thread's archive write
runs alongside instead of waiting for the worker, or the worker for it)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _unmosaic(stored: np.ndarray, tiles: int, rows: int, cols: int, n_slices: int,
              slope: float, intercept: float, out: np.ndarray) -> None:
    """out[c, r, k] = stored[tile_row * rows + r, tile_col * cols + c] * slope + intercept,
    with slice k in tile (k // tiles, k % tiles); ``out`` is the flat Fortran buffer."""
    rescale = slope != 1.0 or intercept != 0.0
    s = np.float32(slope)
    b = np.float32(intercept)
    for k in range(n_slices):
        row0 = (k // tiles) * rows
        col0 = (k % tiles) * cols
        base = k * rows * cols
        for r in range(rows):
            src = stored[row0 + r]
            at = base + r * cols
            for c in range(cols):
                value = np.float32(src[col0 + c])
                out[at + c] = value * s + b if rescale else value


def unmosaic(stored: np.ndarray, n_slices: int, tiles: int, slope: float,
             intercept: float) -> np.ndarray:
    """The (cols, rows, n_slices) float32 Fortran-ordered volume of a mosaic.

    Parameters
    ----------
    stored : (tiles * rows, tiles * cols) integer or float array, the stored pixels
    n_slices, tiles : int, images in the mosaic and tiles per side
    slope, intercept : float, the DICOM rescale (applied in float32, as before)
    """
    rows_m, cols_m = stored.shape
    rows, cols = rows_m // tiles, cols_m // tiles
    out = np.empty((cols, rows, n_slices), dtype=np.float32, order="F")
    _unmosaic(np.ascontiguousarray(stored), tiles, rows, cols, n_slices, slope, intercept,
              out.ravel(order="F"))
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) for the stored pixel types."""
    for dtype in (np.int16, np.uint16, np.uint8, np.int32, np.uint32, np.float32):
        unmosaic(np.zeros((4, 4), dtype), 4, 2, 1.0, 0.0)
        # pixels straight from the received bytes (np.frombuffer) are read-only: numba
        # compiles those separately, so warm that signature up too
        unmosaic(np.frombuffer(bytes(16 * np.dtype(dtype).itemsize), dtype).reshape(4, 4),
                 4, 2, 1.0, 0.0)
