"""A scanner's session folder as the web view reads it: the day's finished series and
their report.html.

Read-only. Only series folders named as :mod:`rtsc.output.session` names them
(``YYYYMMDD-HHMMSS_<12 hex digits>``, maybe ``-N``) directly under the session folder
are looked at, and a report is served only at ``<session_dir>/<such a folder>/report.html``
after resolving symbolic links inside the session folder: no path from a request or a
message reaches the file system.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from rtsc.web.state import FinishedSeries

log = logging.getLogger(__name__)

#: A series folder: local date-time of its first dataset and the series id.
FOLDER = re.compile(r"^(?P<day>\d{8})-(?P<time>\d{6})_(?P<series>[0-9a-f]{12})(-\d{1,4})?$")
REPORT = "report.html"


def report_in(session_dir: str | Path, reported: str | Path) -> Path | None:
    """Where the report a series.end names (``outputs.report``, a path on the publisher's
    host) is under ``session_dir`` here, or None when it is not a series folder's
    report.html or resolves outside ``session_dir``."""
    reported = Path(reported)
    folder = reported.parent.name
    if reported.name != REPORT or not FOLDER.match(folder):
        return None
    return _inside(Path(session_dir), Path(session_dir) / folder / REPORT)


def _inside(root: Path, path: Path) -> Path | None:
    try:
        resolved_root = root.resolve(strict=True)
        resolved = path.resolve()
    except OSError:
        return None
    return resolved if resolved.is_relative_to(resolved_root) else None


def finished_series(session_dir: str | Path, day: str) -> list[FinishedSeries]:
    """The series of ``day`` (YYYYMMDD) finished in ``session_dir``: folders with a
    qc.json (written at the series end), oldest first; unreadable ones are skipped."""
    root = Path(session_dir)
    found: list[FinishedSeries] = []
    if not root.is_dir():
        return found  # rtsc run makes it at its first series
    try:
        folders = sorted(p for p in root.iterdir() if FOLDER.match(p.name))
    except OSError as exc:
        log.warning("cannot list %s: %s", root, exc)
        return []
    for folder in folders:
        match = FOLDER.match(folder.name)
        if match is None or match["day"] != day:
            continue
        try:
            summary = json.loads((folder / "qc.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # still running, or its qc.json could not be written
        if not isinstance(summary, dict):
            continue
        t = match["time"]
        report = _inside(root, folder / REPORT)
        found.append(FinishedSeries(
            match["series"], day, f"{t[:2]}:{t[2:4]}:{t[4:]}",
            _int(summary.get("n_volumes")), _int(summary.get("n_expected")),
            summary.get("verdict") if isinstance(summary.get("verdict"), str) else None,
            None, report))
    return found


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
