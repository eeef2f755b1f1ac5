"""Slice mosaics: slices k of a volume tiled into one 2D image (dashboard and report).

A tile shows the voxel grid as acquired, without reorientation: voxel axis i runs left
to right and j bottom to top. Tiles run left to right, top to bottom, from the lowest
chosen slice.
"""

from __future__ import annotations

import numpy as np


def mosaic_slices(nz: int, count: int = 12) -> np.ndarray:
    """``count`` slice indices spread evenly over the slab, leaving out the outermost ones.

    Returns
    -------
    (m,) int64, increasing, m = min(count, nz)
    """
    if nz <= count:
        return np.arange(nz, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, nz - 1, count + 2)[1:-1]).astype(np.int64))


def mosaic_grid(n_tiles: int) -> tuple[int, int]:
    """(rows, columns) for ``n_tiles`` tiles: as square as possible, wider than tall."""
    cols = int(np.ceil(np.sqrt(n_tiles * 4 / 3)))
    rows = int(np.ceil(n_tiles / cols))
    return rows, cols


def mosaic(volume: np.ndarray, slices: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Tile the axial slices ``slices`` of ``volume`` (see the module notes).

    Parameters
    ----------
    volume : (nx, ny, nz) array
    slices : (m,) int, slice indices
    fill : value of the unused tiles

    Returns
    -------
    (rows * ny, cols * nx) float32, for ``imshow(origin="upper")``
    """
    nx, ny, _ = volume.shape
    rows, cols = mosaic_grid(len(slices))
    out = np.full((rows * ny, cols * nx), fill, dtype=np.float32)
    for t, k in enumerate(slices):
        r, c = divmod(t, cols)
        out[r * ny:(r + 1) * ny, c * nx:(c + 1) * nx] = volume[:, ::-1, int(k)].T
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """Edge pixels of a 2D boolean image (inside pixels with a 4-neighbour outside).

    Parameters
    ----------
    mask : (r, c) bool

    Returns
    -------
    (r, c) bool
    """
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner
