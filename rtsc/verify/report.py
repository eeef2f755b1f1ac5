"""The results of `rtsc verify`: per-series reports, the printed table, the JSON.

Series are named as everywhere in rtsc: SeriesNumber, the cleaned SeriesDescription
and the opaque id (:func:`rtsc.volume.series_id`); no file name, path of the input
folder or other header text appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rtsc.messages import jsonable
from rtsc.verify.checks import FAIL, PASS, SKIP, Check

#: Version of the JSON layout written by ``rtsc verify --json``.
JSON_VERSION = 1
_NAME_WIDTH = 24


@dataclass
class SeriesReport:
    """One series: its checks, or why it was skipped.

    Attributes
    ----------
    series : str, opaque id
    series_number : int or None
    description : str, SeriesDescription without anything but [A-Za-z0-9_-]
    manufacturer : str or None
    layout : str or None, ``slices``, ``mosaic`` or ``multiframe``
    n_files : int
    skipped : str or None
        Why rtsc's series filter does not process it (then no checks are run).
    checks : list of Check, the table
    timing : list of Check, arrival timing (``--listen`` only)
    """

    series: str
    series_number: int | None
    description: str
    manufacturer: str | None = None
    layout: str | None = None
    n_files: int = 0
    skipped: str | None = None
    checks: list[Check] = field(default_factory=list)
    timing: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks + self.timing)

    @property
    def title(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        return f"series {number} {self.description or '(no description)'} [{self.series}]"


@dataclass
class VerifyReport:
    """Everything `rtsc verify` found.

    Attributes
    ----------
    mode : ``folder`` or ``listen``
    series : list of SeriesReport
    dcm2niix : str or None, the version used (None: not installed)
    notes : list of str, about the input as a whole (files that are not DICOM...)
    failures : list of str, problems outside any series (nothing received...)
    """

    mode: str
    series: list[SeriesReport] = field(default_factory=list)
    dcm2niix: str | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def checked(self) -> list[SeriesReport]:
        return [s for s in self.series if s.skipped is None]

    @property
    def passed(self) -> bool:
        """True when a series was checked and no check of any series failed."""
        return bool(self.checked) and not self.failures \
            and not any(s.failed for s in self.series)


def _line(check: Check) -> list[str]:
    lines = [f"  {check.status}  {check.name:<{_NAME_WIDTH}s} {check.value}"]
    lines += [f"        {detail}" for detail in check.details]
    return lines


def series_lines(report: SeriesReport) -> list[str]:
    """The printed table of one series (and its arrival timing, if any)."""
    what = ", ".join(v for v in (report.manufacturer, report.layout,
                                 f"{report.n_files} files") if v)
    lines = [f"{report.title}: {what}"]
    if report.skipped is not None:
        lines.append(f"  SKIP  {'series':<{_NAME_WIDTH}s} not a BOLD time series: "
                     f"{report.skipped}")
        return lines
    if report.timing:
        lines.append("  arrival timing")
        for check in report.timing:
            lines += _line(check)
        lines.append("  series")
    for check in report.checks:
        lines += _line(check)
    counts = {s: sum(c.status == s for c in report.checks + report.timing)
              for s in (PASS, FAIL, SKIP)}
    lines.append(f"  {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return lines


def report_lines(report: VerifyReport) -> list[str]:
    """The whole printed output after the run: each series' table, then the verdict."""
    lines: list[str] = []
    for series in report.series:
        lines += series_lines(series) + [""]
    lines += report.notes
    lines += [f"FAIL  {text}" for text in report.failures]
    n_failed = sum(s.failed for s in report.series)
    if not report.checked:
        lines.append("rtsc verify: FAIL (no BOLD series checked)")
    elif report.passed:
        missing = "" if report.dcm2niix else "; dcm2niix not installed, its checks skipped"
        lines.append(f"rtsc verify: PASS ({len(report.checked)} series, every check passed"
                     f"{missing})")
    else:
        lines.append(f"rtsc verify: FAIL ({n_failed} of {len(report.series)} series with a "
                     "failed check)" if n_failed else "rtsc verify: FAIL")
    return lines


def to_json(report: VerifyReport) -> dict[str, Any]:
    """The report as plain JSON types (``rtsc verify --json``)."""
    def checks(items: list[Check]) -> list[dict[str, Any]]:
        return [{"check": c.name, "status": c.status, "value": c.value,
                 "details": list(c.details), "data": c.data} for c in items]

    return jsonable({
        "rtsc_verify": JSON_VERSION,
        "mode": report.mode,
        "passed": report.passed,
        "dcm2niix": report.dcm2niix,
        "notes": report.notes,
        "failures": report.failures,
        "series": [{"series": s.series, "series_number": s.series_number,
                    "description": s.description, "manufacturer": s.manufacturer,
                    "layout": s.layout, "n_files": s.n_files, "skipped": s.skipped,
                    "failed": s.failed, "timing": checks(s.timing),
                    "checks": checks(s.checks)} for s in report.series],
    })
