"""The motion reference of a series (config ``motion.reference``), and the session
reference carried from one series of an ``rtsc run`` to the next.

Forms (parsed by :func:`rtsc.config.pipeline.parse_motion_reference` at load):

``first``
    The series' first volume.
``volume:N``
    Its volume N (0-based); earlier volumes are flagged ``before_reference``.
``series:PREVIOUS``
    The reference of the series that ended last in this ``rtsc run``, resampled onto
    this series' grid through both affines (the scanner frame is the session's: the same
    head position reads as zero motion whatever the slices' placement), so that the
    motion parameters of every series of a session are displacements from one head
    position, and an ROI drawn in one series' grid stays on the same anatomy in the
    next ones. The carried reference is itself carried on, so a whole session shares
    its first series' reference. Without an earlier series it is the first volume, with
    an info alert.
a NIfTI path
    A volume in the acquired grid.

Across grids the earlier reference is resampled trilinearly; voxels of this grid outside
the earlier field of view get 0, so the head mask of the registration leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rtsc.pipeline.motion._resample_kernels import reslice
from rtsc.pipeline.stages import automatic_mask

#: Share of this series' head (:func:`shared_head` of its first volume) that must lie in
#: the carried reference's field of view.
MIN_SHARED_HEAD = 0.5


@dataclass(frozen=True, eq=False)
class ReferenceImage:
    """The volume a series registered to, kept for the next series.

    Attributes
    ----------
    data : (nx, ny, nz) float32, Fortran order
    affine : (4, 4) float64, voxel -> scanner RAS+ mm
    series : str, the series it was the reference of (its first, for a carried one)
    """

    data: np.ndarray
    affine: np.ndarray
    series: str


def carry_reference(previous: ReferenceImage, shape: tuple[int, int, int],
                    affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An earlier series' reference resampled onto another grid.

    Parameters
    ----------
    previous : ReferenceImage
    shape : (nx, ny, nz), the new grid
    affine : (4, 4) float64, its voxel -> scanner RAS+ mm

    Returns
    -------
    data : (nx, ny, nz) float32, Fortran order; 0 outside the earlier field of view
    inside : (nx, ny, nz) bool, the new grid's voxels inside the earlier field of view
    """
    if tuple(previous.data.shape) == tuple(shape) and np.array_equal(previous.affine, affine):
        # the same grid: the reference itself (interpolation would round its last bits)
        return np.array(previous.data, dtype=np.float32, order="F"), \
            np.ones(tuple(shape), dtype=bool)
    q = np.linalg.inv(np.asarray(previous.affine, np.float64)) @ np.asarray(affine, np.float64)
    data = reslice(np.asfortranarray(previous.data, dtype=np.float32), q, tuple(shape),
                   fill=np.nan)
    inside = ~np.isnan(data)
    data[~inside] = 0.0
    return data, inside


def shared_head(volume: np.ndarray, inside: np.ndarray, fraction: float = 0.2) -> float:
    """Share of a volume's head (its :func:`automatic_mask`: voxels above ``fraction`` of
    its 98th percentile) that lies inside another field of view (``inside``), 0 to 1."""
    head = automatic_mask(volume, fraction)
    return float(np.count_nonzero(head & inside)) / max(1, int(np.count_nonzero(head)))
