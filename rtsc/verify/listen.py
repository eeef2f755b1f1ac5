"""`rtsc verify --listen`: the real receiver, a series sent from the console, its timing.

The service is `rtsc run`'s (:class:`~rtsc.service.run.RunService`) with the site's config:
its receiver (AE title, port, allow-lists), assembler, pipeline and session folder. Only
the publisher is moved to free loopback ports without CURVE, as verify is its only
subscriber (a dashboard can still follow: the endpoint is printed). From the published
messages each series gets its arrival timing: volumes received, the interval between
volumes against the TR, rtsc's receive -> publish latency, late and missing volumes.
Once the series has ended (or ``n_series`` of them, the timeout, or Ctrl-C) the service
stops and the archived files of each series are checked as `rtsc verify FOLDER` checks
a folder (:func:`rtsc.verify.folder.verify_folder`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rtsc.client import Subscriber
from rtsc.config import Config, config_from_dict, merge, to_dict
from rtsc.verify import dcm2niix
from rtsc.ranges import ranges_text
from rtsc.verify.checks import FAIL, PASS, SKIP, Check
from rtsc.verify.folder import verify_folder
from rtsc.verify.report import SeriesReport, VerifyReport

log = logging.getLogger(__name__)

#: Alert codes that mean a dataset or volume came late, or not at all.
LATE_OR_MISSING = ("late_volume", "late_slice", "missing_slices", "unplaced",
                   "series_incomplete", "no_volume")
#: The export keeps up when volumes arrive at least this often, relative to the TR.
INTERVAL_TOL = 1.05
#: PUB/SUB joins asynchronously: the subscriber waits this long before data may come.
_JOIN_S = 0.5


@dataclass
class Arrivals:
    """The messages rtsc published about one series (headers only)."""

    start: dict[str, Any] | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None


def timing_checks(arrivals: Arrivals) -> list[Check]:
    """The arrival timing lines of one series, from its published messages.

    ``volumes received``: how many, of the run length announced. ``volume interval``:
    median and 95th percentile of the time between successive volumes' last datasets
    (per index step), against the TR: FAIL when the median exceeds the TR by more than
    5 % (the export falls behind the acquisition); far below it, the series was sent
    after it was acquired. ``latency``: rtsc's receive -> publish time (the volume
    messages' ``latency_s``), median and 95th percentile: FAIL when the 95th percentile
    reaches the TR (rtsc would fall behind). ``late or missing``: volumes never
    received, and alerts of late, unplaced or missing data.
    """
    start = arrivals.start or {}
    tr = start.get("tr_s")
    announced = start.get("n_expected")
    volumes = sorted(arrivals.volumes, key=lambda h: h["index"])
    n = len(volumes)
    checks = [Check("volumes received", PASS if n else FAIL,
                    f"{n}" + (f" of {announced} announced" if announced else
                              " (no run length announced)"),
                    data={"received": n, "announced": announced})]
    steps = [(b["t_received"] - a["t_received"]) / (b["index"] - a["index"])
             for a, b in zip(volumes, volumes[1:]) if b["index"] > a["index"]]
    if not steps or not tr:
        checks.append(Check("volume interval", SKIP, "needs two volumes and a TR"))
    else:
        median, p95 = float(np.median(steps)), float(np.percentile(steps, 95))
        text = f"median {median:.3f} s, p95 {p95:.3f} s (TR {tr:g} s)"
        data = {"median_s": median, "p95_s": p95, "tr_s": tr}
        if median > INTERVAL_TOL * tr:
            checks.append(Check("volume interval", FAIL, text + ": the export falls behind "
                                "the acquisition", data=data))
        else:
            note = ": sent faster than acquired (a stored series? send one while it is " \
                   "acquired to time the real-time export)" if median < 0.5 * tr else ""
            checks.append(Check("volume interval", PASS, text + note, data=data))
    latencies = [1000.0 * h["latency_s"] for h in volumes if h.get("latency_s") is not None]
    if not latencies:
        checks.append(Check("latency", FAIL, "no volume published"))
    else:
        median, p95 = float(np.median(latencies)), float(np.percentile(latencies, 95))
        text = f"receive->publish median {median:.1f} ms, p95 {p95:.1f} ms"
        ok = not tr or p95 < 1000.0 * tr
        checks.append(Check("latency", PASS if ok else FAIL,
                            text + (f" (TR {tr:g} s)" if tr else "")
                            + ("" if ok else ": rtsc does not keep up with the TR"),
                            data={"median_ms": median, "p95_ms": p95}))
    summary = (arrivals.end or {}).get("summary") or {}
    missing = [list(r) for r in summary.get("missing_volumes") or []]  # [first, last] ranges
    n_missing = int(summary.get("n_missing_volumes") or sum(b - a + 1 for a, b in missing))
    codes: dict[str, int] = {}
    for alert in arrivals.alerts:
        if alert.get("code") in LATE_OR_MISSING:
            codes[alert["code"]] = codes.get(alert["code"], 0) + 1
    problems = ([f"missing volume{'s' if n_missing > 1 else ''} "
                 f"{ranges_text(missing, n_missing)}"] if n_missing else []) \
        + [f"{code} {count}" for code, count in sorted(codes.items())]
    if arrivals.end is None:
        problems.append("the series did not end")
    checks.append(Check("late or missing", FAIL if problems else PASS,
                        "; ".join(problems) if problems else "none",
                        data={"n_missing_volumes": n_missing, "missing_volumes": missing,
                              "alerts": codes}))
    return checks


def listen_config(config: Config) -> Config:
    """The site's config with the publisher on free loopback ports, without CURVE (verify
    is its only subscriber)."""
    return config_from_dict(merge(to_dict(config), {"publish": {
        "endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*",
        "curve_secret_key": None, "curve_clients_dir": None}}))


def listen(config: Config, binary: str | None, n_series: int = 1,
           timeout_s: float | None = None, partial: bool = False,
           stop: Callable[[], bool] = lambda: False,
           progress: Callable[[str], None] = lambda text: None) -> VerifyReport:
    """Receive series with rtsc's service, time them, then check their archived files.

    Parameters
    ----------
    config : the site's config (receiver, session.dir, pipeline...)
    binary : dcm2niix executable, or None
    n_series : end once this many BOLD series have ended
    timeout_s : end after this many seconds, whatever was received (None: no limit)
    partial : see :func:`rtsc.verify.folder.verify_folder`
    stop : polled; True ends the wait (Ctrl-C)
    progress : called with a line of text: listening, each series started and ended
    """
    from rtsc.service.run import RunService  # numba kernels: only when listening

    service = RunService(listen_config(config))
    service.start()
    arrivals: dict[str, Arrivals] = {}
    skipped: dict[str, str] = {}
    subscriber = Subscriber(service.publisher.endpoint)
    t0 = time.monotonic()
    try:
        time.sleep(_JOIN_S)
        receiver = service.receiver
        where = (f"AE title {config.receiver.ae_title} on {config.receiver.host}:"
                 f"{receiver.port}" if receiver is not None else "the receiver is disabled")
        progress(f"rtsc verify: listening as {where}; session files in {config.session.dir}; "
                 f"publishing on {service.publisher.endpoint}. Send the phantom series now "
                 f"(ends after {n_series} series"
                 + (f" or {timeout_s:g} s" if timeout_s else "") + "; Ctrl-C to stop).")
        while not stop():
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                progress(f"rtsc verify: timeout after {timeout_s:g} s")
                break
            message = subscriber.receive(timeout_s=0.2)
            if message is not None:
                _record(message, arrivals, skipped, progress)
            if sum(a.end is not None for a in arrivals.values()) >= n_series:
                break
    finally:
        service.stop()  # ends the open series: their series.end is published now
        while (message := subscriber.receive(timeout_s=0.3)) is not None:
            _record(message, arrivals, skipped, progress)
        subscriber.close()
    for header in service.ended_series:  # authoritative, in case the last one was missed
        arrivals.setdefault(header["series"], Arrivals()).end = header
    return _check_archives(service, arrivals, skipped, binary, partial)


def _record(message: Any, arrivals: dict[str, Arrivals], skipped: dict[str, str],
            progress: Callable[[str], None]) -> None:
    header = message.header
    sid = header.get("series") or ""
    if message.topic == "alert" and header.get("code") == "skipped_series" and sid:
        skipped[sid] = header.get("message", "")
        progress(header.get("message", ""))
        return
    if not sid or message.topic not in ("series.start", "volume", "alert", "series.end"):
        return
    found = arrivals.setdefault(sid, Arrivals())
    if message.topic == "series.start":
        found.start = header
        progress(f"series {header.get('series_number', '?')} {header.get('description', '')} "
                 f"[{sid}]: receiving (TR {header.get('tr_s')} s, "
                 f"{header.get('n_expected') or '?'} volumes announced)")
    elif message.topic == "volume":
        found.volumes.append(header)
    elif message.topic == "alert":
        found.alerts.append(header)
    else:
        found.end = header
        start = found.start or {}
        progress(f"series {start.get('series_number', '?')} {start.get('description', '')} "
                 f"[{sid}] ended: {header.get('n_volumes')} volumes "
                 f"({(header.get('summary') or {}).get('end_reason', '')})")


def _check_archives(service: Any, arrivals: dict[str, Arrivals], skipped: dict[str, str],
                    binary: str | None, partial: bool) -> VerifyReport:
    """The table of every series received, from its archived files, with its timing."""
    report = VerifyReport("listen", dcm2niix=dcm2niix.dcm2niix_version(binary)
                          if binary else None)
    folders: list[Path] = []
    for sid, found in arrivals.items():
        dicom = (found.end or {}).get("outputs", {}).get("dicom")
        folders.append(Path(dicom) if dicom else service.store.series_dir(sid) / "dicom")
    folders += [service.store.series_dir(sid) / "dicom" for sid in skipped]
    seen: set[Path] = set()
    for folder in folders:
        if folder in seen or not folder.is_dir() or not any(folder.iterdir()):
            continue
        seen.add(folder)
        found = verify_folder(folder, service.config, binary, partial)
        report.series += found.series
        report.notes += [f"{folder.parent.name}: {note}" for note in found.notes]
    by_id = {s.series: s for s in report.series}
    for sid, found in arrivals.items():
        series = by_id.get(sid)
        if series is None:
            start = found.start or {}
            series = SeriesReport(sid, start.get("series_number"), start.get("description", ""),
                                  checks=[Check("archive", FAIL, "no archived file")])
            report.series.append(series)
        series.timing = timing_checks(found)
    if not arrivals and not skipped:
        report.failures.append("no series received")
    return report
