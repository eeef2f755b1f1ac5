"""Online 6-DOF rigid registration: inverse-compositional Gauss-Newton on masked SSD.

Model (:mod:`rtsc.conventions`): a head point at ``x`` (RAS+ mm) in the reference is at
``M x = R (x - c) + c + t`` in the current volume, ``R = Rz Ry Rx``, ``c`` the RAS
centre of the reference grid. So ``current(M x) = reference(x)``, and the estimate of
``M`` *is* the motion: ``(trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)``.

Inverse compositional Gauss-Newton (Baker & Matthews 2004): the steepest-descent
images ``J = grad T . dW/dp`` and the Hessian come from the reference once; each
iteration samples the current volume at ``M x`` (trilinear, numba), forms
``b = J^T (I(M x) - T(x))`` and updates ``M <- M . W(H^-1 b)^-1``. Each volume starts
from the previous volume's estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from rtsc.conventions import rigid_params
from rtsc.pipeline._mask_kernels import binary_dilation, percentile
from rtsc.pipeline.motion._kernels import ic_register, interior_points
from rtsc.pipeline.motion._resample_kernels import (GaussianSmoother, reslice, reslice_rows,
                                                    row_extents, sample_rows, valid_rows)


@dataclass(frozen=True, eq=False)
class Reference:
    """What registration needs from the reference volume, computed once.

    Attributes
    ----------
    affine : (4, 4) float64, voxel -> RAS+ mm
    ras_to_vox : (4, 4) float64, its inverse
    shape : (nx, ny, nz)
    center : (3,) float64, RAS mm of the grid centre (rotations are about it)
    points : (n, 3) int32, voxel indices used (mask)
    values : (n,) float32, reference intensities there
    jacobian : (n, 6) float32, steepest-descent images (grad T . dW/dp), per mm / radian
    hessian_inv : (6, 6) float64
    data : (nx, ny, nz) float32, the reference itself (Fortran order)
    """

    affine: np.ndarray
    ras_to_vox: np.ndarray
    shape: tuple[int, int, int]
    center: np.ndarray
    points: np.ndarray
    values: np.ndarray
    jacobian: np.ndarray
    hessian_inv: np.ndarray
    data: np.ndarray


def registration_mask(data: np.ndarray, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Head voxels (above ``fraction`` of the 98th percentile), dilated to take the edges."""
    mask = data > fraction * percentile(data, 98)
    if dilate:
        mask = binary_dilation(mask, dilate)
    return mask


