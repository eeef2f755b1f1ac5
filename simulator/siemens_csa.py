"""Siemens private headers of the simulated images: the CSA2 image and series headers
(``SIEMENS CSA HEADER``, (0029,xx)) with the MrPhoenixProtocol ASCCONV block, and the
``SIEMENS MR HEADER`` (0019,xx) and (0051,xx) elements dcm2niix and rtsc read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from simulator.dicom_series import SeriesInfo, _ds, _Geometry

_CSA_CHECK = 77  # the constant Siemens writes in CSA2 headers and item headers
# Siemens pads every CSA tag to at least 6 items (the extras empty); dcm2niix relies on
# it, reading 3 items of some scalar tags (SliceMeasurementDuration...) unconditionally.
_CSA_MIN_ITEMS = 6
_SIEMENS_CREATOR_MR = "SIEMENS MR HEADER"
_SIEMENS_CREATOR_CSA = "SIEMENS CSA HEADER"


def encode_csa2(elements: Sequence[tuple[str, str, Sequence[str]]]) -> bytes:
    """Encode a Siemens CSA2 ("SV10") header.

    Parameters
    ----------
    elements : sequence of (name, vr, values)
        ``name`` at most 63 ASCII characters, ``vr`` a DICOM VR code (``"FD"``,
        ``"IS"``, ...), ``values`` the items already formatted as text (Siemens stores
        every item as a NUL-terminated string, numbers included).

    Returns
    -------
    bytes
        ``"SV10" 04 03 02 01``, uint32 number of tags, uint32 77, then per tag: name
        (64 bytes, NUL padded), int32 VM, VR (4 bytes), int32 SyngoDT, int32 number of
        items, int32 77; per item: four int32 (length, length, 77, length) and the
        NUL-terminated text padded to a multiple of 4 bytes. All little-endian.
    """
    if not 0 < len(elements) <= 128:
        raise ValueError("a CSA header holds 1 to 128 tags")
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(elements), _CSA_CHECK)]
    for name, vr, values in elements:
        raw_name = name.encode("ascii")
        if len(raw_name) > 63 or len(vr) != 2:
            raise ValueError(f"bad CSA tag name or VR: {name!r} {vr!r}")
        n_items = max(len(values), _CSA_MIN_ITEMS)
        out.append(
            struct.pack(
                "<64si4s3i", raw_name, len(values), vr.encode("ascii"), 0, n_items,
                _CSA_CHECK,
            )
        )
        for value in values:
            text = str(value).encode("latin-1") + b"\x00"
            n = len(text)
            out.append(struct.pack("<4i", n, n, _CSA_CHECK, n))
            out.append(text + b"\x00" * (-n % 4))
        for _ in range(n_items - len(values)):
            out.append(struct.pack("<4i", 0, 0, _CSA_CHECK, 0))
    return b"".join(out)


def _f8(x: float) -> str:
    """Siemens-style CSA float text."""
    return f"{float(x):.8f}"


def _slice_order_mode(times: np.ndarray) -> int:
    """Siemens sSliceArray.ucMode: 1 ascending, 2 descending, 4 interleaved."""
    order = np.argsort(times, kind="stable")
    if np.all(np.diff(order) > 0):
        return 1
    if np.all(np.diff(order) < 0):
        return 2
    return 4


def _ascconv(data_shape: tuple[int, ...], geom: _Geometry, info: SeriesInfo,
             times: np.ndarray) -> str:
    """A minimal MrPhoenixProtocol ASCCONV block describing the acquisition."""
    nx, ny, nz = data_shape
    centre0 = (geom.slice_position(0) + geom.row_cosine * geom.col_spacing * (nx - 1) / 2
               + geom.col_cosine * geom.row_spacing * (ny - 1) / 2)
    n_rep = 0 if info.n_volumes is None else max(info.n_volumes - 1, 0)
    desc = info.series_description.replace('"', "'")
    lines: list[tuple[str, object]] = [
        ("ulVersion", 51130001),
        ("tSequenceFileName", '""%SiemensSeq%\\ep2d_bold""'),
        ("tProtocolName", f'""{desc}""'),
        ("lRepetitions", n_rep),
        ("alTR[0]", int(round(info.tr_s * 1e6))),
        ("alTE[0]", int(round(info.te_s * 1e6))),
        ("lContrasts", 1),
        ("sKSpace.ucDimension", "0x2"),
        ("sKSpace.lBaseResolution", nx),
        ("sKSpace.lPhaseEncodingLines", ny),
        ("sKSpace.dPhaseResolution", _ds(1.0)),
        ("sKSpace.ucMultiSliceMode", "0x2"),
        ("sFastImaging.lEPIFactor", ny),
        ("sPat.lAccelFactPE", 1),
        ("sPat.lAccelFact3D", 1),
        ("sSliceArray.lSize", nz),
        ("sSliceArray.ucMode", hex(_slice_order_mode(times))),
        ("sGroupArray.asGroup[0].dDistFact", "0"),
    ]
    for k in range(nz):
        c = centre0 + k * geom.slice_step
        pre = f"sSliceArray.asSlice[{k}]"
        lines += [
            (f"{pre}.sPosition.dSag", _ds(c[0])),
            (f"{pre}.sPosition.dCor", _ds(c[1])),
            (f"{pre}.sPosition.dTra", _ds(c[2])),
            (f"{pre}.sNormal.dSag", _ds(geom.normal[0])),
            (f"{pre}.sNormal.dCor", _ds(geom.normal[1])),
            (f"{pre}.sNormal.dTra", _ds(geom.normal[2])),
            (f"{pre}.dThickness", _ds(geom.slice_spacing)),
            (f"{pre}.dPhaseFOV", _ds(geom.row_spacing * ny)),
            (f"{pre}.dReadoutFOV", _ds(geom.col_spacing * nx)),
        ]
    body = "\n".join(f"{key:<40} = {value}" for key, value in lines)
    return (
        "### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=51130001 ###\n"
        f"{body}\n### ASCCONV END ###\n"
    )


CsaElements = list[tuple[str, str, list[str]]]


def siemens_private(shape: tuple[int, ...], geom: _Geometry, info: SeriesInfo,
                     times: np.ndarray, index: int,
                     mosaic: bool) -> tuple[Dataset, CsaElements]:
    """Siemens private elements of one image: (0019,xx), CSA (0029,xx), (0051,xx).

    Returns a dataset holding only these elements, to be merged into each image, and
    the CSA image header elements (for re-encoding per slice). The mosaic-only items
    (NumberOfImagesInMosaic, and the (0019,xx29) copy of MosaicRefAcqTimes, whose
    length dcm2niix reads as a slice count) are left out when ``mosaic`` is False.
    """
    nx, ny, nz = shape
    times_ms = times * 1000.0
    slice_ms = info.tr_s * 1000.0 / nz  # SliceMeasurementDuration, ms
    after_start_s = index * info.tr_s  # TimeAfterStart, s
    matrix_text = f"{ny}p*{nx}"  # phase-encoding lines (rows, 'p') * readout (columns)
    csa_image: CsaElements = [
        ("SliceNormalVector", "FD", [_f8(v) for v in geom.normal]),
        ("SliceMeasurementDuration", "DS", [_f8(slice_ms)]),
        ("TimeAfterStart", "DS", [_f8(after_start_s)]),
        ("MosaicRefAcqTimes", "FD", [_f8(t) for t in times_ms]),
        ("AcquisitionMatrixText", "SH", [matrix_text]),
        ("ImaRelTablePosition", "IS", ["0", "0", "0"]),
        ("ImaAbsTablePosition", "SL", ["0", "0", "0"]),
        ("PhaseEncodingDirectionPositive", "IS", ["1"]),
        ("ProtocolSliceNumber", "IS", ["0"]),
        ("BandwidthPerPixelPhaseEncode", "FD", [_f8(info.bandwidth_per_pixel_phase_hz)]),
        ("RealDwellTime", "IS", ["2700"]),
    ]
    if mosaic:
        csa_image.insert(0, ("NumberOfImagesInMosaic", "US", [str(nz)]))
    csa_series = [
        ("MrPhoenixProtocol", "UN", [_ascconv(shape, geom, info, times)]),
        ("NumberOfPrescans", "IS", ["0"]),
    ]
    ds = Dataset()
    mr = ds.private_block(0x0019, _SIEMENS_CREATOR_MR, create=True)
    mr.add_new(0x08, "CS", "IMAGE NUM 4")
    mr.add_new(0x09, "LO", "1.0")
    if mosaic:
        mr.add_new(0x0A, "US", nz)
    mr.add_new(0x0B, "DS", _ds(slice_ms))
    mr.add_new(0x14, "IS", ["0", "0", "0"])
    mr.add_new(0x16, "DS", _ds(after_start_s))
    mr.add_new(0x28, "FD", float(info.bandwidth_per_pixel_phase_hz))
    if mosaic:  # dcm2niix takes nz values here as a mosaic of nz slices
        mr.add_new(0x29, "FD", [float(t) for t in times_ms])
    csa = ds.private_block(0x0029, _SIEMENS_CREATOR_CSA, create=True)
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x09, "LO", "20100114")
    csa.add_new(0x10, "OB", encode_csa2(csa_image))
    csa.add_new(0x18, "CS", "MR")
    csa.add_new(0x19, "LO", "20100114")
    csa.add_new(0x20, "OB", encode_csa2(csa_series))
    hdr = ds.private_block(0x0051, _SIEMENS_CREATOR_MR, create=True)
    hdr.add_new(0x08, "CS", "IMAGE NUM 4")
    hdr.add_new(0x09, "LO", "1.0")
    hdr.add_new(0x0B, "SH", matrix_text)
    hdr.add_new(0x0E, "SH", ("Sag", "Cor", "Tra")[int(np.argmax(np.abs(geom.normal)))])
    return ds, csa_image


def is_siemens(info: SeriesInfo) -> bool:
    return info.manufacturer.strip().upper().startswith("SIEMENS")
