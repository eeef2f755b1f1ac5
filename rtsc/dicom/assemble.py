"""Assemble datasets into volumes: Siemens mosaics, single-slice series, enhanced multi-frame.

One :class:`Assembler` lives on the pipeline worker. :meth:`Assembler.add` takes an
:class:`~rtsc.dicom.incoming.Incoming` and returns what became ready (volumes in
acquisition order, and alerts); :meth:`Assembler.poll` publishes volumes whose missing
slices did not arrive in time, zero-filled, with a ``missing_slices`` alert.

Counts taken from a header are checked before anything is sized by them (issue 16,
header amplification), each refusal an alert (code ``implausible_header``) naming the
element and its value:

- slices per volume (ImagesInAcquisition, GE's (0021,xx4F), Philips' (2001,xx18),
  NumberOfImagesInMosaic, the frames of one multi-frame time point) at most
  ``assembler.max_slices``; a mosaic's count must also fit its tiles: tiles smaller
  than the acquired matrix (AcquisitionMatrix) mean the header claims more images than
  the mosaic holds, and the file is refused rather than cut into wrong tiles;
- volume numbers (TemporalPositionIdentifier, AcquisitionNumber, InstanceNumber, a
  multi-frame TemporalPositionIndex) at most ``session.max_volumes``;
- the announced run length (NumberOfTemporalPositions, Siemens lRepetitions, Philips'
  dynamics) above ``session.max_volumes`` is ignored (run length unknown) with one
  alert per series; below it, it sizes nothing in advance downstream either.

NumberOfFrames and a mosaic's tiles are bounded by the pixel data itself: a dataset
whose PixelData is shorter than its header's counts need is refused as truncated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from rtsc.config import AssemblerConfig, SeriesFilterConfig, SessionConfig
from rtsc.dicom._mosaic_kernels import unmosaic
from rtsc.dicom.csa import csa_image_header
from rtsc.dicom.geometry import (
    acquisition_time,
    affine_from_lps,
    int_or_none,
    plane_geometry,
    slice_spacing,
)
from rtsc.dicom.multiframe import (
    MULTIFRAME_SOP_CLASSES,
    frame_count,
    multiframe_volumes,
    repetition_time_ms,
)
from rtsc.dicom.numbering import VolumeNumbering, slices_per_volume
from rtsc.dicom.vendor import (MOSAIC_IMAGES, NUMBER_OF_TEMPORAL_POSITIONS, FirstVolume,
                               acquisition_facts, bids_sidecar)
from rtsc.dicom.incoming import Incoming
from rtsc.dicom.recognise import skip_reason
from rtsc.dicom.rescale import checked_rescale
from rtsc.errors import DicomError
from rtsc.ranges import index_ranges, ranges_text
from rtsc.volume import SeriesInfo, Volume, series_id

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_AFFINE_TOL_MM = 1e-3


@dataclass(frozen=True)
class AssemblyAlert:
    """Something the assembler reports instead of (or besides) a volume."""

    level: str
    code: str
    message: str
    series: str | None = None
    index: int | None = None


Event = Union[Volume, AssemblyAlert]


def _pixel_layout(ds: Dataset) -> tuple[int, int, np.dtype]:
    """(rows, columns, stored dtype) of an image's pixel module, checked."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        representation = int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DicomError(f"image pixel module incomplete: {exc}") from exc
    if samples != 1:
        raise DicomError("only single-sample (grey-scale) images are supported")
    if representation not in (0, 1):
        raise DicomError(f"PixelRepresentation must be 0 or 1, got {representation}")
    signed = representation == 1
    if bits not in (8, 16, 32) or rows <= 0 or cols <= 0 or rows * cols > 2**26:
        raise DicomError(f"unsupported pixel layout: {rows}x{cols}, {bits} bits allocated")
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if bits > 8:
        big_endian = ds.file_meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.2" \
            if getattr(ds, "file_meta", None) else False
        dtype = dtype.newbyteorder(">" if big_endian else "<")
    return rows, cols, dtype


