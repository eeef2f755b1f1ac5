"""What the web page shows of one scanner: rtsc messages folded into a card.

Pure and I/O-free: :meth:`ScannerState.fold` takes one decoded message at a time (from the
snapshot or live, in publication order) and returns whether the card changed;
:meth:`ScannerState.card` is the card as JSON-able data. Traces keep only the newest
``history`` volumes, alerts the newest :data:`MAX_ALERTS`, so a long session holds a
bounded amount per scanner. A message folded twice (the snapshot and the live stream
overlap) changes nothing.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtsc.conventions import MOTION_NAMES
from rtsc.messages import (
    TOPIC_ALERT,
    TOPIC_SERIES_END,
    TOPIC_SERIES_START,
    TOPIC_VOLUME,
    Message,
)

#: Per-volume traces of a card: trace name -> volume message field.
TRACES = {"index": "index", **{name: name for name in MOTION_NAMES},
          "fd": "framewise_displacement", "dvars": "dvars", "std_dvars": "std_dvars",
          "tsnr": "tsnr"}
#: Alerts kept per scanner (the newest).
MAX_ALERTS = 20
#: Finished series kept per scanner (the newest).
MAX_FINISHED = 200
#: Fields of series.start shown on the card.
START_FIELDS = ("description", "series_number", "tr_s", "n_expected", "mode")


def number(value: Any, digits: int = 5) -> float | None:
    """A JSON number rounded to ``digits`` significant digits, or None (null, NaN, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(out):
        return None
    return float(f"{out:.{digits}g}")


def local_day(t: float) -> str:
    """YYYYMMDD of the epoch time ``t`` in local time (the session folders' date)."""
    return time.strftime("%Y%m%d", time.localtime(t))


@dataclass
class FinishedSeries:
    """A series that ended (from its series.end message or its session folder).

    Attributes
    ----------
    series : str, the opaque series id
    day : str, YYYYMMDD (local) the series ended (from a folder: started)
    time : str, HH:MM:SS (local) of the same
    n_volumes : int or None
    n_expected : int or None
    verdict : str or None, pass / warn / fail (None without the QC stage)
    description : str or None, the series description (from its series.start)
    report : Path or None, its report.html as reached from here (None: not known)
    """

    series: str
    day: str
    time: str
    n_volumes: int | None = None
    n_expected: int | None = None
    verdict: str | None = None
    description: str | None = None
    report: Path | None = None

    def row(self, report_url: str | None) -> dict[str, Any]:
        """The series as a row of the card's list (``report_url``: its link, or None)."""
        return {"series": self.series, "time": self.time, "n_volumes": self.n_volumes,
                "n_expected": self.n_expected, "verdict": self.verdict,
                "description": self.description, "report_url": report_url}


@dataclass
class ScannerState:
    """One scanner's card.

    Parameters
    ----------
    name : str, the scanner (``web.sources[].name``)
    history : int, volumes kept per trace

    Attributes
    ----------
    series : str or None, the current (or last) series id; None before any
    start : dict, the shown fields of its series.start
    traces : trace name -> deque of float or None, the newest ``history`` volumes
    n_volumes : int, volumes of the current series received
    last : dict, the newest volume's header
    alerts : deque of dict, the newest alerts of the current series
    end : dict or None, the current series' series.end header once it ended
    finished : series id -> FinishedSeries, the ended series seen (any day)
    version : int, incremented at every change
    t_message : float or None, when the last message was folded (epoch s)
    """

    name: str
    history: int = 600
    series: str | None = None
    start: dict[str, Any] = field(default_factory=dict)
    traces: dict[str, deque[float | None]] = field(default_factory=dict)
    n_volumes: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_ALERTS))
    end: dict[str, Any] | None = None
    finished: dict[str, FinishedSeries] = field(default_factory=dict)
    version: int = 0
    t_message: float | None = None
    _seen: set[int] = field(default_factory=set)
    _alert_keys: set[tuple[Any, ...]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._clear_traces()

    def _clear_traces(self) -> None:
        self.traces = {name: deque(maxlen=self.history) for name in TRACES}

    def _begin(self, series: str | None, start: dict[str, Any] | None) -> None:
        self.series = series
        self.start = {k: (start or {}).get(k) for k in START_FIELDS}
        self._clear_traces()
        self.n_volumes = 0
        self.last = {}
        self.alerts.clear()
        self._alert_keys = set()
        self.end = None
        self._seen = set()

    # -- folding --

    def fold(self, message: Message, now: float | None = None) -> bool:
        """Take in one message; True when the card changed.

        A series.start of another series starts the card over; a volume or alert of a
        series that already ended (a late duplicate) is ignored; a volume of an unknown
        series (the view joined without the snapshot) starts that series.
        """
        header = message.header
        series = header.get("series")
        series = None if series is None else str(series)
        self.t_message = time.time() if now is None else now
        topic = message.topic
        if topic == TOPIC_SERIES_START:
            if series in self.finished:
                return False
            if series == self.series and self.end is None:
                self.start = {k: header.get(k) for k in START_FIELDS}
            else:
                self._begin(series, header)
            return self._changed()
        if topic == TOPIC_VOLUME:
            if series in self.finished:
                return False
            if series != self.series:
                self._begin(series, None)
            return self._fold_volume(header)
        if topic == TOPIC_ALERT:
            return self._fold_alert(series, header)
        if topic == TOPIC_SERIES_END:
            return self._fold_end(series, header)
        return False

    def _changed(self) -> bool:
        self.version += 1
        return True

    def _fold_volume(self, h: dict[str, Any]) -> bool:
        index = int(h.get("index", -1))
        if index in self._seen:
            return False
        self._seen.add(index)
        for name, key in TRACES.items():
            self.traces[name].append(number(h.get(key)))
        self.n_volumes += 1
        self.last = dict(h)
        return self._changed()

    def _fold_alert(self, series: str | None, h: dict[str, Any]) -> bool:
        if series is not None and self.series is not None and series != self.series:
            return False  # about another series
        key = (series, h.get("code"), h.get("index"), h.get("message"))
        if key in self._alert_keys:
            return False
        self._alert_keys.add(key)
        self.alerts.append({k: h.get(k) for k in ("level", "code", "message", "index")})
        return self._changed()

    def _fold_end(self, series: str | None, h: dict[str, Any]) -> bool:
        if series is None or series in self.finished:
            return False
        summary = h.get("summary") or {}
        outputs = h.get("outputs") or {}
        t = float(h.get("t_published") or time.time())
        report = outputs.get("report")
        self.add_finished(FinishedSeries(
            series, local_day(t), time.strftime("%H:%M:%S", time.localtime(t)),
            _int(h.get("n_volumes")), _int(summary.get("n_expected")),
            summary.get("verdict"),
            self.start.get("description") if series == self.series else None,
            Path(report) if report else None))
        if series == self.series:
            self.end = {"n_volumes": h.get("n_volumes"), "verdict": summary.get("verdict"),
                        "verdict_reasons": summary.get("verdict_reasons")}
        return self._changed()

    def add_finished(self, entry: FinishedSeries) -> None:
        """Remember an ended series (keeps the newest :data:`MAX_FINISHED`)."""
        self.finished[entry.series] = entry
        while len(self.finished) > MAX_FINISHED:
            self.finished.pop(next(iter(self.finished)))

    # -- what the page shows --

    def day_series(self, day: str | None = None) -> list[FinishedSeries]:
        """The series finished on ``day`` (YYYYMMDD, default today), oldest first."""
        day = day or local_day(time.time())
        return sorted((f for f in self.finished.values() if f.day == day),
                      key=lambda f: f.time)

    def summary(self) -> dict[str, Any]:
        """The scanner's current series and last volume index (for /api/state)."""
        last_index = self.last.get("index")
        return {"name": self.name, "series": self.series,
                "last_index": None if last_index is None else int(last_index),
                "n_volumes": self.n_volumes, "n_expected": _int(self.start.get("n_expected")),
                "ended": self.end is not None,
                "verdict": None if self.end is None else self.end.get("verdict"),
                "t_message": self.t_message}

    def card(self, report_url: Any = None) -> dict[str, Any]:
        """Everything the card draws, as JSON-able data.

        Parameters
        ----------
        report_url : callable(FinishedSeries) -> str or None, the link of a finished
            series' report (None: no links)

        Returns
        -------
        dict: ``summary()``'s fields; ``start`` (description, series number, TR s, run
        length, mode); ``last`` (latency ms, FD mm, DVARS, tSNR, usable frames, clean
        minutes, criterion {fraction, minutes, target_minutes, eta_s, reached,
        threshold_mm}, flags, site_percentiles: figure -> percentile among the site's
        earlier series of the protocol, or null); ``traces`` (index, trans_* mm, rot_* degrees, fd mm,
        dvars, std_dvars, tsnr; null where missing); ``alerts`` (newest last); ``end``
        (n_volumes, verdict, verdict_reasons) or null; ``day_series`` (rows of
        :meth:`FinishedSeries.row`, oldest first).
        """
        traces: dict[str, list[float | None]] = {}
        for name, values in self.traces.items():
            if name.startswith("rot_"):
                traces[name] = [None if v is None else number(math.degrees(v)) for v in values]
            else:
                traces[name] = list(values)
        h = self.last
        criterion = h.get("criterion")
        last = {
            "latency_ms": number(1000 * h["latency_s"]) if number(h.get("latency_s")) is not None
            else None,
            "fd": number(h.get("framewise_displacement")), "dvars": number(h.get("dvars")),
            "std_dvars": number(h.get("std_dvars")), "tsnr": number(h.get("tsnr")),
            "usable_frames": h.get("usable_frames"), "clean_minutes": h.get("clean_minutes"),
            "criterion": criterion if isinstance(criterion, dict) else None,
            "flags": list(h.get("flags") or []),
            "site_percentiles": {k: number(v) for k, v in percentiles.items()}
            if isinstance(percentiles := h.get("site_percentiles"), dict) else None,
        }
        link = report_url or (lambda entry: None)
        return {**self.summary(), "start": dict(self.start), "last": last, "traces": traces,
                "alerts": list(self.alerts), "end": self.end,
                "day_series": [f.row(link(f)) for f in self.day_series()]}


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
