"""Which volume a single-slice image belongs to, by the vendors' rules, checked.

No one tag numbers the time points of every scanner's single-slice series:

- TemporalPositionIdentifier (0020,0100), when the images carry it, is the time point
  (GE with TriggerTime, the Philips classic export, the simulator).
- Siemens counts volumes in AcquisitionNumber.
- GE writes AcquisitionNumber 1 on every slice of a run: the time point is only in the
  instance number cycling over the slices of a volume,
  ``volume = (InstanceNumber - 1) // slices``.
- Philips numbers its classic export slice by slice across time (instances 1, 2, 3
  are one slice at three time points): ``volume = (InstanceNumber - 1) % time points``.

The slice count is as unreliable: GE's ImagesInAcquisition counts every image of the
run in some series (128 for 8 slices x 16 time points), while its private "locations
in acquisition" (0021,104F) holds the slices per volume, multiband included. So a
series' rule is chosen from its first image, and every later image is checked
against it: the instance-number cycle must put each instance at the slice position
its slot had before, and a volume may hold one image per slice position. An image the
rule cannot place raises :class:`~rtsc.errors.DicomError` (code ``unplaced``) naming
the reason; the assembler archives it and alerts. One contradiction is resolved
instead: an AcquisitionNumber that stays the same while the positions repeat is not a
volume counter (GE, or a vendor rtsc does not know), and the series falls back to the
instance-number cycle.

Counts and numbers are checked against the config's caps before anything is sized by
them: a slice count above ``assembler.max_slices`` and a volume number (or Philips run
length) above ``session.max_volumes`` raise :class:`~rtsc.errors.DicomError` (code
``implausible_header``) naming the element and its value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from rtsc.dicom.geometry import int_or_none
from rtsc.dicom.vendor import NUMBER_OF_TEMPORAL_POSITIONS, manufacturer
from rtsc.dicom.vendor import slice_count as header_slice_count
from rtsc.errors import DicomError

log = logging.getLogger(__name__)

TEMPORAL_POSITION = "TemporalPositionIdentifier"
ACQUISITION_NUMBER = "AcquisitionNumber"
INSTANCE_CYCLE = "InstanceNumber cycle"
INSTANCE_ACROSS_TIME = "InstanceNumber across time"
RULES = (TEMPORAL_POSITION, ACQUISITION_NUMBER, INSTANCE_CYCLE, INSTANCE_ACROSS_TIME)


def _positive(value: object) -> int | None:
    number = int_or_none(value)
    return number if number is not None and number > 0 else None


@dataclass(frozen=True)
class SliceCount:
    """Slices per volume of a single-slice series and where the number came from.

    Attributes
    ----------
    n : int
    source : str
        The tag or setting that gave it, for messages.
    tag : str or None
        The element that gave it (None for the setting).
    """

    n: int
    source: str
    tag: str | None = None


def slices_per_volume(ds: Dataset, configured: int | None = None,
                      max_slices: int | None = None) -> SliceCount:
    """The slice count of a single-slice series, from its first image.

    ``configured`` (``assembler.slices_per_volume``) wins when set; otherwise the
    vendor's rule (:func:`rtsc.dicom.vendor.slices_per_volume`: GE's (0021,xx4F) when
    ImagesInAcquisition counts the whole run, Philips' (2001,xx18), else
    ImagesInAcquisition), at most ``max_slices`` (``assembler.max_slices``).

    Raises
    ------
    DicomError
        (code ``unsupported``) when no source gives a count; (code
        ``implausible_header``) when the header's count is above ``max_slices``: every
        volume would be allocated that large (ImagesInAcquisition 20000 on 64 x 64
        slices built a 64 x 64 x 20000 volume from 36 slices).
    """
    if configured:
        return SliceCount(int(configured), "assembler.slices_per_volume")
    count, tag = header_slice_count(ds)
    if count is not None:
        if max_slices is not None and count > max_slices:
            raise DicomError(f"{tag} says {count} slices per volume, more than "
                             f"assembler.max_slices ({max_slices}); the series' images are "
                             "archived, not processed (set assembler.slices_per_volume if "
                             "the header is wrong)", code="implausible_header")
        maker = manufacturer(ds) or "unknown"
        return SliceCount(count, f"the {maker} header's slice count", tag)
    raise DicomError("single-slice series without ImagesInAcquisition (or a vendor's slice "
                     "count): set assembler.slices_per_volume in the config",
                     code="unsupported")


def _first_rule(ds: Dataset) -> str:
    if _positive(ds.get(TEMPORAL_POSITION)) is not None:
        return TEMPORAL_POSITION
    maker = manufacturer(ds)
    if maker == "GE":
        return INSTANCE_CYCLE
    if maker == "PHILIPS":
        if _positive(ds.get("NumberOfTemporalPositions")) is None:
            raise DicomError("Philips single slices with neither TemporalPositionIdentifier "
                             "nor NumberOfTemporalPositions: their volumes cannot be told "
                             "apart", code="unsupported")
        return INSTANCE_ACROSS_TIME
    if _positive(ds.get(ACQUISITION_NUMBER)) is not None:
        return ACQUISITION_NUMBER
    return INSTANCE_CYCLE


@dataclass
class VolumeNumbering:
    """The numbering rule of one single-slice series and what checks it.

    Parameters
    ----------
    first : Dataset
        The series' first image (any slice of any volume).
    count : SliceCount
    max_volumes : int or None
        ``session.max_volumes``: an image numbered beyond it is refused (None: no cap).

    Attributes
    ----------
    rule : str
        One of :data:`RULES`.
    slot_positions : dict
        Instance-number cycle only: slot (``(InstanceNumber - 1) % n``) -> slice position
        along the normal (mm) seen first in that slot.
    """

    first: Dataset
    count: SliceCount
    rule: str = ""
    time_points: int | None = None
    slot_positions: dict[int, float] = field(default_factory=dict)
    _acquisition_numbers: set[int] = field(default_factory=set)
    max_volumes: int | None = None

    def __post_init__(self) -> None:
        self.rule = _first_rule(self.first)
        self.time_points = _positive(self.first.get("NumberOfTemporalPositions"))
        if self.rule == INSTANCE_ACROSS_TIME and self.max_volumes is not None \
                and self.time_points is not None and self.time_points > self.max_volumes:
            raise DicomError(f"{NUMBER_OF_TEMPORAL_POSITIONS} says {self.time_points} time "
                             f"points, more than session.max_volumes ({self.max_volumes}), "
                             "and numbers this Philips series' volumes: its images are "
                             "archived, not processed", code="implausible_header")
        log.info("single-slice series numbered by %s, %d slices per volume (%s)",
                 self.rule, self.count.n, self.count.source)

    def index(self, ds: Dataset, position: float) -> int:
        """0-based volume index of an image at ``position`` (mm along the normal).

        Raises
        ------
        DicomError
            (code ``unplaced``) when the image lacks what the rule needs or contradicts
            the positions seen before; (code ``implausible_header``) when it numbers a
            volume beyond ``max_volumes``.
        """
        if self.rule == TEMPORAL_POSITION:
            number = _positive(ds.get(TEMPORAL_POSITION))
            if number is None:
                raise DicomError("no TemporalPositionIdentifier, which the series' first "
                                 "image had", code="unplaced")
            return self._checked(number - 1, "TemporalPositionIdentifier (0020,0100)", number)
        if self.rule == ACQUISITION_NUMBER:
            number = _positive(ds.get(ACQUISITION_NUMBER))
            if number is None:
                raise DicomError("no AcquisitionNumber, which numbers this series' volumes",
                                 code="unplaced")
            index = self._checked(number - 1, "AcquisitionNumber (0020,0012)", number)
            self._acquisition_numbers.add(number)
            return index
        instance = _positive(ds.get("InstanceNumber"))
        if instance is None:
            raise DicomError(f"no InstanceNumber, which numbers this series' volumes "
                             f"({self.rule})", code="unplaced")
        if self.rule == INSTANCE_ACROSS_TIME:
            assert self.time_points is not None
            return (instance - 1) % self.time_points
        index = self._checked((instance - 1) // self.count.n, "InstanceNumber (0020,0013)",
                              instance)
        slot = (instance - 1) % self.count.n
        seen = self.slot_positions.setdefault(slot, position)
        if abs(seen - position) > 0.01:
            raise DicomError(
                f"instance {instance} lies at {position:.2f} mm, but its place in the cycle "
                f"of {self.count.n} slices ({self.count.source}) was at {seen:.2f} mm in "
                "earlier volumes: the slice count does not fit the series", code="unplaced")
        return index

    def _checked(self, index: int, tag: str, value: int) -> int:
        """``index``, unless it lies beyond ``max_volumes`` (DicomError naming ``tag``)."""
        if self.max_volumes is not None and index >= self.max_volumes:
            raise DicomError(f"{tag} {value} numbers volume {index + 1}, beyond "
                             f"session.max_volumes ({self.max_volumes}); archived, not "
                             "processed", code="implausible_header")
        return index

    def fall_back(self, ds: Dataset) -> bool:
        """Switch from AcquisitionNumber to the instance-number cycle after a clash.

        Called when an image would take a slice position its volume already has (or a
        volume already published). True when the series' AcquisitionNumber has never
        changed, so it does not count volumes and the cycle is used from now on.
        """
        if self.rule != ACQUISITION_NUMBER or len(self._acquisition_numbers) != 1 \
                or _positive(ds.get("InstanceNumber")) is None:
            return False
        log.warning("AcquisitionNumber %d on every image so far: it does not count volumes; "
                    "the series is numbered by InstanceNumber from now on",
                    next(iter(self._acquisition_numbers)))
        self.rule = INSTANCE_CYCLE
        return True
