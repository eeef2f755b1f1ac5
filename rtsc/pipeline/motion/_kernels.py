"""Numba kernels of rigid registration (inverse compositional Gauss-Newton) and the
running masked mean of the global signal (fused, or its two halves for the signal
stage, which leaves the running sum for after the volume message): no I/O, no allocation in the loops.

Each kernel works on flat (1-D) views so that it serves any memory order; the
public wrappers check dtype, shape and contiguity and make those views. Trilinear
sampling, reslicing and smoothing are in :mod:`rtsc.pipeline.motion._resample_kernels`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from rtsc.pipeline._mask_kernels import warm_up as _warm_up_masks
from rtsc.pipeline.motion._resample_kernels import (
    _check_volume,
    _trilinear,
    gaussian_smooth,
    reslice,
    reslice_rows,
    row_extents,
    rows_to_mask,
    sample_rows,
    valid_rows,
)


@numba.njit(cache=True, nogil=True, fastmath=False)
def _accumulate_masked_mean(total: np.ndarray, values: np.ndarray, mask: np.ndarray) -> float:
    """``total += values`` and the mean of ``values`` over ``mask``, in one pass."""
    inside = 0.0
    count = 0
    for n in range(values.size):
        v = values[n]
        total[n] += v
        if mask[n]:
            inside += v
            count += 1
    return inside / count if count else np.nan


@numba.njit(cache=True, nogil=True, fastmath=False)
def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """The mean of ``values`` over ``mask``: :func:`_accumulate_masked_mean`'s value
    (same float64 sum in the same order), without the running sum."""
    inside = 0.0
    count = 0
    for n in range(values.size):
        if mask[n]:
            inside += values[n]
            count += 1
    return inside / count if count else np.nan


@numba.njit(cache=True, nogil=True, fastmath=False)
def _accumulate(total: np.ndarray, values: np.ndarray) -> None:
    """``total += values``: :func:`_accumulate_masked_mean`'s running sum alone."""
    for n in range(values.size):
        total[n] += values[n]


@numba.njit(cache=True, nogil=True)
def _interior_points(mask: np.ndarray, out: np.ndarray) -> int:
    """Write the indices of the ``True`` voxels of ``mask`` off its border (one voxel
    in from every face) into ``out`` in C index order, return how many (``out`` None:
    count only, as a (0, 3) array)."""
    nx, ny, nz = mask.shape
    n = 0
    for i in range(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                if mask[i, j, k]:
                    if out.shape[0] > 0:
                        out[n, 0] = i
                        out[n, 1] = j
                        out[n, 2] = k
                    n += 1
    return n


def interior_points(mask: np.ndarray) -> np.ndarray:
    """``np.argwhere(mask & interior).astype(np.int32)`` with ``interior`` the voxels
    one or more voxels in from every face: the same (n, 3) int32 indices in the same
    (C index) order, without the whole-volume ``&``, ``nonzero`` and transpose
    (~50 -> ~5 ms at 128x128x72, the registration's set-up at a series' first volume).

    Parameters
    ----------
    mask : (nx, ny, nz) bool, any memory order
    """
    if mask.dtype != np.bool_ or mask.ndim != 3:
        raise TypeError(f"mask must be a 3-D bool array, got {mask.ndim}-D {mask.dtype}")
    if min(mask.shape) < 3:
        return np.zeros((0, 3), dtype=np.int32)
    empty = np.zeros((0, 3), dtype=np.int32)
    n = _interior_points(mask, empty)
    out = np.empty((n, 3), dtype=np.int32)
    if n:
        _interior_points(mask, out)
    return out


def _flat(array: np.ndarray, dtype: type, name: str) -> np.ndarray:
    if array.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)}, got {array.dtype}")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise ValueError(f"{name} must be contiguous")
    return array.ravel(order="K")


