"""Usable frames as FIRMM counts them, projections, the session criterion, and
respiration-robust FD. Pure functions (plus one small filter state); no I/O.

- A frame is usable under threshold ``T`` when its FD (mm) is finite and ``<= T``
  (frames whose registration failed have no FD and are not usable). Optionally, runs of
  consecutive usable frames shorter than ``min_run`` frames are discarded (FIRMM's
  "minimum contiguous frames"). Counting the frames so far with these rules, volume
  by volume, equals counting the whole prefix offline: the live value is
  :func:`usable_mask` of the FD series so far.
- Clean minutes = usable frames x TR / 60. Projected minutes at the end of the series
  = clean minutes + (usable fraction so far) x (frames still to come) x TR / 60.
- The criterion (FIRMM's default: 12.5 minutes under 0.2 mm) counts the clean minutes
  of every series of the session so far; its ETA is the scanning time still needed at
  the current series' usable fraction.
- Respiration-robust FD (Fair et al. 2020; Gratton et al. 2020): with fast multiband
  TRs, breathing shows up in the motion parameters at the breathing rate. A causal
  second-order IIR band-stop (notch) filter at that rate is run over each of the six
  parameters before FD; the filter starts in its steady state at the first volume's
  parameters, so it equals ``scipy.signal.lfilter`` over the series with
  ``zi = lfilter_zi(b, a) * params[0]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import signal

from rtsc.conventions import framewise_displacement


def usable_mask(fd: np.ndarray, threshold_mm: float, min_run: int = 0) -> np.ndarray:
    """Which frames are usable.

    Parameters
    ----------
    fd : (n,) float, mm (NaN: not registered)
    threshold_mm : float
    min_run : int, runs of usable frames shorter than this are discarded (0 or 1: none)

    Returns
    -------
    (n,) bool
    """
    fd = np.asarray(fd, dtype=np.float64)
    good = np.isfinite(fd) & (fd <= threshold_mm)
    if min_run <= 1 or not good.any():
        return good
    # run lengths of the True runs, painted back on their frames
    edges = np.diff(np.concatenate([[0], good.view(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    keep = np.zeros_like(good)
    for start, stop in zip(starts, stops):  # one iteration per run, not per frame
        if stop - start >= min_run:
            keep[start:stop] = True
    return keep


def usable_counts(fd: np.ndarray, thresholds_mm: Sequence[float], min_run: int = 0
                  ) -> dict[str, int]:
    """Usable frames per threshold, keys formatted ``f"{t:g}"`` ("0.2")."""
    return {f"{t:g}": int(usable_mask(fd, t, min_run).sum()) for t in thresholds_mm}


def clean_minutes(n_usable: int, tr_s: float) -> float:
    """Minutes of usable data in ``n_usable`` frames of ``tr_s`` seconds."""
    return n_usable * tr_s / 60.0


def projected_minutes(n_usable: int, n_seen: int, n_expected: int | None,
                      tr_s: float) -> float | None:
    """Usable minutes expected at the end of the series, if the usable fraction so far
    holds for the frames still to come; None when the run length is unknown."""
    if n_expected is None or n_seen <= 0:
        return None
    remaining = max(n_expected - n_seen, 0)
    return (n_usable + n_usable / n_seen * remaining) * tr_s / 60.0


def criterion_status(session_minutes: float, target_minutes: float, threshold_mm: float,
                     usable_fraction: float | None) -> dict[str, object]:
    """The ``criterion`` field of the ``volume`` message.

    Parameters
    ----------
    session_minutes : float, clean minutes under ``threshold_mm`` over the session so far
    target_minutes : float
    threshold_mm : float
    usable_fraction : float or None, usable frames / frames of the current series

    Returns
    -------
    dict with ``threshold_mm``, ``target_minutes``, ``minutes``, ``fraction``
    (minutes / target), ``eta_s`` (seconds of scanning still needed at the current
    usable fraction; 0 once reached; None when no frame is usable yet) and ``reached``.
    """
    reached = session_minutes >= target_minutes
    if reached:
        eta: float | None = 0.0
    elif usable_fraction and usable_fraction > 0:
        eta = (target_minutes - session_minutes) * 60.0 / usable_fraction
    else:
        eta = None
    return {"threshold_mm": threshold_mm, "target_minutes": target_minutes,
            "minutes": session_minutes,
            "fraction": session_minutes / target_minutes if target_minutes > 0 else None,
            "eta_s": eta, "reached": bool(reached)}


def session_minutes(base: Mapping[str, float], current: Mapping[str, float]
                    ) -> dict[str, float]:
    """Clean minutes per threshold over the session: earlier series plus this one."""
    keys = list(dict.fromkeys([*base, *current]))
    return {k: float(base.get(k, 0.0)) + float(current.get(k, 0.0)) for k in keys}


# ---- respiration-robust FD ------------------------------------------------------------

def notch_coefficients(tr_s: float, breaths_per_min: float, bandwidth_bpm: float
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """Second-order IIR notch (band-stop) at the breathing rate, or None when the rate
    is at or above the Nyquist frequency of the TR (breathing then aliases and cannot be
    stopped by a filter at its own rate).

    Parameters
    ----------
    tr_s : float, seconds (the sampling interval of the motion parameters)
    breaths_per_min : float, centre of the stop band
    bandwidth_bpm : float, -3 dB width of the stop band, breaths per minute

    Returns
    -------
    (b, a) : (3,) float64 each, or None
    """
    fs = 1.0 / tr_s
    f0 = breaths_per_min / 60.0
    if not 0 < f0 < fs / 2:
        return None
    quality = breaths_per_min / bandwidth_bpm
    b, a = signal.iirnotch(f0, quality, fs=fs)
    return np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)


@dataclass
class NotchFilter:
    """Causal notch filter over the six motion parameters, one volume at a time.

    The state is set on the first call to the steady state for that input (so a
    constant series passes unchanged).
    """

    b: np.ndarray
    a: np.ndarray
    zi: np.ndarray | None = None
    _zi_unit: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def step(self, params: np.ndarray) -> np.ndarray:
        """Filter one (6,) parameter vector (mm, radians); returns the filtered (6,)."""
        params = np.asarray(params, dtype=np.float64)
        if self.zi is None:
            self._zi_unit = signal.lfilter_zi(self.b, self.a)
            self.zi = np.outer(self._zi_unit, params)  # (order, 6)
        out, self.zi = signal.lfilter(self.b, self.a, params[None, :], axis=0, zi=self.zi)
        return out[0]


def filtered_fd_step(prev_filtered: np.ndarray | None, filtered: np.ndarray,
                     radius_mm: float) -> float:
    """Power FD between consecutive filtered parameter vectors (0 for the first)."""
    if prev_filtered is None:
        return 0.0
    return framewise_displacement(prev_filtered, filtered, radius_mm)


def finite_or_none(value: float | None) -> float | None:
    """``value`` when finite, else None."""
    return value if value is not None and math.isfinite(value) else None
