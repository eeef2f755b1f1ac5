"""The series of a run, on the worker: start, each volume, alerts, end.

A series starts at its first volume (its stages, writer and alert rules are built
then) and ends at its last expected volume, after ``session.series_timeout_s`` of
silence, or when the run stops; its end writes qc.json (summary, timing, verdict),
the final maps and confounds, and starts report.html in a separate process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rtsc import messages
from rtsc.config import Config
from rtsc.history.live import HistoryBook, SeriesNorm
from rtsc.output.publish import Publisher
from rtsc.output.report import ReportJobs
from rtsc.output.series_writer import SeriesWriter
from rtsc.output.session import SessionStore
from rtsc.pipeline.cord.stages import cord_confound_columns
from rtsc.pipeline.motion.reference import ReferenceImage
from rtsc.pipeline.motion.stages import MotionStage
from rtsc.pipeline.qc.alerts import AlertEngine, protocol_differences, series_rules
from rtsc.pipeline.qc.verdict import verdict
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.stages import automatic_mask
from rtsc.ranges import missing_ranges
from rtsc.service.writes import WriteFailures, failure_code
from rtsc.volume import Volume

log = logging.getLogger(__name__)

# Stages that still run on a volume skipped by ``pipeline.backlog: newest`` (cheap,
# and their bookkeeping needs every volume: arrival timing).
SKIPPED_VOLUME_STAGES = frozenset({"timing"})


@dataclass
class ActiveSeries:
    """Per-series state on the worker."""

    first: Volume
    pipeline: SeriesPipeline
    writer: SeriesWriter
    last_seen: float
    indices: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    n_alerts: int = 0
    alerts: AlertEngine | None = None
    timing_ms: dict[str, list[float]] = field(default_factory=dict)
    silent_alerted: bool = False
    skipped: list[int] = field(default_factory=list)
    #: publish.volumes: Fortran-order flat indices of the voxels published, from the
    #: first corrected volume's automatic mask
    voxel_index: np.ndarray | None = None
    #: history.enabled: the series' yardstick among the earlier series of its protocol
    norm: SeriesNorm | None = None


class SeriesBook:
    """The open and ended series of a run, and what happens to each volume.

    Runs on the pipeline worker only.

    Parameters
    ----------
    config : Config
    store : SessionStore
        Where each series gets its folder.
    publisher : Publisher
    reports : ReportJobs
        The report.html processes.
    forget : callable(series UID)
        Called when a series ends (the assemblers drop what they hold of it).
    on_published : callable()
        Called once a volume is published (the archive writes waiting for it may go).
    on_series_end : callable(header dict) or None
        Called after a series ends (used by `rtsc demo`).

    Attributes
    ----------
    active : dict of str to ActiveSeries
        The open series, by series UID.
    ended : set of str
        The series UIDs ended so far (a later volume of one is archived only).
    ended_series : list of dict
        The series_end headers published so far.
    session_minutes : dict of str to float
        Session-wide: clean minutes per FD threshold of the series ended so far.
    session_reference : ReferenceImage or None
        The motion reference of the series that ended last (for the next series'
        ``motion.reference: series:PREVIOUS``).
    history : HistoryBook or None
        ``history.enabled``: the site's QC history (opened by RunService.start).
    """

    def __init__(self, config: Config, store: SessionStore, publisher: Publisher,
                 reports: ReportJobs, forget: Callable[[str], None],
                 on_published: Callable[[], None],
                 on_series_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.publisher = publisher
        self.reports = reports
        self._forget = forget
        self._on_published = on_published
        self.on_series_end = on_series_end
        self.active: dict[str, ActiveSeries] = {}
        self.ended: set[str] = set()
        self.ended_series: list[dict[str, Any]] = []
        self.session_minutes: dict[str, float] = {}
        self.session_reference: ReferenceImage | None = None
        self.writes = WriteFailures(config.session.dir, self.alert)
        self.history = HistoryBook(config, self.alert) if config.history.enabled else None

    def alert(self, series: str | None, level: str, code: str, text: str,
              index: int | None) -> None:
        """Log and publish an alert, counted in its series' summary while it is open."""
        log.log(logging.WARNING if level != "info" else logging.INFO, "alert %s/%s: %s",
                level, code, text)
        self.publisher.publish(messages.alert(level, code, text, index), series or "")
        if series in self.active:
            self.active[series].n_alerts += 1

    def report_failures(self, failures: list[tuple[str, str]]) -> None:
        """Alert on report.html processes that failed, as (series, text) pairs."""
        for series, text in failures:
            self.alert(series, "warning", "report_failed", text, None)

    def deadlines(self) -> list[float]:
        """When something is due (a series' timeout or its silence alert), epoch seconds."""
        due = [s.last_seen + self.config.session.series_timeout_s for s in self.active.values()]
        due += [d for d in map(self._silence_deadline, self.active.values()) if d is not None]
        return due

    def _start(self, volume: Volume) -> ActiveSeries:
        info = volume.info
        directory = self.store.series_dir(info.series)
        stages, setup_alerts = build_stages(self.config, info, dict(self.session_minutes),
                                            self.session_reference)
        active = ActiveSeries(first=volume, pipeline=SeriesPipeline(stages),
                              writer=SeriesWriter(directory, volume, cord_confound_columns(
                                  volume.shape[2]) if self.config.pipeline.mode == "spinal_cord"
                                  else ()), last_seen=time.time(),
                              alerts=AlertEngine(series_rules(self.config.qc), info.tr_s)
                              if self.config.qc.enabled else None)
        self.active[info.series] = active
        if self.history is not None:  # one query: the earlier series of its protocol
            active.norm = self.history.start(info, volume.shape, volume.voxel_size_mm,
                                             volume.index)
        glm = next((s for s in stages if s.name == "glm"), None)
        design = getattr(glm, "design", None)
        self.publisher.publish(messages.series_start(
            volume.shape, volume.voxel_size_mm, info.tr_s, info.n_expected,
            self.config.pipeline.mode, affine=volume.affine,
            design=None if design is None else messages.design_field(
                design.task_names, design.fixed[:, :len(design.task_names)]),
            series_number=info.series_number,
            description=info.description, source=info.source, echo=info.echo,
            slice_times_s=info.slice_times_s, multiband_factor=info.multiband_factor,
            phase_encoding_direction=info.phase_encoding_direction), info.series)
        log.info("series %s started: %s, TR %s s, %s volumes expected", info.series,
                 volume.shape, info.tr_s, info.n_expected)
        for level, code, text in setup_alerts:
            self.alert(info.series, level, code, text, volume.index)
        if self.config.qc.enabled:
            for text in protocol_differences(volume.shape, volume.voxel_size_mm, info.tr_s,
                                             self.config.qc.protocol):
                self.alert(info.series, "critical", "protocol_mismatch", text, volume.index)
        return active

    def handle_volume(self, volume: Volume, skip: bool = False) -> None:
        """Process, publish and write one volume (starting or ending its series).

        ``skip``: a newer volume of the series is waiting (``pipeline.backlog: newest``):
        only the archive, bold.nii and the cheap bookkeeping stages.
        """
        series = volume.info.series
        if series in self.ended:
            self.alert(series, "warning", "late_volume",
                       f"volume {volume.index} arrived after its series ended; archived only",
                       volume.index)
            return
        active = self.active.get(series) or self._start(volume)
        active.last_seen = time.time()
        active.silent_alerted = False
        if skip:  # backlog: archive and bold.nii only; cheap bookkeeping stages still run
            output = active.pipeline.process(volume, only=SKIPPED_VOLUME_STAGES)
            output.flags.append("skipped")
            active.skipped.append(volume.index)
        else:
            output = active.pipeline.process(
                volume, on_feedback=lambda metrics: self.publisher.publish(messages.feedback(
                    volume.index, volume.t_received, metrics.get("feedback"),
                    metrics.get("roi") or {}), series))
        flags = list(output.flags)
        if volume.missing_slices:
            flags.append("missing_slices")
        output.metrics["stage_ms"] = output.stage_ms
        carpet = output.metrics.pop("carpet", None)  # a buffer, not a header field
        carpet_mask_voxels = output.metrics.pop("carpet_mask_voxels", None)
        if active.norm is not None and not skip:
            self._site_percentiles(active, output.metrics, output.alerts, volume.index)
        header = self.publisher.publish(
            messages.volume(volume.index, volume.t_acquired, volume.t_received, output.metrics,
                            flags, carpet=carpet, carpet_mask_voxels=carpet_mask_voxels,
                            t_assembled=volume.t_assembled), series)
        self._on_published()  # published: the archive writes may compete from now on
        # what the stages left for after the message (the GLM's fit update): now, before
        # the volume's alerts, writes and maps
        output.alerts.extend(active.pipeline.run_later())
        active.latencies_s.append(float(header["latency_s"]))
        active.indices.append(volume.index)
        record_timing(active, header)
        for alert in output.alerts:
            level, code, text, *where = alert
            self.alert(series, level, code, text, where[0] if where else volume.index)
        if active.alerts is not None and not skip:
            for level, code, text in active.alerts.update(header):
                self.alert(series, level, code, text, volume.index)
        try:
            active.writer.append(volume, output.metrics)
        except OSError as exc:  # an observer: alert once, go on, write the next volume
            self.writes.failed(series, failure_code(exc),
                               self.writes.text(f"volume {volume.index}", exc),
                               volume.index, where=(series, volume.index))
        else:
            self.writes.resumed(series, volume.index)
        if self.config.publish.volumes and not skip and output.volume is not None:
            self._publish_voxels(active, output.volume)
        if not skip and active.pipeline.n_volumes % self.config.publish.map_every == 0:
            self._publish_maps(active, volume.index)
        n_expected = volume.info.n_expected
        if n_expected is not None and volume.index >= n_expected - 1:
            self.end(series, reason="last volume received")

    def _site_percentiles(self, active: ActiveSeries, metrics: dict[str, Any],
                          alerts: list[Any], index: int) -> None:
        """``site_percentiles`` of a volume's figures (microseconds: running sums and a
        binary search per figure); ``below_site_norm`` once per series."""
        assert active.norm is not None
        percentiles = active.norm.volume(metrics)
        metrics["site_percentiles"] = percentiles
        history = self.config.history
        text = active.norm.below_norm(percentiles, metrics.get("tsnr"),
                                      history.norm_percentile, history.norm_min_volumes)
        if text is not None:
            alerts.append(("warning", "below_site_norm", text, index))

    def _publish_voxels(self, active: ActiveSeries, corrected: Volume) -> None:
        """``publish.volumes``: the ``voxels`` map once per series (the automatic mask of
        the first corrected volume), then each volume's values there."""
        series = active.first.info.series
        if active.voxel_index is None:
            mask = automatic_mask(corrected.data, self.config.pipeline.mask_fraction)
            active.voxel_index = np.flatnonzero(mask.ravel(order="F"))
            self.publisher.publish(messages.map_message(
                "voxels", active.first.affine, mask.astype(np.float32), corrected.index),
                series)
        values = corrected.data.ravel(order="F")[active.voxel_index]
        self.publisher.publish(messages.voxels(corrected.index, corrected.t_received, values),
                               series)

    def _publish_maps(self, active: ActiveSeries, index: int) -> dict[str, np.ndarray]:
        maps = active.pipeline.maps()
        for name, data in maps.items():
            self.publisher.publish(messages.map_message(name, active.first.affine, data, index),
                                   active.first.info.series)
        return maps

    def _silence_deadline(self, active: ActiveSeries) -> float | None:
        """When the "no volume for N TR" alert is due, or None (off, or already sent)."""
        tr = active.first.info.tr_s
        qc = self.config.qc
        if not qc.enabled or not qc.no_volume_tr or not tr or active.silent_alerted:
            return None
        return active.last_seen + qc.no_volume_tr * tr

    def end_idle(self) -> None:
        """Alert on series silent for ``qc.no_volume_tr`` TR; end those past the timeout."""
        now = time.time()
        for series, active in list(self.active.items()):
            due = self._silence_deadline(active)
            if due is not None and now >= due:
                active.silent_alerted = True  # once per silence; re-armed by the next volume
                last = active.indices[-1] if active.indices else -1
                self.alert(series, "warning", "no_volume",
                           f"no volume for {now - active.last_seen:.1f} s "
                           f"({self.config.qc.no_volume_tr:g} TR) after volume {last}",
                           last + 1)
            if now - active.last_seen >= self.config.session.series_timeout_s:
                self.end(series, reason=f"no volume for "
                         f"{self.config.session.series_timeout_s:g} s")

    def end_all(self, reason: str) -> None:
        """End every open series (the run stops)."""
        for series in list(self.active):
            self.end(series, reason=reason)

    def end(self, series: str, reason: str) -> None:
        """End an open series: final maps, qc.json, outputs, report, series_end."""
        active = self.active.pop(series)
        self.ended.add(series)
        self._forget(series)
        last_index = active.indices[-1] if active.indices else -1
        for level, code, text in active.pipeline.finish():
            self.alert(series, level, code, text, None)
        maps = self._publish_maps(active, last_index)
        summary = summarise(active, reason, self.config)
        if active.norm is not None and self.history is not None:
            summary.update(self.history.end_fields(active.norm, summary))
        if summary.get("incomplete"):
            self.alert(series, "critical", "series_incomplete",
                       f"series stopped at {summary['n_volumes']} of {summary['n_expected']} "
                       f"volumes ({reason})", last_index + 1)
            summary["n_alerts"] = active.n_alerts
        for key, minutes in (summary.get("clean_minutes") or {}).items():
            self.session_minutes[key] = self.session_minutes.get(key, 0.0) + minutes
        for stage in active.pipeline.stages:
            if isinstance(stage, MotionStage) and stage.reference_image is not None:
                self.session_reference = stage.reference_image
        # What is on disk, beside what was processed (they differ after a full disk).
        summary["n_volumes_written"] = active.writer.n_written
        summary["volumes_not_written"] = list(active.writer.not_written)

        def output_failed(what: str, exc: OSError) -> None:
            self.writes.failed(series, failure_code(exc), self.writes.text(what, exc), None)

        outputs = active.writer.finish(summary, active.pipeline.final_confounds(), maps,
                                       on_error=output_failed)
        if self.config.session.report:
            # A separate process writes report.html: it cannot slow or break the data path.
            error = self.reports.start(series, active.writer.directory)
            if error is None:
                outputs["report"] = str(active.writer.directory / "report.html")
            else:
                self.alert(series, "warning", "report_failed", error, None)
        header = self.publisher.publish(
            messages.series_end(len(active.indices), summary, outputs,
                                site_percentiles=summary.get("site_percentiles")), series)
        if active.norm is not None and self.history is not None:
            self.history.record(active.norm, summary)  # after series.end: it may wait
        log.info("series %s ended (%s): %d volumes, latency median %.1f ms", series, reason,
                 len(active.indices), summary["latency_ms_median"] or float("nan"))
        self.ended_series.append(header)
        if self.on_series_end is not None:
            self.on_series_end(header)


