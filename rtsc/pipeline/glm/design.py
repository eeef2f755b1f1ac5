"""The GLM design matrix: HRFs, events, drifts, nuisance columns and contrasts.

The events and contrasts as the user writes them (events.tsv, ``glm.conditions``,
contrast expressions) are read and checked in :mod:`rtsc.pipeline.glm.paradigm`.

Everything here is a pure function of the run's description (events, TR, run length),
computed once before the first volume; the GLM (:mod:`rtsc.pipeline.glm.recursive`) only asks a
:class:`Design` for one row per volume.

Conventions
-----------
* Volume ``i`` is sampled at ``t = i * tr_s`` seconds (nilearn's ``frame_times`` with
  ``slice_time_ref=0``); event onsets are seconds from the start of volume 0, as in a
  BIDS events.tsv.
* Task regressors follow ``nilearn.glm.first_level.compute_regressor`` step by step, so
  the columns equal ``make_first_level_design_matrix(frame_times, events, hrf_model=...)``
  to rounding (1e-15, see tests/pipeline/glm/test_design.py): the events are drawn as boxcars on a
  grid oversampled ``oversampling`` times (50) that starts ``min_onset_s`` (-24 s) before
  the first volume and ends one TR after the last, convolved with the HRF sampled on
  that grid, linearly interpolated at the volume times, and the derivative columns of a
  condition are orthogonalised against its earlier columns over the whole run. That
  grid depends on the run length, which is why a design needs ``n_volumes`` up front
  (the DICOM header's expected count, or config).
* HRF models (config ``glm.hrf``):

  ``spm``
      the canonical double gamma: peak gamma of shape 6 (s), undershoot of shape 16,
      ratio 0.167 (SPM's 1/6, as nilearn rounds it, so both give the same columns),
      32 s long, normalised to sum 1 over its samples. One column per condition.
  ``spm_derivative``
      plus its temporal derivative (finite difference over a 0.1 s onset shift): two
      columns per condition, ``<type>`` and ``<type>_derivative``; nilearn's
      ``"spm + derivative"``. Absorbs latency shifts of about +-1 s.
  ``delayed``
      plus the dispersion derivative as well (finite difference over a 0.01 change of
      the peak's dispersion): ``<type>``, ``<type>_derivative``, ``<type>_dispersion``;
      nilearn's ``"spm + derivative + dispersion"``. For responses that come later or
      last longer than the canonical shape (slow tasks, spinal cord). Contrasts weight
      the canonical column only; the others are part of the model but not of the
      effect.
* Drifts: a DCT-II cosine basis with every frequency below ``1 / high_pass_s``
  (nilearn's ``create_cosine_drift``, SPM's high-pass filter), or orthogonalised
  polynomials of ``t / t_last`` (nilearn's polynomial drift); then a constant column.
* Per-volume (extra) columns: motion confounds with fMRIPrep names (6, 12 or 24:
  ``trans_x`` ..., ``*_derivative1`` backward differences, ``*_power2`` squares), and any
  other regressor plugged in by name (physiological ...); their values arrive with each
  volume.
* Column order is nilearn's: task columns, extra columns, drifts, ``constant``.

Conditioning: columns are *not* rescaled. The GLM is solved by sequential Givens QR
and a triangular solve (see :mod:`rtsc.pipeline.glm.recursive`), never by forming X'X; QR by row
rotations is backward stable column by column (each rotation acts on every column
separately) and the triangular solve's error is componentwise, so a column in
radians**2 next to the constant costs no accuracy and betas come out directly in each
column's own units (intensity per mm, per radian ...). Only the rank decision looks at
the scale, with numpy.linalg.lstsq's rule, so the two agree on which early columns count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import scipy.linalg
from scipy.stats import gamma

from rtsc.conventions import MOTION_NAMES
from rtsc.pipeline.glm.paradigm import (
    DesignError,
    Event,
    check_events,
    parse_contrast,
    read_events,
)

log = logging.getLogger(__name__)

HRF_MODELS = ("spm", "spm_derivative", "delayed")
DRIFT_MODELS = ("cosine", "polynomial", "none")

_HRF_SUFFIXES = {"spm": ("",), "spm_derivative": ("", "_derivative"),
                 "delayed": ("", "_derivative", "_dispersion")}


# ---- haemodynamic response functions ------------------------------------------------------

def _gamma_difference_hrf(tr_s: float, oversampling: int, time_length_s: float, onset_s: float,
                          dispersion: float = 1.0, delay_s: float = 6.0,
                          undershoot_s: float = 16.0, ratio: float = 0.167) -> np.ndarray:
    """Difference of two gamma densities on the oversampled grid, normalised to sum 1.

    Exactly nilearn's ``_gamma_difference_hrf``: ``rint(time_length / dt)`` samples
    spread evenly over [0, time_length] (so the step is slightly above ``dt``), the
    densities shifted by one ``dt``.
    """
    dt = tr_s / oversampling
    t = np.linspace(0.0, time_length_s, int(np.rint(float(time_length_s) / dt))) - onset_s
    peak = gamma.pdf(t, delay_s / dispersion, loc=dt, scale=dispersion)
    undershoot = gamma.pdf(t, undershoot_s, loc=dt, scale=1.0)
    hrf = peak - ratio * undershoot
    return hrf / hrf.sum()


def spm_hrf(tr_s: float, oversampling: int = 50, time_length_s: float = 32.0,
            onset_s: float = 0.0) -> np.ndarray:
    """SPM canonical HRF (peak shape 6 s, undershoot 16 s, ratio 0.167), nilearn's ``spm_hrf``.

    Parameters
    ----------
    tr_s : float, repetition time, seconds
    oversampling : int, samples per TR
    time_length_s : float, length of the kernel, seconds
    onset_s : float, delay of the response, seconds

    Returns
    -------
    hrf : (rint(time_length_s * oversampling / tr_s),) float64, sums to 1
    """
    return _gamma_difference_hrf(tr_s, oversampling, time_length_s, onset_s)


def spm_time_derivative(tr_s: float, oversampling: int = 50, time_length_s: float = 32.0,
                        onset_s: float = 0.0, step_s: float = 0.1) -> np.ndarray:
    """Temporal derivative of :func:`spm_hrf`: ``(h(onset) - h(onset + step)) / step``, 1/s."""
    return (spm_hrf(tr_s, oversampling, time_length_s, onset_s)
            - spm_hrf(tr_s, oversampling, time_length_s, onset_s + step_s)) / step_s


def spm_dispersion_derivative(tr_s: float, oversampling: int = 50, time_length_s: float = 32.0,
                              onset_s: float = 0.0, step: float = 0.01) -> np.ndarray:
    """Derivative of :func:`spm_hrf` with respect to the peak's dispersion (scale, no unit)."""
    return (_gamma_difference_hrf(tr_s, oversampling, time_length_s, onset_s, 1.0)
            - _gamma_difference_hrf(tr_s, oversampling, time_length_s, onset_s, 1.0 + step)) / step


