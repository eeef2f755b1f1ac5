"""What a BOLD run's headers say about its acquisition, whatever the vendor wrote where.

The facts: the run length the scanner announced, the TR, each slice's acquisition time,
the multiband factor and the phase-encoding direction, and a BIDS sidecar made of them.
They are equal to dcm2niix's on every series of ``tests/data/realdata`` given the first
two volumes, and within one 2.5 ms Siemens tick from the first volume alone (see
``tests/dicom/test_vendor_meta.py``); the vendor rules live in :mod:`rtsc.dicom.ge` and
:mod:`rtsc.dicom.siemens`. Philips writes no slice times in DICOM (dcm2niix
``Philips/README.md``): none are reported.

Voxel axes are rtsc's (see :mod:`rtsc.dicom.assemble`): i along a DICOM row (increasing
column index), j along a column (increasing row index), k along the slices as the
assembler stacks them. A fact the headers do not give is None; a fact two sources give
differently is None too, with one warning naming the elements; nothing here raises for a
fact that is merely missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom import ge, siemens
from rtsc.dicom.csa import csa_image_header
from rtsc.dicom.multiframe import MULTIFRAME_SOP_CLASSES, first_volume_frames
from rtsc.dicom.multiframe import repetition_time_ms as multiframe_tr_ms
from rtsc.dicom.private import number, private_value, text
from rtsc.errors import DicomError, RtscError

log = logging.getLogger(__name__)

#: Philips' private block of classic MR images and two of its elements.
PHILIPS_IMAGING = "Philips Imaging DD 001"
PHILIPS_NUMBER_OF_SLICES = 0x18  # (2001,xx18) SL
PHILIPS_EPI_FACTOR = 0x13  # (2001,xx13) SL: echoes per excitation, 1 (or 0) if not EPI
PHILIPS_SCANNING_TECHNIQUE = 0x20  # (2001,xx20) CS, e.g. FEEPI, SEEPI, T1TFE, TSE

#: The first volume of a series: the one dataset of a mosaic or enhanced multi-frame
#: image, or {k: header} of the slices of a single-slice series.
FirstVolume = Union[Dataset, Mapping[int, Dataset]]


def manufacturer(ds: Dataset) -> str | None:
    """``GE``, ``SIEMENS``, ``PHILIPS`` or the Manufacturer text in capitals; None if absent."""
    name = text(ds.get("Manufacturer")).upper()
    for short in ("SIEMENS", "PHILIPS"):
        if short in name:
            return short
    if name.startswith("GE ") or name == "GE" or "GE MEDICAL" in name:
        return "GE"
    return name or None


def _positive_int(value: Any) -> int | None:
    result = number(value)
    return int(result) if result is not None and result >= 1 and result == int(result) else None


#: Where :func:`run_length` and :func:`slice_count` found their number, for messages.
NUMBER_OF_TEMPORAL_POSITIONS = "NumberOfTemporalPositions (0020,0105)"
SIEMENS_REPETITIONS = "the Siemens protocol's lRepetitions + 1"
PHILIPS_DYNAMICS = "Philips Number of Dynamic Scans (2001,xx81)"
IMAGES_IN_ACQUISITION = "ImagesInAcquisition (0020,1002)"
GE_LOCATIONS = "GE Locations in Acquisition (0021,xx4F)"
PHILIPS_SLICES = "Philips Number of Slices MR (2001,xx18)"
MOSAIC_IMAGES = "NumberOfImagesInMosaic"
FIRST_FRAMES = "the frames of the first temporal position"


def run_length(ds: Dataset) -> tuple[int | None, str | None]:
    """Volumes the run was planned with, as announced in one dataset's header, and the
    element that says so (one of the constants above; None with no number).

    NumberOfTemporalPositions (0020,0105) (GE, Philips); Siemens: ``lRepetitions`` + 1 of
    the protocol (CSA series header, or XA's private protocol); Philips: its
    NumberOfDynamicScans (2001,xx81) when the public element is absent. None when no
    source says, or when two say differently (warning). Not checked for plausibility:
    the assembler compares it with ``session.max_volumes``.
    """
    temporal = _positive_int(ds.get("NumberOfTemporalPositions"))
    planned = siemens.repetitions(ds) if manufacturer(ds) == "SIEMENS" else None
    if temporal is not None and planned is not None and temporal != planned:
        log.warning("NumberOfTemporalPositions (0020,0105) = %d but the Siemens protocol's "
                    "lRepetitions + 1 = %d: run length unknown", temporal, planned)
        return None, None
    if temporal is None and planned is None and manufacturer(ds) == "PHILIPS":
        dynamics = _positive_int(private_value(ds, 0x2001, PHILIPS_IMAGING, 0x81))
        return dynamics, PHILIPS_DYNAMICS if dynamics is not None else None
    if temporal is not None:
        return temporal, NUMBER_OF_TEMPORAL_POSITIONS
    return planned, SIEMENS_REPETITIONS if planned is not None else None


def n_expected(ds: Dataset) -> int | None:
    """Volumes the run was planned with, as announced in one dataset's header (see
    :func:`run_length`)."""
    return run_length(ds)[0]


def repetition_time_s(ds: Dataset) -> float | None:
    """Volume period, s: RepetitionTime (0018,0080) (enhanced images: their MR timing
    macro); GE adds the delay after the slices (see :func:`rtsc.dicom.ge.repetition_time_ms`)."""
    if manufacturer(ds) == "GE":
        tr_ms = ge.repetition_time_ms(ds, ge.protocol_data_block(ds))
    else:
        tr_ms = number(ds.get("RepetitionTime")) or multiframe_tr_ms(ds)
    return tr_ms / 1000.0 if tr_ms is not None and 0 < tr_ms < 1e6 else None


def phase_encoding_axis(ds: Dataset) -> str | None:
    """``i`` (InPlanePhaseEncodingDirection ROW), ``j`` (COL, or COLUMN in the MR
    FOV/geometry macro of enhanced images), else None."""
    direction = text(ds.get("InPlanePhaseEncodingDirection")).upper()
    if not direction:
        for group in ds.get("SharedFunctionalGroupsSequence") or []:
            for fov in group.get("MRFOVGeometrySequence") or []:
                direction = text(fov.get("InPlanePhaseEncodingDirection")).upper()
    return {"ROW": "i", "COL": "j", "COLUMN": "j"}.get(direction)


def phase_encoding_direction(ds: Dataset) -> str | None:
    """BIDS PhaseEncodingDirection in rtsc's voxel axes: ``i``, ``i-``, ``j`` or ``j-``.

    The sign: Siemens PhaseEncodingDirectionPositive (CSA image header; XA (0021,xx1C));
    GE's polarity, "unflipped" meaning positive as dcm2niix maps it (see
    :func:`rtsc.dicom.ge.phase_polarity_flipped`). None without both axis and sign
    (Philips never gives the sign).
    """
    axis = phase_encoding_axis(ds)
    maker = manufacturer(ds)
    positive = None
    if maker == "SIEMENS":
        positive = siemens.phase_positive(ds)
    elif maker == "GE":
        flipped = ge.phase_polarity_flipped(ds)
        positive = None if flipped is None else not flipped
    if axis is None or positive is None:
        return None
    return axis if positive else axis + "-"


def slices_per_volume(ds: Dataset) -> int | None:
    """Slices of one volume from one dataset's header, or None.

    Mosaic: NumberOfImagesInMosaic; enhanced multi-frame: frames of its first temporal
    position; GE: the smaller of ImagesInAcquisition and (0021,xx4F) when they differ
    (some GE series count every image of the run in ImagesInAcquisition; interpolated
    (ZIP) series multiply the private count, as dcm2niix reads them); Philips: Number of
    Slices MR (2001,xx18), else ImagesInAcquisition; others: ImagesInAcquisition.
    """
    return slice_count(ds)[0]


def slice_count(ds: Dataset) -> tuple[int | None, str | None]:
    """:func:`slices_per_volume` and the element that gave it (one of the constants
    above; None with no number). Not checked for plausibility: the assembler compares it
    with ``assembler.max_slices``."""
    if str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES:
        try:
            return len(first_volume_frames(ds)), FIRST_FRAMES
        except DicomError:
            return None, None
    if _is_mosaic(ds):
        count = _mosaic_slices(ds)
        return count, MOSAIC_IMAGES if count is not None else None
    images = _positive_int(ds.get("ImagesInAcquisition"))
    by_images = (images, IMAGES_IN_ACQUISITION if images is not None else None)
    if manufacturer(ds) == "PHILIPS":
        # Philips' classic export need not write ImagesInAcquisition; its slice count is
        # Number of Slices MR (2001,xx18), as dcm2niix reads it.
        slices = _positive_int(number(private_value(ds, 0x2001, PHILIPS_IMAGING,
                                                    PHILIPS_NUMBER_OF_SLICES), binary="i"))
        return (slices, PHILIPS_SLICES) if slices is not None else by_images
    if manufacturer(ds) != "GE":
        return by_images
    locations = ge.locations_in_acquisition(ds)
    if locations is not None and images is not None and locations != images:
        thickness = number(ds.get("SliceThickness"))
        spacing = number(ds.get("SpacingBetweenSlices"))
        zip_factor = round(thickness / spacing) if thickness and spacing else 1
        by_locations = locations * max(zip_factor, 1)
        return (images, IMAGES_IN_ACQUISITION) if images <= by_locations \
            else (by_locations, GE_LOCATIONS)
    return by_images if images is not None else \
        (locations, GE_LOCATIONS if locations is not None else None)


def _is_mosaic(ds: Dataset) -> bool:
    return "MOSAIC" in text(ds.get("ImageType")).upper().split("\\")


def _mosaic_slices(ds: Dataset) -> int | None:
    csa = csa_image_header(ds, {"NumberOfImagesInMosaic"}) or {}
    values = csa.get("NumberOfImagesInMosaic")
    if values:
        return _positive_int(values[0])
    return _positive_int(number(private_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0A),
                                binary="H"))


@dataclass(frozen=True, eq=False)  # eq=False: the slice times are an array
class AcquisitionFacts:
    """What the headers of a run's first volume say about its acquisition.

    Attributes
    ----------
    manufacturer : str or None, see :func:`manufacturer`
    tr_s : float or None, volume period, s
    n_expected : int or None, volumes announced
    slice_times_s : (n_slices,) float64 or None
        Acquisition time of each slice relative to the earliest, s, in rtsc's k order.
    multiband_factor : int or None, slices excited together (1 single band)
    phase_encoding_direction : str or None, BIDS form in rtsc's voxel axes
    phase_encoding_axis : str or None, ``i`` or ``j`` even when the sign is unknown
    n_expected_source : str or None, the element that gave ``n_expected`` (for messages)
    """

    manufacturer: str | None
    tr_s: float | None
    n_expected: int | None
    slice_times_s: np.ndarray | None
    multiband_factor: int | None
    phase_encoding_direction: str | None
    phase_encoding_axis: str | None
    n_expected_source: str | None = None


def acquisition_facts(first_volume: FirstVolume, n_slices: int | None = None,
                      second_volume: FirstVolume | None = None) -> AcquisitionFacts:
    """Every fact at once, each warning logged once (what the assembler calls, once per
    series, with its first volume).

    Parameters
    ----------
    first_volume : the mosaic or enhanced dataset, or {k: header} of the first volume's
        slices (k as the assembler stacks them: by position along the slice normal).
        Headers only: datasets read with ``stop_before_pixels`` do.
    n_slices : slices per volume of a single-slice series (default: as many as given;
        slice times then need all of them, except for GE's protocol-block rule)
    second_volume : the next volume, same form, when it is at hand. Siemens writes a
        volume's own measured times, and the first volume's can be off: by one 2.5 ms
        tick (dcm_qa_nih's PA series, VB17), or wholly (CMRR and XA first volumes,
        dcm2niix issues 240 and 870). As dcm2niix does, the second volume's times are
        taken when they span a different range than the first's. GE's times come from
        the protocol and do not change.
    """
    ds = _first_dataset(first_volume)
    times, multiband, tr_s = _timing(first_volume, n_slices, second_volume)
    count, source = run_length(ds)
    return AcquisitionFacts(manufacturer=manufacturer(ds), tr_s=tr_s, n_expected=count,
                            slice_times_s=times, multiband_factor=multiband,
                            phase_encoding_direction=phase_encoding_direction(ds),
                            phase_encoding_axis=phase_encoding_axis(ds),
                            n_expected_source=source)


def slice_times_s(first_volume: FirstVolume, n_slices: int | None = None,
                  second_volume: FirstVolume | None = None) -> np.ndarray | None:
    """Acquisition time of each slice relative to the earliest, s, in rtsc's k order, or
    None (see :func:`acquisition_facts` for the arguments).

    GE: the protocol block's slice order with the TR (dcm2niix's rule), checked against
    TriggerTime (ms); without a block, TriggerTime, else the RTIA timer. Siemens:
    MosaicRefAcqTimes (ms); VB12/VB13: the protocol's slice order and delay; XA enhanced:
    TimeAfterStart and FrameAcquisitionDateTime of the frames; single slices:
    AcquisitionTime. Philips and others: None. Times spanning more than the TR are a
    contradiction (None, warning); times all equal are no slice timing (None).
    """
    return _timing(first_volume, n_slices, second_volume)[0]


def multiband_factor(first_volume: FirstVolume, n_slices: int | None = None,
                     second_volume: FirstVolume | None = None) -> int | None:
    """Slices excited together, 1 for single band, None when unknown.

    GE: (0043,xxB6) and the protocol block's ``MBACCEL``. Siemens: the slices sharing
    the earliest slice time (as dcm2niix counts them); a PAT mode text ``s<N>`` that says
    otherwise makes both the factor and the slice times unknown (XA11 multiband can
    carry single-band times: dcm2niix issue 303).
    """
    return _timing(first_volume, n_slices, second_volume)[1]


def _first_dataset(first_volume: FirstVolume) -> Dataset:
    if isinstance(first_volume, Dataset):
        return first_volume
    if not first_volume:
        raise RtscError("first_volume holds no slice")
    return first_volume[min(first_volume)]


def _timing(first_volume: FirstVolume, n_slices: int | None,
            second_volume: FirstVolume | None = None
            ) -> tuple[np.ndarray | None, int | None, float | None]:
    """(slice times s, multiband factor, TR s) of a first volume."""
    ds = _first_dataset(first_volume)
    maker = manufacturer(ds)
    if maker == "GE" and not isinstance(first_volume, Dataset):
        found = ge.timing(first_volume, n_slices or len(first_volume))
        return found.slice_times_s, found.multiband, found.tr_s
    tr_s = repetition_time_s(ds)
    if maker == "GE":  # one GE dataset: only the header-wide facts
        return None, ge.multiband_factor(ds, ge.protocol_data_block(ds)), tr_s
    if maker != "SIEMENS":
        return None, None, tr_s
    times = _siemens_times(first_volume, n_slices, tr_s)
    later = _siemens_times(second_volume, n_slices, tr_s) if second_volume is not None else None
    if later is not None and (times is None or abs(np.ptp(later) - np.ptp(times)) > 1e-6):
        times = later
    if times is not None and not np.ptp(times) > 0:
        times = None  # all slices at once (3D): no slice timing
    from_times = siemens.simultaneous_slices(times) if times is not None else None
    declared = siemens.declared_multiband(ds)
    if declared is not None and declared > 1 and from_times is not None \
            and from_times != declared:
        log.warning("Siemens PAT mode text (0051,1011) says multiband %d but the slice times "
                    "show %d slices at once: slice times and multiband factor unknown",
                    declared, from_times)
        return None, None, tr_s
    return times, from_times if from_times is not None else declared, tr_s


def _siemens_times(first_volume: FirstVolume, n_slices: int | None,
                   tr_s: float | None) -> np.ndarray | None:
    if not isinstance(first_volume, Dataset):
        n = n_slices or len(first_volume)
        return siemens.checked(siemens.classic_slice_times_s(first_volume, n), tr_s,
                               "AcquisitionTime (0008,0032)")
    ds = first_volume
    if str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES:
        try:
            frames = first_volume_frames(ds)
        except DicomError as exc:
            log.warning("enhanced image without usable frame geometry (%s): no slice times", exc)
            return None
        return siemens.checked(siemens.frame_times_s(ds, frames), tr_s,
                               "FrameAcquisitionDateTime (0018,9074)")
    if _is_mosaic(ds):
        count = _mosaic_slices(ds)
        return None if count is None else siemens.mosaic_slice_times_s(ds, count, tr_s)
    return None


def bids_sidecar(first_volume: FirstVolume, n_slices: int | None = None,
                 facts: AcquisitionFacts | None = None,
                 second_volume: FirstVolume | None = None) -> dict[str, Any]:
    """A BIDS sidecar (``bold.json``) for the run: only keys the headers support.

    RepetitionTime (s), SliceTiming (s, rtsc's k order: the slice axis of the volumes
    rtsc publishes), MultibandAccelerationFactor (written when > 1, as dcm2niix does),
    PhaseEncodingDirection (rtsc's voxel axes; PhaseEncodingAxis when only the axis is
    known), and descriptive keys: Manufacturer, ManufacturersModelName,
    SoftwareVersions, MagneticFieldStrength (T), EchoTime (s), FlipAngle (deg). No
    patient, study or operator identifiers. ``facts``: reuse an
    :func:`acquisition_facts` result instead of reading the headers again;
    ``second_volume``: see :func:`acquisition_facts`.
    """
    ds = _first_dataset(first_volume)
    facts = facts if facts is not None else acquisition_facts(first_volume, n_slices,
                                                              second_volume)
    sidecar: dict[str, Any] = {}
    for key, keyword in (("Manufacturer", "Manufacturer"),
                         ("ManufacturersModelName", "ManufacturerModelName"),
                         ("SoftwareVersions", "SoftwareVersions")):
        value = text(ds.get(keyword))
        if value:
            sidecar[key] = value
    field_t = number(ds.get("MagneticFieldStrength"))
    if field_t is not None and field_t > 0:
        sidecar["MagneticFieldStrength"] = field_t
    echo_ms = _echo_time_ms(ds)
    if echo_ms is not None:
        sidecar["EchoTime"] = round(echo_ms / 1000.0, 9)
    flip = _flip_angle_deg(ds)
    if flip is not None:
        sidecar["FlipAngle"] = flip
    if facts.tr_s is not None:
        sidecar["RepetitionTime"] = round(facts.tr_s, 9)
    if facts.slice_times_s is not None:
        sidecar["SliceTiming"] = [round(float(t), 6) for t in facts.slice_times_s]
    if facts.multiband_factor is not None and facts.multiband_factor > 1:
        sidecar["MultibandAccelerationFactor"] = facts.multiband_factor
    if facts.phase_encoding_direction is not None:
        sidecar["PhaseEncodingDirection"] = facts.phase_encoding_direction
    elif facts.phase_encoding_axis is not None:
        sidecar["PhaseEncodingAxis"] = facts.phase_encoding_axis
    return sidecar


def _shared_item(ds: Dataset, sequence: str) -> Dataset | None:
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for item in group.get(sequence) or []:
            return item
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    for item in (frames[0].get(sequence) or []) if frames else []:
        return item
    return None


def _echo_time_ms(ds: Dataset) -> float | None:
    value = number(ds.get("EchoTime"))
    if value is None:
        echo = _shared_item(ds, "MREchoSequence")
        value = number(echo.get("EffectiveEchoTime")) if echo is not None else None
    return value if value is not None and value > 0 else None


def _flip_angle_deg(ds: Dataset) -> float | None:
    value = number(ds.get("FlipAngle"))
    if value is None:
        timing = _shared_item(ds, "MRTimingAndRelatedParametersSequence")
        value = number(timing.get("FlipAngle")) if timing is not None else None
    return value if value is not None and value > 0 else None
