"""Numba kernel of the MNI registration's cost: the correlation ratio of the acquired
volume, sampled at template points, given the template's intensity bins, and its
gradient with respect to the 3 x 4 map from template points to voxel positions.

No I/O, no allocation in the loops; the wrapper in :mod:`rtsc.pipeline.roi.mni` checks
dtypes and shapes.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _sample_gradient(volume: np.ndarray, nx: int, ny: int, nz: int, x: float, y: float,
                     z: float, out: np.ndarray) -> bool:
    """Trilinear value and its derivatives along x, y, z of a Fortran-ordered flat
    volume at a position strictly inside the grid; False (``out`` untouched) outside."""
    if not (x >= 0.0 and y >= 0.0 and z >= 0.0 and x < nx - 1 and y < ny - 1
            and z < nz - 1):
        return False
    i0 = np.int64(x)
    j0 = np.int64(y)
    k0 = np.int64(z)
    fx, fy, fz = x - i0, y - j0, z - k0
    sy = nx
    sz = nx * ny
    b = i0 + nx * (j0 + ny * k0)
    v000 = volume[b]
    v100 = volume[b + 1]
    v010 = volume[b + sy]
    v110 = volume[b + sy + 1]
    v001 = volume[b + sz]
    v101 = volume[b + sz + 1]
    v011 = volume[b + sy + sz]
    v111 = volume[b + sy + sz + 1]
    c00 = v000 + fx * (v100 - v000)
    c10 = v010 + fx * (v110 - v010)
    c01 = v001 + fx * (v101 - v001)
    c11 = v011 + fx * (v111 - v011)
    c0 = c00 + fy * (c10 - c00)
    c1 = c01 + fy * (c11 - c01)
    out[0] = c0 + fz * (c1 - c0)
    # d/dx: the x differences interpolated in y and z
    d00 = v100 - v000
    d10 = v110 - v010
    d01 = v101 - v001
    d11 = v111 - v011
    d0 = d00 + fy * (d10 - d00)
    d1 = d01 + fy * (d11 - d01)
    out[1] = d0 + fz * (d1 - d0)
    out[2] = (1.0 - fz) * (c10 - c00) + fz * (c11 - c01)
    out[3] = c1 - c0
    return True


@numba.njit(cache=True, nogil=True)
def correlation_ratio(volume: np.ndarray, nx: int, ny: int, nz: int, points: np.ndarray,
                      bins: np.ndarray, n_bins: int, g: np.ndarray, gradient: bool,
                      grad_out: np.ndarray, values: np.ndarray, derivs: np.ndarray,
                      inside: np.ndarray, bin_sum: np.ndarray, bin_count: np.ndarray
                      ) -> tuple[float, int]:
    """``1 - eta**2``: the share of the sampled intensities' variance left within the
    template's bins, and its gradient with respect to ``g``.

    Parameters
    ----------
    volume : (nx * ny * nz,) float32, Fortran-ordered flat acquired volume
    points : (n, 3) float64, template points (mm, relative to the template centre)
    bins : (n,) int64 in [0, n_bins), the template intensity bin of each point
    g : (3, 4) float64, point -> voxel position: ``g[:, :3] @ p + g[:, 3]``
    gradient : whether to fill ``grad_out``
    grad_out : (3, 4) float64, d cost / d g (written when ``gradient``)
    values, derivs, inside, bin_sum, bin_count : work arrays, (n,), (n, 3), (n,) bool,
        (n_bins,) float64, (n_bins,) float64

    Returns
    -------
    cost : float, in [0, 1] (1 when fewer than two points or no variance)
    n_inside : int, points that fell inside the volume
    """
    n = points.shape[0]
    sample = np.empty(4)
    for b in range(n_bins):
        bin_sum[b] = 0.0
        bin_count[b] = 0.0
    total = 0.0
    count = 0
    for i in range(n):
        px = points[i, 0]
        py = points[i, 1]
        pz = points[i, 2]
        x = g[0, 0] * px + g[0, 1] * py + g[0, 2] * pz + g[0, 3]
        y = g[1, 0] * px + g[1, 1] * py + g[1, 2] * pz + g[1, 3]
        z = g[2, 0] * px + g[2, 1] * py + g[2, 2] * pz + g[2, 3]
        ok = _sample_gradient(volume, nx, ny, nz, x, y, z, sample)
        inside[i] = ok
        if ok:
            v = sample[0]
            values[i] = v
            derivs[i, 0] = sample[1]
            derivs[i, 1] = sample[2]
            derivs[i, 2] = sample[3]
            bin_sum[bins[i]] += v
            bin_count[bins[i]] += 1.0
            total += v
            count += 1
    for a in range(3):
        for c in range(4):
            grad_out[a, c] = 0.0
    if count < 2:
        return 1.0, count
    mean = total / count
    within = 0.0
    spread = 0.0
    for i in range(n):
        if inside[i]:
            b = bins[i]
            d = values[i] - bin_sum[b] / bin_count[b]
            within += d * d
            e = values[i] - mean
            spread += e * e
    if spread <= 0.0:
        return 1.0, count
    cost = within / spread
    if gradient:
        # d cost / d v_i = 2 ((v_i - bin mean) - cost (v_i - mean)) / spread: the bin
        # means' own derivatives cancel in the sums over each bin.
        for i in range(n):
            if inside[i]:
                b = bins[i]
                w = 2.0 * ((values[i] - bin_sum[b] / bin_count[b])
                           - cost * (values[i] - mean)) / spread
                for a in range(3):
                    wd = w * derivs[i, a]
                    grad_out[a, 0] += wd * points[i, 0]
                    grad_out[a, 1] += wd * points[i, 1]
                    grad_out[a, 2] += wd * points[i, 2]
                    grad_out[a, 3] += wd
    return cost, count
