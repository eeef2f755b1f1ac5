"""DICOM output of the simulated scanner: single-slice MR images (Siemens, or Philips
classic), and Siemens mosaics.

A volume is ``data`` of shape (nx, ny, nz), int16 or uint16, with ``affine`` (4, 4)
float64 mapping voxel (i, j, k) -> RAS+ mm. DICOM works in LPS (x and y negated). The
pixel array of slice k (Rows x Columns) is ``data[:, :, k].T``: the DICOM column index
is i and the row index is j. Hence

* ImageOrientationPatient = LPS direction of ``affine[:3, 0]`` (row cosine: direction of
  increasing column index), then of ``affine[:3, 1]`` (column cosine);
* PixelSpacing = [|affine[:3, 1]| (between rows), |affine[:3, 0]| (between columns)];
* ImagePositionPatient of slice k = LPS of ``affine @ [0, 0, k, 1]``;
* the k axis must point along +cross(row cosine, column cosine) in LPS, i.e. along the
  DICOM slice normal (equivalently det(affine[:3, :3]) > 0), so slice positions increase
  along the normal. Other affines raise ``ValueError``.

Siemens mosaic conventions (as read by nibabel's ``MosaicWrapper`` and dcm2niix):

* the nz slices are tiled row-major in an m x m grid, m = ceil(sqrt(nz)), slice k at
  tile row ``k // m`` and tile column ``k % m``; unused tiles are zero;
* ImagePositionPatient is that of the whole mosaic seen as one big image of
  (m ny) x (m nx) pixels whose *centre* coincides with the centre of slice 0; the
  readers recover slice 0's corner by adding ``(m - 1) nx / 2`` columns and
  ``(m - 1) ny / 2`` rows;
* the CSA image header's SliceNormalVector gives the direction of increasing k (the
  readers flip the slice axis when it disagrees with the IOP cross product);
* dcm2niix takes any (0019,xx29) MosaicRefAcqTimes with nz values as a mosaic of nz
  slices, so single-slice images carry slice times only in their CSA header;
* the CSA items are padded to 6 per tag as Siemens does: dcm2niix reads 3 items of
  some scalar tags unconditionally (and crashed on unpadded headers).

Philips classic single-slice conventions (:func:`volume_to_philips_slices`; the tags
dcm2niix's Philips notes and reader document):

* files are numbered slice by slice across time: InstanceNumber ``k * nt + t + 1``, so
  InstanceNumber 1, 2, 3 are slice 0 at the first three time points;
  TemporalPositionIdentifier is the time point (``t + 1``), NumberOfTemporalPositions the
  run length; AcquisitionNumber is the same for every image of the series;
* FFE-EPI BOLD says ScanningSequence ``GR`` (not ``EP``), SequenceVariant ``SK``,
  MRAcquisitionType ``2D``, EchoTrainLength = the EPI factor, ImageType
  ``ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE``; the EPI is told by the private block ``Philips
  Imaging DD 001`` (2001,xx): Scanning Technique Description ``FEEPI`` (xx20), EPI Factor
  (xx13), Number of Slices MR (xx18), Slice Number MR (xx0A), Number of Dynamic Scans
  (xx81); and ``Philips MR Imaging DD 001`` (2005,xx): scale slope (xx0E), repetition
  time (xx30), dynamic scan begin time (xxA0);
* no ImagesInAcquisition: the slice count is in (2001,xx18), where dcm2niix reads it.

nibabel's ``wrapper_from_data(ds).get_data()`` is indexed (row, column, slice), i.e.
it equals ``data.transpose(1, 0, 2)``, and ``wrapper.affine`` maps that index order to
LPS: ``diag(-1, -1, 1, 1) @ wrapper.affine @ P`` (P swapping the first two axes) is
our affine.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from simulator.dicom_series import (
    MR_IMAGE_STORAGE,
    PHILIPS,
    SeriesInfo,
    _check_info,
    _check_volume,
    _dicom_datetime,
    _ds,
    _ds_list,
    _Geometry,
    _slice_times,
)
from simulator.siemens_csa import CsaElements, encode_csa2, is_siemens, siemens_private

logger = logging.getLogger(__name__)

_PHILIPS_CREATOR_IMAGING = "Philips Imaging DD 001"
_PHILIPS_CREATOR_MR = "Philips MR Imaging DD 001"


def _base_dataset(info: SeriesInfo, geom: _Geometry, shape: tuple[int, ...],
                  dtype: np.dtype, index: int) -> Dataset:
    """Every module shared by the images of a volume (no instance, times, plane, pixels)."""
    nx, ny, nz = shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RTSC_SIM"

    ds = Dataset()
    ds.file_meta = meta
    series_date, series_time, tz = _dicom_datetime(info.start_time)
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.TimezoneOffsetFromUTC = tz
    # General study, patient
    ds.StudyDate, ds.StudyTime = series_date, series_time
    ds.SeriesDate, ds.SeriesTime = series_date, series_time
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = info.manufacturer
    ds.InstitutionName = "rtsc simulator"
    ds.ReferringPhysicianName = ""
    ds.StationName = "RTSCSIM"
    ds.StudyDescription = "rtsc simulation"
    ds.SeriesDescription = info.series_description
    ds.ManufacturerModelName = "rtsc simulator"
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = "O"
    ds.PatientAge = "040Y"
    ds.PatientWeight = "70"
    # MR acquisition parameters
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"epfid2d1_{nx}"
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(geom.slice_spacing)
    ds.RepetitionTime = _ds(info.tr_s * 1000.0)
    ds.EchoTime = _ds(info.te_s * 1000.0)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = _ds(geom.slice_spacing)
    ds.NumberOfPhaseEncodingSteps = str(ny)
    ds.EchoTrainLength = "1"
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = _ds(100.0 * ny * geom.row_spacing / (nx * geom.col_spacing))
    ds.PixelBandwidth = "2232"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "syngo MR E11 (rtsc simulator)"
    ds.ProtocolName = info.series_description
    ds.AcquisitionMatrix = [nx, 0, 0, ny]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = "90"
    ds.VariableFlipAngleFlag = "N"
    ds.PatientPosition = "HFS"
    # General series / image, frame of reference
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = str(info.series_number)
    ds.AcquisitionNumber = str(index + 1)
    ds.ImageOrientationPatient = _ds_list(np.concatenate([geom.row_cosine, geom.col_cosine]))
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.TemporalPositionIdentifier = str(index + 1)
    if info.n_volumes is not None:
        ds.NumberOfTemporalPositions = str(info.n_volumes)
    ds.PositionReferenceIndicator = ""
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if dtype == np.dtype(np.int16) else 0
    ds.PixelSpacing = _ds_list([geom.row_spacing, geom.col_spacing])
    return ds


def _set_instance(ds: Dataset, t_acq: float) -> None:
    """Give an image a fresh SOPInstanceUID and its acquisition time (epoch s)."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    date, tm, _ = _dicom_datetime(t_acq)
    ds.AcquisitionDate, ds.AcquisitionTime = date, tm
    ds.ContentDate, ds.ContentTime = date, tm
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, tm


