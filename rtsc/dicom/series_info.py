"""Series-level facts of a dataset's header: the series key (one per echo), the
:class:`~rtsc.volume.SeriesInfo` a series starts with, phase encoding and the volume
number of a mosaic or multi-frame file.

The vendor facts that need a whole volume's headers (run length, slice times,
multiband, the BIDS sidecar) are :mod:`rtsc.dicom.vendor`'s.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from typing import Any

from pydicom.dataset import Dataset

from rtsc.dicom.csa import csa_image_header
from rtsc.dicom.geometry import int_or_none
from rtsc.dicom.multiframe import repetition_time_ms
from rtsc.volume import SeriesInfo, series_id


def clean_description(ds: Dataset) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", str(ds.get("SeriesDescription", "")))[:64]


def sequence_name(ds: Dataset) -> str:
    """SequenceName (0018,0024), else PulseSequenceName (0018,9005) of enhanced images,
    with anything but [A-Za-z0-9_*+.-] removed (at most 64 characters); "" when absent."""
    value = ds.get("SequenceName") or ds.get("PulseSequenceName") or ""
    return re.sub(r"[^A-Za-z0-9_*+.-]", "", str(value))[:64]


def station_hash(ds: Dataset) -> str | None:
    """The first 16 hex digits of the plain SHA-256 of StationName (0008,1010), stripped;
    None when absent. The name is not a patient identifier, but it is not kept either."""
    name = str(ds.get("StationName") or "").strip()
    if not name:
        return None
    return hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:16]


def echo_number(ds: Dataset) -> int | None:
    echo = int_or_none(ds.get("EchoNumbers"))
    return echo if echo is not None and echo > 0 else None


def series_key(ds: Dataset, echo: int | None = None) -> str:
    """SeriesInstanceUID, plus the echo number for echoes after the first: each echo of a
    multi-echo series is assembled and processed as its own series. ``echo`` (from a
    multi-echo multi-frame file's frames) replaces the dataset's EchoNumbers."""
    uid = str(ds.SeriesInstanceUID)
    echo = echo_number(ds) if echo is None else echo
    return uid if echo in (None, 1) else f"{uid}/echo{echo}"


def series_info(ds: Dataset, source: str, echo: int | None = None,
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
        echo = echo_number(ds)
    else:
        te_s = echo_time_s
    return SeriesInfo(series=series_id(series_key(ds, echo)), tr_s=tr_s, echo=echo,
                      echo_time_s=te_s,
                      echo_group=series_id(str(ds.SeriesInstanceUID)) if echo else None,
                      n_expected=n_expected if n_expected and n_expected > 0 else None,
                      series_number=int_or_none(ds.get("SeriesNumber")),
                      description=clean_description(ds), source=source,
                      sequence=sequence_name(ds), station_hash=station_hash(ds),
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


def volume_number(ds: Dataset) -> tuple[int | None, str]:
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
