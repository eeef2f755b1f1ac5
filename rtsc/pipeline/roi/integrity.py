"""Feedback integrity: is the neurofeedback value following the head instead of the brain?

A subject who moves with the task, or a feedback ROI at the brain's edge, makes the
feedback track motion and the signal changes motion causes: the subject is then
rewarded for moving. Over the last ``window`` volumes this stage correlates the
``feedback`` value with framewise displacement (FD, mm), DVARS and the global signal
(Pearson r over the volumes where both values exist, at least half the window), publishes
the three correlations as ``feedback_integrity``, and raises a ``feedback_follows_head``
warning when FD's ``|r|`` reaches ``threshold``: once per episode, re-armed once it has
fallen below ``REARM_FRACTION`` of the threshold.

Only FD raises the alert. DVARS and the global signal also move with the brain's own
signal: in rtsc's demo (a clean simulated run, feedback from a sphere on the simulated
activation, window 30) the feedback's r reached 0.59-0.66 with them at several
volumes, through the task's signal change, not motion, while its r with FD stayed under
0.5. Their correlations are published for the reader to judge.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from rtsc.pipeline.stages import StageResult
from rtsc.volume import Volume

#: The nuisance figures, by message field, and their names in the alert.
NUISANCES = {"framewise_displacement": "FD", "dvars": "DVARS", "global_signal": "global signal"}
#: Those whose correlation raises the alert (see the module docstring).
ALERTING = ("framewise_displacement",)
#: The alert is armed again once every correlation is under this share of the threshold.
REARM_FRACTION = 0.8


def window_r(x: np.ndarray, ys: np.ndarray, min_pairs: int) -> list[float | None]:
    """Pearson r of ``x`` ((w,)) with each column of ``ys`` ((w, k)) over the rows where
    both are finite, all columns in one pass; None for a column with fewer than
    ``min_pairs`` such rows or where either is constant over them."""
    both = np.isfinite(x)[:, None] & np.isfinite(ys)
    count = both.sum(axis=0)
    xs = np.where(both, x[:, None], 0.0)
    yv = np.where(both, ys, 0.0)
    pairs = np.maximum(count, 1)
    a = np.where(both, xs - xs.sum(axis=0) / pairs, 0.0)
    b = np.where(both, yv - yv.sum(axis=0) / pairs, 0.0)
    saa, sbb, sab = (a * a).sum(axis=0), (b * b).sum(axis=0), (a * b).sum(axis=0)
    return [float(np.clip(sab[k] / math.sqrt(saa[k] * sbb[k]), -1.0, 1.0))
            if count[k] >= min_pairs and saa[k] > 0.0 and sbb[k] > 0.0 else None
            for k in range(count.size)]


class FeedbackIntegrityStage:
    """The ``feedback_integrity`` field and alert (module docstring).

    Parameters
    ----------
    window : int >= 6, volumes correlated
    threshold : float in (0, 1], ``|r|`` that raises the alert
    """

    name = "feedback_integrity"
    produces = frozenset({"feedback_integrity"})
    consumes = frozenset()
    consumes_optional = frozenset({"feedback", *NUISANCES})

    def __init__(self, window: int = 30, threshold: float = 0.6) -> None:
        if window < 6:
            raise ValueError(f"feedback integrity window {window}: at least 6 volumes")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"feedback integrity threshold {threshold!r}: allowed (0, 1]")
        self.window, self.threshold = int(window), float(threshold)
        # the last ``window`` volumes' (feedback, *NUISANCES), a ring: r needs no order
        self._rows = np.full((self.window, 1 + len(NUISANCES)), np.nan)
        self._n = 0
        self._armed = True
        self.n_alerts = 0
        self.peak: dict[str, float] = {}

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        upstream = upstream or {}

        def number(key: str) -> float:
            value = upstream.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(
                value, bool) else float("nan")

        rows = self._rows
        rows[self._n % self.window] = (number("feedback"), *(number(k) for k in NUISANCES))
        self._n += 1
        found: dict[str, float | None] = dict.fromkeys(NUISANCES)
        if self._n >= self.window:
            found = dict(zip(NUISANCES, window_r(rows[:, 0], rows[:, 1:], (self.window + 1) // 2)))
        for key, r in found.items():
            if r is not None:
                self.peak[key] = max(self.peak.get(key, 0.0), abs(r))
        result = StageResult(metrics={"feedback_integrity": found})
        known = {k: r for k, r in found.items() if r is not None and k in ALERTING}
        worst = max(known, key=lambda k: abs(known[k]), default=None)
        if worst is not None and abs(known[worst]) >= self.threshold and self._armed:
            self._armed = False
            self.n_alerts += 1
            result.alerts.append((
                "warning", "feedback_follows_head",
                f"the feedback correlates with {NUISANCES[worst]} at r = {known[worst]:+.2f} "
                f"over the last {self.window} volumes: it may follow the head, not the brain"))
        elif not self._armed and all(abs(r) < REARM_FRACTION * self.threshold
                                     for r in known.values()):
            self._armed = True
        return result

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        """The largest ``|r|`` per nuisance over the run and the number of alerts."""
        return {"feedback_integrity": {"peak_abs_r": {k: self.peak.get(k) for k in NUISANCES},
                                       "alerts": self.n_alerts, "window": self.window,
                                       "threshold": self.threshold}}
