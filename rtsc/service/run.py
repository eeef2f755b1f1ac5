"""`rtsc run`: inputs, one pipeline worker, publisher and session writer, wired together.

Threads only at the I/O edges: the DICOM server's association threads and the folder
watcher put :class:`~rtsc.dicom.incoming.Incoming` items (and Philips PAR/REC dumps,
:class:`~rtsc.dicom.parrec.ParRecDump`) on one queue; a single worker thread
(:mod:`rtsc.service.worker`) assembles, processes, publishes and writes, in order, the
state of each series kept by :mod:`rtsc.service.series`. This module builds the parts
and starts and stops them.
"""

from __future__ import annotations

import gc
import logging
import queue
from typing import Any, Callable

from rtsc.config import Config
from rtsc.curve import CurveServer
from rtsc.dicom._csa_kernels import warm_up as warm_up_csa
from rtsc.dicom.unmosaic import warm_up as warm_up_mosaic
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.echoes import EchoCombiner
from rtsc.dicom.parrec import ParRecIntake
from rtsc.intake.receiver import Receiver
from rtsc.intake.watcher import FolderWatcher
from rtsc.output.publish import Publisher
from rtsc.output.report import ReportJobs
from rtsc.output.session import SessionStore
from rtsc.pipeline.glm._kernels import warm_up as warm_up_glm
from rtsc.pipeline.motion._kernels import warm_up
from rtsc.pipeline.motion._slicewise_kernels import warm_up as warm_up_slicewise
from rtsc.pipeline.qc._kernels import warm_up as warm_up_qc
from rtsc.pipeline.qc._slice_kernels import warm_up as warm_up_slices
from rtsc.pipeline.qc.alerts import check_rules
from rtsc.pipeline.qc.dvars_online import warm_up as warm_up_dvars
from rtsc.pipeline.glm.build import check_glm_config
from rtsc.pipeline.plugins import check_plugins
from rtsc.redact import LogRedaction
from rtsc.service.series import SeriesBook
from rtsc.service.worker import ArchiveHandshake, Worker

log = logging.getLogger(__name__)


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
        check_plugins(config)  # imports pipeline.plugins: ConfigError naming the entry
        check_rules(config.qc.alerts)
        self.config = config
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
        self.reports = ReportJobs()
        handshake = ArchiveHandshake()
        self.series = SeriesBook(config, self.store, self.publisher, self.reports,
                                 forget=self._forget, on_published=handshake.release,
                                 on_series_end=on_series_end)
        self.worker = Worker(config, self.queue, self.assembler, self.parrec, self.echoes,
                             handshake, self.series, self.reports)
        self.store.on_archive_error = self.worker.archive_failed
        self._redaction: LogRedaction | None = None

    @property
    def ended_series(self) -> list[dict[str, Any]]:
        """The series_end headers published so far."""
        return self.series.ended_series

    def _forget(self, series: str) -> None:
        """An ended series: the assemblers drop what they still hold of it."""
        self.assembler.forget(series)
        self.parrec.forget(series)

    def start(self) -> None:
        """Compile kernels, bind the publisher and receiver, start the watcher and worker."""
        # pydicom and pynetdicom log (and warn) non-conformant received values in clear.
        self._redaction = LogRedaction.for_dicom_libraries().install()
        warm_up()
        warm_up_dvars()
        warm_up_glm()
        warm_up_qc()
        warm_up_slices()
        warm_up_mosaic()
        warm_up_csa()
        if self.config.pipeline.mode == "spinal_cord":
            warm_up_slicewise()
        # Everything alive now (modules, numba's compiled kernels, pydicom's dictionary:
        # ~180,000 objects) lives as long as the process. Frozen, the cyclic collector no
        # longer walks them: a full collection went from 77 ms, a stall at a random
        # volume, to the objects made since.
        gc.freeze()
        for directory, n_volumes in self.store.unfinished():
            log.warning("series folder %s was not finished by an earlier run (%s volumes in "
                        "its bold.nii, no qc.json); left as it is", directory.name,
                        "?" if n_volumes is None else n_volumes)
        for leftover in self.store.leftovers():
            log.warning("%s left by an earlier run: %s; left as it is (it can be deleted)",
                        leftover.path.relative_to(self.store.root), leftover.what)
        self.publisher.start()
        if self.series.history is not None:
            self.series.history.open()  # migrations run here, not at the first volume
        self.worker.start()
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
        self.worker.stop()
        if self.series.history is not None:
            self.series.history.close()
        if len(self.reports):  # let report processes finish (their failures are alerts)
            self.series.report_failures(self.reports.poll(wait_s=120.0))
        self.publisher.close()
        if self._redaction is not None:
            self._redaction.remove()
            self._redaction = None
        gc.unfreeze()  # a process that goes on (tests, `rtsc demo`) collects them again

    def __enter__(self) -> "RunService":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