def _clone(template: Dataset) -> Dataset:
    """Copy of a dataset sharing no mutable value (much faster than ``deepcopy``)."""
    out = Dataset()
    meta = FileMetaDataset()
    for src, dst in ((template.file_meta, meta), (template, out)):
        for elem in src:
            if isinstance(elem.value, MultiValue):
                dst.add(DataElement(elem.tag, elem.VR, list(elem.value)))
            else:  # str, int, float, bytes, UID, PersonName: immutable
                dst.add(copy.copy(elem))
    out.file_meta = meta
    return out


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"


def volume_to_slices(data: np.ndarray, affine: np.ndarray, info: SeriesInfo,
                     index: int) -> list[Dataset]:
    """One single-slice MR Image Storage dataset per slice of a volume.

    Parameters
    ----------
    data : (nx, ny, nz) int16 or uint16
        The volume; slice k's pixel array is ``data[:, :, k].T``.
    affine : (4, 4) float64, voxel -> RAS+ mm
        Its k axis must point along the DICOM slice normal (see module docstring).
    info : SeriesInfo
        Series description.
    index : int
        0-based volume index; AcquisitionNumber and TemporalPositionIdentifier are
        ``index + 1``.

    Returns
    -------
    list of pydicom.Dataset
        nz datasets in slice order k = 0..nz-1, each with ``file_meta`` (Explicit VR
        Little Endian), InstanceNumber ``index * nz + k + 1``, ImagesInAcquisition nz,
        SliceLocation (mm along the normal) and AcquisitionTime
        ``start_time + index * tr_s + slice_times_s[k]``. When the manufacturer is
        Siemens they also carry the Siemens private elements and CSA headers of a
        non-mosaic EPI (MosaicRefAcqTimes, SliceNormalVector, ASCCONV protocol; no
        NumberOfImagesInMosaic), from which dcm2niix takes the slice timing.

    Raises
    ------
    ValueError
        Bad dtype, shape, affine (shear, slice tilt, k against the normal) or times.
    """
    data, geom = _check_volume(data, affine)
    _check_info(info, index)
    nz = data.shape[2]
    times = _slice_times(info, nz)
    t0 = info.start_time + index * info.tr_s
    template = _base_dataset(info, geom, data.shape, data.dtype, index)
    template.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    template.ImagesInAcquisition = str(nz)
    csa_image: CsaElements = []
    if is_siemens(info):
        private, csa_image = siemens_private(data.shape, geom, info, times, index,
                                              mosaic=False)
        template.update(private)
    out = []
    for k in range(nz):
        ds = _clone(template)
        _set_instance(ds, t0 + times[k])
        if csa_image:  # ProtocolSliceNumber differs per slice
            ds[0x0029, 0x1010].value = encode_csa2(
                [(n, vr, [str(k)] if n == "ProtocolSliceNumber" else v)
                 for n, vr, v in csa_image])
        ds.InstanceNumber = str(index * nz + k + 1)
        position = geom.slice_position(k)
        ds.ImagePositionPatient = _ds_list(position)
        ds.SliceLocation = _ds(position @ geom.normal)
        _set_pixels(ds, data[:, :, k].T)
        out.append(ds)
    return out