def hrf_kernels(hrf: str, tr_s: float, oversampling: int = 50) -> list[np.ndarray]:
    """The kernels of an HRF model (see the module docstring), on the oversampled grid."""
    if hrf not in HRF_MODELS:
        raise DesignError(f"hrf {hrf!r} is not known; allowed: {', '.join(HRF_MODELS)}")
    kernels = [spm_hrf(tr_s, oversampling)]
    if hrf in ("spm_derivative", "delayed"):
        kernels.append(spm_time_derivative(tr_s, oversampling))
    if hrf == "delayed":
        kernels.append(spm_dispersion_derivative(tr_s, oversampling))
    return kernels


# ---- regressors ----------------------------------------------------------------------------

def frame_times(n_volumes: int, tr_s: float) -> np.ndarray:
    """Acquisition time of each volume, ``index * tr_s`` seconds; (n_volumes,) float64."""
    return np.arange(int(n_volumes), dtype=np.float64) * float(tr_s)


def _high_res_times(times: np.ndarray, oversampling: int, min_onset_s: float) -> np.ndarray:
    """nilearn's oversampled grid: from ``min_onset_s`` before the first volume to one TR
    after the last, ``oversampling`` samples per (average) TR."""
    n = times.size
    lo, hi = float(times.min()), float(times.max())
    n_high = (n - 1) / (hi - lo) * (hi * (1 + 1.0 / (n - 1)) - lo - min_onset_s) * oversampling
    return np.linspace(lo + min_onset_s, hi * (1 + 1.0 / (n - 1)), int(np.rint(n_high + 1)))


