"""Enhanced MR multi-frame datasets (Siemens XA, Philips, ...) -> volumes.

An enhanced MR image holds many frames, each a 2D slice whose geometry, rescale and
timing live in its per-frame functional group (or in the shared one when equal for
all frames). Frames may come in any order and one file may hold one volume (Siemens XA:
one file per volume) or several (Philips, the nibabel test file). Frames are grouped
into volumes by their temporal position (the Dimension Index Values entry pointing at
TemporalPositionIndex, else the frame's TemporalPositionIndex) and placed along the
slice normal by their ImagePositionPatient, so neither the frame order nor the
In-Stack Position Number convention matters. Multi-echo files (frames with several
effective echo times, as Siemens XA and Philips write them) give one volume per echo and
time point: echo ``e`` is the ``e``-th shortest echo time of the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.geometry import (
    _parse_datetime,
    affine_from_lps,
    int_or_none,
    plane_geometry,
    slice_spacing,
)
from rtsc.dicom.frame_groups import per_frame_groups
from rtsc.dicom.rescale import checked_rescale
from rtsc.errors import DicomError

#: SOP classes read as enhanced multi-frame MR.
MULTIFRAME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
})
_TEMPORAL_POSITION_INDEX = 0x00209128
_POSITION_TOL_MM = 1e-2


@dataclass(frozen=True)
class FrameVolume:
    """One volume taken out of a multi-frame dataset.

    Attributes
    ----------
    number : int
        1-based temporal position of the volume in its series.
    data : (nx, ny, nz) float32, Fortran-ordered, rescaled
    affine : (4, 4) float64, voxel -> RAS+ mm
    slice_times_s : (nz,) float64 or None
        Acquisition time of each slice relative to the earliest, seconds (from
        FrameAcquisitionDateTime), None when the frames carry no time.
    t_acquired : float or None
        Earliest frame acquisition time, seconds since the epoch.
    stored_dtype : numpy dtype of the stored pixels (float32 once rescaled)
    echo : int or None
        1-based echo (by increasing echo time) of a multi-echo file, None for one echo.
    echo_time_s : float or None
        Its effective echo time, seconds.
    """

    number: int
    data: np.ndarray
    affine: np.ndarray
    slice_times_s: np.ndarray | None
    t_acquired: float | None
    stored_dtype: np.dtype
    echo: int | None = None
    echo_time_s: float | None = None


def _item(ds: Dataset, frame: Any, sequence: str) -> Any:
    """First item of a functional group macro, per-frame first, then shared.

    ``frame`` is a per-frame item: a pydicom Dataset, or a dict from
    :func:`rtsc.dicom.frame_groups.per_frame_groups`.
    """
    if frame is not None:
        seq = frame.get(sequence)
        if seq:
            return seq[0]
    shared = _shared(ds)  # only when the frame lacks it: each pydicom access costs ~10 us
    if shared is not None:
        seq = shared.get(sequence)
        if seq:
            return seq[0]
    return None


def _shared(ds: Dataset) -> Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def repetition_time_ms(ds: Dataset) -> float | None:
    """RepetitionTime of an enhanced MR image (top level or the MR timing macro), ms."""
    value = ds.get("RepetitionTime")
    if value in (None, ""):
        frames = ds.get("PerFrameFunctionalGroupsSequence")
        timing = _item(ds, frames[0] if frames else None,
                       "MRTimingAndRelatedParametersSequence")
        value = timing.get("RepetitionTime") if timing is not None else None
    try:
        tr = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return tr if tr is not None and tr > 0 else None


def _temporal_dimension(ds: Dataset) -> int | None:
    """Index into DimensionIndexValues of the TemporalPositionIndex dimension, or None."""
    for i, dim in enumerate(ds.get("DimensionIndexSequence") or []):
        pointer = dim.get("DimensionIndexPointer")
        if pointer is not None and int(pointer) == _TEMPORAL_POSITION_INDEX:
            return i
    return None


def _frame_temporal(content: Dataset | None, dimension: int | None) -> int | None:
    if content is None:
        return None
    if dimension is not None:
        values = content.get("DimensionIndexValues")
        if values is not None:
            values = list(values) if not isinstance(values, int) else [values]
            if dimension < len(values):
                return int(values[dimension])
    return int_or_none(content.get("TemporalPositionIndex"))


def _frame_time(content: Dataset | None) -> float | None:
    stamp = content.get("FrameAcquisitionDateTime") if content is not None else None
    if not stamp:
        return None
    return _parse_datetime(str(stamp)[:8], str(stamp)[8:])


def _echo_time(ds: Dataset, frame: Dataset | None) -> float | None:
    echo = _item(ds, frame, "MREchoSequence")
    value = echo.get("EffectiveEchoTime") if echo is not None else None
    return float(value) if value not in (None, "") else None


@dataclass
class _Frame:
    k_position: float
    ipp: np.ndarray
    pixels: np.ndarray
    slope: float
    intercept: float
    t: float | None


def _rescale_of(ds: Dataset, frame: Dataset | None, dtype: np.dtype,
                where: str = "") -> tuple[float, float]:
    """(slope, intercept) of a frame: its pixel value transformation, else the shared one,
    else the top level's; checked as a mosaic's are (:mod:`rtsc.dicom.rescale`: 0, NaN
    and values float32 cannot carry are refused, not taken as 1)."""
    transform = _item(ds, frame, "PixelValueTransformationSequence")
    values = []
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = transform.get(keyword) if transform is not None else None
        values.append(ds.get(keyword) if value is None or value == "" else value)
    return checked_rescale(*values, dtype, where)


def _position(ds: Dataset, frame: Dataset) -> np.ndarray:
    """ImagePositionPatient (3,) LPS mm of one frame."""
    item = _item(ds, frame, "PlanePositionSequence")
    value = item.get("ImagePositionPatient") if item is not None else None
    try:
        ipp = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DicomError(f"multi-frame image: bad ImagePositionPatient {value!r}") from exc
    if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
        raise DicomError(f"multi-frame image: bad ImagePositionPatient {value!r}")
    return ipp


def _plane_values(ds: Dataset, frame: Any) -> tuple[Any, Any]:
    """(ImageOrientationPatient, PixelSpacing) values of a frame as stored, unconverted."""
    orientation = _item(ds, frame, "PlaneOrientationSequence")
    measures = _item(ds, frame, "PixelMeasuresSequence")
    return (orientation.get("ImageOrientationPatient") if orientation is not None else None,
            measures.get("PixelSpacing") if measures is not None else None)


def _geometry_of(ds: Dataset, frame: Dataset | None) -> Dataset:
    """A flat dataset with the plane tags of one frame, for :func:`plane_geometry`."""
    flat = Dataset()
    orientation = _item(ds, frame, "PlaneOrientationSequence")
    position = _item(ds, frame, "PlanePositionSequence")
    measures = _item(ds, frame, "PixelMeasuresSequence")
    if orientation is None or position is None or measures is None:
        raise DicomError("multi-frame image without plane orientation, plane position or "
                         "pixel measures functional groups")
    flat.ImageOrientationPatient = orientation.get("ImageOrientationPatient")
    flat.ImagePositionPatient = position.get("ImagePositionPatient")
    flat.PixelSpacing = measures.get("PixelSpacing")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if measures.get(keyword) not in (None, ""):
            setattr(flat, keyword, measures.get(keyword))
    return flat


def multiframe_volumes(ds: Dataset, pixels: np.ndarray, fallback_number: int,
                       max_slices: int | None = None,
                       max_volumes: int | None = None) -> list[FrameVolume]:
    """Split a multi-frame dataset into volumes.

    Parameters
    ----------
    ds : pydicom Dataset, an enhanced MR image
    pixels : (n_frames, rows, cols) stored pixel values (any integer or float dtype)
    fallback_number : int
        1-based volume number for a file holding one temporal position (Siemens XA
        writes one file per volume and numbers files, not frames).
    max_slices, max_volumes : int or None
        ``assembler.max_slices`` and ``session.max_volumes``: more frames in one
        temporal position, or a temporal position beyond, is refused (None: no cap).

    Returns
    -------
    list of FrameVolume in increasing temporal position, echoes of one time point in
    increasing echo time.

    Raises
    ------
    DicomError
        Missing functional groups, frames of one volume with different orientations,
        irregular slice spacing, unequal slice counts between volumes, an unusable
        rescale (:mod:`rtsc.dicom.rescale`); (code ``implausible_header``) counts beyond
        the caps.
    """
    frames = per_frame_groups(ds)
    n_frames = pixels.shape[0]
    if not frames or len(frames) != n_frames:
        raise DicomError(f"multi-frame image: {len(frames) if frames else 0} per-frame "
                         f"functional groups for {n_frames} frames")
    dimension = _temporal_dimension(ds)
    shared_echo = _echo_time(ds, None)
    shared_rescale = _rescale_of(ds, None, pixels.dtype)
    frame_echo = [_echo_time(ds, f) if "MREchoSequence" in f else shared_echo for f in frames]
    echo_times = sorted({te for te in frame_echo if te is not None})
    if len(echo_times) > 1 and None in frame_echo:
        raise DicomError("multi-frame image: some frames have an echo time, some not")
    echo_rank = {te: rank + 1 for rank, te in enumerate(echo_times)} \
        if len(echo_times) > 1 else {}
    reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    spacing_hint: float | None = None
    groups: dict[tuple[int | None, int | None], list[_Frame]] = {}
    # Frames that only carry their position, or the first frame's very orientation and
    # spacing values, share its plane: check the full geometry once, then read just
    # ImagePositionPatient (plane_geometry on a flat pydicom dataset costs ~0.1 ms per
    # frame; a volume has ~100 frames).
    own_plane = ("PlaneOrientationSequence", "PixelMeasuresSequence")
    reference_plane: tuple[Any, Any] | None = None
    reference_normal = np.zeros(3)
    for index, frame in enumerate(frames):
        flat: Dataset | None = None
        if reference is not None and (not any(k in frame for k in own_plane)
                                      or _plane_values(ds, frame) == reference_plane):
            ipp = _position(ds, frame)  # the plane is frame 1's: nothing to compare
            normal = reference_normal
        else:
            flat = _geometry_of(ds, frame)
            row_cos, col_cos, spacing, ipp = plane_geometry(flat)
            normal = np.cross(row_cos, col_cos)
        if reference is None:
            assert flat is not None
            reference = (row_cos, col_cos, spacing)
            reference_normal = normal
            values = _plane_values(ds, frame)
            reference_plane = values if None not in values else None
            try:
                spacing_hint = slice_spacing(flat)
            except DicomError:
                spacing_hint = None
        elif flat is not None and not (np.allclose(row_cos, reference[0], atol=1e-4)
                                       and np.allclose(col_cos, reference[1], atol=1e-4)
                                       and np.allclose(spacing, reference[2], atol=1e-4)):
            raise DicomError(f"multi-frame image: frame {index + 1} has another orientation "
                             "or pixel spacing than frame 1")
        slope, intercept = _rescale_of(ds, frame, pixels.dtype, f" of frame {index + 1}") \
            if "PixelValueTransformationSequence" in frame else shared_rescale
        content = frame.get("FrameContentSequence")
        content = content[0] if content else None
        key = (_frame_temporal(content, dimension), echo_rank.get(frame_echo[index]))
        groups.setdefault(key, []).append(
            _Frame(float(ipp @ normal), ipp, pixels[index], slope, intercept,
                   _frame_time(content)))
    assert reference is not None
    temporals = {temporal for temporal, _ in groups}
    if None in temporals and len(temporals) > 1:
        raise DicomError("multi-frame image: some frames have a temporal position, some not")
    single = len(temporals) == 1
    _check_counts(groups, single, max_slices, max_volumes)
    out = []
    n_slices = None
    for (temporal, echo), members in sorted(groups.items(),
                                            key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)):
        number = fallback_number if single or temporal is None else int(temporal)
        if n_slices is not None and len(members) != n_slices:
            raise DicomError(f"multi-frame image: temporal position {temporal} has "
                             f"{len(members)} frames, others {n_slices}")
        n_slices = len(members)
        volume = _volume(members, reference, spacing_hint, number, pixels.dtype)
        if echo is not None:
            volume = dataclasses.replace(volume, echo=echo,
                                         echo_time_s=echo_times[echo - 1] / 1000.0)
        out.append(volume)
    return out


def _check_counts(groups: dict[tuple[int | None, int | None], list[Any]], single: bool,
                  max_slices: int | None, max_volumes: int | None) -> None:
    """Refuse (before any volume is built) more frames per temporal position than
    ``max_slices`` and a temporal position beyond ``max_volumes``."""
    largest = max(len(members) for members in groups.values())
    if max_slices is not None and largest > max_slices:
        raise DicomError(f"multi-frame image: {largest} frames in one temporal position "
                         f"(NumberOfFrames (0028,0008) {sum(map(len, groups.values()))}), "
                         f"more slices than assembler.max_slices ({max_slices})",
                         code="implausible_header")
    numbers = [t for t, _ in groups if t is not None]
    if not single and numbers and max_volumes is not None and max(numbers) > max_volumes:
        raise DicomError(f"multi-frame image: TemporalPositionIndex (0020,9128) {max(numbers)} "
                         f"numbers a volume beyond session.max_volumes ({max_volumes})",
                         code="implausible_header")


def _volume(members: list[_Frame], reference: tuple[np.ndarray, np.ndarray, np.ndarray],
            spacing_hint: float | None, number: int, dtype: np.dtype) -> FrameVolume:
    row_cos, col_cos, spacing = reference
    members = sorted(members, key=lambda f: f.k_position)
    positions = np.array([f.k_position for f in members])
    n = len(members)
    if n > 1:
        gaps = np.diff(positions)
        if np.any(gaps < _POSITION_TOL_MM):
            raise DicomError(f"multi-frame volume {number}: two frames at one slice position")
        if np.ptp(gaps) > _POSITION_TOL_MM:
            raise DicomError(f"multi-frame volume {number}: irregular slice spacing "
                             f"({gaps.min():.3f}..{gaps.max():.3f} mm)")
        step = (members[-1].ipp - members[0].ipp) / (n - 1)
    else:
        if spacing_hint is None:
            raise DicomError("one-frame volume without a slice thickness")
        step = np.cross(row_cos, col_cos) * spacing_hint
    rows, cols = members[0].pixels.shape
    data = np.empty((cols, rows, n), dtype=np.float32, order="F")
    by_slice = data.T  # (nz, rows, cols) C-contiguous view
    for k, frame in enumerate(members):
        by_slice[k] = frame.pixels
    slopes = np.array([f.slope for f in members], dtype=np.float32)
    intercepts = np.array([f.intercept for f in members], dtype=np.float32)
    rescaled = bool(np.any(slopes != 1.0) or np.any(intercepts != 0.0))
    if rescaled:
        by_slice *= slopes[:, None, None]
        by_slice += intercepts[:, None, None]
    affine = affine_from_lps(row_cos, col_cos, spacing, step, members[0].ipp)
    times = [f.t for f in members]
    slice_times = None
    t_acquired = None
    if all(t is not None for t in times):
        t_arr = np.array(times, dtype=np.float64)
        t_acquired = float(t_arr.min())
        slice_times = t_arr - t_acquired
    return FrameVolume(number=number, data=data, affine=affine, slice_times_s=slice_times,
                       t_acquired=t_acquired,
                       stored_dtype=np.dtype(np.float32) if rescaled else np.dtype(dtype))


def first_volume_frames(ds: Dataset) -> list[int]:
    """Indices (0-based) of the frames of the earliest temporal position of ``ds`` (its
    first echo, in a multi-echo file), in the k order :func:`multiframe_volumes` stacks
    them (ascending position along the normal of the first frame's plane). Header only:
    no pixel data needed.

    Raises
    ------
    DicomError
        No per-frame functional groups, or a frame without plane orientation/position.
    """
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        raise DicomError("multi-frame image without per-frame functional groups")
    row_cos, col_cos, _spacing, _ipp = plane_geometry(_geometry_of(ds, frames[0]))
    normal = np.cross(row_cos, col_cos)
    dimension = _temporal_dimension(ds)
    shared_echo = _echo_time(ds, None)
    echo = [_echo_time(ds, f) if "MREchoSequence" in f else shared_echo for f in frames]
    first_echo = min((te for te in echo if te is not None), default=None)
    by_time: dict[int | None, list[int]] = {}
    for index, frame in enumerate(frames):
        if echo[index] != first_echo:
            continue  # a multi-echo file's later echoes repeat echo 1's slices
        content = frame.get("FrameContentSequence")
        by_time.setdefault(_frame_temporal(content[0] if content else None, dimension),
                           []).append(index)
    earliest = by_time[min(by_time, key=lambda t: t or 0)]
    return sorted(earliest, key=lambda i: float(_position(ds, frames[i]) @ normal))


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames of a multi-frame dataset (>= 1)."""
    count: Any = int_or_none(ds.get("NumberOfFrames"))
    if not count or count <= 0:
        raise DicomError("multi-frame image without NumberOfFrames")
    return int(count)
