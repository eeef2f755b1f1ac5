"""Activation time-to-criterion, for pilot sessions: how many more volumes until the
feedback ROI's contrast reaches significance, at the effect and noise seen so far.

The ROI's mean signal (``roi_mean`` of the feedback ROI) is fitted by least squares on
the design's fixed columns (task regressors, drifts, constant: known for the whole run,
so the projection can use the rows still to come; motion confounds are not, and are
left out of this fit). After ``n`` volumes: effect ``e = c'b``, residual variance
``s2 = RSS / (n - rank)``, ``t = e / sqrt(s2 f_n)`` with ``f_n = c'(X_n'X_n)^+ c``. If the
effect and the noise stay, after ``N`` volumes ``t_N = e / sqrt(s2 f_N)``, ``f_N`` from
the planned design's first ``N`` rows; the criterion is the one-sided threshold of the
GLM's ``p_value`` at ``N - rank`` degrees of freedom. Published as
``activation_criterion``: ``t``, ``threshold`` (at the current degrees of freedom),
``volumes_needed`` (0 once reached; None when not reached within the run's planned
length at this effect, or while there is no positive effect), and
``volumes_needed_range``, the same for the effect one standard error above and below
(the faster and slower bound; None as above).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import scipy.stats

from rtsc.pipeline.glm.design import Design
from rtsc.pipeline.stages import StageResult
from rtsc.volume import Volume

#: Relative tolerance of "c lies in the row space of the first N rows".
_ESTIMABLE_TOL = 1e-8


def planned_factors(fixed: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``f_N = c'(X_N'X_N)^+ c`` for the first N = 1 .. n rows of ``fixed`` ((n, q)),
    NaN where ``c`` ((q,)) is not estimable from those rows; (n,) float64."""
    grams = np.cumsum(fixed[:, :, None] * fixed[:, None, :], axis=0)
    pinvs = np.linalg.pinv(grams, hermitian=True)
    factors = np.einsum("i,nij,j->n", c, pinvs, c)
    reproduced = np.einsum("nij,njk,k->ni", grams, pinvs, c)
    off = np.linalg.norm(reproduced - c, axis=1) > _ESTIMABLE_TOL * max(np.linalg.norm(c), 1e-300)
    factors[off] = np.nan
    return factors


def _first_reaching(effect: float, s2: float, factors: np.ndarray, thresholds: np.ndarray,
                    n: int) -> int | None:
    """Volumes after ``n`` until ``effect / sqrt(s2 f_N) >= threshold_N`` (0: already),
    None when not within the planned rows or when ``effect <= 0``."""
    if not effect > 0.0:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        t = effect / np.sqrt(s2 * factors[n - 1:])
    reached = np.flatnonzero(t >= thresholds[n - 1:])
    return int(reached[0]) if reached.size else None


