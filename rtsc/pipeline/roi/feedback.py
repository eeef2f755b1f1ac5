"""The neurofeedback value from the ROIs: its kinds beyond one ROI's PSC, and smoothing.

Kinds (config ``glm.feedback``; ``psc`` and ``contrast`` are in
:mod:`rtsc.pipeline.roi.stage`):

* ``difference``: the PSC of ``feedback_roi`` minus that of ``feedback_roi_b`` (the
  differential feedback of, e.g., left against right motor cortex), None while either
  has none.
* ``correlation``: connectivity feedback, the Pearson correlation of the two ROIs' mean
  signals over the last ``feedback_window`` volumes, after a least-squares fit of a
  constant and a line in time (and, with ``feedback_motion_regression``, the six motion
  parameters) within the window is taken out of each: what OpenNFT's and MURFI's
  sliding-window connectivity feedback computes. None until the window is full, while
  a value in it is missing, or when a residual is constant.

Motion regression (``glm.feedback_motion_regression``) for ``psc`` and ``difference``
(:class:`MotionCleaner`): the value is regressed on a constant and the six motion
parameters over the run so far (ordinary least squares on every volume with a value and
a registration), and the part the motion explains, ``(m_t - mean m) . beta``, is taken
out of this volume's value; the constant is kept, so the feedback keeps its level. Until
:data:`MOTION_REGRESSION_MIN` such volumes exist the value is published unchanged; a
volume without motion parameters (its registration failed) too. (``correlation``
regresses within its window, above; ``contrast``'s GLM has the motion confounds.)

Smoothing (``glm.feedback_smoothing``), applied to any kind, state per series:

* ``ema``: ``s_t = alpha v_t + (1 - alpha) s_{t-1}``, ``s`` starting at the first value.
* ``kalman``: a scalar random-walk Kalman filter (as OpenNFT's, without its spike
  clipping): state variance ``P``, process and measurement noise variances ``Q`` and
  ``R``; ``P <- P + Q``, gain ``K = P / (P + R)``, ``s <- s + K (v - s)``, ``P <- (1 - K)
  P``, starting at the first value with ``P = R``. Only ``Q / R``
  (``feedback_kalman_q_over_r``) shapes the output: small follows slowly, large follows
  the raw value.

A missing value (None) leaves the smoother's state as it is and gives None.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rtsc.conventions import MOTION_NAMES

FEEDBACK_KINDS = ("psc", "contrast", "difference", "correlation")
#: Kinds whose value :class:`MotionCleaner` cleans (``correlation`` regresses in its window).
MOTION_CLEANED_KINDS = ("psc", "difference")
#: Volumes (with a value and motion parameters) before the motion regression starts:
#: twice the seven columns.
MOTION_REGRESSION_MIN = 14
SMOOTHING_KINDS = ("none", "ema", "kalman")
#: Kinds that read a second ROI (``feedback_roi_b``).
TWO_ROI_KINDS = ("difference", "correlation")


def window_correlation(a: np.ndarray, b: np.ndarray,
                       confounds: np.ndarray | None = None) -> float | None:
    """Pearson correlation of ``a`` and ``b`` ((w,) float64) after taking a constant, a
    line in time and the columns of ``confounds`` ((w, c) or None) out of each by least
    squares; None when a residual is (numerically) constant or any value is not finite.
    """
    w = a.size
    t = np.arange(w, dtype=np.float64)
    columns = [np.ones(w), t - t.mean()]
    if confounds is not None:
        columns.extend(np.asarray(confounds, dtype=np.float64).T)
    design = np.column_stack(columns)
    data = np.column_stack([a, b]).astype(np.float64)
    if not (np.isfinite(data).all() and np.isfinite(design).all()):
        return None
    # Orthonormal basis of the design (rank-revealing: motion columns can be constant)
    u, s, _ = np.linalg.svd(design, full_matrices=False)
    basis = u[:, s > s[0] * w * np.finfo(float).eps] if s.size and s[0] > 0 else u[:, :0]
    residual = data - basis @ (basis.T @ data)
    ra, rb = residual[:, 0], residual[:, 1]
    saa, sbb = float(ra @ ra), float(rb @ rb)
    tiny = w * (1e-12 * (float(np.abs(data).max()) or 1.0)) ** 2  # rounding of the fit
    if saa <= tiny or sbb <= tiny:
        return None
    return float(np.clip(float(ra @ rb) / math.sqrt(saa * sbb), -1.0, 1.0))


class SlidingCorrelation:
    """The ``correlation`` kind: the window's values of both ROIs (and the motion
    parameters), and :func:`window_correlation` over them once it is full.

    Parameters
    ----------
    window : int >= 3 volumes (>= 10 with motion regression: 2 + 6 columns and two
        degrees of freedom)
    motion : bool, regress the six motion parameters (mm, radians) out too
    """

    def __init__(self, window: int, motion: bool = False) -> None:
        if window < (10 if motion else 3):
            raise ValueError(f"feedback window {window}: at least {10 if motion else 3} "
                             f"volumes{' with motion regression' if motion else ''}")
        self.window = int(window)
        self.motion = bool(motion)
        self._rows: deque[tuple[float, float, Sequence[float]]] = deque(maxlen=self.window)

    def update(self, a: float | None, b: float | None,
               motion: Sequence[float | None] | None = None) -> float | None:
        """Add one volume's ROI means (and motion parameters); the correlation or None."""
        nan = float("nan")
        params = [nan if v is None else float(v) for v in (motion or [None] * 6)] \
            if self.motion else []
        self._rows.append((nan if a is None else float(a), nan if b is None else float(b),
                           params))
        if len(self._rows) < self.window:
            return None
        values = np.array([(ra, rb) for ra, rb, _ in self._rows])
        confounds = np.array([p for _, _, p in self._rows]) if self.motion else None
        return window_correlation(values[:, 0], values[:, 1], confounds)


