"""The state of one series in the assembler, and the order its volumes leave in.

Volumes leave in index order: one waits while an earlier volume is still collecting
slices, and, when it came well ahead of its schedule, a while for missing earlier
ones (:meth:`SeriesState.gap_wait`); a volume whose place has passed is refused as
late.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from rtsc.dicom.numbering import VolumeNumbering
from rtsc.dicom.pixels import pixel_digest
from rtsc.dicom.slices import PendingVolume
from rtsc.dicom.vendor import FirstVolume
from rtsc.errors import DicomError
from rtsc.volume import SeriesInfo, Volume


@dataclass
class SeriesState:
    """One series being assembled: its geometry, what is pending, ready and published,
    and the order volumes leave in (:meth:`release`)."""

    info: SeriesInfo
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    n_slices: int | None = None
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # The first image's plane (row and column cosines, spacing: float64 bytes) and its
    # normal: later images with the very same plane reuse the normal.
    plane: bytes | None = None
    normal: np.ndarray | None = None
    spacing_fallback: float | None = None
    rescale: tuple[float, float] = (1.0, 1.0)
    slice_matrix: tuple[int, ...] | None = None
    numbering: VolumeNumbering | None = None
    pending: dict[int, PendingVolume] = field(default_factory=dict)
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
        key, digest = hash(uid), pixel_digest(ds)
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

    def clashes(self, index: int, position: float) -> bool:
        """True when volume ``index`` is out already or has an image at ``position``."""
        if index in self.published or index in self.ready:
            return True
        pending = self.pending.get(index)
        return pending is not None and position in pending.slices

    def overdue(self, pending: PendingVolume, now: float, slice_timeout_s: float) -> bool:
        """Whether a volume still collecting slices is given up on at ``now`` (epoch s):
        nothing came for ``slice_timeout_s``, or a later volume is complete and this
        one has waited a TR since its last slice."""
        if now - pending.last_seen >= slice_timeout_s:
            return True
        # A later volume is complete and this one has waited a TR since its last slice:
        # its missing slices are lost, not late.
        later_done = any(i > pending.number for i in self.ready)
        tr = self.info.tr_s or slice_timeout_s
        return later_done and now - pending.last_seen >= tr

    def gap_wait(self, index: int, slice_timeout_s: float) -> float:
        """How long ready volume ``index`` waits for missing earlier ones, seconds.

        A volume that arrives on its schedule (about a TR per index after the last one
        published) waits for nothing: the ones before it are lost, and waiting would
        only delay it. One that arrives well ahead of its schedule (files read from a
        folder at once, or sent out of order) waits a TR (at most the slice timeout) for
        the missing ones, so the series is processed in order.
        """
        tr = self.info.tr_s or slice_timeout_s
        if self.next_index is None or self.last_release_since is None:
            return 0.0
        expected = self.last_release_since + (index - self.next_index + 1) * tr
        if self.ready_since[index] > expected - 0.5 * tr:
            return 0.0
        return min(tr, slice_timeout_s)

    def release(self, now: float, slice_timeout_s: float) -> list[Volume]:
        """Ready volumes in index order. A volume waits while an earlier one is pending,
        and for :meth:`gap_wait` while an index between it and the last published is
        missing; after that the missing volumes are given up (they arrive late)."""
        out: list[Volume] = []
        for index in sorted(self.ready):
            if any(p < index for p in self.pending):
                break
            since = self.ready_since.setdefault(index, now)
            if self.next_index is not None and any(
                    i not in self.refused for i in range(self.next_index, index)) \
                    and now - since < self.gap_wait(index, slice_timeout_s):
                break
            out.append(self.ready.pop(index))
            self.last_release_since = self.ready_since.pop(index)
            self.published.add(index)
            self.next_index = max(index + 1, self.next_index or 0)
        return out

    def check_not_late(self, index: int) -> None:
        """Refuse a volume whose place has passed: a later one is published already.

        Raises
        ------
        DicomError
            (code ``late_volume``) it is.
        """
        if self.next_index is not None and index < self.next_index \
                and index not in self.published:
            raise DicomError(f"volume {index} arrived after volume {self.next_index - 1} "
                             "was published; archived, not processed", code="late_volume",
                             index=index)
