"""The percentile rank of a QC figure among the earlier series of its protocol, and the
figures compared: live (from the ``volume`` messages' fields, volume by volume) and at
the series end (from the summary, qc.json).

Definition (the "mean" kind of ``scipy.stats.percentileofscore``): the percentile of
``x`` among the n earlier values ``v`` is ``100 * (count(v < x) + 0.5 * count(v == x)) / n``:
0 below every earlier series, 100 above every one, 50 at the median of distinct values.
It is a rank, not a judgement: a high percentile of ``fd_mean`` or ``dvars_std`` means
more motion or noise than usual, a low one of ``tsnr``, ``snr`` or ``usable_fraction``
worse data than usual.

The figures (names as in qc.json, MRIQC's where MRIQC has one):

==================  =========================================  ===========================
figure              live, after each volume                    at the end (the summary)
==================  =========================================  ===========================
``tsnr``            the message's ``tsnr`` (running median)    ``tsnr``
``snr``             median of the ``snr`` values so far         ``snr_background``
``fd_mean``         mean of the finite FD so far, mm           ``fd_mean``
``usable_fraction`` ``usable_frames`` at                       the same over ``n_volumes``
                    ``qc.criterion_threshold_mm`` over the
                    volumes processed so far
``dvars_std``       mean of the finite ``std_dvars`` so far     ``dvars_std``
                    (the live estimate)                        (the exact values)
==================  =========================================  ===========================
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

#: The QC figures given as site percentiles, in this order.
FIGURES = ("tsnr", "snr", "fd_mean", "usable_fraction", "dvars_std")


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def percentile_rank(earlier: np.ndarray, x: float | None) -> float | None:
    """The percentile rank of ``x`` among ``earlier``, 0-100 (see the module notes).

    Parameters
    ----------
    earlier : (n,) float64, ascending, finite
        The earlier series' values of the figure.
    x : float or None

    Returns
    -------
    float or None
        None when ``x`` is None or not finite, or ``earlier`` is empty.
    """
    value = finite(x)
    if value is None or earlier.size == 0:
        return None
    below = int(np.searchsorted(earlier, value, side="left"))
    ties = int(np.searchsorted(earlier, value, side="right")) - below
    return 100.0 * (below + 0.5 * ties) / earlier.size


def end_figures(summary: Mapping[str, Any], threshold_mm: float) -> dict[str, float | None]:
    """The figures of a finished series from its summary (qc.json fields).

    Parameters
    ----------
    summary : the series summary
    threshold_mm : ``qc.criterion_threshold_mm``, the FD threshold of ``usable_fraction``
    """
    n = int(summary.get("n_volumes") or 0)
    usable = (summary.get("usable_frames") or {}).get(f"{threshold_mm:g}")
    return {"tsnr": finite(summary.get("tsnr")), "snr": finite(summary.get("snr_background")),
            "fd_mean": finite(summary.get("fd_mean")),
            "usable_fraction": finite(usable / n) if usable is not None and n else None,
            "dvars_std": finite(summary.get("dvars_std"))}


@dataclass
class LiveState:
    """What the live figures need of the volumes so far.

    Attributes
    ----------
    n : int, volumes folded (skipped ones excluded)
    fd_sum : float, mm; fd_n : int, finite FD values
    dvars_sum : float; dvars_n : int, finite std_dvars values
    snr_sorted : list of float, the finite per-volume SNR values, ascending
    """

    n: int = 0
    fd_sum: float = 0.0
    fd_n: int = 0
    dvars_sum: float = 0.0
    dvars_n: int = 0
    snr_sorted: list[float] = field(default_factory=list)


def live_step(state: LiveState, metrics: Mapping[str, Any],
              usable_key: str) -> tuple[LiveState, dict[str, float | None]]:
    """Fold one volume's published fields into ``state``; the live figures after it.

    Parameters
    ----------
    state : LiveState, updated in place and returned
    metrics : the volume's fields (``tsnr``, ``snr``, ``framewise_displacement``,
        ``std_dvars``, ``usable_frames``)
    usable_key : the ``usable_frames`` key of ``qc.criterion_threshold_mm`` (``"0.2"``)
    """
    state.n += 1
    fd = finite(metrics.get("framewise_displacement"))
    if fd is not None:
        state.fd_sum += fd
        state.fd_n += 1
    std = finite(metrics.get("std_dvars"))
    if std is not None:
        state.dvars_sum += std
        state.dvars_n += 1
    snr = finite(metrics.get("snr"))
    if snr is not None:
        bisect.insort(state.snr_sorted, snr)
    values = state.snr_sorted
    m = len(values)
    median = None if not m else values[m // 2] if m % 2 else (values[m // 2 - 1]
                                                               + values[m // 2]) / 2.0
    usable = finite((metrics.get("usable_frames") or {}).get(usable_key))
    return state, {"tsnr": finite(metrics.get("tsnr")), "snr": median,
                   "fd_mean": state.fd_sum / state.fd_n if state.fd_n else None,
                   "usable_fraction": usable / state.n if usable is not None else None,
                   "dvars_std": state.dvars_sum / state.dvars_n if state.dvars_n else None}


def site_percentiles(earlier: Mapping[str, np.ndarray], figures: Mapping[str, float | None],
                     min_series: int) -> dict[str, float | None]:
    """Each figure's percentile rank among its earlier values, null with fewer than
    ``min_series`` of them.

    Parameters
    ----------
    earlier : figure -> (n,) float64 ascending, the earlier series' values
    figures : figure -> this series' value (or None)
    min_series : the fewest earlier values a percentile is given with
    """
    out: dict[str, float | None] = {}
    for name in FIGURES:
        values = earlier.get(name)
        out[name] = None if values is None or values.size < min_series else \
            percentile_rank(values, figures.get(name))
    return out
