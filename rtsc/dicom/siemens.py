"""Siemens MR headers: the protocol (ASCCONV) text, slice times, multiband, phase polarity.

Where each fact lives depends on the software line:

- V-series (VB12 to VE11) write a CSA image header (0029,xx10) per image and a CSA series
  header (0029,xx20) with the protocol text: ``MrPhoenixProtocol`` from VB13 on,
  ``MrProtocol`` in VB12. Slice times of a mosaic are ``MosaicRefAcqTimes`` (ms, one per
  tile) from VB15 on; VB12/VB13 only give the slice order ``sSliceArray.ucMode`` (1
  ascending, 2 descending, 4 interleaved) and ``lDelayTimeInTR`` (us) in the protocol
  (dcm2niix ``Siemens/README.md`` and dcm_qa_stc).
- X-series (XA10 on) enhanced images have no CSA header: the protocol text is the
  private (0021,xx19) of ``SIEMENS MR SDS 01`` and each frame's private group
  (0021,xxFE, ``SIEMENS MR SDI 02``) holds TimeAfterStart (xx04, s; wrong in a run's
  first volume) and the phase polarity (xx1C); slice times come from the public
  FrameAcquisitionDateTime of the frames.

The multiband factor is read from the slice times: the number of slices excited at the
earliest time (dcm2niix issue 672: ``sSliceAcceleration.lMultiBandFactor`` is not reliable,
CMRR sequences leave it at 1).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any, Mapping

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.csa import csa_image_header, csa_series_header
from rtsc.dicom.private import number, private_item, private_value, text

log = logging.getLogger(__name__)

_SDS, _SDI = "SIEMENS MR SDS 01", "SIEMENS MR SDI 02"
_ASCCONV = re.compile(r"### ASCCONV BEGIN[^\n]*\n(.*?)### ASCCONV END", re.S)
_ENTRY = re.compile(r"^\s*([A-Za-z_][\w.\[\]]*)\s*=\s*(.*?)\s*$")
#: Two slice times closer than this are one excitation (Siemens times are 2.5 ms ticks).
SAME_TIME_S = 5e-4
_EPOCH = dt.datetime(2000, 1, 1)


def parse_ascconv(protocol: str) -> dict[str, str | None]:
    """The ``key = value`` entries of the ASCCONV section of a Siemens protocol text.

    Values are kept as text (quotes removed). A key written twice with different values
    maps to None: the protocol contradicts itself there. Siemens leaves out entries at
    their default (zero) value, so an absent key usually means 0.
    """
    section = _ASCCONV.search(protocol)
    entries: dict[str, str | None] = {}
    for line in (section.group(1) if section else "").splitlines():
        match = _ENTRY.match(line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip().strip('"').strip()
        if key in entries and entries[key] != value:
            entries[key] = None
        else:
            entries.setdefault(key, value)
    return entries


def protocol(ds: Dataset) -> dict[str, str | None] | None:
    """The ASCCONV entries of ``ds``'s protocol (CSA series header, or XA's private
    protocol element), or None when the dataset carries no protocol text."""
    series = csa_series_header(ds, {"MrPhoenixProtocol", "MrProtocol"}) or {}
    for name in ("MrPhoenixProtocol", "MrProtocol"):
        for item in series.get(name) or []:
            if isinstance(item, str) and "### ASCCONV BEGIN" in item:
                return parse_ascconv(item)
    for holder in _xa_holders(ds, _SDS, 0xFE, shared=True):
        value = private_value(holder, 0x0021, _SDS, 0x19)
        body = text(value) if value is not None else ""
        if "### ASCCONV BEGIN" in body:
            return parse_ascconv(body)
    return None


def protocol_int(entries: Mapping[str, str | None], key: str) -> int | None:
    """An integer protocol entry (decimal or 0x hexadecimal); 0 when absent (Siemens'
    default); None, with a warning, when the text is not an integer or contradicts
    itself."""
    if key not in entries:
        return 0
    value = entries[key]
    if value is None:
        log.warning("Siemens protocol entry %s is written twice with different values: "
                    "ignored", key)
        return None
    try:
        return int(value, 0)
    except ValueError:
        log.warning("Siemens protocol entry %s = %r is not an integer: ignored", key, value)
        return None


def repetitions(ds: Dataset) -> int | None:
    """Volumes the run was planned with: ``lRepetitions`` + 1, or None without a protocol."""
    entries = protocol(ds)
    if entries is None:
        return None
    count = protocol_int(entries, "lRepetitions")
    if count is None or count < 0:
        if count is not None:
            log.warning("Siemens protocol lRepetitions = %d: run length unknown", count)
        return None
    return count + 1


def phase_positive(ds: Dataset) -> bool | None:
    """Siemens PhaseEncodingDirectionPositive: True when phase is encoded towards
    increasing row (COL) or column (ROW) index; from the CSA image header, else XA's
    private (0021,xx1C) of the frame or image; None when absent."""
    csa = csa_image_header(ds, {"PhaseEncodingDirectionPositive"}) or {}
    values = csa.get("PhaseEncodingDirectionPositive") or []
    flag = number(values[0]) if values else None
    if flag is None:
        for holder in _xa_holders(ds, _SDI, 0xFE, shared=False):
            flag = number(private_value(holder, 0x0021, _SDI, 0x1C))
            if flag is not None:
                break
    return None if flag not in (0.0, 1.0) else flag == 1.0


def declared_multiband(ds: Dataset) -> int | None:
    """Slice acceleration from the PAT mode text (``p2s4`` -> 4): (0051,xx11) of
    ``SIEMENS MR HEADER``, XA's (0021,xx09); None when the text has no ``s`` factor."""
    for value in (private_value(ds, 0x0051, "SIEMENS MR HEADER", 0x11),
                  *(private_value(h, 0x0021, _SDS, 0x09)
                    for h in _xa_holders(ds, _SDS, 0xFE, shared=True))):
        match = re.search(r"s(\d+)", text(value))
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return None


