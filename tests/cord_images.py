"""Synthetic axial cord slices for the slice-wise motion, cord and display tests."""

from __future__ import annotations

import numpy as np

VOXEL = (1.0, 1.0, 5.0)


def cord_slices(shape: tuple[int, int, int], centres_mm: np.ndarray,
                rng: np.random.Generator | None = None, sigma: float = 5.0,
                supersample: int = 3) -> np.ndarray:
    """Synthetic axial cord slices: a CSF ellipse (13 x 21 mm) around a cord ellipse
    (7.5 x 13 mm) and a side structure in tissue, rendered analytically at each slice's
    centre (mm) with ``supersample``^2 sub-samples per voxel, slice intensities differing
    by up to 30%, plus Gaussian noise."""
    nx, ny, nz = shape
    off = (np.arange(supersample) + 0.5) / supersample - 0.5
    x = (np.arange(nx)[:, None] + off[None, :]).ravel() * VOXEL[0]
    y = (np.arange(ny)[:, None] + off[None, :]).ravel() * VOXEL[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    out = np.zeros(shape, np.float32, order="F")
    for k in range(nz):
        cx, cy = centres_mm[k]
        img = np.full(xx.shape, 250.0)
        img[((xx - cx) / 6.5) ** 2 + ((yy - cy) / 10.5) ** 2 <= 1] = 700.0
        img[((xx - cx) / 3.75) ** 2 + ((yy - cy) / 6.5) ** 2 <= 1] = 630.0
        img[((xx - cx - 20) / 8) ** 2 + ((yy - cy + 25) / 5) ** 2 <= 1] = 400.0
        img = img.reshape(nx, supersample, ny, supersample).mean(axis=(1, 3))
        out[:, :, k] = img * (1 + 0.3 * np.sin(k))
    if rng is not None:
        out += rng.normal(0.0, sigma, shape).astype(np.float32)
    return out