def accumulate_masked_mean(total: np.ndarray, data: np.ndarray, mask: np.ndarray) -> float:
    """``total += data`` in place (float64 running sum of float32 volumes) and the mean of
    ``data`` over ``mask`` (float64 accumulation; NaN for an empty mask), in one pass.

    Parameters
    ----------
    total : (nx, ny, nz) float64, contiguous
    data : (nx, ny, nz) float32, same shape and memory order
    mask : (nx, ny, nz) bool, same shape and memory order
    """
    for other, name in ((data, "data"), (mask, "mask")):
        if other.shape != total.shape or other.flags.f_contiguous != total.flags.f_contiguous:
            raise ValueError(f"total and {name} must share shape and memory order")
    return float(_accumulate_masked_mean(_flat(total, np.float64, "total"),
                                         _flat(data, np.float32, "data"),
                                         _flat(mask, np.bool_, "mask")))


def masked_mean(data: np.ndarray, mask: np.ndarray) -> float:
    """The mean of ``data`` over ``mask`` (float64 accumulation in flat memory order; NaN
    for an empty mask): the value :func:`accumulate_masked_mean` returns, bit for bit.

    Parameters
    ----------
    data : (nx, ny, nz) float32, contiguous, image intensity units
    mask : (nx, ny, nz) bool, same shape and memory order
    """
    if mask.shape != data.shape or mask.flags.f_contiguous != data.flags.f_contiguous:
        raise ValueError("data and mask must share shape and memory order")
    return float(_masked_mean(_flat(data, np.float32, "data"), _flat(mask, np.bool_, "mask")))


def accumulate(total: np.ndarray, data: np.ndarray) -> None:
    """``total += data`` in place (float64 running sum of float32 volumes): the sum
    :func:`accumulate_masked_mean` keeps, bit for bit.

    Parameters
    ----------
    total : (nx, ny, nz) float64, contiguous
    data : (nx, ny, nz) float32, same shape and memory order
    """
    if data.shape != total.shape or data.flags.f_contiguous != total.flags.f_contiguous:
        raise ValueError("total and data must share shape and memory order")
    _accumulate(_flat(total, np.float64, "total"), _flat(data, np.float32, "data"))


def warm_up() -> None:
    """Compile (or load from cache) every kernel before the first volume arrives."""
    probe = np.zeros((2, 2, 2), dtype=np.float32, order="F")
    accumulate_masked_mean(np.zeros(probe.shape, dtype=np.float64, order="F"), probe,
                           np.ones(probe.shape, dtype=bool, order="F"))
    masked_mean(probe, np.ones(probe.shape, dtype=bool, order="F"))
    accumulate(np.zeros(probe.shape, dtype=np.float64, order="F"), probe)
    q = np.eye(4)[:3]
    points = np.zeros((1, 3), dtype=np.int32)
    ic_step(probe, q, points, np.zeros(1, np.float32), np.zeros((1, 6), np.float32),
            np.zeros(6))
    ic_register(probe, np.eye(4), np.eye(4), np.eye(4), points, np.zeros(1, np.float32),
                np.zeros((1, 6), np.float32), np.eye(6), np.zeros(3), 1, 1.0, 50.0)
    reslice(probe, q, probe.shape)
    reslice_rows(probe, q, *row_extents(np.ones(probe.shape, dtype=bool)))
    sample_rows(probe, q, *row_extents(np.ones(probe.shape, dtype=bool)), np.arange(2))
    rows_to_mask(2, *row_extents(np.ones(probe.shape, dtype=bool)),
                 *valid_rows(q, probe.shape, *row_extents(np.ones(probe.shape, dtype=bool))))
    gaussian_smooth(probe, 1.0)
    interior_points(np.ones((3, 3, 3), dtype=bool, order="F"))
    interior_points(np.ones((3, 3, 3), dtype=bool))
    _warm_up_masks()


# ---- rigid registration (inverse compositional Gauss-Newton) ----------------------------