def _pixel_array(ds: Dataset, rows: int, cols: int, dtype: np.dtype,
                 frames: int = 1) -> np.ndarray:
    """Stored pixel values (rows, columns) or (frames, rows, columns), checked for size."""
    element = ds.get_item(0x7FE00010)  # raw bytes as received: no decoding
    raw = None if element is None else element.value
    if raw is None:
        raise DicomError("image pixel module incomplete: no PixelData")
    if not isinstance(raw, (bytes, bytearray)):
        raise DicomError(f"PixelData is a {type(raw).__name__}, not bytes")
    expected = rows * cols * frames * dtype.itemsize
    if len(raw) < expected:
        raise DicomError(f"truncated PixelData: {len(raw)} bytes, {expected} expected "
                         f"for {frames}x{rows}x{cols} {dtype}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols * frames)
    arr = _bits_stored(arr.astype(dtype.newbyteorder("="), copy=False), ds)
    return arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


def _bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values without the bits above BitsStored.

    Older Siemens software writes 12 of 16 allocated bits and leaves other data (overlay
    planes) in the 4 above, so a raw 4379 is the pixel value 283 (dcm2niix reads it so).
    Signed values are sign-extended from their high bit.
    """
    stored = int_or_none(ds.get("BitsStored"))
    allocated = arr.dtype.itemsize * 8
    if stored is None or not 0 < stored < allocated:
        return arr
    if arr.dtype.kind == "u":
        return np.bitwise_and(arr, arr.dtype.type((1 << stored) - 1))
    shift = arr.dtype.type(allocated - stored)
    return np.right_shift(np.left_shift(arr, shift), shift)


def _pixels(ds: Dataset, frames: int = 1) -> np.ndarray:
    """Stored pixel values (rows, columns) or (frames, rows, columns), checked for size."""
    return _pixel_array(ds, *_pixel_layout(ds), frames=frames)


def _rescale(ds: Dataset, dtype: np.dtype) -> tuple[float, float]:
    """(slope, intercept) of a mosaic or slice storing ``dtype``, checked (see
    :func:`rtsc.dicom.rescale.checked_rescale`)."""
    return checked_rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), dtype)


def _apply_rescale(data: np.ndarray, slope: float, intercept: float) -> None:
    """Apply the DICOM rescale in place (float32)."""
    if slope != 1.0 or intercept != 0.0:
        data *= np.float32(slope)
        data += np.float32(intercept)


def _clean_description(ds: Dataset) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", str(ds.get("SeriesDescription", "")))[:64]


def _echo(ds: Dataset) -> int | None:
    echo = int_or_none(ds.get("EchoNumbers"))
    return echo if echo is not None and echo > 0 else None


def _series_key(ds: Dataset, echo: int | None = None) -> str:
    """SeriesInstanceUID, plus the echo number for echoes after the first: each echo of a
    multi-echo series is assembled and processed as its own series. ``echo`` (from a
    multi-echo multi-frame file's frames) replaces the dataset's EchoNumbers."""
    uid = str(ds.SeriesInstanceUID)
    echo = _echo(ds) if echo is None else echo
    return uid if echo in (None, 1) else f"{uid}/echo{echo}"


def _series_info(ds: Dataset, source: str, echo: int | None = None,
                 echo_time_s: float | None = None,
                 max_volumes: int | None = None) -> SeriesInfo:
    try:
        tr_ms = float(ds.get("RepetitionTime") or repetition_time_ms(ds) or 0.0)
    except (TypeError, ValueError):
        tr_ms = 0.0  # a malformed TR is treated as absent
    tr_s = tr_ms / 1000.0 if math.isfinite(tr_ms) and 0 < tr_ms < 1e6 else None
    n_expected = int_or_none(ds.get("NumberOfTemporalPositions"))
    if n_expected is not None and max_volumes is not None and n_expected > max_volumes:
        n_expected = None  # implausible: Assembler._learn alerts when it reads the facts
    te_ms = ds.get("EchoTime")
    te_s = float(te_ms) / 1000.0 if te_ms not in (None, "") and float(te_ms) > 0 else None
    if echo is None:
        echo = _echo(ds)
    else:
        te_s = echo_time_s
    return SeriesInfo(series=series_id(_series_key(ds, echo)), tr_s=tr_s, echo=echo,
                      echo_time_s=te_s,
                      echo_group=series_id(str(ds.SeriesInstanceUID)) if echo else None,
                      n_expected=n_expected if n_expected and n_expected > 0 else None,
                      series_number=int_or_none(ds.get("SeriesNumber")),
                      description=_clean_description(ds), source=source,
                      **phase_encoding(ds))


def phase_encoding(ds: Dataset) -> dict[str, Any]:
    """``phase_encoding_axis`` (``i`` for ROW, ``j`` for COL, else None; enhanced
    multi-frame: from the shared MRFOVGeometrySequence) and
    ``bandwidth_pe_hz`` (Siemens BandwidthPerPixelPhaseEncode: the CSA image header,
    else the private element (0019,1028); None when absent) of a dataset."""
    direction = str(ds.get("InPlanePhaseEncodingDirection") or "").strip().upper()
    if not direction:  # enhanced multi-frame: in the shared MR FOV/geometry macro
        for group in ds.get("SharedFunctionalGroupsSequence") or []:
            for fov in group.get("MRFOVGeometrySequence") or []:
                direction = str(fov.get("InPlanePhaseEncodingDirection") or "").strip().upper()
    axis = {"ROW": "i", "COL": "j"}.get(direction)
    bandwidth = None
    csa = csa_image_header(ds, {"BandwidthPerPixelPhaseEncode"}) or {}
    values = csa.get("BandwidthPerPixelPhaseEncode") or []
    if not values:
        private = ds.get(0x00191028)
        values = [private.value] if private is not None else []
        if values and isinstance(values[0], bytes) and len(values[0]) == 8:
            values = list(struct.unpack("<d", values[0]))  # FD read as UN
    try:
        value = float(values[0]) if values else None
    except (TypeError, ValueError):
        value = None
    if value is not None and math.isfinite(value) and value > 0:
        bandwidth = value
    return {"phase_encoding_axis": axis, "bandwidth_pe_hz": bandwidth}


def _volume_number(ds: Dataset) -> tuple[int | None, str]:
    """1-based temporal position of a mosaic or multi-frame file (TemporalPositionIdentifier,
    else AcquisitionNumber: Siemens counts volumes there, else InstanceNumber), and the
    element it came from. Single slices follow the vendors' rules of
    :mod:`rtsc.dicom.numbering`."""
    for keyword, tag in (("TemporalPositionIdentifier", "(0020,0100)"),
                         ("AcquisitionNumber", "(0020,0012)"),
                         ("InstanceNumber", "(0020,0013)")):
        number = int_or_none(ds.get(keyword))
        if number is not None and number > 0:
            return number, f"{keyword} {tag}"
    return None, "InstanceNumber (0020,0013)"


def is_mosaic(ds: Dataset) -> bool:
    """True for a Siemens mosaic (ImageType contains MOSAIC)."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).upper() == "MOSAIC" for v in image_type)


_MOSAIC_CSA_FIELDS = frozenset({"NumberOfImagesInMosaic", "SliceNormalVector",
                                "MosaicRefAcqTimes"})


def _csa_numbers(csa: dict, name: str) -> list[float] | None:
    """A CSA field's values as finite numbers, or None when absent or not numeric."""
    values = csa.get(name)
    if not values:
        return None
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        log.warning("Siemens CSA %s is not numeric; ignored", name)
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


#: Header elements a mosaic's layout (:class:`MosaicLayout`) is made from, besides the
#: CSA fields: orientation, spacing, position, slice spacing, pixel module, rescale,
#: and Siemens' private NumberOfImagesInMosaic with its block's creator.
_MOSAIC_LAYOUT_TAGS = (0x00200037, 0x00280030, 0x00200032, 0x00180088, 0x00180050,
                       0x00280010, 0x00280011, 0x00280100, 0x00280103, 0x00280002,
                       0x00281053, 0x00281052, 0x00190010, 0x0019100A, 0x00181310)
#: Layouts a :class:`MosaicLayoutCache` keeps (one per series is the normal case).
_LAYOUTS_KEPT = 8


@dataclass(frozen=True, eq=False)
class MosaicLayout:
    """What a mosaic's header says about its volume, pixels aside.

    Attributes
    ----------
    n_slices, tiles, rows, cols : int, images in the mosaic, tiles per side, image size
    dtype : numpy dtype of the stored pixels (byte order included)
    slope, intercept : float, the DICOM rescale
    affine : (4, 4) float64, voxel -> RAS+ mm (read-only: volumes share it)
    slice_times_s : (nz,) float64 or None, from MosaicRefAcqTimes (read-only)
    """

    n_slices: int
    tiles: int
    rows: int
    cols: int
    dtype: np.dtype
    slope: float
    intercept: float
    affine: np.ndarray
    slice_times_s: np.ndarray | None


def _encoding_key(ds: Dataset, tags: tuple[int, ...]) -> tuple[Any, ...]:
    """The encodings of ``tags`` in ``ds``: their raw bytes while pydicom has not decoded
    them (the normal case on the worker), else their values as text."""
    key: list[Any] = []
    for tag in tags:
        element = ds.get_item(tag)
        if element is None:
            key.append(None)
        elif isinstance(element, RawDataElement):
            key.append((element.VR, element.value, element.is_little_endian))
        else:
            key.append((element.VR, str(element.value)))
    return tuple(key)


class MosaicLayoutCache:
    """Mosaic layouts by the encoding of the header elements they come from.

    The mosaics of a series repeat their geometry byte for byte; decoding it (pydicom
    values, the checks, the affine) costs ~0.4 ms per volume on this machine, a
    dictionary lookup once it is known. A changed element gives a new key, decoded and
    checked afresh, so a change of geometry is still seen.

    Parameters
    ----------
    max_slices : int, ``assembler.max_slices`` (see :func:`mosaic_layout`)
    """

    def __init__(self, max_slices: int = AssemblerConfig().max_slices) -> None:
        self.max_slices = max_slices
        self._layouts: dict[tuple[Any, ...], MosaicLayout] = {}

    def get(self, ds: Dataset, csa: dict[str, list[Any]]) -> MosaicLayout:
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) \
            if getattr(ds, "file_meta", None) else ""
        key = (_encoding_key(ds, _MOSAIC_LAYOUT_TAGS), syntax,
               tuple((name, tuple(csa[name])) for name in sorted(csa)))
        layout = self._layouts.get(key)
        if layout is None:
            layout = mosaic_layout(ds, csa, self.max_slices)
            if len(self._layouts) >= _LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
            self._layouts[key] = layout
        return layout


def _acquired_matrix(ds: Dataset) -> int | None:
    """The smaller in-plane size of the acquired matrix: AcquisitionMatrix (0018,1310)
    holds frequency rows, frequency columns, phase rows, phase columns, two of them 0.
    None when absent or not of that form."""
    try:
        sizes = [int(v) for v in ds.get("AcquisitionMatrix") or []]
    except (TypeError, ValueError):
        return None
    nonzero = [v for v in sizes if v > 0]
    return min(nonzero) if len(sizes) == 4 and len(nonzero) == 2 else None


def mosaic_layout(ds: Dataset, csa: dict[str, list[Any]],
                  max_slices: int = AssemblerConfig().max_slices) -> MosaicLayout:
    """Decode and check a mosaic's layout from its header and CSA image header fields
    (``_MOSAIC_CSA_FIELDS``).

    NumberOfImagesInMosaic ``n`` tiles the image in ``ceil(sqrt(n))`` per side. It is
    refused above ``max_slices`` (``assembler.max_slices``), and when its tiles come out
    smaller than the acquired matrix (AcquisitionMatrix, when given): the mosaic then
    holds fewer images than the header claims (a 384 x 384 mosaic of 64 x 64 images
    holds 36; a count of 64 would cut it into 48 x 48 tiles). Refused, not capped: the
    right count cannot be told from the pixels, and capping would still cut wrong tiles.

    Raises
    ------
    DicomError
        No usable NumberOfImagesInMosaic, tiles that do not divide the image, a broken
        geometry or rescale; (code ``implausible_header``) a count above ``max_slices``
        or more than the tiles hold.
    """
    counts = _csa_numbers(csa, "NumberOfImagesInMosaic")
    n_slices = counts[0] if counts else None
    where = f"{MOSAIC_IMAGES} (CSA image header)"
    if n_slices is None:
        private = ds.get(0x0019100A)
        n_slices = int_or_none(private.value) if private is not None else None
        where = f"{MOSAIC_IMAGES} (0019,100A)"
    if not n_slices or n_slices <= 0 or n_slices != int(n_slices):
        raise DicomError(f"mosaic without a usable NumberOfImagesInMosaic ({n_slices})")
    n_slices = int(n_slices)
    if n_slices > max_slices:
        raise DicomError(f"{where} {n_slices} is more slices than assembler.max_slices "
                         f"({max_slices}); archived, not processed", code="implausible_header")
    tiles = int(np.ceil(np.sqrt(n_slices)))
    rows_m, cols_m, dtype = _pixel_layout(ds)
    if rows_m % tiles or cols_m % tiles:
        raise DicomError(f"mosaic {rows_m}x{cols_m} does not split into {tiles}x{tiles} tiles")
    rows, cols = rows_m // tiles, cols_m // tiles
    acquired = _acquired_matrix(ds)
    if acquired is not None and min(rows, cols) < acquired:
        raise DicomError(
            f"{where} {n_slices} is more images than the mosaic holds: {tiles}x{tiles} tiles "
            f"of {rows}x{cols} in {rows_m}x{cols_m}, smaller than the acquired matrix "
            f"({acquired}, AcquisitionMatrix (0018,1310)), which fits at most "
            f"{(rows_m // acquired) * (cols_m // acquired)}; archived, not processed",
            code="implausible_header")
    slope, intercept = _rescale(ds, dtype)
    row_cos, col_cos, spacing, ipp = plane_geometry(ds)
    # ImagePositionPatient of a mosaic is the corner of the whole mosaic as one image,
    # centred on the true slice: shift to the first slice's first voxel.
    first = ipp + row_cos * spacing[0] * (cols_m - cols) / 2 + col_cos * spacing[1] * (rows_m - rows) / 2
    normal = np.asarray(_csa_numbers(csa, "SliceNormalVector") or np.cross(row_cos, col_cos),
                        dtype=np.float64)
    if normal.shape != (3,) or not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomError(f"mosaic SliceNormalVector is not a unit 3-vector: {normal}")
    affine = affine_from_lps(row_cos, col_cos, spacing, normal * slice_spacing(ds), first)
    times = _csa_numbers(csa, "MosaicRefAcqTimes")
    slice_times = np.asarray(times[:n_slices], dtype=np.float64) / 1000.0 \
        if times and len(times) >= n_slices else None
    for shared in (affine, slice_times):
        if shared is not None:
            shared.flags.writeable = False
    return MosaicLayout(n_slices=n_slices, tiles=tiles, rows=rows_m, cols=cols_m, dtype=dtype,
                        slope=slope, intercept=intercept, affine=affine,
                        slice_times_s=slice_times)


def mosaic_to_volume(ds: Dataset, layouts: MosaicLayoutCache | None = None,
                     max_slices: int = AssemblerConfig().max_slices
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.dtype]:
    """Unpack a Siemens mosaic.

    Parameters
    ----------
    ds : the mosaic's dataset
    layouts : layouts of earlier mosaics to reuse (see :class:`MosaicLayoutCache`)
    max_slices : int, the cap on NumberOfImagesInMosaic without ``layouts``

    Returns
    -------
    data : (nx, ny, nz) float32, rescaled, Fortran-ordered
    affine : (4, 4) float64, voxel -> RAS+ mm (read-only)
    slice_times_s : (nz,) float64 or None, from MosaicRefAcqTimes (read-only)
    stored_dtype : numpy dtype of the stored pixels
    """
    csa = csa_image_header(ds, _MOSAIC_CSA_FIELDS) or {}
    layout = layouts.get(ds, csa) if layouts is not None \
        else mosaic_layout(ds, csa, max_slices)
    stored = _pixel_array(ds, layout.rows, layout.cols, layout.dtype)
    data = unmosaic(stored, layout.n_slices, layout.tiles, layout.slope, layout.intercept)
    rescaled = (layout.slope, layout.intercept) != (1.0, 0.0)
    stored_dtype = np.dtype(np.float32) if rescaled else stored.dtype
    return data, layout.affine, layout.slice_times_s, stored_dtype


@dataclass
class _Slice:
    position: float
    pixels: np.ndarray
    ipp: np.ndarray
    t_acquired: float | None
    t_received: float
    header: Dataset


@dataclass
class _Pending:
    """A single-slice volume being collected."""

    number: int
    slices: dict[float, _Slice] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class _SeriesState:
    info: SeriesInfo
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    n_slices: int | None = None
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    spacing_fallback: float | None = None
    rescale: tuple[float, float] = (1.0, 1.0)
    slice_matrix: tuple[int, ...] | None = None
    numbering: VolumeNumbering | None = None
    pending: dict[int, _Pending] = field(default_factory=dict)
    ready: dict[int, Volume] = field(default_factory=dict)
    ready_since: dict[int, float] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    next_index: int | None = None  # after the last volume published
    refused: set[int] = field(default_factory=set)  # volumes refused whole: not waited for
    fact_headers: FirstVolume | None = None  # the first volume's, until the second's came
    facts_from: int = 0  # volumes whose headers the vendor facts were read from (0-2)
    last_release_since: float | None = None  # when the last volume published became ready
    # hash() of every SOPInstanceUID taken, placed or refused with an alert, to the
    # digest of its pixel bytes: the same dataset sent again (same pixels) is the one
    # case dropped silently; other pixels under a known SOPInstanceUID are refused.
    instances: dict[int, tuple[int, int]] = field(default_factory=dict)
    n_duplicates: int = 0
    run_length_refused: bool = False  # the implausible run length was alerted

    def first_time(self, ds: Dataset) -> bool:
        """False for a SOPInstanceUID this series has had with the same pixels (counted
        as a duplicate: a resent C-STORE).

        Raises
        ------
        DicomError
            (code ``unplaced``) the SOPInstanceUID came before with other pixel bytes:
            not a resend, and neither image may silently replace the other.
        """
        uid = str(ds.get("SOPInstanceUID", ""))
        key, digest = hash(uid), _pixel_digest(ds)
        seen = self.instances.get(key)
        if seen is None:
            self.instances[key] = digest
            return True
        if seen != digest:
            raise DicomError(f"SOPInstanceUID {'(none)' if not uid else 'seen before'} "
                             f"with other pixel data ({digest[0]} bytes, CRC-32 {digest[1]:08x}; "
                             f"first {seen[0]} bytes, {seen[1]:08x}): not a resend; this copy "
                             "archived, not processed", code="unplaced")
        self.n_duplicates += 1
        return False


def _pixel_digest(ds: Dataset) -> tuple[int, int]:
    """(length, CRC-32) of a dataset's PixelData bytes as received: 0.1 ms for a
    384 x 384 mosaic, enough to tell a resend from another image under the same UID."""
    element = ds.get_item(0x7FE00010)
    raw = element.value if element is not None else None
    if not isinstance(raw, (bytes, bytearray)):
        return (-1, 0)
    return (len(raw), zlib.crc32(raw))


class Assembler:
    """Datasets in, volumes out, in acquisition order per series.

    Parameters
    ----------
    config : AssemblerConfig
    clock : callable returning seconds since the epoch (tests pass a fake clock)
    series_filter : SeriesFilterConfig or None
        Rules recognising series that are not BOLD time series (default rules if None).
    max_volumes : int
        ``session.max_volumes``: the longest run length and highest volume number a
        header may give (see the module docstring).
    """

    def __init__(self, config: AssemblerConfig, clock: Callable[[], float] = time.time,
                 series_filter: SeriesFilterConfig | None = None,
                 max_volumes: int = SessionConfig().max_volumes) -> None:
        self.config = config
        self.clock = clock
        self.series_filter = series_filter or SeriesFilterConfig()
        self.max_volumes = max_volumes
        # Alerts raised while a volume is built (an implausible run length), handed out
        # with the events of the add() or poll() that raised them.
        self._notes: list[AssemblyAlert] = []
        self._accepted: set[str] = set()  # SeriesInstanceUIDs that passed the filter
        self._skipped: set[str] = set()
        self._series: dict[str, _SeriesState] = {}
        self._by_uid: dict[str, _SeriesState] = {}  # SeriesInstanceUID -> state, never leaves
        self._layouts = MosaicLayoutCache(config.max_slices)

    # -- public API ------------------------------------------------------------------

    def add(self, item: Incoming) -> list[Event]:
        """Take one dataset; return the volumes and alerts it made ready."""
        if item.error is not None:
            return [AssemblyAlert("warning", "bad_dicom",
                                  f"unreadable input {item.path.name if item.path else ''}: "
                                  f"{item.error}")]
        dataset = None
        try:
            dataset = item.load()
            if dataset is None:
                raise DicomError("no dataset")
            return self._with_notes(self._add(dataset, item.t_received))
        except DicomError as exc:
            name = item.path.name if item.path is not None else "dataset"
            log.warning("%s: %s", name, exc)
            series = series_id(_series_key(dataset)) \
                if dataset is not None and "SeriesInstanceUID" in dataset else None
            return self._with_notes(
                [AssemblyAlert("warning", exc.code, f"{name}: {exc}", series, exc.index)])

    def _with_notes(self, events: list[Event]) -> list[Event]:
        """``events`` and then the alerts noted while making them."""
        if self._notes:
            events = [*events, *self._notes]
            self._notes = []
        return events

    def poll(self, now: float | None = None) -> list[Event]:
        """Publish volumes whose missing slices are overdue."""
        now = self.clock() if now is None else now
        events: list[Event] = []
        for state in self._series.values():
            for number, pending in sorted(state.pending.items()):
                if self._overdue(state, pending, now):
                    events.extend(self._finish_incomplete(state, pending))
            events.extend(self._release(state, now))
        return self._with_notes(events)

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (seconds since the epoch), or None."""
        deadlines = [p.last_seen + self.config.slice_timeout_s
                     for s in self._series.values() for p in s.pending.values()]
        for state in self._series.values():
            if state.ready_since:
                first = min(state.ready_since)
                deadlines.append(state.ready_since[first] + self._gap_wait(state, first))
        return min(deadlines) if deadlines else None

    def forget(self, series: str) -> None:
        """Drop a finished series' state."""
        self._series.pop(series, None)
        self._by_uid = {uid: s for uid, s in self._by_uid.items() if s.info.series != series}

    # -- internals -------------------------------------------------------------------

    def _state(self, ds: Dataset, source: str, echo: int | None = None,
               echo_time_s: float | None = None) -> _SeriesState:
        uid = _series_key(ds, echo)
        state = self._by_uid.get(uid)
        if state is None or state.info.series not in self._series:
            # First dataset of the series: read its series-level header once.
            info = _series_info(ds, source, echo, echo_time_s, self.max_volumes)
            state = self._series.get(info.series) or _SeriesState(info=info)
            self._series[info.series] = state
            self._by_uid[uid] = state
        return state

    def _recognise(self, ds: Dataset) -> list[Event] | None:
        """None for a series to process; else what to report (once per skipped series)."""
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid in self._accepted:
            return None
        if uid in self._skipped:
            return []
        reason = skip_reason(ds, self.series_filter)
        if reason is None:
            self._accepted.add(uid)
            return None
        self._skipped.add(uid)
        number = int_or_none(ds.get("SeriesNumber"))
        message = (f"series {number if number is not None else '?'} "
                   f"{_clean_description(ds) or '(no description)'} skipped: {reason}; "
                   "archived, not processed")
        log.info(message)
        return [AssemblyAlert("info", "skipped_series", message,
                              series_id(uid) if uid else None)]

    def _add(self, ds: Dataset, t_received: float) -> list[Event]:
        skipped = self._recognise(ds)
        if skipped is not None:
            return skipped
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in MULTIFRAME_SOP_CLASSES:
            if "SeriesInstanceUID" not in ds or "PixelData" not in ds:
                raise DicomError("missing SeriesInstanceUID or PixelData")
            return self._add_multiframe(ds, t_received)
        if sop_class != MR_IMAGE_STORAGE:
            name = getattr(ds.SOPClassUID, "name", sop_class) if sop_class else "no SOP class"
            raise DicomError(f"{name} is not an MR image", code="unsupported")
        if "SeriesInstanceUID" not in ds or "PixelData" not in ds:
            raise DicomError("missing SeriesInstanceUID or PixelData")
        if is_mosaic(ds):
            return self._add_mosaic(ds, t_received)
        return self._add_slice(ds, t_received)

    def _check_geometry(self, state: _SeriesState, shape: tuple[int, ...],
                        affine: np.ndarray, index: int) -> None:
        if affine is state.affine and shape == state.shape:
            return  # the first volume's (cached, read-only) layout: checked then
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            state.refused.add(index)
            raise DicomError(f"volume {index}: the header's geometry gives a degenerate or "
                             "non-finite voxel-to-world matrix; archived, not processed")
        if state.shape is None:
            state.shape, state.affine = shape, affine
            return
        assert state.affine is not None
        if shape != state.shape or not np.allclose(affine, state.affine, atol=_AFFINE_TOL_MM):
            state.refused.add(index)
            raise DicomError(
                f"series {state.info.series} volume {index}: matrix {shape} / geometry changed "
                f"from {state.shape}; volume archived, not processed", code="geometry_changed")

    def _index(self, number: int | None, tag: str) -> int:
        """0-based index of volume ``number`` (1-based; None: the first), read from
        ``tag``, refused beyond ``session.max_volumes``."""
        index = max((number or 1) - 1, 0)
        if index >= self.max_volumes:
            raise DicomError(f"{tag} {number} numbers a volume beyond session.max_volumes "
                             f"({self.max_volumes}); archived, not processed",
                             code="implausible_header")
        return index

    def _add_mosaic(self, ds: Dataset, t_received: float) -> list[Event]:
        state = self._state(ds, "mosaic")
        if not state.first_time(ds):
            return []
        index = self._index(*_volume_number(ds))
        if index in state.published or index in state.ready:
            raise DicomError(f"volume {index} was already received from another image "
                             "(same AcquisitionNumber); archived, not processed",
                             code="unplaced", index=index)
        self._check_not_late(state, index)
        data, affine, slice_times, stored_dtype = mosaic_to_volume(ds, self._layouts)
        self._check_geometry(state, data.shape, affine, index)
        self._learn(state, ds)
        volume = Volume(data=data, affine=affine, index=index, info=state.info,
                        t_acquired=acquisition_time(ds), t_received=t_received,
                        t_assembled=self.clock(), slice_times_s=slice_times,
                        stored_dtype=stored_dtype)
        state.ready[index] = volume
        return self._release(state)

    def _add_multiframe(self, ds: Dataset, t_received: float) -> list[Event]:
        number, tag = _volume_number(ds)
        self._index(number, tag)  # refuses a file number beyond the cap
        pixels = _pixels(ds, frames=frame_count(ds))
        if pixels.ndim == 2:
            pixels = pixels[None]
        parts = multiframe_volumes(ds, pixels, number or 1, self.config.max_slices,
                                   self.max_volumes)
        # Echo 1's series (the first part) stands for the file: a multi-echo file is one
        # SOP instance whose frames feed one series per echo.
        state = self._state(ds, "multiframe", parts[0].echo, parts[0].echo_time_s)
        if not state.first_time(ds):
            return []
        clashes, late = [], []
        touched = {}
        for part in parts:
            echo_state = self._state(ds, "multiframe", part.echo, part.echo_time_s)
            touched[echo_state.info.series] = echo_state
            index = self._index(part.number, "the volume number")  # checked in the split
            if index in echo_state.published or index in echo_state.ready:
                clashes.append(index)
                continue
            if echo_state.next_index is not None and index < echo_state.next_index:
                late.append(index)
                continue
            self._check_geometry(echo_state, part.data.shape, part.affine, index)
            self._learn(echo_state, ds)
            echo_state.ready[index] = Volume(
                data=part.data, affine=part.affine, index=index, info=echo_state.info,
                t_acquired=part.t_acquired or acquisition_time(ds), t_received=t_received,
                t_assembled=self.clock(), slice_times_s=part.slice_times_s,
                stored_dtype=part.stored_dtype)
        events = [e for echo_state in touched.values() for e in self._release(echo_state)]
        for code, indices, why in (("unplaced", clashes, "were already received from another "
                                    "image"),
                                   ("late_volume", late, "arrived after later volumes were "
                                    "published")):
            if indices:
                message = (f"volumes {ranges_text(index_ranges(indices))} of this multi-frame "
                           f"image {why}; those frames archived, not processed")
                log.warning(message)
                events.append(AssemblyAlert("warning", code, message, state.info.series,
                                            indices[0]))
        return events

    def _add_slice(self, ds: Dataset, t_received: float) -> list[Event]:
        state = self._state(ds, "slices")
        if not state.first_time(ds):
            return []
        row_cos, col_cos, spacing, ipp = plane_geometry(ds)
        normal = np.cross(row_cos, col_cos)
        stored = _pixels(ds)
        if state.geometry is None:
            # Everything that can refuse the series' first image before the state is
            # set: a refused first image leaves the series to the next one.
            count = slices_per_volume(ds, self.config.slices_per_volume,
                                      self.config.max_slices)
            numbering = VolumeNumbering(ds, count, max_volumes=self.max_volumes)
            rescale = _rescale(ds, stored.dtype)
            state.geometry = (row_cos, col_cos, spacing)
            state.slice_matrix = stored.shape
            state.n_slices = count.n
            state.numbering = numbering
            state.rescale = rescale
            try:
                state.spacing_fallback = slice_spacing(ds)
            except DicomError:
                state.spacing_fallback = None
        elif not (np.allclose(row_cos, state.geometry[0], atol=1e-4)
                  and np.allclose(col_cos, state.geometry[1], atol=1e-4)
                  and np.allclose(spacing, state.geometry[2], atol=1e-4)):
            raise DicomError(f"series {state.info.series}: slice orientation or pixel spacing "
                             "changed; slice archived, not processed", code="geometry_changed")
        if stored.shape != state.slice_matrix:
            raise DicomError(f"series {state.info.series}: slice matrix {stored.shape[::-1]} "
                             f"differs from {state.slice_matrix[::-1]}; slice archived, "
                             "not processed",
                             code="geometry_changed")
        assert state.numbering is not None and state.n_slices is not None
        position = round(float(ipp @ normal), 3)
        index = state.numbering.index(ds, position)
        if self._clashes(state, index, position) and state.numbering.fall_back(ds):
            index = state.numbering.index(ds, position)
        self._check_not_late(state, index)
        if index in state.published or index in state.ready:
            raise DicomError(f"volume {index} was already published when this slice at "
                             f"{position:.2f} mm arrived ({state.numbering.rule}); archived, "
                             "not processed", code="late_slice", index=index)
        pending = state.pending.get(index)
        now = self.clock()
        if pending is None:
            pending = _Pending(number=index, first_seen=now)
            state.pending[index] = pending
        if position in pending.slices:
            raise DicomError(f"volume {index} already has another image at {position:.2f} mm "
                             f"(numbered by {state.numbering.rule}); archived, not processed",
                             code="unplaced", index=index)
        if len(pending.slices) >= state.n_slices:
            raise DicomError(f"volume {index} already has its {state.n_slices} slices "
                             f"({state.numbering.count.source}); one more at {position:.2f} mm "
                             "is archived, not processed", code="unplaced", index=index)
        pending.last_seen = now
        pending.slices[position] = _Slice(position, stored, ipp, acquisition_time(ds), t_received,
                                          ds)
        if len(pending.slices) == state.n_slices:
            del state.pending[index]
            state.ready[index] = self._build(state, pending)
        return self._release(state)

    @staticmethod
    def _clashes(state: _SeriesState, index: int, position: float) -> bool:
        """True when volume ``index`` is out already or has an image at ``position``."""
        if index in state.published or index in state.ready:
            return True
        pending = state.pending.get(index)
        return pending is not None and position in pending.slices

    def _overdue(self, state: _SeriesState, pending: _Pending, now: float) -> bool:
        if now - pending.last_seen >= self.config.slice_timeout_s:
            return True
        # A later volume is complete and this one has waited a TR since its last slice:
        # its missing slices are lost, not late.
        later_done = any(i > pending.number for i in state.ready)
        tr = state.info.tr_s or self.config.slice_timeout_s
        return later_done and now - pending.last_seen >= tr

    def _finish_incomplete(self, state: _SeriesState, pending: _Pending) -> list[Event]:
        del state.pending[pending.number]
        assert state.n_slices is not None
        volume = self._build(state, pending)
        missing = volume.missing_slices
        message = (f"volume {pending.number}: {len(missing)} of {state.n_slices} slices never "
                   f"arrived (slices {ranges_text(index_ranges(missing))}); zero-filled")
        log.warning(message)
        state.ready[pending.number] = volume
        return [AssemblyAlert("warning", "missing_slices", message, state.info.series,
                              pending.number)]

    def _build(self, state: _SeriesState, pending: _Pending) -> Volume:
        """Stack the slices of ``pending`` by position along the normal."""
        assert state.geometry is not None and state.n_slices is not None
        row_cos, col_cos, spacing = state.geometry
        slices = [pending.slices[p] for p in sorted(pending.slices)]
        n = state.n_slices
        rows, cols = slices[0].pixels.shape
        normal = np.cross(row_cos, col_cos)
        if state.affine is not None:
            # Place slices on the grid fixed by the series' first volume.
            assert state.affine is not None
            step = np.diag([-1.0, -1.0, 1.0]) @ state.affine[:3, 2]
            origin = np.diag([-1.0, -1.0, 1.0]) @ state.affine[:3, 3]
        elif len(slices) > 1:
            step = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
            origin = slices[0].ipp
            if len(slices) < n:
                # Incomplete first volume: infer the step from the closest pair.
                gaps = np.diff([s.position for s in slices])
                step = normal * float(gaps.min())
        else:
            if state.spacing_fallback is None:
                raise DicomError("one-slice volume without a slice spacing")
            step = normal * state.spacing_fallback
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
        slope, intercept = state.rescale
        _apply_rescale(data, slope, intercept)
        affine = affine_from_lps(row_cos, col_cos, spacing, step, origin)
        self._check_geometry(state, data.shape, affine, pending.number)
        self._learn(state, {k: s.header for k, s in zip(filled, slices)})
        times = [s.t_acquired for s in slices]
        t_acquired = min(t for t in times if t is not None) if any(t is not None for t in times) \
            else None
        slice_times = None
        if t_acquired is not None and all(t is not None for t in times) and len(slices) == n:
            order = np.argsort(filled)
            slice_times = np.array([times[i] for i in order], dtype=np.float64) - t_acquired
        missing = tuple(sorted(set(range(n)) - set(filled)))
        pixel_dtype = slices[0].pixels.dtype
        stored_dtype = pixel_dtype if (slope, intercept) == (1.0, 0.0) else np.dtype(np.float32)
        return Volume(data=data, affine=affine, index=pending.number, info=state.info,
                      t_acquired=t_acquired, t_received=max(s.t_received for s in slices),
                      t_assembled=self.clock(), slice_times_s=slice_times,
                      stored_dtype=stored_dtype, missing_slices=missing)

    def _learn(self, state: _SeriesState, headers: FirstVolume) -> None:
        """Read the vendor facts (run length, TR, slice times, multiband, phase encoding,
        the BIDS sidecar) from the headers of a series' first volume, and again with its
        second, whose Siemens times dcm2niix prefers when they differ (see
        :func:`rtsc.dicom.vendor.acquisition_facts`); ``state.info`` carries them from
        the volume being built on."""
        if state.facts_from >= 2:
            return
        first = headers if state.fact_headers is None else state.fact_headers
        second = None if state.fact_headers is None else headers
        facts = acquisition_facts(first, state.n_slices, second_volume=second)
        state.fact_headers = headers if second is None else None
        state.facts_from += 1
        info = state.info
        sidecar = bids_sidecar(first, state.n_slices, facts=facts)
        if info.echo is not None and info.echo_time_s is not None:
            sidecar["EchoTime"] = round(info.echo_time_s, 9)  # this echo's, not the file's
        times = facts.slice_times_s
        n_expected = facts.n_expected
        if n_expected is not None and n_expected > self.max_volumes:
            # Buffers, the GLM design and the series end follow the run length: a header
            # claiming 2**31 - 1 volumes must not size them.
            if not state.run_length_refused:
                state.run_length_refused = True
                message = (f"{facts.n_expected_source or NUMBER_OF_TEMPORAL_POSITIONS} "
                           f"announces {n_expected} volumes, more than session.max_volumes "
                           f"({self.max_volumes}): the run length is taken as unknown")
                log.warning(message)
                self._notes.append(AssemblyAlert("warning", "implausible_header", message,
                                                 info.series))
            n_expected = None
        state.info = dataclasses.replace(
            info, tr_s=facts.tr_s or info.tr_s, n_expected=n_expected,
            slice_times_s=None if times is None else tuple(float(t) for t in times),
            multiband_factor=facts.multiband_factor,
            phase_encoding_direction=facts.phase_encoding_direction, sidecar=sidecar)

    def _gap_wait(self, state: _SeriesState, index: int) -> float:
        """How long ready volume ``index`` waits for missing earlier ones, seconds.

        A volume that arrives on its schedule (about a TR per index after the last one
        published) waits for nothing: the ones before it are lost, and waiting would
        only delay it. One that arrives well ahead of its schedule (files read from a
        folder at once, or sent out of order) waits a TR (at most the slice timeout) for
        the missing ones, so the series is processed in order.
        """
        tr = state.info.tr_s or self.config.slice_timeout_s
        if state.next_index is None or state.last_release_since is None:
            return 0.0
        expected = state.last_release_since + (index - state.next_index + 1) * tr
        if state.ready_since[index] > expected - 0.5 * tr:
            return 0.0
        return min(tr, self.config.slice_timeout_s)

    def _release(self, state: _SeriesState, now: float | None = None) -> list[Event]:
        """Ready volumes in index order. A volume waits while an earlier one is pending,
        and for :meth:`_gap_wait` while an index between it and the last published is
        missing; after that the missing volumes are given up (they arrive late)."""
        out: list[Event] = []
        now = self.clock() if now is None else now
        for index in sorted(state.ready):
            if any(p < index for p in state.pending):
                break
            since = state.ready_since.setdefault(index, now)
            if state.next_index is not None and any(
                    i not in state.refused for i in range(state.next_index, index)) \
                    and now - since < self._gap_wait(state, index):
                break
            out.append(state.ready.pop(index))
            state.last_release_since = state.ready_since.pop(index)
            state.published.add(index)
            state.next_index = max(index + 1, state.next_index or 0)
        return out

    @staticmethod
    def _check_not_late(state: _SeriesState, index: int) -> None:
        """Refuse a volume whose place has passed: a later one is published already."""
        if state.next_index is not None and index < state.next_index \
                and index not in state.published:
            raise DicomError(f"volume {index} arrived after volume {state.next_index - 1} "
                             "was published; archived, not processed", code="late_volume",
                             index=index)
