"""The unit of work flowing from the assembler through the pipeline."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


def series_id(series_instance_uid: str) -> str:
    """Opaque series id derived from a SeriesInstanceUID by hashing.

    No identifier from the DICOM header leaves the process in clear: the id is the
    first 12 hex digits of SHA-256 of the UID.
    """
    return hashlib.sha256(series_instance_uid.encode("ascii", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class SeriesInfo:
    """What the assembler knows about a series, without patient identifiers.

    Attributes
    ----------
    series : str
        Opaque id (:func:`series_id`).
    tr_s : float or None
        Repetition time, seconds (DICOM RepetitionTime / 1000).
    n_expected : int or None
        Number of volumes announced by the header (NumberOfTemporalPositions), if any.
    series_number : int or None
        SeriesNumber, an integer the console shows; not an identifier.
    description : str
        SeriesDescription with anything but [A-Za-z0-9_-] removed.
    source : str
        ``mosaic``, ``slices`` or ``multiframe``.
    echo : int or None
        EchoNumbers of the series' images; each echo of a multi-echo series is its own
        series (its id hashes the SeriesInstanceUID and the echo number after echo 1).
    echo_time_s : float or None
        EchoTime, seconds.
    echo_group : str or None
        The same opaque id for every echo of one multi-echo series (hash of its UID).
    phase_encoding_axis : str or None
        Voxel axis of the in-plane phase encoding: ``i`` (DICOM
        InPlanePhaseEncodingDirection ROW) or ``j`` (COL); None when not given.
    bandwidth_pe_hz : float or None
        Bandwidth per pixel in the phase-encoding direction, Hz (Siemens CSA
        BandwidthPerPixelPhaseEncode); an off-resonance of this many Hz shifts the image
        by one pixel along the phase-encoding axis.
    slice_times_s : tuple of float or None
        Acquisition time of each slice k relative to the volume's first, seconds, from
        the vendor's headers (:func:`rtsc.dicom.vendor.acquisition_facts`); None when
        the headers do not give them (Philips).
    multiband_factor : int or None
        Slices excited together (1: single band), None when unknown.
    phase_encoding_direction : str or None
        BIDS PhaseEncodingDirection in the voxel axes (``i``, ``i-``, ``j``, ``j-``).
    sidecar : dict or None
        The BIDS sidecar of the series (``bold.json``): RepetitionTime, SliceTiming,
        MultibandAccelerationFactor, PhaseEncodingDirection where the headers give them,
        and descriptive keys; no patient identifiers.
    sequence : str
        SequenceName (enhanced images: PulseSequenceName) with anything but
        [A-Za-z0-9_*+.-] removed, e.g. ``*epfid2d1_64``; "" when absent.
    station_hash : str or None
        First 16 hex digits of the plain SHA-256 of StationName (stripped); None when
        absent. The history's protocol fingerprint uses it; the name itself is not kept.
    """

    series: str
    tr_s: float | None
    n_expected: int | None
    series_number: int | None
    description: str
    source: str
    echo: int | None = None
    echo_time_s: float | None = None
    echo_group: str | None = None
    phase_encoding_axis: str | None = None
    bandwidth_pe_hz: float | None = None
    slice_times_s: tuple[float, ...] | None = None
    multiband_factor: int | None = None
    phase_encoding_direction: str | None = None
    sidecar: dict[str, Any] | None = field(default=None, compare=False)
    sequence: str = ""
    station_hash: str | None = None


@dataclass(frozen=True, eq=False)
class Coverage:
    """The run's validity mask: the voxels every volume of the series so far sampled
    inside the acquired grid (an AND over volumes, as SPM's realign mask).

    A motion-corrected voxel whose sample falls outside the acquired field of view
    (beyond SPM's 0.05-voxel tolerance) holds no data for that volume, so it leaves
    every statistic of the run from then on: the stages use their brain mask AND
    ``mask``. The motion stage makes a new Coverage only when the mask shrinks, with
    ``version`` one higher; a stage compares versions to know when to update.

    Attributes
    ----------
    mask : (nx, ny, nz) bool, Fortran order, read-only
    n_valid : int, voxels in ``mask``
    version : int, 0 for the first; +1 each time voxels leave
    left : (k,) int64 or None
        The voxels that left with this version (in version - 1's mask, not in this
        one's), as increasing Fortran-order flat indices, when the maker knows them:
        a stage that applied version - 1 updates its voxels by these few instead of
        intersecting its mask with the whole grid again (most volumes of a moving head
        bring a new version, nearly always of voxels at the grid's edge).
    """

    mask: np.ndarray
    n_valid: int
    version: int = 0
    left: np.ndarray | None = None

    @staticmethod
    def of(mask: np.ndarray, version: int = 0) -> "Coverage":
        """A Coverage holding a read-only Fortran-ordered copy of ``mask``."""
        frozen = np.array(mask, dtype=bool, order="F")
        frozen.flags.writeable = False
        return Coverage(frozen, int(np.count_nonzero(frozen)), int(version))


@dataclass(frozen=True, eq=False)
class Volume:
    """One assembled volume.

    Attributes
    ----------
    data : (nx, ny, nz) float32, Fortran-contiguous (i fastest)
        Voxel values after the DICOM rescale; axis i runs along the DICOM row direction,
        j along the column direction, k along the slice normal. Fortran order is how
        both DICOM pixel data and NIfTI store voxels, so assembling and writing are
        plain block copies.
    affine : (4, 4) float64, voxel -> RAS+ mm
    index : int
        0-based position in its series (from the acquisition order).
    info : SeriesInfo
    t_acquired : float or None
        Acquisition time of the volume's first slice, seconds since the epoch
        (AcquisitionDate/Time), None when the header has none.
    t_received : float
        When the last dataset of the volume was received, seconds since the epoch.
    t_assembled : float
        When the volume was assembled, seconds since the epoch.
    slice_times_s : (nz,) float64 or None
        Acquisition offset of each slice within the volume, seconds.
    stored_dtype : numpy dtype
        dtype of the stored pixels, so outputs keep the scanner's integers exactly.
    missing_slices : tuple of int
        Slices that never arrived (filled with zeros).
    corrected_at : callable or None
        Set between the motion stage and the reslice stage, while ``data`` still holds
        the acquired (uncorrected) volume: Fortran flat voxel indices -> the
        motion-corrected values there, float32 (bit-identical to the resliced volume).
        The neurofeedback ROI reads its few voxels this way before the whole volume is
        resliced.
    coverage : Coverage or None
        Set by the motion stage (from the reference volume on): the run's validity mask
        up to and including this volume; ``data`` (once resliced) is NaN where this
        volume's sample fell outside the acquired grid. None: no reslice, every voxel is
        valid.
    """

    data: np.ndarray
    affine: np.ndarray
    index: int
    info: SeriesInfo
    t_acquired: float | None
    t_received: float
    t_assembled: float
    slice_times_s: np.ndarray | None = None
    stored_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    missing_slices: tuple[int, ...] = ()
    corrected_at: Callable[[np.ndarray], np.ndarray] | None = None
    coverage: Coverage | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Matrix (nx, ny, nz)."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k, mm."""
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(sizes[0]), float(sizes[1]), float(sizes[2]))
