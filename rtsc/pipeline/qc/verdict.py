"""The pass / warn / fail verdict of a series from its summary and configured criteria."""

from __future__ import annotations

from typing import Any, Mapping

from rtsc.config import VerdictConfig

_RANK = {"pass": 0, "warn": 1, "fail": 2}


def verdict(summary: Mapping[str, Any], criteria: VerdictConfig,
            threshold_mm: float) -> tuple[str, list[str]]:
    """Judge a series.

    Parameters
    ----------
    summary : the series summary (``fd_mean``, ``tsnr``, ``n_volumes``, ``n_expected``,
        ``n_missing_volumes``, ``spike_volumes``, ``usable_frames``, ``registration_failed``,
        ``incomplete``)
    criteria : VerdictConfig (a null criterion is not checked)
    threshold_mm : FD threshold whose usable fraction is judged

    Returns
    -------
    verdict : "pass", "warn" or "fail" (the worst criterion)
    reasons : list of str, one per criterion not passed, "fail: ..." / "warn: ..."
    """
    reasons: list[tuple[str, str]] = []
    n = int(summary.get("n_volumes") or 0)
    missing = int(summary.get("n_missing_volumes") or 0)
    expected = max(n + missing, 1)

    def high(value: float | None, warn: float | None, fail: float | None, what: str,
             fmt: str = "{:.3g}") -> None:
        if value is None:
            return
        if fail is not None and value > fail:
            reasons.append(("fail", f"{what} {fmt.format(value)} above {fmt.format(fail)}"))
        elif warn is not None and value > warn:
            reasons.append(("warn", f"{what} {fmt.format(value)} above {fmt.format(warn)}"))

    def low(value: float | None, warn: float | None, fail: float | None, what: str,
            fmt: str = "{:.3g}") -> None:
        if value is None:
            return
        if fail is not None and value < fail:
            reasons.append(("fail", f"{what} {fmt.format(value)} below {fmt.format(fail)}"))
        elif warn is not None and value < warn:
            reasons.append(("warn", f"{what} {fmt.format(value)} below {fmt.format(warn)}"))

    high(summary.get("fd_mean"), criteria.fd_mean_warn_mm, criteria.fd_mean_fail_mm,
         "mean FD (mm)")
    usable = (summary.get("usable_frames") or {}).get(f"{threshold_mm:g}")
    if usable is not None and n:
        low(usable / n, criteria.usable_warn_fraction, criteria.usable_fail_fraction,
            f"usable fraction under {threshold_mm:g} mm")
    low(summary.get("tsnr"), criteria.tsnr_warn, criteria.tsnr_fail, "median tSNR")
    spikes = len(summary.get("spike_volumes") or [])
    warn_at = criteria.spike_warn_volumes
    if criteria.spike_fail_fraction is not None and n and spikes / n > criteria.spike_fail_fraction:
        reasons.append(("fail", f"{spikes} volumes with spikes ({100 * spikes / n:.1f}% > "
                        f"{100 * criteria.spike_fail_fraction:g}%)"))
    elif warn_at is not None and warn_at > 0 and spikes >= warn_at:
        reasons.append(("warn", f"{spikes} volumes with spikes"))
    if criteria.missing_fail_fraction is not None and missing / expected > \
            criteria.missing_fail_fraction:
        reasons.append(("fail", f"{missing} volumes missing ({100 * missing / expected:.1f}% > "
                        f"{100 * criteria.missing_fail_fraction:g}%)"))
    elif criteria.missing_warn_volumes and missing >= criteria.missing_warn_volumes:
        reasons.append(("warn", f"{missing} volumes missing"))
    failed = len(summary.get("registration_failed") or [])
    if criteria.registration_fail_fraction is not None and n and \
            failed / n > criteria.registration_fail_fraction:
        reasons.append(("fail", f"registration failed on {failed} of {n} volumes"))
    elif failed:
        reasons.append(("warn", f"registration failed on {failed} volumes"))
    if summary.get("incomplete") and criteria.incomplete != "pass":
        reasons.append((criteria.incomplete, f"series stopped at {n} of "
                        f"{summary.get('n_expected')} volumes"))
    worst = max((_RANK[level] for level, _ in reasons), default=0)
    name = {v: k for k, v in _RANK.items()}[worst]
    return name, [f"{level}: {text}" for level, text in reasons]
