"""The history on the pipeline worker: the yardstick of each series, and what happens
when the database fails.

At a series' first volume :meth:`HistoryBook.start` reads the earlier series' figures of
its protocol fingerprint once (one query); each volume then costs only the live
figures' running sums and a binary search per figure in those small sorted arrays
(:meth:`SeriesNorm.volume`). At the end the summary's figures get their percentiles
(no query) and, after ``series.end`` is published, the series is recorded (one insert).

Failure policy: the history is an observer. A database that cannot be opened, read or
written gives a ``history_unavailable`` warning (at the run's start, then once per
series while it lasts) and the run goes on: the percentiles are then null and the
series is not recorded. An unreachable server costs at most the connection timeout at
the run's start; after a failed open the run does not try again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from rtsc.config import Config
from rtsc.errors import HistoryError
from rtsc.history.fingerprint import Protocol
from rtsc.history.percentile import FIGURES, LiveState, end_figures, live_step, \
    site_percentiles
from rtsc.history.store import HistoryStore, history_url, shown
from rtsc.volume import SeriesInfo

log = logging.getLogger(__name__)

#: alert(series, level, code, text, index), as SeriesBook.alert
AlertFn = Callable[[str | None, str, str, str, "int | None"], None]


@dataclass
class SeriesNorm:
    """One series' yardstick: its protocol, the earlier series' figures, its live state.

    Attributes
    ----------
    series : str, the opaque series id
    protocol : Protocol
    earlier : figure -> (n,) float64 ascending (empty when the history is unavailable)
    min_series : int, ``history.min_series``
    usable_key : str, the ``usable_frames`` key of ``qc.criterion_threshold_mm``
    state : LiveState
    norm_alerted : bool, ``below_site_norm`` was sent for this series
    """

    series: str
    protocol: Protocol
    earlier: dict[str, np.ndarray]
    min_series: int
    usable_key: str
    state: LiveState = field(default_factory=LiveState)
    norm_alerted: bool = False
    available: bool = True

    def volume(self, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """The site percentiles after one (processed) volume's fields (see
        :func:`rtsc.history.percentile.live_step`)."""
        self.state, figures = live_step(self.state, metrics, self.usable_key)
        return site_percentiles(self.earlier, figures, self.min_series)

    def below_norm(self, percentiles: Mapping[str, float | None], tsnr: Any,
                   norm_percentile: float, min_volumes: int) -> str | None:
        """The ``below_site_norm`` text, once per series: tSNR's percentile under
        ``norm_percentile`` after ``min_volumes`` volumes; else None."""
        rank = percentiles.get("tsnr")
        if self.norm_alerted or rank is None or self.state.n < min_volumes or \
                rank >= norm_percentile:
            return None
        self.norm_alerted = True
        n = int(self.earlier["tsnr"].size)
        return (f"tSNR {float(tsnr):.1f} is at percentile {rank:.1f} of the {n} earlier "
                f"series of this protocol (fingerprint {self.protocol.fingerprint}; "
                f"median {float(np.median(self.earlier['tsnr'])):.1f}), below "
                f"{norm_percentile:g}")


class HistoryBook:
    """The history of a run: opened at its start, consulted by each series.

    Parameters
    ----------
    config : Config
    alert : callable(series, level, code, text, index)
        How an alert is published (SeriesBook.alert).
    """

    def __init__(self, config: Config, alert: AlertFn) -> None:
        self.config = config
        self._alert = alert
        self.url = history_url(config.history.url, config.session.dir)
        self.store: HistoryStore | None = None
        self.error: str | None = None

    def open(self) -> None:
        """Connect and migrate (at the run's start); a failure is an alert."""
        started = time.perf_counter()
        try:
            self.store = HistoryStore.open(self.url)
        except HistoryError as exc:
            self.error = str(exc)
            self._alert(None, "warning", "history_unavailable",
                        f"{exc}; the run goes on without site percentiles", None)
            return
        log.info("history %s open (%.0f ms)", shown(self.url),
                 1000 * (time.perf_counter() - started))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def start(self, info: SeriesInfo, shape: tuple[int, int, int],
              voxel_size_mm: tuple[float, float, float], index: int) -> SeriesNorm:
        """A new series' yardstick: the earlier figures of its fingerprint, read once."""
        protocol = Protocol.of(info, shape, voxel_size_mm, self.config.pipeline.mode)
        usable_key = f"{self.config.qc.criterion_threshold_mm:g}"
        empty = {name: np.zeros(0) for name in FIGURES}
        norm = SeriesNorm(info.series, protocol, empty, self.config.history.min_series,
                          usable_key, available=False)
        if self.store is None:
            self._alert(info.series, "warning", "history_unavailable",
                        f"no site percentiles for this series: {self.error}", index)
            return norm
        try:
            norm.earlier = self.store.figures(protocol.fingerprint,
                                              exclude_series=info.series)
            norm.available = True
        except HistoryError as exc:
            self._alert(info.series, "warning", "history_unavailable",
                        f"no site percentiles for this series: {exc}", index)
        return norm

    def end_fields(self, norm: SeriesNorm, summary: Mapping[str, Any]) -> dict[str, Any]:
        """The summary's history fields: ``site_percentiles`` of its final figures,
        ``protocol_fingerprint`` and ``protocol`` (the parts)."""
        figures = end_figures(summary, self.config.qc.criterion_threshold_mm)
        return {"site_percentiles": site_percentiles(norm.earlier, figures, norm.min_series)
                if norm.available else None,
                "protocol_fingerprint": norm.protocol.fingerprint,
                "protocol": norm.protocol.parts()}

    def record(self, norm: SeriesNorm, summary: Mapping[str, Any]) -> None:
        """Record a finished series; a failure is an alert."""
        if self.store is None:
            return  # alerted at the series' start
        try:
            self.store.record(norm.series, norm.protocol, summary,
                              self.config.qc.criterion_threshold_mm)
        except HistoryError as exc:
            self._alert(norm.series, "warning", "history_unavailable",
                        f"series not recorded: {exc}", None)