def record_timing(active: ActiveSeries, header: dict[str, Any]) -> None:
    """Per-volume latencies of each step, ms, for the summary's median and p95."""
    rows = dict((header.get("timing") or {}))
    rows["received_to_published_s"] = header.get("latency_s")
    for name, seconds in rows.items():
        if seconds is not None:
            active.timing_ms.setdefault(name[:-2] + "_ms", []).append(1000.0 * seconds)
    for name, ms in (header.get("stage_ms") or {}).items():
        active.timing_ms.setdefault(f"stage:{name}", []).append(ms)


def summarise(active: ActiveSeries, reason: str, config: Config) -> dict[str, Any]:
    """The summary of an ended series (qc.json and series_end): counts, missing volumes,
    latency (ms), the pipeline's own summary, timing per step and the verdict."""
    latencies = np.asarray(active.latencies_s) * 1000.0
    info = active.first.info
    expected = info.n_expected if info.n_expected else (max(active.indices) + 1
                                                        if active.indices else 0)
    # A count and ranges: what a header claims (a run of 100000, a volume numbered
    # 99999) must not make the summary a list of every index.
    n_missing, missing = missing_ranges(active.indices, expected)
    summary: dict[str, Any] = {
        "n_volumes": len(active.indices),
        "n_expected": info.n_expected,
        "n_missing_volumes": n_missing,
        "missing_volumes": missing,
        "end_reason": reason,
        "tr_s": info.tr_s,
        "shape": list(active.first.shape),
        "voxel_size_mm": list(active.first.voxel_size_mm),
        "latency_ms_median": float(np.median(latencies)) if latencies.size else None,
        "latency_ms_p95": float(np.percentile(latencies, 95)) if latencies.size else None,
        "n_alerts": active.n_alerts,
        "skipped_volumes": list(active.skipped),
        "incomplete": bool(info.n_expected and (max(active.indices, default=-1) + 1
                                                 < info.n_expected)),
    }
    summary.update(active.pipeline.summary())
    summary["timing_ms"] = {
        name: {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}
        for name, values in active.timing_ms.items() if values}
    if config.qc.enabled:
        summary["verdict"], summary["verdict_reasons"] = verdict(
            summary, config.qc.verdict, config.qc.criterion_threshold_mm)
    return summary
