"""`rtsc run`: inputs, one pipeline worker, publisher and session writer, wired together.

Threads only at the I/O edges: the DICOM server's association threads and the folder
watcher put :class:`~rtsc.intake.receiver.Incoming` items (and Philips PAR/REC dumps,
:class:`~rtsc.dicom.parrec.ParRecDump`) on one queue; a single worker thread assembles,
processes, publishes and writes, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numba
import numpy as np

from rtsc import messages
from rtsc.config import Config
from rtsc.curve import CurveServer
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.echoes import EchoCombiner
from rtsc.dicom.parrec import ParRecDump, ParRecIntake
from rtsc.intake.receiver import Receiver
from rtsc.intake.watcher import FolderWatcher, InputAlert
from rtsc.display.report import ReportJobs
from rtsc.dicom._csa_kernels import warm_up as warm_up_csa
from rtsc.dicom._mosaic_kernels import warm_up as warm_up_mosaic
from rtsc.pipeline.glm._kernels import warm_up as warm_up_glm
from rtsc.pipeline.motion._kernels import warm_up
from rtsc.pipeline.qc._kernels import warm_up as warm_up_qc
from rtsc.pipeline.motion._slicewise_kernels import warm_up as warm_up_slicewise
from rtsc.pipeline.cord.stages import cord_confound_columns
from rtsc.pipeline.qc.alerts import AlertEngine, check_rules, protocol_differences, series_rules
from rtsc.pipeline.qc.dvars_online import warm_up as warm_up_dvars
from rtsc.pipeline.glm.build import check_glm_config
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.qc.verdict import verdict
from rtsc.output.publish import Publisher
from rtsc.ranges import missing_ranges
from rtsc.redact import LogRedaction
from rtsc.output.session import SeriesWriter, SessionStore, is_disk_full
from rtsc.volume import Volume

log = logging.getLogger(__name__)

_STOP = object()
# Stages that still run on a volume skipped by ``pipeline.backlog: newest`` (cheap,
# and their bookkeeping needs every volume: arrival timing).
SKIPPED_VOLUME_STAGES = frozenset({"timing"})


@dataclass
class _WriteTrouble:
    """An episode of failed writes (a full disk): from the first failure to the first
    volume written again. One alert opens it, one closes it."""

    code: str
    not_written: list[tuple[str, int]] = field(default_factory=list)  # (series, index)


@dataclass
class _ActiveSeries:
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


class RunService:
    """Everything `rtsc run` does, startable and stoppable from code and tests.

    Parameters
    ----------
    config : Config
    on_series_end : callable(header dict) or None
        Called on the worker after a series ends (used by `rtsc demo`).
    """

    def __init__(self, config: Config,
                 on_series_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        check_glm_config(config)
        check_rules(config.qc.alerts)
        self.config = config
        self.on_series_end = on_series_end
        self.queue: queue.Queue[Any] = queue.Queue()
        self.store = SessionStore(config.session.dir)
        self.publisher = Publisher(config.publish.endpoint, config.publish.snapshot_endpoint,
                                   curve=CurveServer.from_config(config.publish))
        self.receiver = Receiver(config.receiver, self.store, self.queue) \
            if config.receiver.enabled else None
        self.watcher = FolderWatcher(config.watcher, self.store, self.queue) \
            if config.watcher.dir else None
        self.assembler = Assembler(config.assembler, series_filter=config.series_filter,
                                   max_volumes=config.session.max_volumes)
        self.parrec = ParRecIntake(config.watcher)
        self.echoes = EchoCombiner(config.multi_echo.n_echoes, config.multi_echo.t2star_volumes) \
            if config.multi_echo.combine == "t2star" else None
        self._skip_backlog = config.pipeline.backlog == "newest"
        self._series: dict[str, _ActiveSeries] = {}
        self._ended: set[str] = set()
        self._worker: threading.Thread | None = None
        self.ended_series: list[dict[str, Any]] = []
        self.reports = ReportJobs()
        # Session-wide state: clean minutes per FD threshold of the series ended so far.
        self.session_minutes: dict[str, float] = {}
        # Events of datasets taken by the worker whose archive write waits for it.
        self._held: list[threading.Event] = []
        self._write_trouble: _WriteTrouble | None = None
        self.store.on_archive_error = self._archive_failed
        self._redaction: LogRedaction | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Compile kernels, bind the publisher and receiver, start the watcher and worker."""
        # pydicom and pynetdicom log (and warn) non-conformant received values in clear.
        self._redaction = LogRedaction.for_dicom_libraries().install()
        warm_up()
        warm_up_dvars()
        warm_up_glm()
        warm_up_qc()
        warm_up_mosaic()
        warm_up_csa()
        if self.config.pipeline.mode == "spinal_cord":
            warm_up_slicewise()
        for directory, n_volumes in self.store.unfinished():
            log.warning("series folder %s was not finished by an earlier run (%s volumes in "
                        "its bold.nii, no qc.json); left as it is", directory.name,
                        "?" if n_volumes is None else n_volumes)
        for leftover in self.store.leftovers():
            log.warning("%s left by an earlier run: %s; left as it is (it can be deleted)",
                        leftover.path.relative_to(self.store.root), leftover.what)
        self.publisher.start()
        self._worker = threading.Thread(target=self._work, name="rtsc-pipeline", daemon=True)
        self._worker.start()
        try:
            if self.receiver is not None:
                self.receiver.start()
            if self.watcher is not None:
                self.watcher.start()
        except BaseException:
            self.stop()  # release the publisher's ports and the worker before failing
            raise

    def stop(self) -> None:
        """Stop inputs, process what was received, end open series, close sockets."""
        if self.receiver is not None:
            self.receiver.close()
        if self.watcher is not None:
            self.watcher.close()
        if self._worker is not None:
            self.queue.put(_STOP)
            self._worker.join()
            self._worker = None
        if len(self.reports):  # let report processes finish (their failures are alerts)
            self._report_failures(self.reports.poll(wait_s=120.0))
        self.publisher.close()
        if self._redaction is not None:
            self._redaction.remove()
            self._redaction = None

    def __enter__(self) -> "RunService":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- worker ----------------------------------------------------------------------

    def _timeout(self) -> float | None:
        deadlines = [s.last_seen + self.config.session.series_timeout_s
                     for s in self._series.values()]
        deadlines += [d for d in map(self._silence_deadline, self._series.values())
                      if d is not None]
        deadlines += [d for d in (self.assembler.next_deadline(), self.parrec.next_deadline())
                      if d is not None]
        if len(self.reports):
            deadlines.append(time.time() + 0.5)  # look at the report processes now and then
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.time()) + 0.01

    def _work(self) -> None:
        # numba's thread count is per calling thread: set it for this worker. Parallel
        # regions that must wait for a core held by the receiver's threads stall for a
        # scheduler quantum (~8 ms measured), so the default is one thread.
        numba.set_num_threads(min(self.config.pipeline.threads, numba.config.NUMBA_NUM_THREADS))
        while True:
            try:
                item = self.queue.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            try:
                if item is not None:
                    self._hold(item)
                    events = self._assemble(item)
                    if self._skip_backlog and events and not self.queue.empty():
                        events, stop = self._take_backlog(events)
                        self._handle_events(events)
                        if stop:
                            break
                    else:
                        self._handle_events(events)
                self._handle_events(self.assembler.poll())
                self._handle_events(self.parrec.poll())
                self._end_idle_series()
                if len(self.reports):
                    self._report_failures(self.reports.poll())
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad input
                log.exception("pipeline worker error")
                self._alert(None, "critical", "internal_error",
                            "internal error in the pipeline worker (see the log)", None)
            finally:
                self._release_held()
        self._handle_events(self.assembler.poll(now=float("inf")))
        self._handle_events(self.parrec.poll(now=float("inf")))
        for series in list(self._series):
            self._end_series(series, reason="rtsc stopped")

    def _take_backlog(self, events: list[Any]) -> tuple[list[Any], bool]:
        """``pipeline.backlog: newest``: assemble everything already waiting.

        Returns the events and whether the stop sentinel was met. Only called when the
        queue is not empty, so the normal (no backlog) path does no extra work.
        """
        for _ in range(64):  # bounded: assembled volumes held at once, and deadlines
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return events, False
            if item is _STOP:
                return events, True
            self._hold(item)
            events.extend(self._assemble(item))
        return events, False

    def _hold(self, item: Any) -> None:
        """Note a dataset whose archiving waits for this worker (see Incoming.processed)."""
        processed = getattr(item, "processed", None)
        if processed is not None:
            self._held.append(processed)

    def _release_held(self) -> None:
        """Let the receiver archive the datasets taken so far: their volume is published
        (or they made none)."""
        for processed in self._held:
            processed.set()
        self._held.clear()

    def _assemble(self, item: Any) -> list[Any]:
        """Events of one queue item: a dataset to assemble, a Philips PAR/REC dump to read,
        a Volume already assembled (``rtsc replay`` of a NIfTI), or an input's alert (a
        full disk reported by the archive is one episode with the outputs' own)."""
        if isinstance(item, Volume):
            return [item]
        if isinstance(item, ParRecDump):
            return self.parrec.add(item)
        if isinstance(item, InputAlert):
            if item.code in ("disk_full", "write_failed"):
                self._write_failed(None, item.code, item.message, None)
                return []
            return [AssemblyAlert(item.level, item.code, item.message)]
        return self.assembler.add(item)

    def _handle_events(self, events: list[Any]) -> None:
        newest: dict[str, int] = {}
        if self._skip_backlog:
            for i, event in enumerate(events):
                if isinstance(event, Volume):
                    newest[event.info.series] = i
        for i, event in enumerate(events):
            if isinstance(event, AssemblyAlert):
                self._alert(event.series, event.level, event.code, event.message, event.index)
            else:
                skip = newest.get(event.info.series, i) > i  # a newer volume is waiting
                self._handle_volume(event, skip=skip)
                if self.echoes is not None and event.info.echo is not None:
                    for combined in self.echoes.add(event):
                        self._handle_volume(combined, skip=skip)

    def _alert(self, series: str | None, level: str, code: str, text: str,
               index: int | None) -> None:
        log.log(logging.WARNING if level != "info" else logging.INFO, "alert %s/%s: %s",
                level, code, text)
        self.publisher.publish(messages.alert(level, code, text, index), series or "")
        if series in self._series:
            self._series[series].n_alerts += 1

    def _start_series(self, volume: Volume) -> _ActiveSeries:
        info = volume.info
        directory = self.store.series_dir(info.series)
        stages, setup_alerts = build_stages(self.config, info, dict(self.session_minutes))
        active = _ActiveSeries(first=volume, pipeline=SeriesPipeline(stages),
                               writer=SeriesWriter(directory, volume, cord_confound_columns(
                                   volume.shape[2]) if self.config.pipeline.mode == "spinal_cord"
                                   else ()), last_seen=time.time(),
                               alerts=AlertEngine(series_rules(self.config.qc), info.tr_s)
                               if self.config.qc.enabled else None)
        self._series[info.series] = active
        glm = next((s for s in stages if s.name == "glm"), None)
        design = getattr(glm, "design", None)
        self.publisher.publish(messages.series_start(
            volume.shape, volume.voxel_size_mm, info.tr_s, info.n_expected,
            self.config.pipeline.mode, affine=volume.affine,
            design=None if design is None else messages.design_field(
                design.task_names, design.fixed[:, :len(design.task_names)]), series_number=info.series_number,
            description=info.description, source=info.source, echo=info.echo,
            slice_times_s=info.slice_times_s, multiband_factor=info.multiband_factor,
            phase_encoding_direction=info.phase_encoding_direction), info.series)
        log.info("series %s started: %s, TR %s s, %s volumes expected", info.series,
                 volume.shape, info.tr_s, info.n_expected)
        for level, code, text in setup_alerts:
            self._alert(info.series, level, code, text, volume.index)
        if self.config.qc.enabled:
            for text in protocol_differences(volume.shape, volume.voxel_size_mm, info.tr_s,
                                             self.config.qc.protocol):
                self._alert(info.series, "critical", "protocol_mismatch", text, volume.index)
        return active

    def _handle_volume(self, volume: Volume, skip: bool = False) -> None:
        series = volume.info.series
        if series in self._ended:
            self._alert(series, "warning", "late_volume",
                        f"volume {volume.index} arrived after its series ended; archived only",
                        volume.index)
            return
        active = self._series.get(series) or self._start_series(volume)
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
        header = self.publisher.publish(
            messages.volume(volume.index, volume.t_acquired, volume.t_received, output.metrics,
                            flags, carpet=carpet, carpet_mask_voxels=carpet_mask_voxels,
                            t_assembled=volume.t_assembled), series)
        self._release_held()  # published: the archive writes may compete from now on
        active.latencies_s.append(float(header["latency_s"]))
        active.indices.append(volume.index)
        self._record_timing(active, header)
        for alert in output.alerts:
            level, code, text, *where = alert
            self._alert(series, level, code, text, where[0] if where else volume.index)
        if active.alerts is not None and not skip:
            for level, code, text in active.alerts.update(header):
                self._alert(series, level, code, text, volume.index)
        try:
            active.writer.append(volume, output.metrics)
        except OSError as exc:  # an observer: alert once, go on, write the next volume
            self._write_failed(series, "disk_full" if is_disk_full(exc) else "write_failed",
                               self._write_failure_text(f"volume {volume.index}", exc),
                               volume.index, where=(series, volume.index))
        else:
            self._writing_resumed(series, volume.index)
        if not skip and active.pipeline.n_volumes % self.config.publish.map_every == 0:
            self._publish_maps(active, volume.index)
        n_expected = volume.info.n_expected
        if n_expected is not None and volume.index >= n_expected - 1:
            self._end_series(series, reason="last volume received")

    def _publish_maps(self, active: _ActiveSeries, index: int) -> dict[str, np.ndarray]:
        maps = active.pipeline.maps()
        for name, data in maps.items():
            self.publisher.publish(messages.map_message(name, active.first.affine, data, index),
                                   active.first.info.series)
        return maps

    @staticmethod
    def _record_timing(active: _ActiveSeries, header: dict[str, Any]) -> None:
        """Per-volume latencies of each step, ms, for the summary's median and p95."""
        rows = dict((header.get("timing") or {}))
        rows["received_to_published_s"] = header.get("latency_s")
        for name, seconds in rows.items():
            if seconds is not None:
                active.timing_ms.setdefault(name[:-2] + "_ms", []).append(1000.0 * seconds)
        for name, ms in (header.get("stage_ms") or {}).items():
            active.timing_ms.setdefault(f"stage:{name}", []).append(ms)

    def _silence_deadline(self, active: _ActiveSeries) -> float | None:
        """When the "no volume for N TR" alert is due, or None (off, or already sent)."""
        tr = active.first.info.tr_s
        qc = self.config.qc
        if not qc.enabled or not qc.no_volume_tr or not tr or active.silent_alerted:
            return None
        return active.last_seen + qc.no_volume_tr * tr

    def _end_idle_series(self) -> None:
        now = time.time()
        for series, active in list(self._series.items()):
            due = self._silence_deadline(active)
            if due is not None and now >= due:
                active.silent_alerted = True  # once per silence; re-armed by the next volume
                last = active.indices[-1] if active.indices else -1
                self._alert(series, "warning", "no_volume",
                            f"no volume for {now - active.last_seen:.1f} s "
                            f"({self.config.qc.no_volume_tr:g} TR) after volume {last}",
                            last + 1)
            if now - active.last_seen >= self.config.session.series_timeout_s:
                self._end_series(series, reason=f"no volume for "
                                 f"{self.config.session.series_timeout_s:g} s")

    def _end_series(self, series: str, reason: str) -> None:
        active = self._series.pop(series)
        self._ended.add(series)
        self.assembler.forget(series)
        self.parrec.forget(series)
        last_index = active.indices[-1] if active.indices else -1
        for level, code, text in active.pipeline.finish():
            self._alert(series, level, code, text, None)
        maps = self._publish_maps(active, last_index)
        summary = self._summary(active, reason)
        if summary.get("incomplete"):
            self._alert(series, "critical", "series_incomplete",
                        f"series stopped at {summary['n_volumes']} of {summary['n_expected']} "
                        f"volumes ({reason})", last_index + 1)
            summary["n_alerts"] = active.n_alerts
        for key, minutes in (summary.get("clean_minutes") or {}).items():
            self.session_minutes[key] = self.session_minutes.get(key, 0.0) + minutes
        # What is on disk, beside what was processed (they differ after a full disk).
        summary["n_volumes_written"] = active.writer.n_written
        summary["volumes_not_written"] = list(active.writer.not_written)

        def output_failed(what: str, exc: OSError) -> None:
            self._write_failed(series, "disk_full" if is_disk_full(exc) else "write_failed",
                               self._write_failure_text(what, exc), None)

        outputs = active.writer.finish(summary, active.pipeline.final_confounds(), maps,
                                       on_error=output_failed)
        if self.config.session.report:
            # A separate process writes report.html: it cannot slow or break the data path.
            error = self.reports.start(series, active.writer.directory)
            if error is None:
                outputs["report"] = str(active.writer.directory / "report.html")
            else:
                self._alert(series, "warning", "report_failed", error, None)
        header = self.publisher.publish(
            messages.series_end(len(active.indices), summary, outputs), series)
        log.info("series %s ended (%s): %d volumes, latency median %.1f ms", series, reason,
                 len(active.indices), summary["latency_ms_median"] or float("nan"))
        self.ended_series.append(header)
        if self.on_series_end is not None:
            self.on_series_end(header)

    # -- failed writes (a full disk) ----------------------------------------------------

    def _archive_failed(self, exc: OSError) -> None:
        """The store could not archive a file (first failure of a run of them).

        Runs on the thread that archives (receiver or watcher): hands the alert to the
        worker through the queue, the only thing shared safely from here.
        """
        code = "disk_full" if is_disk_full(exc) else "write_failed"
        self.queue.put(InputAlert("critical", code, (
            f"cannot archive in {self.config.session.dir} ({exc.strerror or exc}): C-STORE "
            "is answered out of resources (nothing acknowledged is lost; the sender keeps "
            "the images) and watched files stay in their folder until they can be archived; "
            "volumes received are still processed and published")))

    def _write_failure_text(self, what: str, exc: OSError) -> str:
        return (f"cannot write {what} in {self.config.session.dir} ({exc.strerror or exc}): "
                "volumes are still processed and published, each written to bold.nii, "
                "bold.nii.gz and confounds.tsv whole or not at all; writing resumes by itself "
                "when space returns (the volumes not written are listed in qc.json)")

    def _write_failed(self, series: str | None, code: str, text: str, index: int | None,
                      where: tuple[str, int] | None = None) -> None:
        """One critical alert per episode of failed writes, not one per volume (or a
        traceback each): the rest of the episode is counted and logged at debug level."""
        trouble = self._write_trouble
        if trouble is None:
            trouble = self._write_trouble = _WriteTrouble(code)
            self._alert(series, "critical", code, text, index)
        else:
            log.debug("still failing: %s", text)
        if where is not None:
            trouble.not_written.append(where)

    def _writing_resumed(self, series: str, index: int) -> None:
        """A volume was written: an episode of failed writes, if any, is over."""
        trouble, self._write_trouble = self._write_trouble, None
        if trouble is None:
            return
        lost = [i for s, i in trouble.not_written if s == series]
        others = len(trouble.not_written) - len(lost)
        text = f"outputs are written again from volume {index}"
        if lost:
            text += (f"; {len(lost)} volume(s) of this series not written "
                     f"({min(lost)}-{max(lost)}), listed in qc.json (volumes_not_written)")
        if others:
            text += f"; {others} volume(s) of other series not written"
        self._alert(series, "info", "writing_resumed", text, index)

    def _report_failures(self, failures: list[tuple[str, str]]) -> None:
        for series, text in failures:
            self._alert(series, "warning", "report_failed", text, None)

    def _summary(self, active: _ActiveSeries, reason: str) -> dict[str, Any]:
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
        if self.config.qc.enabled:
            summary["verdict"], summary["verdict_reasons"] = verdict(
                summary, self.config.qc.verdict, self.config.qc.criterion_threshold_mm)
        return summary