def _xa_holders(ds: Dataset, creator: str, sequence_offset: int,
                shared: bool) -> list[Dataset]:
    """Datasets that may hold XA private elements: the dataset itself, then the first
    item of the shared (or first per-frame) functional group and of its private
    sequence (0021,xx<sequence_offset>)."""
    holders = [ds]
    groups = ds.get("SharedFunctionalGroupsSequence" if shared
                    else "PerFrameFunctionalGroupsSequence")
    if groups:
        holders.append(groups[0])
        nested = private_item(groups[0], 0x0021, creator, sequence_offset)
        if nested is not None:
            holders.append(nested)
    return holders


def simultaneous_slices(times_s: np.ndarray) -> int:
    """Slices excited together with the earliest one (the multiband factor)."""
    return int(np.sum(times_s - times_s.min() <= SAME_TIME_S))


def checked(times_s: np.ndarray | None, tr_s: float | None, source: str) -> np.ndarray | None:
    """``times_s`` unless they span more than the TR (then None and a warning naming the
    ``source`` element): the slices of a volume are acquired within one TR."""
    if times_s is None or tr_s is None:
        return times_s
    span = float(np.ptp(times_s))
    if span > tr_s + SAME_TIME_S:
        log.warning("Siemens %s spans %.4f s, more than the TR of %.4f s: slice times unknown",
                    source, span, tr_s)
        return None
    return times_s


def mosaic_slice_times_s(ds: Dataset, n_slices: int, tr_s: float | None) -> np.ndarray | None:
    """Slice times of a mosaic, s, in tile order (rtsc's k order for mosaics).

    MosaicRefAcqTimes (ms) when the CSA image header has them, else the VB12/VB13 rule
    from the protocol (see :func:`protocol_slice_times_s`). Times are made relative to
    the earliest (Siemens sometimes writes negative ones: dcm2niix issue 271).
    """
    csa = csa_image_header(ds, {"MosaicRefAcqTimes", "ProtocolSliceNumber"}) or {}
    raw = csa.get("MosaicRefAcqTimes") or []
    if raw:
        values = [number(v) for v in raw[:n_slices]]
        if len(values) < n_slices or any(v is None for v in values):
            log.warning("Siemens CSA MosaicRefAcqTimes has %d usable values for %d slices: "
                        "slice times unknown", sum(v is not None for v in values), n_slices)
            return None
        times = np.array(values, dtype=np.float64) / 1000.0
        return checked(times - times.min(), tr_s, "CSA MosaicRefAcqTimes")
    first = csa.get("ProtocolSliceNumber") or [0]
    return checked(protocol_slice_times_s(ds, n_slices, tr_s, number(first[0])), tr_s,
                   "protocol sSliceArray.ucMode")


