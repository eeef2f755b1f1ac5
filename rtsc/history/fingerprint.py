"""The protocol fingerprint: which earlier series a series is compared with.

Two series share a fingerprint when they were acquired with the same protocol on the
same scanner: the same in-plane matrix, slices, voxel size (to 0.01 mm), TR (to 1 ms),
sequence name, series description, pipeline mode and station (its name hashed, see
:func:`rtsc.dicom.series_info.station_hash`). The fingerprint is the first 16 hex
digits of the SHA-256 of those parts as canonical JSON (sorted keys, no spaces).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from rtsc.volume import SeriesInfo


@dataclass(frozen=True)
class Protocol:
    """The parts of a protocol fingerprint.

    Attributes
    ----------
    matrix_i, matrix_j : int, in-plane matrix (voxels along i and j)
    n_slices : int, voxels along k
    voxel_i_mm, voxel_j_mm, voxel_k_mm : float, voxel size, mm, rounded to 0.01 mm
    tr_s : float or None, repetition time, s, rounded to 1 ms
    sequence : str, cleaned SequenceName ("" when absent)
    description : str, cleaned SeriesDescription
    station_hash : str or None, SHA-256 (16 hex digits) of StationName
    mode : str, ``brain`` or ``spinal_cord`` (the figures mean other things in the cord)
    """

    matrix_i: int
    matrix_j: int
    n_slices: int
    voxel_i_mm: float
    voxel_j_mm: float
    voxel_k_mm: float
    tr_s: float | None
    sequence: str
    description: str
    station_hash: str | None
    mode: str

    @staticmethod
    def of(info: SeriesInfo, shape: Sequence[int], voxel_size_mm: Sequence[float],
           mode: str) -> "Protocol":
        """The protocol of a series from its first volume's facts.

        Parameters
        ----------
        info : SeriesInfo
        shape : (3,) int, matrix (nx, ny, nz)
        voxel_size_mm : (3,) float, mm
        mode : ``pipeline.mode``
        """
        vx, vy, vz = (round(float(v), 2) for v in voxel_size_mm)
        return Protocol(int(shape[0]), int(shape[1]), int(shape[2]), vx, vy, vz,
                        None if info.tr_s is None else round(float(info.tr_s), 3),
                        info.sequence, info.description, info.station_hash, mode)

    def parts(self) -> dict[str, Any]:
        """The parts as a mapping (column name -> value)."""
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        """16 hex digits: SHA-256 of the parts as canonical JSON."""
        text = json.dumps(self.parts(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