class MotionCleaner:
    """Takes the part that the six motion parameters explain out of a value, fitted over
    the run so far (module docstring)."""

    def __init__(self) -> None:
        self._values: list[float] = []
        self._motion: list[list[float]] = []

    def update(self, value: float | None, motion: Sequence[float | None]) -> float | None:
        """This volume's value with its motion part removed (None stays None)."""
        if value is None or not math.isfinite(value):
            return None
        if any(m is None or not math.isfinite(m) for m in motion):
            return value
        self._values.append(float(value))
        self._motion.append([float(m) for m in motion])  # type: ignore[arg-type]
        if len(self._values) < MOTION_REGRESSION_MIN:
            return value
        moved = np.asarray(self._motion)
        centred = moved - moved.mean(axis=0)
        design = np.column_stack([np.ones(len(self._values)), centred])
        beta = np.linalg.lstsq(design, np.asarray(self._values), rcond=None)[0]
        return value - float(centred[-1] @ beta[1:])


class Ema:
    """Exponential moving average, ``alpha`` in (0, 1]."""

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"feedback_ema_alpha {alpha!r}: allowed (0, 1]")
        self.alpha = float(alpha)
        self.state: float | None = None

    def update(self, value: float | None) -> float | None:
        if value is None or not math.isfinite(value):
            return None
        self.state = value if self.state is None else \
            self.alpha * value + (1.0 - self.alpha) * self.state
        return self.state


class Kalman:
    """Scalar random-walk Kalman filter with ``Q / R`` = ``q_over_r`` > 0 (module doc)."""

    def __init__(self, q_over_r: float) -> None:
        if not q_over_r > 0.0:
            raise ValueError(f"feedback_kalman_q_over_r {q_over_r!r}: allowed > 0")
        self.q = float(q_over_r)  # in units of R (R = 1)
        self.state: float | None = None
        self.variance = 1.0

    def update(self, value: float | None) -> float | None:
        if value is None or not math.isfinite(value):
            return None
        if self.state is None:
            self.state, self.variance = value, 1.0
            return self.state
        predicted = self.variance + self.q
        gain = predicted / (predicted + 1.0)
        self.state += gain * (value - self.state)
        self.variance = (1.0 - gain) * predicted
        return self.state


