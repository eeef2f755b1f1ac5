"""GE MR headers: the private elements that carry timing, multiband and phase-encoding facts.

GE writes no slice times in public elements that every sequence fills. Three private
sources exist, of unequal trust:

- the Protocol Data Block (0025,xx1B, creator ``GEMS_SERS_01``): a gzip'd text of the
  prescription (``SLICEORDER`` 0 sequential / 1 interleaved, ``MBACCEL``, ``NOSLC``,
  ``DELACQNOAV``...). With the TR and the slice count it gives the slice times of a
  continuous acquisition: dcm2niix has used it for all GE EPI since 2020
  (dcm2niix ``GE/README.md``, "Slice Timing"), and so does rtsc;
- TriggerTime (0018,1060), ms, per slice, written by the multi-phase ``epi`` sequence;
- the RTIA timer (0021,xx5E, ``GEMS_RELA_01``): seconds in DV24, 1/10000 s in 14.0
  (dcm2niix issue 286), and known to be wrong in the first volume of some runs.

Phase-encoding polarity comes from Rectilinear Phase Encode Reordering (0018,9034) from
RX27 on, else from the binary user data (0043,xx2A, ``GEMS_PARM_01``), whose layout
changed at version 25.002 (dcm2niix ``nii_dicom.cpp``, issue 674).

Slice times here are indexed by *prescription position* p: p = 0 is the slice GE lists
first (lowest InstanceNumber of a volume), p increases along the prescribed stack.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.private import number, private_value, text

log = logging.getLogger(__name__)

_ACQU, _RELA, _SERS, _PARM = "GEMS_ACQU_01", "GEMS_RELA_01", "GEMS_SERS_01", "GEMS_PARM_01"
#: A decompressed protocol block larger than this is not a protocol: refuse it.
_MAX_PROTOCOL_BYTES = 1 << 22
_PDB_LINE = re.compile(r'^\s*([A-Za-z0-9_]+)\s+"(.*)"\s*$')


def protocol_data_block(ds: Dataset) -> dict[str, str] | None:
    """The GE Protocol Data Block of ``ds`` as ``{KEY: value text}``, or None.

    The element holds a little-endian uint32 byte count followed by a gzip member whose
    text has one ``KEY "value"`` per line. An XML block (some DV24 systems) or anything
    that does not decompress gives None (logged at debug level: the block is optional).
    """
    raw = private_value(ds, 0x0025, _SERS, 0x1B)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 24:
        return None
    declared = struct.unpack_from("<I", raw, 0)[0]
    member = bytes(raw[4:4 + declared]) if 0 < declared <= len(raw) - 4 else bytes(raw[4:])
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16+: expect a gzip header
        body = inflater.decompress(member, _MAX_PROTOCOL_BYTES)
    except zlib.error as exc:
        log.debug("GE protocol data block (0025,101B) does not decompress: %s", exc)
        return None
    content = body.decode("latin-1")
    if content.lstrip().startswith("<?xml"):
        log.debug("GE protocol data block (0025,101B) is XML: not read")
        return None
    block: dict[str, str] = {}
    for line in content.splitlines():
        match = _PDB_LINE.match(line)
        if match:
            block.setdefault(match.group(1), match.group(2).strip())
    return block or None


def _block_number(block: Mapping[str, str], key: str) -> float | None:
    value = block.get(key)
    try:
        result = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return result if result is not None and math.isfinite(result) else None


def group_delay_ms(ds: Dataset) -> float | None:
    """epiRT's "delay after slice group" (0043,xx7C), ms (GE stores seconds, FL)."""
    seconds = number(private_value(ds, 0x0043, _PARM, 0x7C), binary="f")
    return None if seconds is None else seconds * 1000.0


def locations_in_acquisition(ds: Dataset) -> int | None:
    """GE's slices per volume (0021,xx4F, SS); unlike ImagesInAcquisition it never
    counts the images of all volumes."""
    count = number(private_value(ds, 0x0021, _RELA, 0x4F), binary="h")
    return int(count) if count is not None and count > 0 else None