def _philips_private(shape: tuple[int, ...], geom: _Geometry, info: SeriesInfo,
                     index: int) -> Dataset:
    """Philips private elements of one FFE-EPI image (the slice number is set per slice)."""
    nx, ny, nz = shape
    assert info.n_volumes is not None
    ds = Dataset()
    imaging = ds.private_block(0x2001, _PHILIPS_CREATOR_IMAGING, create=True)
    imaging.add_new(0x08, "IS", "1")  # Phase Number
    imaging.add_new(0x0A, "IS", "1")  # Slice Number MR (1-based)
    imaging.add_new(0x0B, "CS", ("SAGITTAL", "CORONAL", "TRANSVERSAL")[
        int(np.argmax(np.abs(geom.normal)))])  # Slice Orientation
    imaging.add_new(0x12, "CS", "Y")  # Dynamic Series
    imaging.add_new(0x13, "SL", ny)  # EPI Factor: one echo per phase-encoding line
    imaging.add_new(0x14, "SL", 1)  # Number of Echoes
    imaging.add_new(0x17, "SL", 1)  # Number of Phases MR
    imaging.add_new(0x18, "SL", nz)  # Number of Slices MR
    imaging.add_new(0x20, "LO", "FEEPI")  # Scanning Technique Description MR
    imaging.add_new(0x81, "IS", str(info.n_volumes))  # Number of Dynamic Scans
    mr = ds.private_block(0x2005, _PHILIPS_CREATOR_MR, create=True)
    mr.add_new(0x0E, "FL", 1.0)  # scale slope: FP = DV / (rescale slope x scale slope)
    mr.add_new(0x30, "FL", [info.tr_s * 1000.0, 0.0])  # repetition time(s), ms
    mr.add_new(0x6F, "CS", "2D")  # acquisition type
    mr.add_new(0xA0, "FL", index * info.tr_s)  # dynamic scan begin time, s
    return ds


def volume_to_philips_slices(data: np.ndarray, affine: np.ndarray, info: SeriesInfo,
                             index: int) -> list[Dataset]:
    """One Philips classic single-slice MR Image Storage dataset per slice of a volume.

    Parameters
    ----------
    data : (nx, ny, nz) int16 or uint16
        The volume; slice k's pixel array is ``data[:, :, k].T``.
    affine : (4, 4) float64, voxel -> RAS+ mm
        Its k axis must point along the DICOM slice normal (see module docstring).
    info : SeriesInfo
        Series description; ``n_volumes`` must be set (Philips numbers its files slice
        by slice across the whole run). Manufacturer is Philips whatever it says.
    index : int
        0-based volume index (time point).

    Returns
    -------
    list of pydicom.Dataset
        nz datasets in slice order k = 0..nz-1 (the order of acquisition within the
        volume), laid out as Philips writes them (see the module docstring):
        InstanceNumber ``k * n_volumes + index + 1``, TemporalPositionIdentifier
        ``index + 1``, ScanningSequence GR, the Philips private elements; rescale slope 1
        and intercept 0, so the stored values are ``data``.

    Raises
    ------
    ValueError
        ``info.n_volumes`` unset; bad dtype, shape, affine or times.
    """
    if info.n_volumes is None:
        raise ValueError("a Philips classic series needs info.n_volumes: its files are "
                         "numbered slice by slice across the whole run")
    data, geom = _check_volume(data, affine)
    _check_info(info, index)
    nz = data.shape[2]
    times = _slice_times(info, nz)
    t0 = info.start_time + index * info.tr_s
    template = _base_dataset(info, geom, data.shape, data.dtype, index)
    template.Manufacturer = PHILIPS
    template.ManufacturerModelName = "Ingenia (rtsc simulator)"
    template.SoftwareVersions = "5.7.1 (rtsc simulator)"
    template.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    template.ScanningSequence = "GR"
    template.SequenceVariant = "SK"
    template.ScanOptions = "OTHER"
    del template.SequenceName  # Philips leaves it out
    template.EchoTrainLength = str(data.shape[1])  # the EPI factor
    template.AcquisitionNumber = str(info.series_number)  # one number for the series
    template.RescaleIntercept = "0"
    template.RescaleSlope = "1"
    template.update(_philips_private(data.shape, geom, info, index))
    out = []
    for k in range(nz):
        ds = _clone(template)
        _set_instance(ds, t0 + times[k])
        ds.private_block(0x2001, _PHILIPS_CREATOR_IMAGING)[0x0A].value = str(k + 1)
        ds.InstanceNumber = str(k * info.n_volumes + index + 1)
        position = geom.slice_position(k)
        ds.ImagePositionPatient = _ds_list(position)
        ds.SliceLocation = _ds(position @ geom.normal)
        _set_pixels(ds, data[:, :, k].T)
        out.append(ds)
    return out


