"""Siemens mosaics: one volume's slices tiled in one image.

:func:`mosaic_layout` decodes and checks what a mosaic's header says about its
volume (slice count, tiles, rescale, affine, slice times);
:class:`MosaicLayoutCache` keeps it for the next mosaics of the series, whose headers
repeat it byte for byte; :func:`mosaic_to_volume` unpacks the pixels
(:mod:`rtsc.dicom.unmosaic`, one cast-copy per band of tiles).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from rtsc.config import AssemblerConfig
from rtsc.dicom.unmosaic import unmosaic
from rtsc.dicom.csa import csa_image_header
from rtsc.dicom.geometry import affine_from_lps, int_or_none, plane_geometry, slice_spacing
from rtsc.dicom.pixels import pixel_array, pixel_layout, stored_rescale
from rtsc.dicom.vendor import MOSAIC_IMAGES
from rtsc.errors import DicomError

log = logging.getLogger(__name__)


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
    rows_m, cols_m, dtype = pixel_layout(ds)
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
    slope, intercept = stored_rescale(ds, dtype)
    row_cos, col_cos, spacing, ipp = plane_geometry(ds)
    # ImagePositionPatient of a mosaic is the corner of the whole mosaic as one image,
    # centred on the true slice: shift to the first slice's first voxel.
    first = (ipp + row_cos * spacing[0] * (cols_m - cols) / 2
             + col_cos * spacing[1] * (rows_m - rows) / 2)
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
    stored = pixel_array(ds, layout.rows, layout.cols, layout.dtype)
    data = unmosaic(stored, layout.n_slices, layout.tiles, layout.slope, layout.intercept)
    rescaled = (layout.slope, layout.intercept) != (1.0, 0.0)
    stored_dtype = np.dtype(np.float32) if rescaled else stored.dtype
    return data, layout.affine, layout.slice_times_s, stored_dtype
