"""What the simulated scanner's DICOM writers are told about a series, and what they
share: :class:`SeriesInfo`, the checked geometry of a volume, slice times, and DICOM
value formatting.

Conventions (axes, LPS, slice order) are :mod:`simulator.dicom_writer`'s docstring.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.uid import MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

#: SOP Class UID of MR Image Storage.
MR_IMAGE_STORAGE = str(MRImageStorage)
#: Manufacturer (0008,0070) of a Philips scanner's images.
PHILIPS = "Philips Medical Systems"

_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS sign flip (its own inverse)
_ORTHO_TOL = 1e-4  # |cos| between row and column directions
_PARALLEL_TOL = 1e-4  # |sin| between the k axis and the slice normal


@dataclass(frozen=True)
class SeriesInfo:
    """Series-level description shared by every image of a simulated series.

    Attributes
    ----------
    study_uid, series_uid, frame_of_reference_uid : str
        DICOM UIDs.
    series_number : int
        SeriesNumber (0020,0011).
    series_description : str
        SeriesDescription and ProtocolName, e.g. ``"ep2d_bold_sim"``.
    tr_s : float
        Repetition time, seconds (> 0).
    te_s : float
        Echo time, seconds.
    n_volumes : int or None
        Expected number of volumes, if known (NumberOfTemporalPositions).
    slice_times_s : tuple of float
        Acquisition offset of each slice within the TR, seconds, one per slice k, each
        in [0, tr_s). Empty means ascending and evenly spread: ``k * tr_s / nz``.
    patient_name, patient_id, patient_birth_date : str
        Patient module values (synthetic).
    manufacturer : str
        Manufacturer (0008,0070).
    start_time : float
        Epoch seconds of the acquisition start of volume 0. DICOM dates and times are
        written in local time, with TimezoneOffsetFromUTC (0008,0201).
    bandwidth_per_pixel_phase_hz : float
        Siemens BandwidthPerPixelPhaseEncode (CSA and (0019,xx28)), Hz per pixel along
        the phase-encoding direction (COL, A-P).
    """

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int
    series_description: str
    tr_s: float
    te_s: float = 0.030
    n_volumes: int | None = None
    slice_times_s: tuple[float, ...] = ()
    patient_name: str = "SIM^PHANTOM"
    patient_id: str = "SIM0001"
    patient_birth_date: str = "19800101"
    manufacturer: str = "SIEMENS"
    start_time: float = 0.0
    bandwidth_per_pixel_phase_hz: float = 20.0


def new_series_info(series_number: int, tr_s: float, **kw: object) -> SeriesInfo:
    """Return a `SeriesInfo` with fresh study, series and frame-of-reference UIDs.

    Parameters
    ----------
    series_number : int
        SeriesNumber.
    tr_s : float
        Repetition time, seconds.
    **kw
        Any other `SeriesInfo` field; ``series_description`` defaults to
        ``"ep2d_bold_sim"``. Given UIDs are kept.

    Returns
    -------
    SeriesInfo
    """
    kw.setdefault("series_description", "ep2d_bold_sim")
    for key in ("study_uid", "series_uid", "frame_of_reference_uid"):
        kw.setdefault(key, generate_uid())
    return SeriesInfo(series_number=series_number, tr_s=tr_s, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    """Image-plane geometry of a volume, LPS mm."""

    row_cosine: np.ndarray  # (3,) unit, direction of increasing column index i
    col_cosine: np.ndarray  # (3,) unit, direction of increasing row index j
    normal: np.ndarray  # (3,) unit, cross(row, col) == direction of increasing k
    col_spacing: float  # mm between adjacent columns, |affine[:3, 0]|
    row_spacing: float  # mm between adjacent rows, |affine[:3, 1]|
    slice_spacing: float  # mm between slices, |affine[:3, 2]|
    origin: np.ndarray  # (3,) LPS of voxel (0, 0, 0)
    slice_step: np.ndarray  # (3,) LPS displacement from slice k to k + 1

    def slice_position(self, k: float) -> np.ndarray:
        """LPS mm of voxel (0, 0, k)."""
        return self.origin + k * self.slice_step


def _check_volume(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, _Geometry]:
    """Validate a volume and derive its DICOM geometry; raise ValueError if unusable."""
    data = np.asarray(data)
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"data must have shape (nx, ny, nz), got {data.shape}")
    if data.dtype not in (np.dtype(np.int16), np.dtype(np.uint16)):
        raise ValueError(f"data must be int16 or uint16, got {data.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("affine must be a finite (4, 4) array")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"affine bottom row must be [0, 0, 0, 1], got {affine[3]}")
    cols = affine[:3, :3] * _LPS[:, None]
    sizes = np.linalg.norm(cols, axis=0)
    if np.any(sizes <= 0):
        raise ValueError(f"affine has a zero-length axis: voxel sizes {sizes}")
    row, col, kdir = (cols / sizes).T
    if abs(row @ col) > _ORTHO_TOL:
        raise ValueError("affine i and j axes are not orthogonal: DICOM cannot express shear")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    if np.linalg.norm(np.cross(kdir, normal)) > _PARALLEL_TOL or kdir @ normal <= 0:
        raise ValueError(
            "affine k axis must point along +cross(i, j) (the DICOM slice normal, "
            "det(affine[:3, :3]) > 0, no gantry tilt); flip the volume or the axis"
        )
    geom = _Geometry(
        row_cosine=row,
        col_cosine=col,
        normal=normal,
        col_spacing=float(sizes[0]),
        row_spacing=float(sizes[1]),
        slice_spacing=float(sizes[2]),
        origin=affine[:3, 3] * _LPS,
        slice_step=cols[:, 2],
    )
    return data, geom


def _slice_times(info: SeriesInfo, nz: int) -> np.ndarray:
    """Per-slice acquisition offsets within the TR, seconds, shape (nz,)."""
    if not info.slice_times_s:
        return np.arange(nz) * (info.tr_s / nz)
    times = np.asarray(info.slice_times_s, dtype=np.float64)
    if times.shape != (nz,):
        raise ValueError(f"slice_times_s has {times.size} values for {nz} slices")
    if np.any(times < 0) or np.any(times >= info.tr_s):
        raise ValueError(f"slice_times_s must lie in [0, tr_s={info.tr_s}) s")
    return times


def _check_info(info: SeriesInfo, index: int) -> None:
    if not info.tr_s > 0:
        raise ValueError(f"tr_s must be > 0 s, got {info.tr_s}")
    if index < 0:
        raise ValueError(f"volume index must be >= 0, got {index}")
    if info.n_volumes is not None and index >= info.n_volumes:
        raise ValueError(f"volume index {index} >= n_volumes {info.n_volumes}")


# ----------------------------------------------------------------------- formatting


def _ds(x: float) -> str:
    """Format a float as a DICOM decimal string (<= 16 characters)."""
    x = float(x)
    if abs(x) < 1e-12:
        x = 0.0
    return format_number_as_ds(x)


def _ds_list(values: Sequence[float] | np.ndarray) -> list[str]:
    return [_ds(v) for v in values]


def _dicom_datetime(t: float) -> tuple[str, str, str]:
    """Epoch seconds -> (DA, TM, timezone offset) in local time."""
    local = _dt.datetime.fromtimestamp(t).astimezone()
    offset = local.utcoffset() or _dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    tz = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f"), tz
