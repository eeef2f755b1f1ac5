"""Numba kernels of the recursive GLM (see :mod:`rtsc.pipeline.glm.recursive` for the algorithm).

Two kernels per volume:

* :func:`_givens_row` rotates the new design row into the shared triangular factor
  ``R`` (p x p, one for all voxels because they share the design) and records the p
  rotations as coefficients;
* :func:`_rotate_voxels` applies those rotations to every in-mask voxel's ``Q'y``
  (p x V) and adds the rotated-out remainder squared to its residual sum of squares.

The voxel kernel works on blocks of ``BLOCK`` voxels: the block's new values sit in a
small float64 buffer (L1-resident) while the rotations stream contiguous row slices of
``Q'y``, which LLVM vectorises (``fastmath={"contract"}`` only lets it fuse
multiply-adds; no reassociation). Measured at ~44 000 voxels x 12 columns on the 2-vCPU
test VM with ``Q'y`` warm in cache: 0.2-0.4 ms per volume blocked and vectorised
(varies with the machine's load), 0.7-0.8 ms voxel by voxel with a scalar chain of
rotations; cold (other stages ran in between) the whole stage update takes ~0.7 ms
(benchmarks/glm.py). It runs on one thread: it is bound by memory traffic (``Q'y`` is
read and written once per volume: 4 MB at 64 x 64 x 36, 34 MB at 128 x 128 x 72) and
numba's threads stall when the receiver holds a core (see ``pipeline.threads``).

No allocation, no I/O; the public wrappers check dtype, shape and contiguity.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Voxels per block of the voxel kernel: 4 KiB of float64 buffer.
BLOCK = 512

# Columns of the rotation coefficients: for the column-k rotation (forgetting folded in)
#   z_k' = CZ * z_k + SZ * y,   y' = CY * y - SY * z_k
CZ, SZ, CY, SY = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True)
def _givens_row(r: np.ndarray, x: np.ndarray, sqrt_lam: float, coef: np.ndarray,
                active: np.ndarray) -> int:
    """Rotate row ``x`` into ``sqrt_lam * R`` (in place); return how many rotations act.

    r : (p, p) float64, upper triangular; x : (p,) float64, destroyed;
    coef : (p, 4) float64 out, one rotation per column (identity where ``x`` is 0 there);
    active : (p,) int64 out, the columns whose rotation is not the identity, first the
    returned count of them.
    """
    p = x.size
    if sqrt_lam != 1.0:
        for i in range(p):
            for j in range(i, p):
                r[i, j] *= sqrt_lam
    n_active = 0
    for k in range(p):
        xk = x[k]
        if xk == 0.0:
            # Nothing to rotate: Q'y row k only decays with the forgetting factor.
            coef[k, CZ] = sqrt_lam
            coef[k, SZ] = 0.0
            coef[k, CY] = 1.0
            coef[k, SY] = 0.0
            if sqrt_lam != 1.0:
                active[n_active] = k
                n_active += 1
            continue
        rkk = r[k, k]
        h = math.hypot(rkk, xk)
        c = rkk / h
        s = xk / h
        r[k, k] = h
        x[k] = 0.0
        for j in range(k + 1, p):
            a = r[k, j]
            b = x[j]
            r[k, j] = c * a + s * b
            x[j] = c * b - s * a
        # Q'y was not scaled by sqrt_lam yet: fold it into the coefficients on z_k.
        coef[k, CZ] = c * sqrt_lam
        coef[k, SZ] = s
        coef[k, CY] = c
        coef[k, SY] = s * sqrt_lam
        active[n_active] = k
        n_active += 1
    return n_active


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _rotate_voxels(data: np.ndarray, index: np.ndarray, offset: np.ndarray, coef: np.ndarray,
                   active: np.ndarray, n_active: int, z: np.ndarray, rss: np.ndarray,
                   ybuf: np.ndarray, lam: float) -> None:
    """For every voxel v: y = data[index[v]] - offset[v], rotate (z[:, v], y) by the
    active rotations, then ``rss[v] = lam * rss[v] + y**2`` with the remainder y.

    data : (N,) float32, a whole volume, flat; index : (V,) int64; offset : (V,) float32;
    z : (p, V) float64, C-contiguous; rss : (V,) float64; ybuf : (BLOCK,) float64 scratch.

    Rotations go four at a time through a block, so the block's y is loaded and stored
    once per four rotations instead of once per rotation (0.28 instead of 0.37 ms at
    44 000 voxels x 12 columns; the same bits up to the order of fused multiply-adds).
    """
    n_voxels = index.size
    for b0 in range(0, n_voxels, BLOCK):
        b1 = min(b0 + BLOCK, n_voxels)
        y = ybuf[:b1 - b0]
        for v in range(b1 - b0):
            # float32 -> float64 before subtracting: the difference is exact.
            y[v] = np.float64(data[index[b0 + v]]) - np.float64(offset[b0 + v])
        m = 0
        while m + 4 <= n_active:
            k0, k1, k2, k3 = active[m], active[m + 1], active[m + 2], active[m + 3]
            cz0, sz0, cy0, sy0 = coef[k0, CZ], coef[k0, SZ], coef[k0, CY], coef[k0, SY]
            cz1, sz1, cy1, sy1 = coef[k1, CZ], coef[k1, SZ], coef[k1, CY], coef[k1, SY]
            cz2, sz2, cy2, sy2 = coef[k2, CZ], coef[k2, SZ], coef[k2, CY], coef[k2, SY]
            cz3, sz3, cy3, sy3 = coef[k3, CZ], coef[k3, SZ], coef[k3, CY], coef[k3, SY]
            z0, z1, z2, z3 = z[k0, b0:b1], z[k1, b0:b1], z[k2, b0:b1], z[k3, b0:b1]
            for v in range(y.size):
                yv = y[v]
                a = z0[v]
                z0[v] = cz0 * a + sz0 * yv
                yv = cy0 * yv - sy0 * a
                a = z1[v]
                z1[v] = cz1 * a + sz1 * yv
                yv = cy1 * yv - sy1 * a
                a = z2[v]
                z2[v] = cz2 * a + sz2 * yv
                yv = cy2 * yv - sy2 * a
                a = z3[v]
                z3[v] = cz3 * a + sz3 * yv
                y[v] = cy3 * yv - sy3 * a
            m += 4
        while m < n_active:
            k = active[m]
            cz, sz, cy, sy = coef[k, CZ], coef[k, SZ], coef[k, CY], coef[k, SY]
            zk = z[k, b0:b1]
            for v in range(y.size):
                a = zk[v]
                yv = y[v]
                zk[v] = cz * a + sz * yv
                y[v] = cy * yv - sy * a
            m += 1
        out = rss[b0:b1]
        for v in range(out.size):
            out[v] = lam * out[v] + y[v] * y[v]


def givens_row(r: np.ndarray, row: np.ndarray, forgetting: float, coef: np.ndarray,
               active: np.ndarray) -> int:
    """Checked wrapper of :func:`_givens_row` (``row`` is copied, not destroyed).

    Parameters
    ----------
    r : (p, p) float64, C-contiguous, updated in place
    row : (p,) float64, the new design row
    forgetting : float in (0, 1], lambda; R is scaled by sqrt(lambda) first
    coef : (p, 4) float64 out; active : (p,) int64 out

    Returns
    -------
    n_active : int, the first entries of ``active`` are the columns whose rotation acts
    """
    p = r.shape[0]
    if r.shape != (p, p) or r.dtype != np.float64 or not r.flags.c_contiguous:
        raise ValueError("r must be a C-contiguous (p, p) float64 array")
    if row.shape != (p,) or coef.shape != (p, 4) or active.shape != (p,):
        raise ValueError(f"row, coef and active must be ({p},), ({p}, 4) and ({p},)")
    if coef.dtype != np.float64 or active.dtype != np.int64:
        raise ValueError("coef must be float64 and active int64")
    return int(_givens_row(r, np.array(row, dtype=np.float64), math.sqrt(forgetting), coef,
                           active))


def rotate_voxels(volume: np.ndarray, index: np.ndarray, offset: np.ndarray, coef: np.ndarray,
                  active: np.ndarray, n_active: int, z: np.ndarray, rss: np.ndarray,
                  ybuf: np.ndarray, forgetting: float) -> None:
    """Checked wrapper of :func:`_rotate_voxels`.

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran-contiguous (``index`` counts in that order)
    index : (V,) int64, in-mask voxels, sorted flat Fortran-order indices
    offset : (V,) float32, subtracted from each voxel's values
    coef, active, n_active : from :func:`givens_row`
    z : (p, V) float64, C-contiguous, updated in place
    rss : (V,) float64, updated in place
    ybuf : (BLOCK,) float64 scratch
    forgetting : float in (0, 1]
    """
    if volume.dtype != np.float32 or not volume.flags.f_contiguous:
        raise ValueError("volume must be a Fortran-ordered float32 array")
    n_voxels = index.size
    if index.dtype != np.int64 or offset.dtype != np.float32 or offset.shape != (n_voxels,):
        raise ValueError("index must be (V,) int64 and offset (V,) float32")
    if z.dtype != np.float64 or not z.flags.c_contiguous or z.shape != (coef.shape[0], n_voxels):
        raise ValueError(f"z must be a C-contiguous ({coef.shape[0]}, {n_voxels}) float64 array")
    if rss.dtype != np.float64 or rss.shape != (n_voxels,) or ybuf.shape != (BLOCK,):
        raise ValueError("rss must be (V,) float64 and ybuf (BLOCK,) float64")
    if n_voxels and (index[0] < 0 or index[-1] >= volume.size):
        raise ValueError("index points outside the volume")
    _rotate_voxels(volume.ravel(order="F"), index, offset, coef, active, int(n_active), z, rss,
                   ybuf, float(forgetting))


def warm_up() -> None:
    """Compile (or load from cache) every kernel before the first volume arrives."""
    p = 2
    r = np.zeros((p, p))
    coef = np.zeros((p, 4))
    active = np.zeros(p, dtype=np.int64)
    n_active = givens_row(r, np.ones(p), 1.0, coef, active)
    volume = np.zeros((2, 2, 2), dtype=np.float32, order="F")
    index = np.arange(3, dtype=np.int64)
    rotate_voxels(volume, index, np.zeros(3, np.float32), coef, active, n_active,
                  np.zeros((p, 3)), np.zeros(3), np.zeros(BLOCK), 1.0)
