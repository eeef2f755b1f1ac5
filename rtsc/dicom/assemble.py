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
import time
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
from pydicom.dataset import Dataset

from rtsc.config import AssemblerConfig, SeriesFilterConfig, SessionConfig
from rtsc.dicom.geometry import acquisition_time, int_or_none, plane_geometry, slice_spacing
from rtsc.dicom.incoming import Incoming
from rtsc.dicom.mosaic import MosaicLayoutCache, is_mosaic, mosaic_to_volume
from rtsc.dicom.multiframe import MULTIFRAME_SOP_CLASSES, frame_count, multiframe_volumes
from rtsc.dicom.numbering import VolumeNumbering, slices_per_volume
from rtsc.dicom.pixels import stored_pixels, stored_rescale
from rtsc.dicom.recognise import skip_reason
from rtsc.dicom.series_info import clean_description, series_info, series_key, volume_number
from rtsc.dicom.series_state import SeriesState
from rtsc.dicom.slices import PendingVolume, SliceImage, slice_timing, stack_slices
from rtsc.dicom.vendor import NUMBER_OF_TEMPORAL_POSITIONS, FirstVolume, acquisition_facts, \
    bids_sidecar
from rtsc.errors import DicomError
from rtsc.ranges import index_ranges, ranges_text
from rtsc.volume import Volume, series_id

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
        self._series: dict[str, SeriesState] = {}
        self._by_uid: dict[str, SeriesState] = {}  # SeriesInstanceUID -> state, never leaves
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
            series = series_id(series_key(dataset)) \
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
                if state.overdue(pending, now, self.config.slice_timeout_s):
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
                deadlines.append(state.ready_since[first]
                                 + state.gap_wait(first, self.config.slice_timeout_s))
        return min(deadlines) if deadlines else None

    def forget(self, series: str) -> None:
        """Drop a finished series' state."""
        self._series.pop(series, None)
        self._by_uid = {uid: s for uid, s in self._by_uid.items() if s.info.series != series}

    # -- internals -------------------------------------------------------------------

    def _state(self, ds: Dataset, source: str, echo: int | None = None,
               echo_time_s: float | None = None) -> SeriesState:
        uid = series_key(ds, echo)
        state = self._by_uid.get(uid)
        if state is None or state.info.series not in self._series:
            # First dataset of the series: read its series-level header once.
            info = series_info(ds, source, echo, echo_time_s, self.max_volumes)
            state = self._series.get(info.series) or SeriesState(info=info)
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
                   f"{clean_description(ds) or '(no description)'} skipped: {reason}; "
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

    def _check_geometry(self, state: SeriesState, shape: tuple[int, ...],
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
        index = self._index(*volume_number(ds))
        if index in state.published or index in state.ready:
            raise DicomError(f"volume {index} was already received from another image "
                             "(same AcquisitionNumber); archived, not processed",
                             code="unplaced", index=index)
        state.check_not_late(index)
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
        number, tag = volume_number(ds)
        self._index(number, tag)  # refuses a file number beyond the cap
        pixels = stored_pixels(ds, frames=frame_count(ds))
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
        # Most images repeat the series' plane bit for bit: then its normal (and the
        # tolerance checks below, which exact equality passes) need no recomputing.
        plane = row_cos.tobytes() + col_cos.tobytes() + spacing.tobytes()
        same_plane = plane == state.plane
        normal = state.normal if same_plane else np.cross(row_cos, col_cos)
        stored = stored_pixels(ds)
        if state.geometry is None:
            # Everything that can refuse the series' first image before the state is
            # set: a refused first image leaves the series to the next one.
            count = slices_per_volume(ds, self.config.slices_per_volume,
                                      self.config.max_slices)
            numbering = VolumeNumbering(ds, count, max_volumes=self.max_volumes)
            rescale = stored_rescale(ds, stored.dtype)
            state.geometry = (row_cos, col_cos, spacing)
            state.plane, state.normal = plane, normal
            state.slice_matrix = stored.shape
            state.n_slices = count.n
            state.numbering = numbering
            state.rescale = rescale
            try:
                state.spacing_fallback = slice_spacing(ds)
            except DicomError:
                state.spacing_fallback = None
        elif not same_plane and not (np.allclose(row_cos, state.geometry[0], atol=1e-4)
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
        if state.clashes(index, position) and state.numbering.fall_back(ds):
            index = state.numbering.index(ds, position)
        state.check_not_late(index)
        if index in state.published or index in state.ready:
            raise DicomError(f"volume {index} was already published when this slice at "
                             f"{position:.2f} mm arrived ({state.numbering.rule}); archived, "
                             "not processed", code="late_slice", index=index)
        pending = state.pending.get(index)
        now = self.clock()
        if pending is None:
            pending = PendingVolume(number=index, first_seen=now)
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
        pending.slices[position] = SliceImage(position, stored, ipp, acquisition_time(ds),
                                              t_received, ds)
        if len(pending.slices) == state.n_slices:
            del state.pending[index]
            state.ready[index] = self._build(state, pending)
        return self._release(state)

    def _finish_incomplete(self, state: SeriesState, pending: PendingVolume) -> list[Event]:
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

    def _build(self, state: SeriesState, pending: PendingVolume) -> Volume:
        """Stack the slices of ``pending`` by position along the normal."""
        assert state.geometry is not None and state.n_slices is not None
        data, affine, slices, filled = stack_slices(pending, state.n_slices, state.geometry,
                                                    state.affine, state.spacing_fallback,
                                                    state.rescale)
        self._check_geometry(state, data.shape, affine, pending.number)
        self._learn(state, {k: s.header for k, s in zip(filled, slices)})
        t_acquired, slice_times = slice_timing(slices, filled, state.n_slices)
        missing = tuple(sorted(set(range(state.n_slices)) - set(filled)))
        pixel_dtype = slices[0].pixels.dtype
        stored_dtype = pixel_dtype if state.rescale == (1.0, 0.0) else np.dtype(np.float32)
        return Volume(data=data, affine=affine, index=pending.number, info=state.info,
                      t_acquired=t_acquired, t_received=max(s.t_received for s in slices),
                      t_assembled=self.clock(), slice_times_s=slice_times,
                      stored_dtype=stored_dtype, missing_slices=missing)

    def _learn(self, state: SeriesState, headers: FirstVolume) -> None:
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

    def _release(self, state: SeriesState, now: float | None = None) -> list[Event]:
        """Ready volumes of ``state`` in index order (see :meth:`SeriesState.release`)."""
        now = self.clock() if now is None else now
        return list(state.release(now, self.config.slice_timeout_s))
