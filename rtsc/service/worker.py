"""The pipeline worker: one thread that assembles, processes, publishes and writes, in
the order the inputs queued their items.

It also keeps the two policies of the data path: ``pipeline.backlog: newest`` (when
items wait, only the newest volume of a series is processed in full) and the archive
hand-shake (the receiver archives an idle worker's dataset once its volume is
published, so the write does not compete with the processing).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numba
from threadpoolctl import threadpool_limits

from rtsc.config import Config
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.echoes import EchoCombiner
from rtsc.dicom.parrec import ParRecDump, ParRecIntake
from rtsc.intake.watcher import InputAlert
from rtsc.output.report import ReportJobs
from rtsc.service.series import SeriesBook
from rtsc.service.writes import archive_failure_alert
from rtsc.volume import Volume

log = logging.getLogger(__name__)

_STOP = object()


class ArchiveHandshake:
    """Datasets taken by the worker whose archive write waits for it.

    The receiver hands an idle worker a dataset with an event
    (:attr:`rtsc.dicom.incoming.Incoming.processed`) and archives once it is set: when
    the volume is published, or when the worker is done with the dataset otherwise.
    """

    def __init__(self) -> None:
        self._held: list[threading.Event] = []

    def hold(self, item: Any) -> None:
        """Note a dataset whose archiving waits for this worker (see Incoming.processed)."""
        processed = getattr(item, "processed", None)
        if processed is not None:
            self._held.append(processed)

    def release(self) -> None:
        """Let the receiver archive the datasets taken so far: their volume is published
        (or they made none)."""
        for processed in self._held:
            processed.set()
        self._held.clear()


class Worker:
    """The worker thread and its loop.

    Parameters
    ----------
    config : Config
    items : queue.Queue
        What the inputs put: :class:`~rtsc.dicom.incoming.Incoming`, ParRecDump,
        Volume (replay of a NIfTI) or InputAlert.
    assembler : Assembler
    parrec : ParRecIntake
    echoes : EchoCombiner or None
        Combines the echoes of a multi-echo series (``multi_echo.combine: t2star``).
    handshake : ArchiveHandshake
    series : SeriesBook
    reports : ReportJobs
    """

    def __init__(self, config: Config, items: "queue.Queue[Any]", assembler: Assembler,
                 parrec: ParRecIntake, echoes: EchoCombiner | None,
                 handshake: ArchiveHandshake, series: SeriesBook, reports: ReportJobs) -> None:
        self.config = config
        self.queue = items
        self.assembler = assembler
        self.parrec = parrec
        self.echoes = echoes
        self.handshake = handshake
        self.series = series
        self.reports = reports
        self._skip_backlog = config.pipeline.backlog == "newest"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="rtsc-pipeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Process what is queued, end the open series and join the thread."""
        if self._thread is not None:
            self.queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def is_alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def archive_failed(self, exc: OSError) -> None:
        """The store could not archive a file (first failure of a run of them).

        Runs on the thread that archives (receiver or watcher): hands the alert to the
        worker through the queue, the only thing shared safely from here.
        """
        self.queue.put(archive_failure_alert(exc, self.config.session.dir))

    def _timeout(self) -> float | None:
        deadlines = self.series.deadlines()
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
        # BLAS (the GLM's set-up, numpy's lstsq) would start a thread per core beside
        # the receiver's threads, as numba would: the same limit (OpenBLAS's count is
        # per process; the worker is its only user in `rtsc run`).
        with threadpool_limits(limits=self.config.pipeline.threads, user_api="blas"):
            self._loop()

    def _loop(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            try:
                if item is not None:
                    self.handshake.hold(item)
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
                self.series.end_idle()
                if len(self.reports):
                    self.series.report_failures(self.reports.poll())
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad input
                log.exception("pipeline worker error")
                self.series.alert(None, "critical", "internal_error",
                                  "internal error in the pipeline worker (see the log)", None)
            finally:
                self.handshake.release()
        self._handle_events(self.assembler.poll(now=float("inf")))
        self._handle_events(self.parrec.poll(now=float("inf")))
        self.series.end_all(reason="rtsc stopped")

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
            self.handshake.hold(item)
            events.extend(self._assemble(item))
        return events, False

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
                self.series.writes.failed(None, item.code, item.message, None)
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
                self.series.alert(event.series, event.level, event.code, event.message,
                                  event.index)
            else:
                skip = newest.get(event.info.series, i) > i  # a newer volume is waiting
                self.series.handle_volume(event, skip=skip)
                if self.echoes is not None and event.info.echo is not None:
                    for combined in self.echoes.add(event):
                        self.series.handle_volume(combined, skip=skip)