@numba.njit(cache=True, nogil=True, parallel=True)
def _ic_step(volume: np.ndarray, nx: int, ny: int, nz: int, q: np.ndarray, points: np.ndarray,
             ref_values: np.ndarray, jac: np.ndarray, out_b: np.ndarray) -> tuple[float, int]:
    """One inverse-compositional pass: b = J^T (I(Q p) - T(p)); returns (SSE, n used).

    points : (n, 3) int32 reference voxel indices; q : (3, 4) reference voxel -> current
    voxel; jac : (n, 6) float32 steepest-descent images; out_b : (6,) float64.
    """
    b0 = b1 = b2 = b3 = b4 = b5 = 0.0
    sse = 0.0
    used = 0
    for n in numba.prange(points.shape[0]):
        i = points[n, 0]
        j = points[n, 1]
        k = points[n, 2]
        x = q[0, 0] * i + q[0, 1] * j + q[0, 2] * k + q[0, 3]
        y = q[1, 0] * i + q[1, 1] * j + q[1, 2] * k + q[1, 3]
        z = q[2, 0] * i + q[2, 1] * j + q[2, 2] * k + q[2, 3]
        value = _trilinear(volume, nx, ny, nz, x, y, z)
        if value == value:  # not NaN: inside the current grid
            r = value - ref_values[n]
            b0 += jac[n, 0] * r
            b1 += jac[n, 1] * r
            b2 += jac[n, 2] * r
            b3 += jac[n, 3] * r
            b4 += jac[n, 4] * r
            b5 += jac[n, 5] * r
            sse += r * r
            used += 1
    out_b[0] = b0
    out_b[1] = b1
    out_b[2] = b2
    out_b[3] = b3
    out_b[4] = b4
    out_b[5] = b5
    return sse, used


@numba.njit(cache=True, nogil=True)
def _rigid_step_inverse(delta: np.ndarray, center: np.ndarray, out: np.ndarray) -> None:
    """out = inverse of the RAS map ``x -> R (x - c) + c + t`` of ``delta`` (t in mm,
    rotations in radians, ``R = Rz Ry Rx``): ``x -> R^T (x - c - t) + c``. ``R`` is
    :func:`rtsc.conventions.rotation_matrix` written out for numba (tests/simulator/test_conventions.py
    checks that the two agree)."""
    cx, sx = math.cos(delta[3]), math.sin(delta[3])
    cy, sy = math.cos(delta[4]), math.sin(delta[4])
    cz, sz = math.cos(delta[5]), math.sin(delta[5])
    rot = np.empty((3, 3))
    rot[0, 0] = cz * cy
    rot[0, 1] = cz * sy * sx - sz * cx
    rot[0, 2] = cz * sy * cx + sz * sx
    rot[1, 0] = sz * cy
    rot[1, 1] = sz * sy * sx + cz * cx
    rot[1, 2] = sz * sy * cx - cz * sx
    rot[2, 0] = -sy
    rot[2, 1] = cy * sx
    rot[2, 2] = cy * cx
    for r in range(3):
        shift = 0.0
        for c in range(3):
            out[r, c] = rot[c, r]
            shift += rot[c, r] * (center[c] + delta[c])
        out[r, 3] = center[r] - shift
        out[3, r] = 0.0
    out[3, 3] = 1.0