def _interp_linear(x: np.ndarray, y: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """``scipy.interpolate.interp1d(x, y)(x_new)`` written out (same arithmetic, same bits)."""
    hi = np.clip(np.searchsorted(x, x_new), 1, x.size - 1)
    lo = hi - 1
    slope = (y[..., hi] - y[..., lo]) / (x[hi] - x[lo])
    return slope * (x_new - x[lo]) + y[..., lo]


def _orthogonalize(columns: np.ndarray) -> np.ndarray:
    """Each column minus its projection on the columns before it (nilearn's ``orthogonalize``)."""
    out = columns.copy()
    for i in range(1, out.shape[1]):
        out[:, i] -= (out[:, i] @ out[:, :i]) @ scipy.linalg.pinv(out[:, :i])
    return out


def condition_regressors(events: Sequence[Event], hrf: str, times: np.ndarray,
                         oversampling: int = 50,
                         min_onset_s: float = -24.0) -> tuple[np.ndarray, list[str]]:
    """HRF-convolved regressors of every condition, sampled at ``times``.

    Parameters
    ----------
    events : list of (onset_s, duration_s, trial_type)
    hrf : one of HRF_MODELS
    times : (n,) float64, volume acquisition times, seconds, increasing, n >= 2
    oversampling : int, samples per TR of the convolution grid
    min_onset_s : float, seconds relative to ``times[0]``: the start of the convolution
        grid; an event starting earlier is clipped to start there (as nilearn does, whose
        warning says "not considered"), with a warning in the log

    Returns
    -------
    regressors : (n, n_conditions * n_kernels) float64
        Conditions in sorted order of their trial_type, each with its kernels' columns.
    names : list of str, ``<type>``, ``<type>_derivative``, ``<type>_dispersion``
    """
    events = check_events(events)
    kernels = hrf_kernels(hrf, float(np.min(np.diff(times))), oversampling)
    high = _high_res_times(times, oversampling, min_onset_s)
    early = [e for e in events if e[0] < times[0] + min_onset_s]
    if early:
        log.warning("%d event(s) start more than %g s before the first volume; they are "
                    "clipped to start there", len(early), -min_onset_s)
    columns: list[np.ndarray] = []
    names: list[str] = []
    for kind in sorted({e[2] for e in events}):
        onsets = np.array([e[0] for e in events if e[2] == kind])
        durations = np.array([e[1] for e in events if e[2] == kind])
        last = high.size - 1
        start = np.minimum(np.searchsorted(high, onsets), last)
        stop = np.minimum(np.searchsorted(high, onsets + durations), last)
        # A zero-duration event still lasts one grid step (nilearn's delta function).
        stop = np.where((stop < last) & (stop == start), stop + 1, stop)
        boxcar = np.zeros(high.size)
        np.add.at(boxcar, start, 1.0)
        np.add.at(boxcar, stop, -1.0)
        boxcar = np.cumsum(boxcar)
        convolved = np.array([np.convolve(boxcar, k)[:boxcar.size] for k in kernels])
        block = _interp_linear(high, convolved, times).T
        columns.append(_orthogonalize(block) if block.shape[1] > 1 else block)
        names += [kind + suffix for suffix in _HRF_SUFFIXES[hrf]]
    if not columns:
        return np.zeros((times.size, 0)), []
    return np.hstack(columns), names


def cosine_drift_order(n_volumes: int, tr_s: float, high_pass_s: float) -> int:
    """Columns of :func:`cosine_drift` for a run of ``n_volumes`` at ``tr_s``, without
    building it: ``min(n - 1, floor(2 n TR / high_pass_s))``, twice the run's duration
    in cut-off periods (56 for an hour with SPM's 128 s)."""
    n = int(n_volumes)
    return max(min(n - 1, int(np.floor(2 * n * (1.0 / high_pass_s) * tr_s))), 0)


def cosine_drift(high_pass_s: float, times: np.ndarray) -> np.ndarray:
    """DCT-II basis of every frequency below ``1 / high_pass_s`` (nilearn's cosine drift).

    Parameters
    ----------
    high_pass_s : float, period of the cut-off, seconds (SPM's 128 s)
    times : (n,) float64, seconds, evenly spaced

    Returns
    -------
    drift : (n, K) float64, ``sqrt(2/n) cos(pi k (i + 0.5) / n)`` for k = 1..K,
        ``K = min(n - 1, floor(2 n dt / high_pass_s))``; no constant column
    """
    n = times.size
    dt = (times[-1] - times[0]) / (n - 1)
    order = min(n - 1, int(np.floor(2 * n * (1.0 / high_pass_s) * dt)))
    i = np.arange(n)
    return np.column_stack([np.sqrt(2.0 / n) * np.cos(np.pi / n * (i + 0.5) * k)
                            for k in range(1, order + 1)]) if order else np.zeros((n, 0))


def polynomial_drift(order: int, times: np.ndarray) -> np.ndarray:
    """Orthogonalised powers 1..order of ``t / t_last`` (nilearn's polynomial drift, no constant).

    Returns
    -------
    drift : (n, order) float64
    """
    powers = np.column_stack([(times / float(times.max())) ** k for k in range(order + 1)])
    return _orthogonalize(powers)[:, 1:]


# ---- motion confounds ----------------------------------------------------------------------

def motion_confound_names(n: int = 6) -> tuple[str, ...]:
    """fMRIPrep names of the 6, 12 or 24 motion confounds.

    6: ``trans_x`` ... ``rot_z``; 12: plus ``<name>_derivative1`` (backward difference);
    24: plus ``<name>_power2`` and ``<name>_derivative1_power2`` (Friston 24).
    """
    suffixes = {6: ("",), 12: ("", "_derivative1"),
                24: ("", "_derivative1", "_power2", "_derivative1_power2")}
    if n not in suffixes:
        raise DesignError(f"motion confounds: {n!r} is not allowed; allowed: 6, 12, 24")
    return tuple(name + suffix for suffix in suffixes[n] for name in MOTION_NAMES)


def expand_motion(params: npt.ArrayLike, previous: npt.ArrayLike | None) -> dict[str, float]:
    """All 24 motion confounds of one volume.

    Parameters
    ----------
    params : 6 floats, trans (mm) and rot (radians), in the order of
        :data:`rtsc.conventions.MOTION_NAMES`
    previous : the previous volume's 6 parameters, or None for the first volume (its
        derivatives are 0, where fMRIPrep writes n/a)

    Returns
    -------
    confounds : dict name -> value (mm, radians, mm**2, radians**2)
    """
    now = np.asarray(params, dtype=np.float64)
    diff = now - np.asarray(previous, dtype=np.float64) if previous is not None else 0.0 * now
    out: dict[str, float] = {}
    for j, name in enumerate(MOTION_NAMES):
        out[name] = float(now[j])
        out[f"{name}_derivative1"] = float(diff[j])
        out[f"{name}_power2"] = float(now[j] ** 2)
        out[f"{name}_derivative1_power2"] = float(diff[j] ** 2)
    return out


# ---- the design ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Design:
    """The design of one run: fixed columns known in advance plus per-volume columns.

    Build it with :func:`make_design`.

    Attributes
    ----------
    tr_s : float, repetition time, seconds
    hrf : str, one of HRF_MODELS
    trial_types : tuple of str, the conditions, sorted
    task_names : tuple of str, the task columns (conditions x HRF kernels)
    extra_names : tuple of str, per-volume columns whose values come with each volume
    drift_names : tuple of str, ``drift_1`` ... then ``constant``
    fixed : (n_volumes, n_task + n_drift) float64, read-only
        Task columns then drift columns (with the constant last), in their units
        (task: HRF-convolved boxcar, plateau ~1 for blocks; drifts as nilearn's).
    """

    tr_s: float
    hrf: str
    trial_types: tuple[str, ...]
    task_names: tuple[str, ...]
    extra_names: tuple[str, ...]
    drift_names: tuple[str, ...]
    fixed: np.ndarray

    def __post_init__(self) -> None:
        if self.fixed.shape[1] != len(self.task_names) + len(self.drift_names):
            raise DesignError("fixed columns do not match the task and drift names")
        if len(set(self.names)) != len(self.names):
            raise DesignError(f"column names are not unique: {list(self.names)}")
        self.fixed.setflags(write=False)

    @property
    def names(self) -> tuple[str, ...]:
        """All column names in model order: task, extra, drifts, constant."""
        return self.task_names + self.extra_names + self.drift_names

    @property
    def n_volumes(self) -> int:
        """Run length the design was built for (rows of ``fixed``)."""
        return int(self.fixed.shape[0])

    @property
    def p(self) -> int:
        """Number of columns."""
        return len(self.names)

    @property
    def times(self) -> np.ndarray:
        """Volume acquisition times, seconds, (n_volumes,)."""
        return frame_times(self.n_volumes, self.tr_s)

    def _extra_vector(self, extra: Mapping[str, float] | None) -> np.ndarray:
        values = np.empty(len(self.extra_names))
        if not self.extra_names:
            return values
        extra = extra or {}
        missing = [name for name in self.extra_names if name not in extra]
        if missing:
            raise DesignError(f"design row: no value for {', '.join(missing)}")
        for j, name in enumerate(self.extra_names):
            value = extra[name]
            if value is None or not math.isfinite(float(value)):
                raise DesignError(f"design row: {name} is {value!r}, not a finite number")
            values[j] = float(value)
        return values

    def row(self, index: int, extra: Mapping[str, float] | None = None) -> np.ndarray:
        """The design row of volume ``index``.

        Parameters
        ----------
        index : int, 0-based volume index, below ``n_volumes``
        extra : dict name -> value for every name of ``extra_names`` (more are ignored)

        Returns
        -------
        row : (p,) float64
        """
        if not 0 <= index < self.n_volumes:
            raise DesignError(f"design row: volume {index} is outside the design's "
                              f"{self.n_volumes} volumes")
        n_task = len(self.task_names)
        return np.concatenate((self.fixed[index, :n_task], self._extra_vector(extra),
                               self.fixed[index, n_task:]))

    def matrix(self, extra: Mapping[str, Sequence[float]] | None = None,
               n: int | None = None) -> np.ndarray:
        """The first ``n`` rows (all by default) as one matrix, for offline references.

        Parameters
        ----------
        extra : dict name -> (n,) values for every name of ``extra_names``
        n : int or None

        Returns
        -------
        X : (n, p) float64
        """
        n = self.n_volumes if n is None else int(n)
        n_task = len(self.task_names)
        extra = extra or {}
        missing = [name for name in self.extra_names if name not in extra]
        if missing:
            raise DesignError(f"design matrix: no values for {', '.join(missing)}")
        extras = np.column_stack([np.asarray(extra[name], dtype=np.float64)[:n]
                                  for name in self.extra_names]) \
            if self.extra_names else np.zeros((n, 0))
        return np.hstack((self.fixed[:n, :n_task], extras, self.fixed[:n, n_task:]))

    def column(self, name: str) -> int:
        """Index of a column by name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise DesignError(f"no column {name!r}; columns: {', '.join(self.names)}") from None

    def contrast(self, expression: str) -> np.ndarray:
        """Weights over the columns of a contrast over trial types (or task column names).

        ``"task"``, ``"tap - rest"``, ``"2*a - b"``, ``"(a + b) / 2"``; a trial type stands
        for its canonical column (derivative columns can be named explicitly); nuisance
        columns always get weight 0.

        Returns
        -------
        weights : (p,) float64

        Raises
        ------
        DesignError
            See :func:`parse_contrast`.
        """
        weights = np.zeros(self.p)
        for name, w in parse_contrast(expression, self.task_names).items():
            weights[self.column(name)] = w
        return weights


def make_design(events: Sequence[Event] | str | Path | None, n_volumes: int, tr_s: float,
                hrf: str = "spm", high_pass_s: float = 128.0, drift: str = "cosine",
                drift_order: int = 1, extra_names: Sequence[str] = (),
                oversampling: int = 50, min_onset_s: float = -24.0) -> Design:
    """Build the design of a run.

    Parameters
    ----------
    events : list of (onset_s, duration_s, trial_type), a BIDS events.tsv path, or None
        (no task columns: drifts and nuisance only)
    n_volumes : int >= 2, run length (the DICOM header's expected count, or config)
    tr_s : float > 0, repetition time, seconds
    hrf : ``spm`` | ``spm_derivative`` | ``delayed`` (config ``glm.hrf``)
    high_pass_s : float > 0, cosine drift cut-off period, seconds (config ``glm.high_pass_s``)
    drift : ``cosine`` | ``polynomial`` | ``none`` (constant only)
    drift_order : int >= 1, polynomial order
    extra_names : per-volume columns, e.g. ``motion_confound_names(24)`` plus physiological
        regressor names
    oversampling : int, samples per TR of the convolution grid (nilearn: 50)
    min_onset_s : float, seconds; start of the convolution grid, earlier events are
        clipped to it (nilearn: -24)

    Returns
    -------
    design : Design
    """
    if int(n_volumes) < 2:
        raise DesignError(f"n_volumes must be >= 2, got {n_volumes!r}")
    if not tr_s > 0 or not high_pass_s > 0:
        raise DesignError(f"tr_s and high_pass_s must be > 0, got {tr_s!r}, {high_pass_s!r}")
    if drift not in DRIFT_MODELS:
        raise DesignError(f"drift {drift!r} is not known; allowed: {', '.join(DRIFT_MODELS)}")
    if hrf not in HRF_MODELS:
        raise DesignError(f"hrf {hrf!r} is not known; allowed: {', '.join(HRF_MODELS)}")
    times = frame_times(n_volumes, tr_s)
    if isinstance(events, (str, Path)):
        events = read_events(events)
    if events is not None and len(events):
        task, task_names = condition_regressors(check_events(events), hrf, times,
                                                oversampling, min_onset_s)
    else:
        task, task_names = np.zeros((times.size, 0)), []
    if drift == "cosine":
        drifts = cosine_drift(high_pass_s, times)
    elif drift == "polynomial":
        drifts = polynomial_drift(int(drift_order), times)
    else:
        drifts = np.zeros((times.size, 0))
    drift_names = [f"drift_{k}" for k in range(1, drifts.shape[1] + 1)] + ["constant"]
    fixed = np.hstack((task, drifts, np.ones((times.size, 1))))
    trial_types = tuple(sorted({e[2] for e in check_events(events)})) if events else ()
    return Design(tr_s=float(tr_s), hrf=hrf, trial_types=trial_types,
                  task_names=tuple(task_names), extra_names=tuple(extra_names),
                  drift_names=tuple(drift_names), fixed=np.ascontiguousarray(fixed))