def rtia_timer(ds: Dataset) -> float | None:
    """The RTIA timer (0021,xx5E) as stored, in the unit of the software version that
    wrote it (seconds in DV24, 1/10000 s in 14.0): see :func:`rtia_slice_times_s`."""
    return number(private_value(ds, 0x0021, _RELA, 0x5E))


def multiband_parameters(ds: Dataset) -> int | None:
    """Multiband (HyperBand) factor from (0043,xxB6), whose first value is the factor
    (dcm2niix ``GE/README.md``); 1 when the element says 0 or 1; None when absent."""
    factor = number(private_value(ds, 0x0043, _PARM, 0xB6))
    if factor is None:
        return None
    return max(int(factor), 1)


def phase_polarity_flipped(ds: Dataset) -> bool | None:
    """GE's phase-encoding polarity: True "flipped", False "unflipped", None unknown.

    Rectilinear Phase Encode Reordering (0018,9034), written from RX27 on, decides when
    present (LINEAR: flipped, REVERSE_LINEAR: unflipped; dcm2niix issue 674). Else the
    binary user data (0043,xx2A): its header offset is the uint16 at byte 24; at that
    offset a float32 version; from version 25.002 the fields sit 0x4C bytes further and
    the k-space direction word 0x8C bytes nearer. An EPI flag (0x800 in the uint16 at
    +0x3A) must be set; bit 0x4 of the uint16 at +0x30 is the polarity, and a bottom-up
    k-space traversal (value 2 of the uint16 at +0x394) inverts it.
    """
    element = ds.get_item(0x00189034)
    reordering = text(element.value if element is not None else None).upper()
    if reordering.startswith("LINEAR"):
        return True
    if reordering.startswith("REVERSE"):
        return False
    raw = private_value(ds, 0x0043, _PARM, 0x2A)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 916:
        return None
    raw = bytes(raw)
    start = struct.unpack_from("<H", raw, 24)[0]
    if start + 916 > len(raw):
        return None
    version = struct.unpack_from("<f", raw, start)[0]
    if not 5.0 <= version <= 40.0:
        return None
    fields, kspace_direction = start, 0x394
    if version >= 25.002:
        fields += 0x4C
        kspace_direction -= 0x8C
    if fields + max(kspace_direction, 0x3A) + 2 > len(raw):
        return None
    if not struct.unpack_from("<H", raw, fields + 0x3A)[0] & 0x800:
        return None  # not EPI: the polarity bit means nothing
    flipped = bool(struct.unpack_from("<H", raw, fields + 0x30)[0] & 0x4)
    if struct.unpack_from("<H", raw, fields + kspace_direction)[0] == 2:
        flipped = not flipped
    return flipped


def software_release(ds: Dataset) -> tuple[float, bool] | None:
    """(major.minor version, True from 27.0 R03 on) of GE's SoftwareVersions.

    The release text comes after "MR Software release:" (DV26.0_R01_1725.a), after
    "SIGNA_LX1." (MR30.0_R01_2236.d) or after the last backslash (MR29.1_EA_2039.g);
    the 14.0 software writes no letters before the number (14.0_M4_0629.a).
    """
    versions = text(ds.get("SoftwareVersions"))
    for marker in ("SIGNA_LX1.", "MR Software release:"):
        if marker in versions:
            versions = versions.split(marker, 1)[1]
            break
    else:
        versions = versions.rsplit("\\", 1)[-1]
    match = re.match(r"\s*[A-Za-z]{0,2}(\d+)\.(\d+)_(?:R(\d+)|(EA)|\w)?", versions)
    if not match:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    release = int(match.group(3)) if match.group(3) else 0
    version = major + 0.1 * minor
    return version, version >= 27.1 or (major == 27 and release >= 3)


def sequence_kind(ds: Dataset, block: Mapping[str, str] | None) -> str | None:
    """``"epiRT"`` (BrainWave / FMRI option), ``"epi"`` (multi-phase EPI) or None.

    As dcm2niix decides: the pulse sequence name (0019,xx9C), the presence of epiRT's
    group delay (0043,xx7C), the internal name (0019,xx9E) ``EPI`` and the protocol's
    imaging options (``FMRI``, ``MPh``). Diffusion (``epi2``, ``EPI2``) and the ABCD
    pepolar research sequence give None: their slice order is not known.
    """
    pulse = text(private_value(ds, 0x0019, _ACQU, 0x9C)).lower()
    internal = text(private_value(ds, 0x0019, _ACQU, 0x9E)).upper()
    options = {o.strip().upper() for o in (block or {}).get("IOPT", "").split(",")}
    if "epi_pepolar" in pulse:
        return None
    if "epirt" in pulse or "FMRI" in options \
            or private_value(ds, 0x0043, _PARM, 0x7C) is not None:
        return "epiRT"
    if "epi2" in pulse or internal == "EPI2":
        return None
    if "epi" in pulse or internal == "EPI" or "MPH" in options:
        return "epi"
    return None


def protocol_delay_ms(block: Mapping[str, str]) -> float | None:
    """Multi-phase EPI's delay after each volume from the protocol block, ms: 0 when the
    delay is "Minimum", None for variable delays (``MPhVar``, not supported)."""
    options = {o.strip().upper() for o in block.get("IOPT", "").split(",")}
    if "MPHVAR" in options:
        return None
    if block.get("DELACQ", "").strip().lower() == "minimum":
        return 0.0
    seconds = _block_number(block, "DELACQNOAV")
    return 0.0 if seconds is None or seconds < 0 else seconds * 1000.0


def repetition_time_ms(ds: Dataset, block: Mapping[str, str] | None) -> float | None:
    """GE's volume period, ms: RepetitionTime (the time the slices take) plus the delay
    that follows them (epiRT's (0043,xx7C); multi-phase EPI's protocol delay), as
    dcm2niix reports it."""
    tr = number(ds.get("RepetitionTime"))
    if tr is None or tr <= 0:
        return None
    delay = group_delay_ms(ds) or 0.0
    if block is not None and sequence_kind(ds, block) == "epi":
        delay += protocol_delay_ms(block) or 0.0
    return tr + max(delay, 0.0)


def planned_slice_times_s(n_slices: int, active_s: float, interleaved: bool, multiband: int,
                          version: float, release_27r3: bool) -> np.ndarray | None:
    """Slice times of a continuous GE acquisition, s, by prescription position.

    Parameters
    ----------
    n_slices : slices per volume
    active_s : time over which the slices are spread (RepetitionTime without the
        delay that follows them), s
    interleaved : SLICEORDER 1 (even positions first, then odd) rather than 0
    multiband : HyperBand factor (1 single band); slice p is excited with p + n_exc,
        n_exc = ceil(n_slices / multiband) excitations per volume
    version, release_27r3 : see :func:`software_release`

    Returns
    -------
    (n_slices,) float64 or None when GE's rule is unknown (HyperBand before 26.0).

    Notes
    -----
    GE's HyperBand rules as dcm2niix re-derived them (``sliceTimeGE``, dcm_qa_ge): before
    27.0 R03 an even excitation count gets one dummy excitation; from 27.0 R03 an
    interleaved even count swaps the last and third-to-last excitations.
    """
    if n_slices < 1 or not active_s > 0 or multiband < 1:
        return None
    if multiband > 1 and version < 26.0:
        return None
    n_exc = math.ceil(n_slices / multiband)
    if multiband > 1 and not release_27r3 and n_exc % 2 == 0:
        n_exc += 1
    if interleaved:
        # Excitations 0, 2, 4... go first, then 1, 3, 5...
        order = list(range(0, n_exc, 2)) + list(range(1, n_exc, 2))
        slot = np.empty(n_exc, dtype=np.int64)
        slot[order] = np.arange(n_exc)
        if multiband > 1 and release_27r3 and n_exc > 2 and n_exc % 2 == 0:
            slot[[n_exc - 1, n_exc - 3]] = slot[[n_exc - 3, n_exc - 1]]
    else:
        slot = np.arange(n_exc)
    per_excitation = active_s / n_exc
    return slot[np.arange(n_slices) % n_exc] * per_excitation