class ActivationCriterionStage:
    """The ``activation_criterion`` field (module docstring).

    Parameters
    ----------
    design : Design, the GLM's
    weights : (p,) float64, the contrast over the design's columns (``names`` order)
    roi : str, the ROI whose ``roi_mean`` is fitted
    contrast : str, the contrast's name (for the message)
    p_value : float, one-sided threshold (the GLM's ``p_value``)
    """

    name = "activation_criterion"
    produces = frozenset({"activation_criterion"})
    consumes = frozenset()
    consumes_optional = frozenset({"roi_mean"})

    def __init__(self, design: Design, weights: np.ndarray, roi: str, contrast: str,
                 p_value: float = 0.001) -> None:
        names = design.names
        fixed_names = design.task_names + design.drift_names
        self.c = np.array([weights[names.index(n)] for n in fixed_names], dtype=np.float64)
        self.fixed = np.asarray(design.fixed, dtype=np.float64)
        self.roi, self.contrast, self.p_value = roi, contrast, float(p_value)
        self.factors: np.ndarray | None = None  # planned f_N, made at the first volume
        self.n = 0  # volumes fitted
        self.last_index = -1  # the highest index fitted
        q = self.c.size
        self._gram, self._xty, self._yty = np.zeros((q, q)), np.zeros(q), 0.0
        self._y0: float | None = None
        self.last: dict[str, Any] | None = None
        self._threshold_rank = -1
        self._pending = False
        self._threshold_cache = np.zeros(0)

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Add this volume's ROI mean; the message gets the figures as of the volume
        before (``as_of``): they are computed after the message (a pilot session's
        projection over tens of volumes does not need this one, and the message does
        not wait), or here when that did not run."""
        self._refresh()
        means = (upstream or {}).get("roi_mean") or {}
        y = means.get(self.roi)
        if y is not None and math.isfinite(y) and 0 <= volume.index < self.fixed.shape[0]:
            self.n += 1
            self.last_index = max(self.last_index, volume.index)
            if self._y0 is None:
                self._y0 = float(y)  # subtracted: sums of squares near the noise's scale
            x, value = self.fixed[volume.index], float(y) - self._y0
            self._gram += np.outer(x, x)
            self._xty += value * x
            self._yty += value * value
            self._pending = True
        return StageResult(metrics={"activation_criterion": self.last},
                           after_publish=self._refresh)

    def _refresh(self) -> None:
        if self._pending:
            self._pending = False
            self.last = self._figures()

    def _figures(self) -> dict[str, Any] | None:
        n = self.n
        if n < 3:
            return None
        if self.factors is None:
            self.factors = planned_factors(self.fixed, self.c)
        # the normal equations of a handful of columns (q x q, once per volume)
        values, vectors = np.linalg.eigh(self._gram)
        # numpy's matrix_rank rule on X'X; the contrast must lie in the kept directions
        keep = values > values[-1] * values.size * np.finfo(float).eps
        rank = int(keep.sum())
        dof = n - rank
        if dof < 1 or rank == 0:
            return None
        kept = vectors[:, keep]
        if np.linalg.norm(self.c - kept @ (kept.T @ self.c)) > 1e-8 * np.linalg.norm(self.c):
            return None  # not estimable yet (a condition without events so far)
        inverse = (kept / values[keep]) @ kept.T
        beta = inverse @ self._xty
        rss = self._yty - float(beta @ self._xty)  # y'y - b'X'y at the least-squares b
        s2 = rss / dof
        f_n = float(self.c @ inverse @ self.c)
        if not (s2 > 0.0 and f_n > 0.0):
            return None
        effect = float(self.c @ beta)
        se = math.sqrt(s2 * f_n)
        thresholds = self._thresholds(int(rank))
        last = self.last_index + 1  # the planned rows so far (missing volumes included)

        def needed(e: float) -> int | None:
            assert self.factors is not None
            return _first_reaching(e, s2, self.factors, thresholds, last)

        return {"as_of": self.last_index, "roi": self.roi, "contrast": self.contrast,
                "t": effect / se,
                "threshold": float(thresholds[dof + rank - 1]),
                "volumes_needed": needed(effect),
                "volumes_needed_range": [needed(effect + se), needed(effect - se)]}

    def _thresholds(self, rank: int) -> np.ndarray:
        """The one-sided threshold at N - rank degrees of freedom, N = 1 .. planned rows
        (at least 1), computed once per rank."""
        if self._threshold_rank != rank:
            assert self.factors is not None
            planned = np.arange(1, self.factors.size + 1)
            self._threshold_cache = scipy.stats.t.isf(self.p_value,
                                                      np.maximum(planned - rank, 1))
            self._threshold_rank = rank
        return self._threshold_cache

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        self._refresh()
        return {"activation_criterion": self.last}


def activation_phrase(value: Any) -> str:
    """``activation_criterion`` (docs/messages.md) as "task t 2.1 of 3.4, ~18 (9-40) more
    volumes"; "" when there is none. Shared by the dashboard and the report."""
    if not isinstance(value, dict) or value.get("t") is None:
        return ""
    head = f"{value.get('contrast')} t {float(value['t']):.1f} of {float(value['threshold']):.1f}"
    needed = value.get("volumes_needed")
    if needed == 0:
        return head + ", reached"
    low, high = (value.get("volumes_needed_range") or [None, None])[:2]
    if needed is None:
        return head + ", not within the run at this effect"
    spread = f" ({low}-{high if high is not None else 'run end'})" if low is not None else ""
    return head + f", ~{needed}{spread} more volumes"
