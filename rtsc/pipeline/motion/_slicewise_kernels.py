"""Numba kernels of slice-wise (2D, per slice) motion correction: no I/O, no allocation
in the loops.

Volumes are (nx, ny, nz) float32, Fortran order (i fastest), handed to the kernels as
flat views. Translations are in voxels of the slice plane: a cord point at in-plane
voxel ``p`` of slice ``k`` in the reference is at ``p + t_k`` in the current volume,
so ``current(p + t_k) = reference(p)``.

Registration is inverse-compositional Gauss-Newton on the sum of squared differences
over the mask voxels of each slice (Baker & Matthews 2004): for a pure translation the
steepest-descent images are the reference's gradient and the 2x2 Hessian is fixed per
slice; each iteration samples the current slice at ``p + t`` (bilinear), forms
``b = J^T (I(p + t) - T(p))``, and updates ``t <- t - H^-1 b``.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _bilinear(volume: np.ndarray, nx: int, ny: int, k: int, x: float, y: float) -> float:
    """Bilinear sample of slice ``k`` of a Fortran-ordered flat volume; NaN outside."""
    if not (x >= 0.0 and y >= 0.0 and x <= nx - 1 and y <= ny - 1):
        return np.nan
    i0 = min(np.int64(x), nx - 2)
    j0 = min(np.int64(y), ny - 2)
    fx = x - i0
    fy = y - j0
    b = i0 + nx * (j0 + ny * k)
    c0 = volume[b] + fx * (volume[b + 1] - volume[b])
    c1 = volume[b + nx] + fx * (volume[b + nx + 1] - volume[b + nx])
    return c0 + fy * (c1 - c0)


@numba.njit(cache=True, nogil=True, parallel=True)
def _slice_gauss_newton(volume: np.ndarray, nx: int, ny: int, nz: int, points: np.ndarray,
                        bounds: np.ndarray, ref_values: np.ndarray, jac: np.ndarray,
                        hinv: np.ndarray, init: np.ndarray, max_iterations: int,
                        tolerance: float, out_t: np.ndarray, out_iterations: np.ndarray,
                        out_rms: np.ndarray, out_used: np.ndarray,
                        out_converged: np.ndarray) -> None:
    """Register every slice (in parallel over slices); see the module docstring."""
    for k in numba.prange(nz):
        tx = init[k, 0]
        ty = init[k, 1]
        start = bounds[k]
        stop = bounds[k + 1]
        out_converged[k] = False
        out_iterations[k] = 0
        out_used[k] = 0
        out_rms[k] = np.nan
        if stop - start < 3:
            out_t[k, 0] = tx
            out_t[k, 1] = ty
            continue
        for iteration in range(1, max_iterations + 1):
            b0 = 0.0
            b1 = 0.0
            sse = 0.0
            used = 0
            for n in range(start, stop):
                value = _bilinear(volume, nx, ny, k, points[n, 0] + tx, points[n, 1] + ty)
                if value == value:
                    r = value - ref_values[n]
                    b0 += jac[n, 0] * r
                    b1 += jac[n, 1] * r
                    sse += r * r
                    used += 1
            out_iterations[k] = iteration
            out_used[k] = used
            if used == 0:
                break
            out_rms[k] = math.sqrt(sse / used)
            d0 = hinv[k, 0, 0] * b0 + hinv[k, 0, 1] * b1
            d1 = hinv[k, 1, 0] * b0 + hinv[k, 1, 1] * b1
            tx -= d0
            ty -= d1
            if not (math.isfinite(tx) and math.isfinite(ty)):
                break
            if math.sqrt(d0 * d0 + d1 * d1) < tolerance:
                out_converged[k] = True
                break
        out_t[k, 0] = tx
        out_t[k, 1] = ty


@numba.njit(cache=True, nogil=True, parallel=True)
def _shift_slices(volume: np.ndarray, nx: int, ny: int, nz: int, shifts: np.ndarray,
                  out: np.ndarray) -> None:
    """``out[i, j, k] = volume(i + tx_k, j + ty_k, k)`` (bilinear); the acquired value
    where the shifted point falls outside the slice."""
    for k in numba.prange(nz):
        tx = shifts[k, 0]
        ty = shifts[k, 1]
        for j in range(ny):
            for i in range(nx):
                v = i + nx * (j + ny * k)
                value = _bilinear(volume, nx, ny, k, i + tx, j + ty)
                out[v] = value if value == value else volume[v]


def _check_volume(volume: np.ndarray) -> None:
    if volume.dtype != np.float32 or volume.ndim != 3 or not volume.flags.f_contiguous:
        raise ValueError("volume must be a Fortran-ordered (nx, ny, nz) float32 array")
    if volume.shape[0] < 2 or volume.shape[1] < 2:
        raise ValueError(f"slices of {volume.shape[:2]} voxels are too small to interpolate")


def slice_gauss_newton(volume: np.ndarray, points: np.ndarray, bounds: np.ndarray,
                       ref_values: np.ndarray, jac: np.ndarray, hinv: np.ndarray,
                       init: np.ndarray, max_iterations: int, tolerance_vox: float,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice 2D translation of ``volume`` against a prepared reference.

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran order, the current volume
    points : (n, 2) int32, in-plane voxel indices (i, j) of the mask, grouped by slice
    bounds : (nz + 1,) int64, slice k's points are ``points[bounds[k]:bounds[k + 1]]``
    ref_values : (n,) float32, reference intensities at the points
    jac : (n, 2) float32, reference gradient (d/di, d/dj) at the points, per voxel
    hinv : (nz, 2, 2) float64, inverse Hessians (``(J^T J)^-1`` per slice)
    init : (nz, 2) float64, starting translations, voxels
    max_iterations : int
    tolerance_vox : float, stop when an update is shorter than this (voxels)

    Returns
    -------
    t : (nz, 2) float64, translations (voxels, along i and j)
    iterations : (nz,) int64
    rms : (nz,) float64, RMS residual at the last iteration (intensity units)
    used : (nz,) int64, points that fell inside the slice at the last iteration
    converged : (nz,) bool
    """
    _check_volume(volume)
    nx, ny, nz = volume.shape
    if bounds.shape != (nz + 1,) or init.shape != (nz, 2) or hinv.shape != (nz, 2, 2):
        raise ValueError("bounds, init and hinv must have nz + 1, (nz, 2), (nz, 2, 2) entries")
    n = points.shape[0]
    if ref_values.shape != (n,) or jac.shape != (n, 2) or points.shape != (n, 2):
        raise ValueError("points, ref_values and jac must have the same number of rows")
    out_t = np.empty((nz, 2))
    iterations = np.zeros(nz, dtype=np.int64)
    rms = np.full(nz, np.nan)
    used = np.zeros(nz, dtype=np.int64)
    converged = np.zeros(nz, dtype=np.bool_)
    _slice_gauss_newton(volume.ravel(order="F"), nx, ny, nz,
                        np.ascontiguousarray(points, dtype=np.int32),
                        np.ascontiguousarray(bounds, dtype=np.int64),
                        np.ascontiguousarray(ref_values, dtype=np.float32),
                        np.ascontiguousarray(jac, dtype=np.float32),
                        np.ascontiguousarray(hinv, dtype=np.float64),
                        np.ascontiguousarray(init, dtype=np.float64), int(max_iterations),
                        float(tolerance_vox), out_t, iterations, rms, used, converged)
    return out_t, iterations, rms, used, converged


