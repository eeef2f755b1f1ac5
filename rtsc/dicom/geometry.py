"""DICOM image geometry: LPS patient coordinates -> voxel-to-RAS+ affines, voxel axes as
world directions, and times."""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.fastread import raw_ds_numbers
from rtsc.errors import DicomError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Plausible ranges: anything outside is a broken header, not an image.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e4
MAX_POSITION_MM = 1e6


# The plane elements read for every image, by tag (rtsc.dicom.fastread.raw_ds_numbers).
_PLANE_TAGS = {"ImageOrientationPatient": 0x00200037, "ImagePositionPatient": 0x00200032,
               "PixelSpacing": 0x00280030}


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    # Straight from the received bytes when they are plain (pydicom's DS conversion was
    # a tenth of a 128 x 128 slice's worker time); anything else through pydicom.
    tag = _PLANE_TAGS.get(keyword)
    numbers = raw_ds_numbers(ds, tag, n) if tag is not None else None
    if numbers is not None:
        return np.array(numbers, dtype=np.float64)
    value = ds.get(keyword)
    if value is None:
        raise DicomError(f"missing {keyword}")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{keyword} is not numeric: {value!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DicomError(f"{keyword} must be {n} finite numbers, got {value!r}")
    return arr


def plane_geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Orientation and spacing of an image plane.

    Returns
    -------
    row_cos, col_cos : (3,) float64, LPS unit vectors
        Direction of increasing column index (along a row) and of increasing row index.
    spacing : (2,) float64, mm
        (spacing between columns, spacing between rows), i.e. PixelSpacing reversed.
    position : (3,) float64, LPS mm
        ImagePositionPatient: centre of the first transmitted pixel.
    """
    iop = _floats(ds, "ImageOrientationPatient", 6)
    row_cos, col_cos = iop[:3], iop[3:]
    for vec, name in ((row_cos, "row"), (col_cos, "column")):
        if not math.isclose(float(np.linalg.norm(vec)), 1.0, abs_tol=1e-3):
            raise DicomError(f"ImageOrientationPatient {name} cosine is not a unit vector: {vec}")
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise DicomError("ImageOrientationPatient row and column cosines are not orthogonal")
    pixel_spacing = _floats(ds, "PixelSpacing", 2)
    if np.any(pixel_spacing < MIN_SPACING_MM) or np.any(pixel_spacing > MAX_SPACING_MM):
        raise DicomError(f"PixelSpacing must be {MIN_SPACING_MM} to {MAX_SPACING_MM} mm, "
                         f"got {pixel_spacing}")
    position = _floats(ds, "ImagePositionPatient", 3)
    if np.any(np.abs(position) > MAX_POSITION_MM):
        raise DicomError(f"ImagePositionPatient beyond {MAX_POSITION_MM:g} mm: {position}")
    return row_cos, col_cos, pixel_spacing[::-1].copy(), position


def slice_spacing(ds: Dataset) -> float:
    """Distance between slice centres (SpacingBetweenSlices, else SliceThickness), mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value not in (None, ""):
            try:
                spacing = float(value)
            except (TypeError, ValueError) as exc:
                raise DicomError(f"{keyword} is not a number: {value!r}") from exc
            if MIN_SPACING_MM <= spacing <= MAX_SPACING_MM:
                return spacing
    raise DicomError("neither SpacingBetweenSlices nor SliceThickness gives the slice spacing")


def affine_from_lps(row_cos: np.ndarray, col_cos: np.ndarray, spacing: np.ndarray,
                    slice_step: np.ndarray, first_position: np.ndarray) -> np.ndarray:
    """Voxel (i=column, j=row, k=slice) -> RAS+ mm affine from LPS geometry.

    Parameters
    ----------
    row_cos, col_cos : (3,) LPS unit vectors
    spacing : (2,) mm, spacing along i and along j
    slice_step : (3,) LPS mm, displacement from slice k to slice k+1
    first_position : (3,) LPS mm, centre of voxel (0, 0, 0)
    """
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[0]
    lps[:3, 1] = col_cos * spacing[1]
    lps[:3, 2] = slice_step
    lps[:3, 3] = first_position
    return LPS_TO_RAS @ lps


#: Patient directions of the RAS+ axes: (toward negative, toward positive).
WORLD_DIRECTIONS = (("L", "R"), ("P", "A"), ("I", "S"))


def world_axis(affine: np.ndarray, axis: int) -> tuple[int, int]:
    """(closest RAS+ axis 0-2, sign +-1) of voxel ``axis`` of an image with ``affine``."""
    world, sign = nib.orientations.io_orientation(affine)[axis]
    return int(world), int(sign)


def phase_encoding_world(direction: str, affine: np.ndarray) -> tuple[int, int]:
    """A BIDS PhaseEncodingDirection (``i``, ``j-``...) as (RAS+ axis, sign): comparable
    between two readers that orient the same image differently (dcm2niix flips rows)."""
    world, sign = world_axis(affine, "ijk".index(direction[0]))
    return world, -sign if direction.endswith("-") else sign


def phase_encoding_label(direction: str, affine: np.ndarray) -> str:
    """A BIDS PhaseEncodingDirection as the console names it: ``A>>P`` for phase encoded
    from anterior toward posterior (Siemens' notation; dcm2niix's ``AP``)."""
    world, sign = phase_encoding_world(direction, affine)
    start, end = WORLD_DIRECTIONS[world] if sign > 0 else WORLD_DIRECTIONS[world][::-1]
    return f"{start}>>{end}"


def slice_times_world(times: np.ndarray, affine: np.ndarray) -> tuple[int, np.ndarray]:
    """(RAS+ axis of the slices, slice times ordered along it increasing): comparable
    between two readers that stack the slices in opposite orders."""
    world, sign = world_axis(affine, 2)
    times = np.asarray(times, dtype=np.float64)
    return world, (times if sign > 0 else times[::-1])


def acquisition_time(ds: Dataset) -> float | None:
    """Acquisition time as seconds since the epoch, None if the header has none.

    DICOM dates and times carry no time zone; they are read as the local time of the
    machine running rtsc (scanner and rtsc share a clock in practice).
    """
    stamp = ds.get("AcquisitionDateTime")
    if stamp:
        return _parse_datetime(str(stamp)[:8], str(stamp)[8:])
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"),
                             ("ContentDate", "ContentTime"), ("SeriesDate", "AcquisitionTime")):
        date, tod = ds.get(date_kw), ds.get(time_kw)
        if date and tod:
            return _parse_datetime(str(date), str(tod))
    return None


def _parse_datetime(date: str, tod: str) -> float | None:
    try:
        ymd = date.strip()[:8]
        if len(ymd) != 8 or not ymd.isdigit():  # as strptime's %Y%m%d, at a tenth the cost
            raise ValueError(f"not a DICOM date: {date!r}")
        midnight = _local_midnight(int(ymd[:4]), int(ymd[4:6]), int(ymd[6:8]))
        tod = tod.strip().split("+")[0].split("-")[0]
        whole, _, frac = tod.partition(".")
        whole = whole.ljust(6, "0")
        seconds = int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6])
        fraction = float("0." + frac) if frac else 0.0
    except ValueError:
        return None
    return midnight + seconds + fraction


@functools.lru_cache(maxsize=64)
def _local_midnight(year: int, month: int, day: int) -> float:
    """Seconds since the epoch of local midnight starting a date (``time.mktime``),
    kept: every image and frame of a session has the same date, and mktime was a
    tenth of a multi-frame file's per-frame times.

    Raises
    ------
    ValueError
        Not a date.
    """
    return time.mktime(dt.datetime(year, month, day).timetuple())


def int_or_none(value: Any) -> int | None:
    """An integer from an IS element, or None when absent or malformed."""
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