def instance_order_ascending(slices: Mapping[int, Dataset]) -> bool | None:
    """True when InstanceNumber grows with k over the given slices of one volume, False
    when it falls, None when it does not tell (fewer than two numbered slices, or no
    consistent order: logged as a warning).

    GE numbers the images of a volume along the prescribed stack, so this gives the
    prescription position of slice k: p = k when True, p = n - 1 - k when False.
    """
    numbered = sorted((k, number(ds.get("InstanceNumber"))) for k, ds in slices.items())
    if len(numbered) < 2 or any(n is None for _, n in numbered):
        return None
    steps = {float(np.sign(b - a)) for (_, a), (_, b) in zip(numbered, numbered[1:])}
    if len(steps) != 1 or 0.0 in steps:
        log.warning("GE InstanceNumber (0020,0013) does not run monotonically along the "
                    "slice stack: acquisition order unknown, no slice times")
        return None
    return steps == {1.0}


def multiband_factor(ds: Dataset, block: Mapping[str, str] | None) -> int | None:
    """GE HyperBand factor: (0043,xxB6) and the protocol's ``MBACCEL``; 1 when the
    sources present say single band; None when there is none, or when both claim
    multiband with different factors (logged as a warning)."""
    declared = multiband_parameters(ds)
    accel = _block_number(block, "MBACCEL") if block is not None else None
    protocol = max(int(accel), 1) if accel is not None else (1 if block is not None else None)
    claims = [f for f in (declared, protocol) if f is not None]
    if not claims:
        return None
    if declared and protocol and declared > 1 and protocol > 1 and declared != protocol:
        log.warning("GE multiband factor: (0043,10B6) says %d, protocol block (0025,101B) "
                    "MBACCEL says %d; factor unknown", declared, protocol)
        return None
    return max(claims)


@dataclass(frozen=True, eq=False)  # eq=False: the slice times are an array
class Timing:
    """What GE's headers say about a single-slice series' timing.

    Attributes
    ----------
    tr_s : float or None, volume period (see :func:`repetition_time_ms`), s
    slice_times_s : (n_slices,) float64 or None, in rtsc's k order, s
    multiband : int or None, HyperBand factor (1 single band)
    """

    tr_s: float | None
    slice_times_s: np.ndarray | None
    multiband: int | None


def timing(slices: Mapping[int, Dataset], n_slices: int) -> Timing:
    """TR, slice times and multiband factor of a GE single-slice series.

    Parameters
    ----------
    slices : {k: header} of slices of the series' first volume (k as the assembler
        stacks them: by position along the slice normal); missing slices are allowed
        when the protocol block gives the times
    n_slices : slices per volume

    Returns
    -------
    Timing. Slice times come from the protocol block (dcm2niix's source); TriggerTime,
    when every given slice carries it, must agree with them within a quarter of a slice
    interval (a contradiction gives None and a warning naming (0018,1060)); without a
    protocol block, TriggerTime of a complete volume, else its RTIA timers.
    """
    first = slices[min(slices)]
    block = protocol_data_block(first)
    tr_ms = repetition_time_ms(first, block)
    mb = multiband_factor(first, block)
    active = number(first.get("RepetitionTime"))
    active_s = active / 1000.0 if active is not None and active > 0 else None
    planned = _planned_by_k(first, block, slices, n_slices, active_s, mb)
    measured = _trigger_times_s(slices)
    times = planned
    if planned is not None and measured is not None:
        ks = sorted(measured)
        offsets = np.array([measured[k] - planned[k] for k in ks])
        gaps = np.diff(np.unique(np.round(planned, 6)))
        tolerance = 0.25 * float(gaps.min()) if gaps.size else 1e-3
        if float(np.ptp(offsets)) > tolerance:
            log.warning("GE TriggerTime (0018,1060) contradicts the slice order of the protocol "
                        "block (0025,101B) by up to %.1f ms: slice times unknown",
                        1000.0 * float(np.ptp(offsets)))
            times = None
    elif planned is None and len(slices) == n_slices:
        if measured is not None and len(measured) == n_slices:
            times = np.array([measured[k] for k in range(n_slices)])
            times -= times.min()
        elif active_s is not None:
            times = _rtia_by_k(slices, n_slices, active_s)
    if times is not None and tr_ms is not None and float(np.ptp(times)) > tr_ms / 1000.0:
        log.warning("GE slice times span %.3f s, more than the TR of %.3f s: slice times "
                    "unknown", float(np.ptp(times)), tr_ms / 1000.0)
        times = None
    if times is not None and not np.ptp(times) > 0:
        times = None  # one excitation for all slices: no slice timing to report
    return Timing(tr_s=tr_ms / 1000.0 if tr_ms is not None else None, slice_times_s=times,
                  multiband=mb)