@numba.njit(cache=True, nogil=True)
def _matmul4(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    for r in range(4):
        for c in range(4):
            total = 0.0
            for m in range(4):
                total += a[r, m] * b[m, c]
            out[r, c] = total


@numba.njit(cache=True, nogil=True)
def _ic_register(volume: np.ndarray, nx: int, ny: int, nz: int, vox_to_ras: np.ndarray,
                 ras_to_vox: np.ndarray, matrix: np.ndarray, points: np.ndarray,
                 ref_values: np.ndarray, jac: np.ndarray, hessian_inv: np.ndarray,
                 center: np.ndarray, max_iterations: int, tolerance_mm: float,
                 radius_mm: float) -> tuple[int, float, int, bool]:
    """Inverse-compositional Gauss-Newton iterations, all in compiled code (no Python or
    GIL between them). ``matrix`` (4, 4), the starting RAS map, is updated in place.

    Returns (iterations, SSE of the last pass, samples used by it, converged)."""
    b = np.zeros(6)
    delta = np.zeros(6)
    step_inv = np.empty((4, 4))
    work = np.empty((4, 4))
    q = np.empty((4, 4))
    sse, used = 0.0, 0
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        _matmul4(ras_to_vox, matrix, work)
        _matmul4(work, vox_to_ras, q)
        sse, used = _ic_step(volume, nx, ny, nz, q, points, ref_values, jac, b)
        if used == 0:
            return iteration, sse, used, False
        for r in range(6):
            total = 0.0
            for c in range(6):
                total += hessian_inv[r, c] * b[c]
            delta[r] = total
        _rigid_step_inverse(delta, center, step_inv)
        _matmul4(matrix, step_inv, work)
        matrix[:, :] = work
        size = (math.sqrt(delta[0] ** 2 + delta[1] ** 2 + delta[2] ** 2)
                + radius_mm * math.sqrt(delta[3] ** 2 + delta[4] ** 2 + delta[5] ** 2))
        if size < tolerance_mm:
            return iteration, sse, used, True
    return iteration, sse, used, False


def ic_register(volume: np.ndarray, vox_to_ras: np.ndarray, ras_to_vox: np.ndarray,
                matrix: np.ndarray, points: np.ndarray, ref_values: np.ndarray, jac: np.ndarray,
                hessian_inv: np.ndarray, center: np.ndarray, max_iterations: int,
                tolerance_mm: float, radius_mm: float) -> tuple[np.ndarray, int, float, int, bool]:
    """Checked wrapper of the whole inverse-compositional fit (see :func:`_ic_register`).

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran-ordered, the (smoothed) current volume
    vox_to_ras, ras_to_vox : (4, 4) float64, the reference grid's affine and its inverse
    matrix : (4, 4) float64, starting RAS map reference -> current (not modified)
    points, ref_values, jac : as :func:`ic_step`
    hessian_inv : (6, 6) float64
    center : (3,) float64, RAS mm, the centre of rotation
    max_iterations : int
    tolerance_mm : float, stop when an update moves every point of a ``radius_mm``
        sphere less than this, mm

    Returns (matrix, iterations, SSE, samples used, converged).
    """
    _check_volume(volume)
    nx, ny, nz = volume.shape
    # copies: a read-only affine (volumes share their series' one) would be another
    # signature for numba to compile on the first volume
    vox_to_ras = np.array(vox_to_ras, dtype=np.float64, order="C")
    ras_to_vox = np.array(ras_to_vox, dtype=np.float64, order="C")
    out = np.array(matrix, dtype=np.float64, order="C")
    iterations, sse, used, converged = _ic_register(
        volume.ravel(order="F"), nx, ny, nz, vox_to_ras, ras_to_vox, out,
        points, ref_values, jac, np.ascontiguousarray(hessian_inv, dtype=np.float64),
        np.ascontiguousarray(center, dtype=np.float64), int(max_iterations),
        float(tolerance_mm), float(radius_mm))
    return out, int(iterations), float(sse), int(used), bool(converged)


def ic_step(volume: np.ndarray, q: np.ndarray, points: np.ndarray, ref_values: np.ndarray,
            jac: np.ndarray, out_b: np.ndarray) -> tuple[float, int]:
    """Checked wrapper of the inverse-compositional pass (see :func:`_ic_step`).

    Parameters
    ----------
    volume : (nx, ny, nz) float32, Fortran-ordered
    q : (3, 4) float64, reference voxel -> current voxel
    points : (n, 3) int32; ref_values : (n,) float32; jac : (n, 6) float32
    out_b : (6,) float64, filled with J^T r
    """
    _check_volume(volume)
    nx, ny, nz = volume.shape
    return _ic_step(volume.ravel(order="F"), nx, ny, nz, np.ascontiguousarray(q[:3], np.float64),
                    points, ref_values, jac, out_b)