def protocol_slice_times_s(ds: Dataset, n_slices: int, tr_s: float | None,
                           first_protocol_slice: float | None) -> np.ndarray | None:
    """VB12/VB13 mosaic slice times inferred from the protocol, s, in tile order.

    The ``n_slices`` slices share TR - ``lDelayTimeInTR`` evenly, in the order of
    ``sSliceArray.ucMode``: 1 ascending, 2 descending, 4 interleaved (Siemens'
    interleave starts with the second slice when the count is even, with the first
    when it is odd). The order runs over protocol slice numbers; the first tile is
    protocol slice 0, or the last when the numbering is reversed.
    """
    entries = protocol(ds)
    if entries is None or tr_s is None or n_slices < 2:
        return None
    mode = protocol_int(entries, "sSliceArray.ucMode")
    delay_us = protocol_int(entries, "lDelayTimeInTR")
    if mode not in (1, 2, 4) or delay_us is None:
        return None
    active_s = tr_s - delay_us / 1e6
    if not active_s > 0:
        log.warning("Siemens protocol lDelayTimeInTR = %d us leaves no time in the TR of "
                    "%.3f s: slice times unknown", delay_us, tr_s)
        return None
    if mode == 1:
        order = list(range(n_slices))
    elif mode == 2:
        order = list(range(n_slices - 1, -1, -1))
    else:
        start = 1 if n_slices % 2 == 0 else 0
        order = list(range(start, n_slices, 2)) + list(range(1 - start, n_slices, 2))
    by_protocol = np.empty(n_slices, dtype=np.float64)
    by_protocol[order] = np.arange(n_slices) * active_s / n_slices
    if first_protocol_slice in (None, 0.0):
        return by_protocol
    if first_protocol_slice == n_slices - 1:
        return by_protocol[::-1].copy()
    log.warning("Siemens CSA ProtocolSliceNumber %s of the first tile is neither the first "
                "nor the last slice: slice order unknown", first_protocol_slice)
    return None


def frame_times_s(ds: Dataset, frames: list[int]) -> np.ndarray | None:
    """Slice times of an enhanced image's frames (in the order given), s, relative to
    the earliest.

    FrameAcquisitionDateTime (0018,9074) of each frame. XA's private TimeAfterStart
    (0021,xx04) is wrong in a run's first volume (single-band-like values:
    dcm2niix ``sliceTimingXA``, issue 240; the XA10 series of dcm_qa_stc shows it), so it
    is only a fallback, and a check, in later volumes: there the two must agree within
    1 ms (else None and a warning; a de-identified copy scrambles the date-times).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    after_start: list[float | None] = []
    stamps_us: list[int | None] = []
    first_volume = True
    for index in frames:
        item = per_frame[index]
        nested = private_item(item, 0x0021, _SDI, 0xFE)
        after_start.append(number(private_value(nested, 0x0021, _SDI, 0x04)))
        content = item.get("FrameContentSequence")
        content = content[0] if content else None
        stamps_us.append(_datetime_us(content.get("FrameAcquisitionDateTime"))
                         if content is not None else None)
        position = number(content.get("TemporalPositionIndex")) if content is not None else None
        first_volume = first_volume and position in (None, 1.0)
    relative: dict[str, np.ndarray] = {}
    if stamps_us and all(v is not None for v in stamps_us):
        us = np.array(stamps_us, dtype=np.int64)
        relative["FrameAcquisitionDateTime (0018,9074)"] = (us - us.min()) / 1e6
    if not first_volume and after_start and all(v is not None for v in after_start):
        seconds = np.array(after_start, dtype=np.float64)
        relative["TimeAfterStart (0021,1104)"] = seconds - seconds.min()
    if len(relative) == 2:
        a, b = relative.values()
        if float(np.max(np.abs(a - b))) > 1e-3:
            log.warning("Siemens %s and %s disagree by up to %.1f ms: slice times unknown",
                        *relative, 1000.0 * float(np.max(np.abs(a - b))))
            return None
    return next(iter(relative.values()), None)


def _datetime_us(stamp: Any) -> int | None:
    """A DICOM DT as whole microseconds since 2000-01-01, or None: integers, so that
    differences between frames stay exact."""
    match = re.match(r"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?", text(stamp))
    if not match:
        return None
    try:
        moment = dt.datetime(*(int(match.group(i)) for i in range(1, 7)))
    except ValueError:
        return None
    whole = (moment - _EPOCH) // dt.timedelta(seconds=1)
    return whole * 1_000_000 + int((match.group(7) or "0").ljust(6, "0"))


def classic_slice_times_s(slices: Mapping[int, Dataset], n_slices: int) -> np.ndarray | None:
    """Slice times of a single-slice (non-mosaic) Siemens series from each slice's
    AcquisitionTime (0008,0032), s, in k order; needs the whole volume (dcm2niix
    ``sliceTimingSiemens2D``). A volume crossing midnight is unwrapped."""
    if len(slices) != n_slices or set(slices) != set(range(n_slices)):
        return None
    values = [_time_of_day_s(slices[k].get("AcquisitionTime")) for k in range(n_slices)]
    if any(v is None for v in values):
        return None
    times = np.array(values, dtype=np.float64)
    if np.ptp(times) > 43200.0:  # the clock passed midnight within the volume
        times[times < 43200.0] += 86400.0
    return times - times.min()


def _time_of_day_s(value: Any) -> float | None:
    match = re.match(r"(\d{2})(\d{2})(\d{2})(\.\d+)?$", text(value))
    if not match:
        return None
    return (int(match.group(1)) * 3600 + int(match.group(2)) * 60 + int(match.group(3))
            + float(match.group(4) or 0.0))