def _planned_by_k(first: Dataset, block: Mapping[str, str] | None,
                  slices: Mapping[int, Dataset], n_slices: int, active_s: float | None,
                  mb: int | None) -> np.ndarray | None:
    """Protocol-block slice times in k order, or None."""
    if block is None or active_s is None or mb is None:
        return None
    kind = sequence_kind(first, block)
    if kind is None:
        return None
    if kind == "epi" and protocol_delay_ms(block) is None:
        log.info("GE multi-phase EPI with variable delays: slice times not supported")
        return None
    planned_count = _block_number(block, "NOSLC")
    if planned_count is not None and int(planned_count) != n_slices:
        log.warning("GE protocol block (0025,101B) prescribes %d slices, the volume has %d: "
                    "slice times unknown", int(planned_count), n_slices)
        return None
    # dcm2niix reads SLICEORDER for epiRT only; multi-phase epi is taken as interleaved
    # (TriggerTime, which that sequence writes, then checks it).
    interleaved = _block_number(block, "SLICEORDER") != 0 if kind == "epiRT" else True
    release = software_release(first) or (0.0, False)
    by_p = planned_slice_times_s(n_slices, active_s, interleaved, mb, *release)
    if by_p is None:
        log.info("GE HyperBand before software 26.0: slice times not known")
        return None
    ascending = instance_order_ascending(slices) if n_slices > 1 else True
    if ascending is None:
        return None
    return by_p if ascending else by_p[::-1].copy()


def _trigger_times_s(slices: Mapping[int, Dataset]) -> dict[int, float] | None:
    """{k: TriggerTime in s} when every given slice has one and they differ, else None."""
    values = {k: number(ds.get("TriggerTime")) for k, ds in slices.items()}
    if any(v is None for v in values.values()) or len(set(values.values())) < 2:
        return None
    return {k: float(v) / 1000.0 for k, v in values.items()}  # type: ignore[arg-type]


def _rtia_by_k(slices: Mapping[int, Dataset], n_slices: int,
               active_s: float) -> np.ndarray | None:
    values = [rtia_timer(slices[k]) if k in slices else None for k in range(n_slices)]
    if any(v is None for v in values):
        return None
    times = rtia_slice_times_s(np.array(values, dtype=np.float64), active_s)
    if times is None:
        log.warning("GE RTIA timer (0021,105E) of the first volume does not fit the TR in "
                    "seconds or in 1/10000 s: slice times unknown")
    return times


def rtia_slice_times_s(values: np.ndarray, tr_s: float) -> np.ndarray | None:
    """Slice times from the RTIA timers of one volume, s, or None when implausible.

    The unit is not written anywhere: seconds (DV24) or 1/10000 s (14.0). The one that
    spreads the slices over more than half of the TR, and not beyond it, is taken; each
    distinct time must be shared by the same number of slices (the multiband factor).
    The first volume of some runs carries bogus timers (dcm2niix ``GE/README.md``).
    """
    span = float(np.ptp(values))
    if not span > 0 or not tr_s > 0:
        return None
    for unit_s in (1.0, 1e-4):
        times = (values - values.min()) * unit_s
        if 0.5 * tr_s < span * unit_s <= tr_s and _equal_groups(times):
            return times
    return None


def _equal_groups(times_s: np.ndarray, tol_s: float = 5e-4) -> bool:
    """True when every distinct time is shared by the same number of slices."""
    ordered = np.sort(times_s)
    breaks = np.flatnonzero(np.diff(ordered) > tol_s)
    sizes = np.diff(np.concatenate(([0], breaks + 1, [len(ordered)])))
    return bool(np.all(sizes == sizes[0]))