def make_smoother(kind: str, alpha: float, q_over_r: float) -> Ema | Kalman | None:
    """The smoother of ``glm.feedback_smoothing`` (None for ``none``)."""
    if kind not in SMOOTHING_KINDS:
        raise ValueError(f"feedback_smoothing {kind!r}: allowed: {', '.join(SMOOTHING_KINDS)}")
    if kind == "ema":
        return Ema(alpha)
    if kind == "kalman":
        return Kalman(q_over_r)
    return None


class FeedbackSource:
    """The feedback value of each volume from the ROI stage's figures: its kind, then
    its smoothing (the module docstring).

    Parameters
    ----------
    kind : one of :data:`FEEDBACK_KINDS`
    roi, roi_b : str, the feedback ROI and the second one (two-ROI kinds only)
    roi_names : list of str, every ROI of the stage
    window : the ``correlation`` kind's :class:`SlidingCorrelation`
    motion : regress the motion parameters out: within the window (``correlation``), over
        the run (:class:`MotionCleaner`: ``psc``, ``difference``); ignored by ``contrast``
    smoothing, alpha, q_over_r : :func:`make_smoother`

    Raises
    ------
    ValueError
        A two-ROI kind without a second, different ROI; bad window or smoothing values.
    """

    def __init__(self, kind: str, roi: str, roi_b: str | None, roi_names: list[str],
                 window: int = 20, motion: bool = False, smoothing: str = "none",
                 alpha: float = 0.5, q_over_r: float = 0.1) -> None:
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"feedback {kind!r}: allowed: {', '.join(FEEDBACK_KINDS)}")
        if kind in TWO_ROI_KINDS and (roi_b not in roi_names or roi_b == roi):
            raise ValueError(f"feedback {kind!r} needs feedback_roi_b, an ROI other than "
                             f"{roi!r}; got {roi_b!r}; ROIs: {', '.join(roi_names)}")
        self.kind, self.roi = kind, roi
        self.roi_b = roi_b if kind in TWO_ROI_KINDS else None
        self.correlation = SlidingCorrelation(window, motion) if kind == "correlation" \
            else None
        self.smoothing = smoothing
        self.smoother = make_smoother(smoothing, alpha, q_over_r)
        self.cleaner = MotionCleaner() if motion and kind in MOTION_CLEANED_KINDS else None
        #: the motion parameters, read from the earlier stages for the regression
        self.consumes_optional = frozenset(MOTION_NAMES) \
            if motion and (self.cleaner is not None or self.correlation is not None) \
            else frozenset()

    def update(self, psc: Mapping[str, float | None], means: Mapping[str, float | None],
               contrast: Callable[[], float | None],
               upstream: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
        """(value, raw): this volume's feedback, smoothed and before smoothing.

        ``psc`` and ``means``: ROI name -> PSC and mean of this volume (None: none);
        ``contrast``: the contrast kind's value, called only for it; ``upstream``: the
        earlier stages' metrics (the motion parameters, mm and radians)."""
        raw: float | None
        if self.kind == "psc":
            raw = psc[self.roi]
        elif self.kind == "contrast":
            raw = contrast()
        elif self.kind == "difference":
            a, b = psc[self.roi], psc[self.roi_b]  # type: ignore[index]
            raw = None if a is None or b is None else a - b
        else:
            assert self.correlation is not None and self.roi_b is not None
            motion = [(upstream or {}).get(name) for name in MOTION_NAMES] \
                if self.correlation.motion else None
            raw = self.correlation.update(means[self.roi], means[self.roi_b], motion)
        if self.cleaner is not None:
            raw = self.cleaner.update(raw, [(upstream or {}).get(n) for n in MOTION_NAMES])
        return (raw if self.smoother is None else self.smoother.update(raw)), raw