def mosaic_shape(nx: int, ny: int, nz: int) -> tuple[int, int, int]:
    """Return (tiles per side m, Rows, Columns) of the mosaic of an (nx, ny, nz) volume."""
    m = int(math.ceil(math.sqrt(nz)))
    return m, m * ny, m * nx


def volume_to_mosaic(data: np.ndarray, affine: np.ndarray, info: SeriesInfo,
                     index: int) -> Dataset:
    """One Siemens mosaic MR Image Storage dataset holding a whole volume.

    Parameters
    ----------
    data : (nx, ny, nz) int16 or uint16
        The volume.
    affine : (4, 4) float64, voxel -> RAS+ mm
        Its k axis must point along the DICOM slice normal (see module docstring).
    info : SeriesInfo
        Series description.
    index : int
        0-based volume index; InstanceNumber, AcquisitionNumber and
        TemporalPositionIdentifier are ``index + 1``.

    Returns
    -------
    pydicom.Dataset
        Rows = m ny, Columns = m nx with m = ceil(sqrt(nz)); ImageType ends in
        ``MOSAIC``; AcquisitionTime is the volume start ``start_time + index * tr_s``;
        Siemens private elements (0019,xx0A/0B/29), (0051,xx0B) and the CSA image and
        series headers (0029,xx10/20), the latter with an ASCCONV protocol block.
        MosaicRefAcqTimes are the slice times in ms. Manufacturer is SIEMENS whatever
        ``info.manufacturer`` says.

    Raises
    ------
    ValueError
        Bad dtype, shape, affine or times.
    """
    data, geom = _check_volume(data, affine)
    _check_info(info, index)
    nx, ny, nz = data.shape
    times = _slice_times(info, nz)
    t0 = info.start_time + index * info.tr_s
    m, rows, cols = mosaic_shape(nx, ny, nz)

    ds = _base_dataset(info, geom, data.shape, data.dtype, index)
    _set_instance(ds, t0)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    if not is_siemens(info):
        ds.Manufacturer = "SIEMENS"  # a mosaic only makes sense with Siemens privates
    ds.InstanceNumber = str(index + 1)
    # Siemens: the position of a (rows x cols) image centred on slice 0's centre.
    corner = (geom.slice_position(0)
              - geom.row_cosine * geom.col_spacing * (cols - nx) / 2.0
              - geom.col_cosine * geom.row_spacing * (rows - ny) / 2.0)
    ds.ImagePositionPatient = _ds_list(corner)
    ds.SliceLocation = _ds(geom.slice_position(0) @ geom.normal)

    mosaic = np.zeros((rows, cols), dtype=data.dtype)
    for k in range(nz):
        r, c = divmod(k, m)
        mosaic[r * ny:(r + 1) * ny, c * nx:(c + 1) * nx] = data[:, :, k].T
    _set_pixels(ds, mosaic)

    ds.update(siemens_private(data.shape, geom, info, times, index, mosaic=True)[0])
    return ds


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> None:
    """Write a dataset as a DICOM Part 10 file (preamble, file meta), atomically.

    The file is written to a hidden temporary name in the same folder and renamed, so a
    folder watcher never sees a partial file.

    Parameters
    ----------
    ds : pydicom.Dataset
        Dataset with ``file_meta``; its TransferSyntaxUID is set to Explicit VR Little
        Endian if missing.
    path : str or path-like
        Destination file.
    """
    path = Path(path)
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("wrote %s", path)