def shift_slices(volume: np.ndarray, shifts: np.ndarray, out: np.ndarray | None = None,
                 ) -> np.ndarray:
    """Undo per-slice translations: the corrected volume on the reference grid.

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran order
    shifts : (nz, 2) float64, translations (voxels along i, j), reference -> current
    out : (nx, ny, nz) float32 Fortran array to fill, or None

    Returns
    -------
    (nx, ny, nz) float32, Fortran order; where ``p + t`` leaves the slice, the acquired
    value is kept.
    """
    _check_volume(volume)
    nx, ny, nz = volume.shape
    if shifts.shape != (nz, 2):
        raise ValueError(f"shifts must be (nz, 2) = ({nz}, 2), got {shifts.shape}")
    if out is None:
        out = np.empty(volume.shape, dtype=np.float32, order="F")
    elif out.shape != volume.shape or out.dtype != np.float32 or not out.flags.f_contiguous:
        raise ValueError("out must be a Fortran-ordered float32 array of the volume's shape")
    _shift_slices(volume.ravel(order="F"), nx, ny, nz,
                  np.ascontiguousarray(shifts, dtype=np.float64), out.ravel(order="F"))
    return out


def warm_up() -> None:
    """Compile (or load from cache) the slice-wise kernels before the first volume."""
    probe = np.ones((4, 4, 2), dtype=np.float32, order="F")
    points = np.array([[1, 1], [1, 2], [2, 1], [1, 1], [1, 2], [2, 1]], dtype=np.int32)
    bounds = np.array([0, 3, 6], dtype=np.int64)
    slice_gauss_newton(probe, points, bounds, np.ones(6, np.float32),
                       np.ones((6, 2), np.float32), np.tile(np.eye(2), (2, 1, 1)),
                       np.zeros((2, 2)), 1, 1e-3)
    shift_slices(probe, np.zeros((2, 2)))


def fourier_shift_slices(volume: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Undo per-slice translations by a linear phase in each slice's 2D spectrum.

    ``out(p) = volume(p + t_k)`` with band-limited (sinc) interpolation: unlike bilinear
    interpolation it keeps the noise variance (a unitary operation), so the tSNR of the
    corrected data is not inflated by fractional shifts. Circular at the slice edges
    (an object leaving one side enters the other: the neck lies well inside the FOV).

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran order
    shifts : (nz, 2) float64, translations (voxels along i, j), reference -> current

    Returns
    -------
    (nx, ny, nz) float32, Fortran order
    """
    from scipy import fft

    _check_volume(volume)
    nx, ny, nz = volume.shape
    if shifts.shape != (nz, 2):
        raise ValueError(f"shifts must be (nz, 2) = ({nz}, 2), got {shifts.shape}")
    spectrum = fft.rfft2(volume, axes=(1, 0), workers=1)  # (nx // 2 + 1, ny, nz): real along i
    fi = fft.rfftfreq(nx)[:, None]
    fj = fft.fftfreq(ny)[:, None]
    spectrum *= np.exp(2j * np.pi * fi * shifts[None, :, 0]).astype(np.complex64)[:, None, :]
    spectrum *= np.exp(2j * np.pi * fj * shifts[None, :, 1]).astype(np.complex64)[None, :, :]
    out = fft.irfft2(spectrum, s=(ny, nx), axes=(1, 0), workers=1)
    return np.asfortranarray(out, dtype=np.float32)
