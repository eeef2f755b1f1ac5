"""Single-slice series: the slices of one volume collected, then stacked.

Each image of such a series is one slice; :class:`PendingVolume` collects a volume's
slices by their position along the slice normal (mm), and :func:`stack_slices` places
them on the volume grid (the series' first volume fixes it), zero-filling slices that
never came.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.geometry import affine_from_lps
from rtsc.dicom.pixels import apply_rescale
from rtsc.errors import DicomError


@dataclass
class SliceImage:
    """One slice as received: position along the normal (mm), stored pixels (rows,
    columns), ImagePositionPatient (LPS mm), acquisition and arrival times (epoch s)."""

    position: float
    pixels: np.ndarray
    ipp: np.ndarray
    t_acquired: float | None
    t_received: float
    header: Dataset


@dataclass
class PendingVolume:
    """A single-slice volume being collected."""

    number: int
    slices: dict[float, SliceImage] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0


def stack_slices(pending: PendingVolume, n_slices: int,
                 geometry: tuple[np.ndarray, np.ndarray, np.ndarray],
                 series_affine: np.ndarray | None, spacing_fallback: float | None,
                 rescale: tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray, list[SliceImage], list[int]]:
    """Stack the slices of ``pending`` by position along the normal.

    Parameters
    ----------
    pending : the volume's slices
    n_slices : int, slices per volume
    geometry : (row cosines, column cosines, pixel spacing mm) of the series
    series_affine : (4, 4) float64 or None, the series' first volume's affine: its grid
        places the slices (None: this is the first volume)
    spacing_fallback : float or None, the header's slice spacing (mm), for a one-slice
        first volume
    rescale : (slope, intercept), applied in place

    Returns
    -------
    data : (nx, ny, nz) float32, rescaled, Fortran-ordered, zero where no slice came
    affine : (4, 4) float64, voxel -> RAS+ mm
    slices : the slices in position order
    filled : the slice index (k) of each of ``slices``

    Raises
    ------
    DicomError
        No way to tell the slice step, slices at one position, or a slice off the grid.
    """
    row_cos, col_cos, spacing = geometry
    slices = [pending.slices[p] for p in sorted(pending.slices)]
    n = n_slices
    rows, cols = slices[0].pixels.shape
    normal = np.cross(row_cos, col_cos)
    if series_affine is not None:
        # Place slices on the grid fixed by the series' first volume.
        step = np.diag([-1.0, -1.0, 1.0]) @ series_affine[:3, 2]
        origin = np.diag([-1.0, -1.0, 1.0]) @ series_affine[:3, 3]
    elif len(slices) > 1:
        step = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
        origin = slices[0].ipp
        if len(slices) < n:
            # Incomplete first volume: infer the step from the closest pair.
            gaps = np.diff([s.position for s in slices])
            step = normal * float(gaps.min())
    else:
        if spacing_fallback is None:
            raise DicomError("one-slice volume without a slice spacing")
        step = normal * spacing_fallback
        origin = slices[0].ipp
    step_len = float(np.linalg.norm(step))
    if step_len <= 0:
        raise DicomError("slices of a volume share one position")
    data = np.zeros((cols, rows, n), dtype=np.float32, order="F")
    by_slice = data.T  # (nz, rows, cols) view of the Fortran-ordered volume
    filled = []
    for s in slices:
        k = int(round(float((s.ipp - origin) @ step) / step_len**2))
        if not 0 <= k < n:
            raise DicomError(f"slice at {s.position:.2f} mm falls outside the volume grid")
        by_slice[k] = s.pixels
        filled.append(k)
    slope, intercept = rescale
    apply_rescale(data, slope, intercept)
    affine = affine_from_lps(row_cos, col_cos, spacing, step, origin)
    return data, affine, slices, filled


def slice_timing(slices: list[SliceImage], filled: list[int], n_slices: int
                 ) -> tuple[float | None, np.ndarray | None]:
    """The volume's acquisition time (its first slice's, epoch s) and, when every slice
    came with one, each slice's time after it, (nz,) float64 s in slice order."""
    times = [s.t_acquired for s in slices]
    t_acquired = min(t for t in times if t is not None) if any(t is not None for t in times) \
        else None
    slice_times = None
    if t_acquired is not None and all(t is not None for t in times) and len(slices) == n_slices:
        order = np.argsort(filled)
        slice_times = np.array([times[i] for i in order], dtype=np.float64) - t_acquired
    return t_acquired, slice_times
