"""Carpet-plot samples: a fixed, evenly subsampled set of in-mask voxels per volume.

The live dashboard draws a carpet plot (Power's "grayplot": voxels x time). Whole
volumes do not travel over ZeroMQ, so each ``volume`` message carries one small
float32 buffer: the motion-corrected values of ``K`` voxels (``publish.carpet_voxels``,
default 2,000, 8 kB) chosen once per series on the first volume. The voxels are the
automatic mask's voxels (the same mask as the global signal), taken evenly along the
Fortran-order flat index (i fastest, then j, then k), so the rows of the carpet run
from the lowest slice to the highest and every slice is represented in proportion to
its mask size. The header's ``carpet`` field describes the buffer (see
:func:`rtsc.messages.volume`).

The voxels are chosen inside the run's validity mask (``Volume.coverage``) too; a voxel
that later leaves it (its motion-corrected sample fell outside the acquired grid) keeps
its row, NaN from then on: the rows of the picture do not move, and a gap shows where
there is no data (never a made-up 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtsc.pipeline.stages import NO_FIELDS, StageResult, automatic_mask, valid_mask
from rtsc.volume import Coverage, Volume


@dataclass(frozen=True)
class CarpetState:
    """The sampled voxels of one series.

    Attributes
    ----------
    index : (K,) int64, Fortran-order flat indices into the (nx, ny, nz) grid, increasing
    mask_voxels : int, voxels in the automatic mask (K <= mask_voxels)
    """

    index: np.ndarray
    mask_voxels: int


def carpet_init(first: np.ndarray, mask_fraction: float, n_voxels: int,
                coverage: Coverage | None = None) -> CarpetState:
    """Choose the voxels on the first (motion-corrected) volume.

    Parameters
    ----------
    first : (nx, ny, nz) float array
    mask_fraction : float, see :func:`~rtsc.pipeline.stages.automatic_mask`
    n_voxels : int, how many to sample at most (all mask voxels when fewer)
    coverage : Coverage or None, the run's validity mask (``Volume.coverage``)
    """
    mask = valid_mask(automatic_mask(first, mask_fraction), coverage)
    positions = np.flatnonzero(mask.ravel(order="F"))
    mask_voxels = int(positions.size)
    if positions.size > n_voxels:
        pick = np.unique(np.round(np.linspace(0, positions.size - 1, n_voxels)).astype(np.int64))
        positions = positions[pick]
    return CarpetState(index=positions.astype(np.int64), mask_voxels=mask_voxels)


def carpet_step(state: CarpetState, data: np.ndarray) -> np.ndarray:
    """The sampled voxels' values in one volume.

    Parameters
    ----------
    data : (nx, ny, nz) float32 (any memory order)

    Returns
    -------
    (K,) float32, image intensity units; NaN where the voxel is invalid
    """
    return np.ascontiguousarray(data.ravel(order="F")[state.index], dtype=np.float32)


class CarpetStage:
    """Publishes the carpet samples as the ``carpet`` metric (popped into a buffer by the
    service) with ``carpet_mask_voxels``.

    Parameters
    ----------
    mask_fraction : float
    n_voxels : int, >= 1
    """

    name = "carpet"
    produces = frozenset({"carpet", "carpet_mask_voxels"})
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, mask_fraction: float, n_voxels: int) -> None:
        self.mask_fraction = mask_fraction
        self.n_voxels = n_voxels
        self.state: CarpetState | None = None

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        if self.state is None:
            self.state = carpet_init(volume.data, self.mask_fraction, self.n_voxels,
                                     volume.coverage)
        return StageResult(metrics={"carpet": carpet_step(self.state, volume.data),
                                    "carpet_mask_voxels": self.state.mask_voxels})

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}