def prepare_reference(data: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None,
                      smooth_vox: float = 0.0, subsample: int = 1) -> Reference:
    """Precompute the inverse-compositional Jacobian and Hessian of a reference volume.

    Parameters
    ----------
    data : (nx, ny, nz) float array, the reference
    affine : (4, 4) voxel -> RAS+ mm
    mask : (nx, ny, nz) bool or None
        Voxels that drive the fit (default :func:`registration_mask`).
    smooth_vox : float
        Gaussian sigma (voxels) applied to the reference before taking gradients.
    subsample : int
        Use every ``subsample``-th mask voxel (in memory order); on smoothed images
        neighbours carry nearly the same information.
    """
    ref = np.asfortranarray(data, dtype=np.float32)
    shape = ref.shape
    if mask is None:
        mask = registration_mask(ref)
    smoothed = ndimage.gaussian_filter(ref, smooth_vox) if smooth_vox > 0 else ref
    # Interior only: central differences are defined and samples stay inside
    # (np.argwhere(mask & interior)'s indices and order, from a kernel: no whole-volume
    # temporaries at the series' first volume).
    mask = np.asarray(mask)
    if mask.dtype == np.bool_ and mask.shape == shape:
        points = interior_points(mask)
    else:  # other dtypes (``&`` is bitwise on integers) or shapes: the NumPy rule
        interior = np.zeros(shape, dtype=bool)
        interior[1:-1, 1:-1, 1:-1] = True
        points = np.argwhere(mask & interior).astype(np.int32)
    points = points[::max(1, subsample)]
    # np.gradient's central differences (float64, per voxel step), at the points only
    grad_vox = np.empty((len(points), 3), dtype=np.float64)
    i, j, k = (points[:, axis].astype(np.intp) for axis in range(3))
    for axis, (up, down) in enumerate((((i + 1, j, k), (i - 1, j, k)),
                                       ((i, j + 1, k), (i, j - 1, k)),
                                       ((i, j, k + 1), (i, j, k - 1)))):
        grad_vox[:, axis] = (smoothed[up].astype(np.float64)
                             - smoothed[down].astype(np.float64)) / 2.0
    linear = affine[:3, :3]
    grad_ras = grad_vox @ np.linalg.inv(linear)
    center_vox = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    center = linear @ center_vox + affine[:3, 3]
    xyz = points @ linear.T + affine[:3, 3] - center
    jacobian = np.concatenate([grad_ras, np.cross(xyz, grad_ras)], axis=1)
    values = ref[points[:, 0], points[:, 1], points[:, 2]].astype(np.float32)
    # Intensity gain and offset are projected out of the fit (Baker & Matthews'
    # "project out" for linear appearance change): the Jacobian is made orthogonal to
    # the reference image and to a constant, so a volume brighter or darker as a whole
    # (the first volumes of a run still approaching the steady state: 1.7x on a real GE
    # run without dummy scans, where the plain SSD fit diverged; a slow drift) is not read
    # as motion. The update J^T r then ignores those components of the residual, and the
    # kernel is unchanged.
    appearance = np.stack([values.astype(np.float64), np.ones(len(values))], axis=1)
    jacobian -= appearance @ np.linalg.lstsq(appearance, jacobian, rcond=None)[0]
    hessian = jacobian.T @ jacobian
    affine = np.array(affine, dtype=np.float64)
    return Reference(affine=affine, ras_to_vox=np.linalg.inv(affine), shape=shape, center=center,
                     points=np.ascontiguousarray(points), values=values,
                     jacobian=np.ascontiguousarray(jacobian, dtype=np.float32),
                     hessian_inv=np.linalg.inv(hessian), data=ref)


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of registering one volume.

    Attributes
    ----------
    params : (6,) float64, trans (mm) and rot (radians), :mod:`rtsc.conventions`
    matrix : (4, 4) RAS map reference -> current
    iterations : int
    rms_residual : float, intensity units, over the samples used
    fraction_used : float, share of mask samples that fell inside the current grid
    converged : bool
    """

    params: np.ndarray
    matrix: np.ndarray
    iterations: int
    rms_residual: float
    fraction_used: float
    converged: bool


def register(ref: Reference, data: np.ndarray, init: np.ndarray | None = None,
             max_iterations: int = 30, tolerance_mm: float = 1e-2,
             radius_mm: float = 50.0) -> RegistrationResult:
    """Register ``data`` (same grid as the reference) to ``ref``.

    Parameters
    ----------
    ref : Reference
    data : (nx, ny, nz) float32, Fortran-ordered, in the reference's grid
    init : (4, 4) starting RAS map (the previous volume's), identity if None
    max_iterations : int
    tolerance_mm : float
        Stop when the update moves every point of a ``radius_mm`` sphere less than this.
    """
    matrix, iteration, sse, used, converged = ic_register(
        data, ref.affine, ref.ras_to_vox, np.eye(4) if init is None else init, ref.points,
        ref.values, ref.jacobian, ref.hessian_inv, ref.center, max_iterations, tolerance_mm,
        radius_mm)
    rms = math.sqrt(sse / used) if used else float("nan")
    return RegistrationResult(params=rigid_params(matrix, ref.center), matrix=matrix,
                              iterations=iteration, rms_residual=rms,
                              fraction_used=used / max(len(ref.points), 1), converged=converged)


def reslice_to_reference(ref: Reference, data: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The current volume resampled onto the reference grid (motion corrected).

    Returns (nx, ny, nz) float32, Fortran order; NaN where the sample falls farther than
    ``GRID_TOLERANCE_VOX`` outside the acquired grid (invalid, not 0).
    """
    q = ref.ras_to_vox @ matrix @ ref.affine
    return reslice(data, q, ref.shape)


class RigidRegistration:
    """Registration of volumes to one reference, both smoothed alike.

    Smoothing both images with the same Gaussian (sigma ``smooth_vox`` voxels) before
    the fit removes most of trilinear interpolation's bias (as SPM and MCFLIRT do):
    at 3 mm voxels, sigma 1.2 voxels cut the worst rotation error of a simulated run
    from 0.37 to 0.05 degrees.

    Parameters
    ----------
    reference : (nx, ny, nz) float array
    affine : (4, 4) voxel -> RAS+ mm
    smooth_vox : float, Gaussian sigma in voxels (0: no smoothing)
    mask : (nx, ny, nz) bool or None, see :func:`registration_mask`
    max_points : int
        Mask voxels are thinned to about this many (every n-th voxel): the cost of an
        iteration is proportional to it, and on smoothed images the worst error is set
        by interpolation, not by the number of points. At 64x64x36, six seeded runs
        with motion up to 3 mm / 3 degrees (2026-12-01): worst errors 0.068 mm / 0.062
        degrees with all 16,400 mask points, 0.075 mm / 0.067 degrees with 7,300 (8,000
        asked), 0.073 mm / 0.147 degrees with 3,900; medians 0.007-0.009 mm and
        0.015-0.017 degrees for 5,000 points and more. At 96x96x60 and 128x128x72 8,000
        points stay under 0.014 mm / 0.042 degrees.
    tolerance_mm : float
        Stop when an update moves every point of a 50 mm sphere less than this. A
        warm-started volume converges in two updates; at 0.001 mm a third only confirmed
        it (same errors to 1e-4 mm over the six runs, one iteration more per volume).
    reslice_margin : int
        :meth:`reslice` interpolates within the registration mask dilated by this many
        voxels (head motion up to about ``reslice_margin`` voxels stays inside it) and
        copies the acquired background; None interpolates every voxel.

    A resliced voxel whose sample falls outside the acquired grid (beyond SPM's
    tolerance, :data:`~rtsc.pipeline.motion._resample_kernels.GRID_TOLERANCE_VOX`) is
    invalid: NaN in :meth:`reslice` and :meth:`sampler`, and outside :meth:`valid_rows`.
    """

    def __init__(self, reference: np.ndarray, affine: np.ndarray, smooth_vox: float = 1.2,
                 mask: np.ndarray | None = None, max_iterations: int = 30,
                 tolerance_mm: float = 1e-2, max_points: int = 8000,
                 reslice_margin: int | None = 3) -> None:
        reference = np.asfortranarray(reference, dtype=np.float32)
        self.smoother = GaussianSmoother(reference.shape, smooth_vox) if smooth_vox > 0 else None
        self._smoothed = np.empty(reference.shape, dtype=np.float32, order="F")
        if mask is None:
            mask = registration_mask(reference)
        subsample = max(1, math.ceil(int(mask.sum()) / max_points))
        self._extents = None if reslice_margin is None else row_extents(
            binary_dilation(mask, reslice_margin) if reslice_margin else mask)
        nx, ny, nz = reference.shape
        #: (starts, stops), (ny, nz) int64 each: the voxels of each row that are resliced
        self.extents = self._extents if self._extents is not None else (
            np.zeros((ny, nz), np.int64), np.full((ny, nz), nx, np.int64))
        self.reference = prepare_reference(self._smooth(reference).copy(order="F"), affine, mask,
                                           subsample=subsample)
        self.max_iterations = max_iterations
        self.tolerance_mm = tolerance_mm

    def _smooth(self, data: np.ndarray) -> np.ndarray:
        if self.smoother is None:
            return data
        return self.smoother(data, self._smoothed)

    def register(self, data: np.ndarray, init: np.ndarray | None = None) -> RegistrationResult:
        """Register ``data`` ((nx, ny, nz) float32, Fortran order) starting from ``init``."""
        return register(self.reference, self._smooth(data), init,
                        max_iterations=self.max_iterations, tolerance_mm=self.tolerance_mm)

    def sampler(self, data: np.ndarray, matrix: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A function of Fortran flat voxel indices giving the values that
        ``reslice(data, matrix)`` will have there (bit-identical), for a few voxels
        needed before the whole volume is resliced (the neurofeedback ROI)."""
        data = np.asfortranarray(data, dtype=np.float32)
        ref = self.reference
        q = ref.ras_to_vox @ matrix @ ref.affine
        extents = self.extents
        return lambda flat_index: sample_rows(data, q, *extents, flat_index)

    def valid_rows(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which voxels ``reslice(data, matrix)`` samples inside the acquired grid, per row
        (see :func:`~rtsc.pipeline.motion._resample_kernels.valid_rows`; the extents are
        :attr:`extents`): (lo, hi), (ny, nz) int64 each. O(ny nz), no data needed."""
        ref = self.reference
        return valid_rows(ref.ras_to_vox @ matrix @ ref.affine, ref.shape, *self.extents)

    def reslice(self, data: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """``data`` (unsmoothed) resampled onto the reference grid (within the head rows
        only, see ``reslice_margin``)."""
        if self._extents is None:
            return reslice_to_reference(self.reference, data, matrix)
        ref = self.reference
        q = ref.ras_to_vox @ matrix @ ref.affine
        return reslice_rows(np.asfortranarray(data, dtype=np.float32), q, *self._extents)
