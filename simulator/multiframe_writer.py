"""Enhanced MR multi-frame output of the simulated scanner (Siemens XA / Philips style).

One dataset holds ``nt`` volumes of ``nz`` frames (Siemens XA writes ``nt = 1``, one file
per volume; Philips writes a whole series in one file). Frame ``f`` carries, in its
per-frame functional group: Plane Position (ImagePositionPatient of its slice), Frame
Content (FrameAcquisitionDateTime, StackID "1", InStackPositionNumber ``k + 1``,
TemporalPositionIndex ``t + 1`` and DimensionIndexValues ``[1, k + 1, t + 1]``) and MR
Echo. Orientation, pixel measures, rescale and MR timing (RepetitionTime) are shared.
Frames may be written in any order (``frame_order``). Geometry conventions are those of
:mod:`simulator.dicom_writer`: frame pixels of slice k are ``data[:, :, k].T``.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, generate_uid

from simulator.dicom_series import (
    SeriesInfo,
    _check_info,
    _check_volume,
    _dicom_datetime,
    _ds,
    _ds_list,
    _slice_times,
)
from simulator.dicom_writer import _base_dataset, _set_instance

_PIXEL_TAGS_PER_IMAGE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                         "SliceThickness", "SpacingBetweenSlices", "RepetitionTime",
                         "EchoTime", "TemporalPositionIdentifier")


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _datetime(t: float) -> str:
    date, tm, _ = _dicom_datetime(t)
    return date + tm


def volumes_to_multiframe(data: np.ndarray, affine: np.ndarray, info: SeriesInfo,
                          first_index: int = 0,
                          frame_order: np.ndarray | None = None,
                          echo_times_s: tuple[float, ...] | None = None) -> Dataset:
    """One Enhanced MR Image Storage dataset holding ``nt`` volumes (of ``ne`` echoes).

    Parameters
    ----------
    data : (nx, ny, nz), (nx, ny, nz, nt) or, with ``echo_times_s``, (nx, ny, nz, nt, ne)
        int16 or uint16. The volume(s), volume ``t`` is series volume ``first_index + t``.
    affine : (4, 4) float64, voxel -> RAS+ mm, k along the DICOM slice normal
    info : SeriesInfo
    first_index : int
        0-based series index of the first volume; InstanceNumber and AcquisitionNumber
        are ``first_index + 1``.
    frame_order : (nz * nt * ne,) int array or None
        Permutation: frame ``f`` of the file is frame ``frame_order[f]`` of the natural
        order (volume-major, then echo, then slice). None keeps the natural order.
    echo_times_s : tuple of float or None
        Multi-echo (Siemens XA style): the effective echo time of each echo, seconds,
        in each frame's MR Echo macro; None writes one echo at ``info.te_s`` (shared).

    Returns
    -------
    pydicom.Dataset
        With ``file_meta`` (Explicit VR Little Endian), NumberOfFrames ``nz * nt``,
        slice times ``start_time + (first_index + t) * tr_s + slice_times_s[k]``.
    """
    data5 = np.asarray(data)
    if data5.ndim == 3:
        data5 = data5[..., None]
    if data5.ndim == 4:
        data5 = data5[..., None]
    ne = len(echo_times_s) if echo_times_s is not None else 1
    if data5.ndim != 5 or data5.shape[4] != ne:
        raise ValueError(f"data must be (nx, ny, nz[, nt]) or, with {ne} echo times, "
                         f"(nx, ny, nz, nt, {ne}); got {np.shape(data)}")
    data4 = data5[..., 0]
    nx, ny, nz, nt = data4.shape
    _, geom = _check_volume(data4[..., 0], affine)
    for t in range(nt):
        _check_info(info, first_index + t)
    n_frames = nz * nt * ne
    order = np.arange(n_frames) if frame_order is None else np.asarray(frame_order)
    if sorted(order.tolist()) != list(range(n_frames)):
        raise ValueError("frame_order must be a permutation of range(nz * nt * ne)")
    times = _slice_times(info, nz)
    t0 = info.start_time + first_index * info.tr_s

    ds = _base_dataset(info, geom, (nx, ny, nz), data4.dtype, first_index)
    for keyword in _PIXEL_TAGS_PER_IMAGE:
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    _set_instance(ds, t0)
    ds.AcquisitionDateTime = _datetime(t0)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T2_STAR"
    ds.ContentQualification = "PRODUCT"
    ds.InstanceNumber = str(first_index + 1)
    ds.NumberOfFrames = str(n_frames)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.DimensionOrganizationType = "3D_TEMPORAL"
    organisation = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organisation)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=pointer,
              FunctionalGroupPointer=0x00209111)
        for pointer in (0x00209056, 0x00209057, 0x00209128)])
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=_ds_list(
            np.concatenate([geom.row_cosine, geom.col_cosine])))]),
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=_ds_list([geom.row_spacing, geom.col_spacing]),
            SliceThickness=_ds(geom.slice_spacing),
            SpacingBetweenSlices=_ds(geom.slice_spacing))]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(
            RepetitionTime=_ds(info.tr_s * 1000.0), FlipAngle="90", EchoTrainLength="1")]),
    )])
    if echo_times_s is None:
        ds.SharedFunctionalGroupsSequence[0].MREchoSequence = Sequence([_item(
            EffectiveEchoTime=info.te_s * 1000.0)])
    per_frame = []
    pixels = np.empty((n_frames, ny, nx), dtype=data4.dtype.newbyteorder("<"))
    for f, natural in enumerate(order):
        t, rest = divmod(int(natural), nz * ne)
        e, k = divmod(rest, nz)
        stamp = _datetime(t0 + t * info.tr_s + times[k])
        per_frame.append(_item(
            FrameContentSequence=Sequence([_item(
                FrameAcquisitionDateTime=stamp, FrameReferenceDateTime=stamp,
                FrameAcquisitionDuration=float(info.tr_s * 1000.0 / nz),
                StackID="1", InStackPositionNumber=k + 1,
                TemporalPositionIndex=first_index + t + 1,
                DimensionIndexValues=[1, k + 1, first_index + t + 1])]),
            PlanePositionSequence=Sequence([_item(
                ImagePositionPatient=_ds_list(geom.slice_position(k)))]),
        ))
        if echo_times_s is not None:
            per_frame[-1].MREchoSequence = Sequence([_item(
                EffectiveEchoTime=echo_times_s[e] * 1000.0)])
        pixels[f] = data5[:, :, k, t, e].T
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.Rows, ds.Columns = ny, nx
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds
