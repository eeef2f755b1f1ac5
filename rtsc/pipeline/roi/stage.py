"""Regions of interest and the neurofeedback value: ROI means, online detrending, PSC.

ROIs (config ``glm.roi``, see :func:`parse_roi_spec`)
------------------------------------------------------
* ``MaskRoi``: a mask NIfTI in the acquired (reference) grid; nonzero finite voxels are
  in. Its shape must equal the volumes' and its affine agree to 1e-3 mm (no resampling:
  a mask in another grid is an error, not a silent reinterpretation).
* ``SphereRoi``: the voxels whose centres (through the volumes' affine) lie within
  ``radius_mm`` of ``center_ras_mm`` (RAS+ mm), boundary included.
* ``ContrastRoi``: the ``top_k`` voxels with the largest t of a GLM contrast (signed: a
  negative effect is asked for with a negated contrast), optionally among the voxels of
  a mask or sphere given as ``within``. It is re-selected from the GLM's current t-map
  whenever the GLM has added a volume, by default for the whole run; with
  ``freeze_after = N`` the selection made after volume ``N - 1`` (a localiser) is kept
  from then on (if the contrast is not estimable by then, the first selection made
  later is kept). Until the contrast is estimable (its t is NaN everywhere) the ROI has
  no value (None).

A ROI's value history is always that of its *current* voxels: when a top-k ROI changes,
its means over the earlier volumes are recomputed from a history of the candidate
voxels' values (float32, one row per volume, ``4 * candidates`` bytes per volume; dropped
at the freeze), so the trend, baseline and PSC never mix voxel sets.

Per volume, per ROI (all exact against an offline recomputation on volumes 0..t)
--------------------------------------------------------------------------------
* ``mean``: the mean of the (motion-corrected) volume over the ROI, float64
  accumulation, intensity units.
* ``detrended``: ``mean - slope * index``, where ``slope`` (intensity per volume) is the
  coefficient of the index in the least-squares fit of all the ROI's values so far on
  ``[1, index]`` (``detrend="linear"``; slope 0 for ``"none"``), with the design's task
  columns as covariates when a design is known (``task_covariates=True``, default):
  otherwise the first task block, seen alone, is taken for a drift and the PSC of the
  first minute is halved (on the simulator, 100 volumes, the online PSC correlates 0.78
  with the true response without covariates, 0.99 with them). Only the line is
  removed, never the task part. The fit is kept as
  Welford running means and centred co-moments of the values minus the first one:
  O(q**2) per volume (q = 1 + task columns), no raw sums to cancel (tests add 1e8 to
  the data). The level of volume 0 is kept, so the value stays in intensity units.
  Volumes beyond the design's length stay out of the fit when it has task covariates.
  The design's cosine drift columns are not offered: fitted to the first volumes of a
  run they are nearly collinear (condition number 1e10 at volume 100 of 300 for 9
  columns), so the drift fitted at the newest volume, the one that matters, would be
  the extrapolation of a high-degree fit.
* ``psc``: ``100 * (detrended - baseline) / baseline`` with ``baseline`` the mean of the
  detrended values of the baseline volumes under the *current* line (so that a drift
  does not separate the baseline from the present). Baseline volumes are the first N
  (``baseline=N``: indices below N; the baseline exists once volume N - 1 has arrived,
  so no feedback is given during it) or the rest
  volumes of the design (``baseline="rest"``: every canonical task column at or below
  ``rest_threshold`` times its peak absolute value; the undershoot counts as rest; the
  baseline exists from the first rest volume). Before it exists the PSC is None.

Messages
--------
:class:`RoiStage` adds to the ``volume`` message ``roi`` = name -> PSC (percent, None
before a baseline exists: the quantity neurofeedback displays, independent of the
scanner's intensity scale), ``roi_mean`` = name -> mean (intensity units), and
``roi_detrended`` = name -> detrended mean (intensity units), each None while a top-k
ROI has no voxels; and ``feedback``: one number or None, either the PSC of one ROI
(``feedback="psc"``) or the GLM contrast effect averaged over an ROI's voxels
(``feedback="contrast"``, intensity units, ``c'beta``).

Latency
-------
The feedback must leave within 10 ms of the volume's arrival, registration included,
so this stage does per volume only what depends on the new volume:

* masks are resolved once, on the first volume (mask files are read at construction),
  into sorted flat Fortran-order index arrays (a sphere is evaluated in its bounding
  box only): each volume costs one gather and one float64 sum per ROI, then O(q**2)
  scalar work for the fit and the PSC;
* the contrast feedback never fits the whole brain: the effect is linear in the data,
  so the mean of the voxels' effects is the effect of the mean of their ``z = Q'y``
  columns, a (p, k) gather and one p x p solve (glm_fit's pseudo-inverse path only
  while the design is rank-deficient), redone only when the GLM has a new volume;
* a top-k ROI computes t on its candidate voxels only (restrict them with ``within``),
  and when its voxels change, only the voxels that entered or left are gathered over
  the past volumes.

Measured at 64 x 64 x 36 (shared 2-vCPU VM, medians over 120 volumes of update()
alone, ranges over runs): a 303-voxel sphere with rest baseline and task covariate
0.03-0.05 ms (0.08 ms for three); with ``feedback="contrast"`` 0.12-0.14 ms; a top-300
ROI within a 25 mm sphere, re-selected every volume, 0.5-0.6 ms; over the whole brain
1-1.8 ms, with 4 bytes per GLM voxel per volume of new memory whose page faults showed
as occasional 2-4 ms stalls (so freeze it, or restrict it with ``within``); frozen, 0.04
ms. The first volume (mask set-up) costs 0.4-2 ms, 2-6 ms with a whole-brain top-k ROI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import scipy.linalg

from rtsc.pipeline.glm.design import Design
from rtsc.pipeline.glm.recursive import GlmStage, GlmState, glm_fit
from rtsc.pipeline.roi.spec import (
    ContrastRoi,
    MaskRoi,
    RoiError,
    RoiSpec,
    SphereRoi,
    is_integer,
    flat_index,
    load_mask,
    mask_on_grid,
    roi_mean,
    sphere_mask,
)
from rtsc.pipeline.stages import StageResult
from rtsc.volume import Coverage, Volume

log = logging.getLogger(__name__)

#: A volume is a task volume (for the summary) when a task column reaches this fraction
#: of its peak.
TASK_LEVEL = 0.5
#: Baseline with ``baseline="auto"`` and no design to find rest volumes in.
DEFAULT_BASELINE_VOLUMES = 10
_EPS = float(np.finfo(np.float64).eps)


# ---- trend, baseline, percent signal change -----------------------------------------------

@dataclass
class TrendState:
    """Running least-squares fit of an ROI's values on ``[1, index, task columns]`` and the
    means of its baseline volumes.

    Welford running means and centred co-moments: O(q**2) per volume, and no raw sums
    whose difference would cancel. The values enter minus the first one (``offset``,
    an exact difference of nearby floats), so a large intensity offset costs nothing.

    Attributes
    ----------
    linear : bool, fit the line (False: no detrending, slope 0)
    q : int, fitted columns besides the constant: the index, then the task columns
    n : int, values fitted
    offset : float, the first value, intensity units
    mean_x : (q,) float64, column means
    mean_y : float, mean of ``value - offset``
    cxx : (q, q) float64, ``sum (x - mean_x)(x - mean_x)'``
    cxy : (q,) float64, ``sum (x - mean_x)(y - offset - mean_y)``
    slope : float, the index column's coefficient, intensity per volume (0 while the
        index column is constant or the fit is off)
    n_base : int, baseline values added
    base_x : float, mean index of the baseline volumes
    base_y : float, mean of ``value - offset`` over the baseline volumes
    """

    linear: bool = True
    q: int = 1
    n: int = 0
    offset: float = 0.0
    mean_x: np.ndarray = field(default_factory=lambda: np.zeros(1))
    mean_y: float = 0.0
    cxx: np.ndarray = field(default_factory=lambda: np.zeros((1, 1)))
    cxy: np.ndarray = field(default_factory=lambda: np.zeros(1))
    slope: float = 0.0
    n_base: int = 0
    base_x: float = 0.0
    base_y: float = 0.0


def trend_init(linear: bool = True, n_task: int = 0) -> TrendState:
    """An empty fit with ``n_task`` task covariates (ignored when not ``linear``)."""
    q = 1 + int(n_task) if linear else 0
    return TrendState(linear=linear, q=q, mean_x=np.zeros(q), cxx=np.zeros((q, q)),
                      cxy=np.zeros(q))


def _solve_slope(state: TrendState) -> float:
    """The index column's least-squares coefficient from the centred co-moments.

    Columns that are constant so far (a condition not started yet) are left out, which
    is the minimum-norm solution numpy.linalg.lstsq gives for an exactly zero column.
    """
    if state.q == 0 or not state.cxx[0, 0] > 0.0:
        return 0.0
    active = np.flatnonzero(np.diag(state.cxx) > 0.0)  # starts with column 0
    if active.size == 1:
        return float(state.cxy[0] / state.cxx[0, 0])
    if active.size == 2:
        # Cramer's rule (a tenth of lstsq's cost) unless the two are nearly collinear.
        j = active[1]
        a, b, d = state.cxx[0, 0], state.cxx[0, j], state.cxx[j, j]
        det = a * d - b * b
        if det > 1e-8 * a * d:
            return float((d * state.cxy[0] - b * state.cxy[j]) / det)
    block = state.cxx[np.ix_(active, active)]
    return float(np.linalg.lstsq(block, state.cxy[active], rcond=None)[0][0])


def _row(state: TrendState, x: float, task: np.ndarray | None) -> np.ndarray:
    row = np.empty(state.q)
    row[0] = x
    if state.q > 1:
        row[1:] = task  # type: ignore[index]
    return row


def trend_step(state: TrendState, x: float, y: float, baseline: bool,
               task: np.ndarray | None = None) -> TrendState:
    """Add value ``y`` of volume index ``x`` (in place).

    Parameters
    ----------
    state : TrendState
    x : float, volume index
    y : float, ROI mean, intensity units
    baseline : bool, a baseline volume
    task : (q - 1,) float64, the volume's task columns (when the fit has them)
    """
    if state.n == 0:
        state.offset = y
    state.n += 1
    yr = y - state.offset
    if state.q:
        row = _row(state, x, task)
        dx = row - state.mean_x
        state.mean_x += dx / state.n
        dy = yr - state.mean_y
        state.mean_y += dy / state.n
        state.cxx += np.outer(dx, row - state.mean_x)
        state.cxy += dx * (yr - state.mean_y)
        state.slope = _solve_slope(state)
    else:
        state.mean_y += (yr - state.mean_y) / state.n
    if baseline:
        state.n_base += 1
        state.base_x += (x - state.base_x) / state.n_base
        state.base_y += (yr - state.base_y) / state.n_base
    return state


def trend_batch(x: np.ndarray, y: np.ndarray, baseline: np.ndarray, linear: bool = True,
                task: np.ndarray | None = None) -> TrendState:
    """The state :func:`trend_step` reaches on a whole series (two-pass, same maths).

    Parameters
    ----------
    x : (n,) float64, volume indices
    y : (n,) float64, values
    baseline : (n,) bool, baseline volumes
    linear : bool
    task : (n, m) float64 or None, task columns
    """
    m = 0 if task is None else task.shape[1]
    state = trend_init(linear, m)
    state.n = int(x.size)
    if not x.size:
        return state
    state.offset = float(y[0])
    yr = y - state.offset
    state.mean_y = float(yr.mean())
    if state.q:
        rows = x[:, None] if task is None or not m else np.column_stack([x, task])
        state.mean_x = rows.mean(axis=0)
        centred = rows - state.mean_x
        state.cxx = centred.T @ centred
        state.cxy = centred.T @ (yr - state.mean_y)
        state.slope = _solve_slope(state)
    state.n_base = int(np.count_nonzero(baseline))
    if state.n_base:
        state.base_x = float(x[baseline].mean())
        state.base_y = float(yr[baseline].mean())
    return state


def detrended_value(state: TrendState, x: float, y: float) -> float:
    """``y - slope * x``: the value without the line's change since volume 0."""
    return y - state.slope * x


def percent_change(state: TrendState, x: float, y: float) -> float | None:
    """``100 * (detrended - baseline) / baseline`` under the current fit; None without
    baseline volumes or with a baseline of 0.

    The numerator is formed as ``(y - offset - base_y) - slope * (x - base_x)``,
    differences of nearby numbers first, so a large intensity offset cancels exactly.
    """
    if state.n_base == 0:
        return None
    baseline = state.offset + state.base_y - state.slope * state.base_x
    if not math.isfinite(baseline) or baseline == 0.0:
        return None
    return 100.0 * (((y - state.offset) - state.base_y) - state.slope * (x - state.base_x)) \
        / baseline


def task_rest_volumes(design: Design, rest_threshold: float = 0.1,
                      task_level: float = TASK_LEVEL) -> tuple[np.ndarray, np.ndarray] | None:
    """Task and rest volumes of a design, from its canonical task columns.

    Each column is scaled by its peak absolute value over the run; a volume is rest when
    every column is at most ``rest_threshold`` (the undershoot counts as rest) and task
    when some column reaches ``task_level``.

    Returns
    -------
    (task, rest) : (n_volumes,) bool each, or None when the design has no task column
    """
    columns = [design.task_names.index(t) for t in design.trial_types
               if t in design.task_names]
    if not columns:
        return None
    x = design.fixed[:, columns]
    peak = np.abs(x).max(axis=0)
    scaled = x / np.where(peak > 0, peak, 1.0)
    return np.any(scaled >= task_level, axis=1), np.all(scaled <= rest_threshold, axis=1)


# ---- top-k and contrast effects on a subset of the GLM's voxels ------------------------------

def _sub_state(state: GlmState, positions: np.ndarray | None) -> GlmState:
    """The GLM of a subset of its voxels (voxels are independent given the shared R)."""
    if positions is None:
        return state
    return dataclasses.replace(state, index=state.index[positions], z=state.z[:, positions],
                               rss=state.rss[positions], offset=state.offset[positions],
                               valid=None if state.valid is None else state.valid[positions])


def _full_rank_weights(state: GlmState, weights: np.ndarray) -> np.ndarray | None:
    """``u = R^-T c`` when the GLM has full rank by :func:`glm_fit`'s rule, else None.

    With full rank (every singular value of R above ``eps * max(n, p)`` times the
    largest, numpy.linalg.lstsq's rule, which glm_fit follows) and a constant column,
    glm_fit's effect is ``u'z + c_const * offset`` per voxel and its variance factor
    ``|u|**2``: one p x p solve instead of glm_fit's pseudo-inverse and estimability
    checks (~0.25 ms of small-array overhead). Anything else goes through glm_fit.
    """
    r = state.r
    p = r.shape[0]
    if state.constant is None or state.n <= p:
        return None
    s = np.linalg.svd(r, compute_uv=False)
    if not s[-1] > _EPS * max(state.n, p) * s[0]:
        return None
    # Back substitution (componentwise backward error, as glm_fit's inverse), not LU.
    return scipy.linalg.solve_triangular(r, weights, trans="T", check_finite=False)


def contrast_t(state: GlmState, weights: np.ndarray,
               positions: np.ndarray | None = None) -> np.ndarray:
    """t of one contrast on some of the GLM's voxels, as :func:`glm_fit` gives it (to
    rounding: both are within about cond(R) * eps of lstsq).

    Parameters
    ----------
    state : GlmState
    weights : (p,) float64
    positions : (V',) int, positions in ``state.index``; None: all voxels

    Returns
    -------
    t : (V',) float64, NaN where undefined
    """
    u = _full_rank_weights(state, weights)
    if u is None:
        return glm_fit(_sub_state(state, positions), weights[None, :], with_beta=False).t[0]
    sub = _sub_state(state, positions)
    assert state.constant is not None
    effect = u @ sub.z + weights[state.constant] * sub.offset.astype(np.float64)
    variance = (u @ u) * sub.rss / (state.n - state.p)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = effect / np.sqrt(variance)
    t[~(variance > 0)] = np.nan
    if sub.valid is not None:  # voxels that left the acquired grid
        t[~sub.valid] = np.nan
    return t


def mean_effect(state: GlmState, weights: np.ndarray, positions: np.ndarray) -> float:
    """Mean over some voxels of a contrast's effect ``c'beta`` (intensity units).

    The effect is linear in each voxel's ``z = Q'(y - offset)`` and offset, so it is
    computed once, on their means (p x k work, no whole-brain fit). NaN when the
    contrast is not estimable yet, or when no voxel is left in the run's validity mask
    (those that left are not averaged).
    """
    if state.valid is not None:
        positions = positions[state.valid[positions]]
        if positions.size == 0:
            return math.nan
    z = state.z[:, positions].mean(axis=1)
    offset = float(np.mean(state.offset[positions], dtype=np.float64))
    u = _full_rank_weights(state, weights)
    if u is not None:
        assert state.constant is not None
        return float(u @ z + weights[state.constant] * offset)
    one = dataclasses.replace(state, index=np.zeros(1, np.int64), z=z[:, None],
                              rss=np.zeros(1), offset=np.array([offset]), valid=None)
    return float(glm_fit(one, weights[None, :], with_beta=False).effect[0, 0])


def top_k_positions(t: np.ndarray, k: int) -> np.ndarray | None:
    """Positions of the ``k`` largest finite values of ``t`` (all finite ones if fewer),
    sorted; None when none is finite."""
    finite = np.isfinite(t)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        return None
    k = min(int(k), n_finite)
    score = np.where(finite, -t, np.inf)
    chosen = np.argpartition(score, k - 1)[:k] if k < t.size else np.arange(t.size)
    return np.sort(chosen)


class _History:
    """Candidate voxels' values, one float32 row per volume, in blocks that are never
    copied when the history grows.

    A block holds the rows the run is expected to need (``rows``: the freeze or the
    design's length). ``np.empty`` only reserves address space, so the memory is
    touched row by row as volumes arrive; allocating many small blocks instead cost
    2-3 ms stalls at each new block on the test VM (whole-brain candidates at
    64 x 64 x 36), one large block none.
    """

    def __init__(self, width: int, rows: int) -> None:
        self.width = width
        self.rows = int(min(max(rows, 1), 4096))
        self.blocks: list[np.ndarray] = []
        self.x: list[float] = []

    def append(self, x: float, values: np.ndarray) -> None:
        row = len(self.x) % self.rows
        if row == 0:
            self.blocks.append(np.empty((self.rows, self.width), dtype=np.float32))
        self.blocks[-1][row] = values
        self.x.append(x)

    def sums(self, columns: np.ndarray) -> np.ndarray:
        """(n,) float64, each row's sum over ``columns`` (float64 accumulation)."""
        n = len(self.x)
        if columns.size == 0:
            return np.zeros(n)
        return np.concatenate([
            np.sum(block[:min(self.rows, n - b * self.rows)][:, columns], axis=1,
                   dtype=np.float64) for b, block in enumerate(self.blocks)])


# ---- the stage ----------------------------------------------------------------------------------

@dataclass
class RoiTrack:
    """One ROI's voxels and time course.

    Attributes
    ----------
    name : str
    spec : RoiSpec
    trend : TrendState
    x : list of float, volume indices of the values
    y : list of float, ROI means (intensity units), float64
    index : (k,) int64 or None, the ROI's voxels (flat Fortran order); None: not selected yet
    candidates : (V',) int64 or None, a top-k ROI's candidate voxels (flat Fortran order)
    candidate_positions : (V',) int64 or None, their positions in the GLM's voxels (None:
        all of them)
    selection : (k,) int64 or None, a top-k ROI's voxels as positions in ``candidates``
    history : _History or None, the candidates' values (until frozen)
    sums : list of float, the history's sums over ``selection``, one per volume
    glm_n : int, GLM volumes at the last selection
    frozen : bool
    version : int, counts the changes of the voxel set
    coverage_version : int, the run's validity mask (``Volume.coverage``) last applied
    voxels : (k0,) int64 or None, a mask or sphere ROI's voxels as resolved (flat
        Fortran order); ``index`` is those still in the run's validity mask
    columns : (k,) int64 or None, their positions in ``voxels`` (columns of ``history``)
    """

    name: str
    spec: RoiSpec
    trend: TrendState
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    index: np.ndarray | None = None
    candidates: np.ndarray | None = None
    candidate_positions: np.ndarray | None = None
    selection: np.ndarray | None = None
    history: _History | None = None
    sums: list[float] = field(default_factory=list)
    glm_n: int = -1
    frozen: bool = False
    version: int = 0
    coverage_version: int = -1
    voxels: np.ndarray | None = None
    columns: np.ndarray | None = None


class RoiStage:
    """ROI means, detrended values, PSC and the neurofeedback value, volume by volume.

    Runs after the motion stage (it receives the motion-corrected volume) and after the
    GLM stage when an ROI or the feedback needs the GLM. See the module docstring for the
    definitions and the message fields.

    Parameters
    ----------
    rois : dict name -> RoiSpec (:func:`parse_roi_spec`), at least one, in order
    feedback : ``"psc"`` (the PSC of ``feedback_roi``) or ``"contrast"`` (the GLM effect
        of ``feedback_contrast`` averaged over ``feedback_roi``'s voxels in the GLM mask)
    feedback_roi : str or None, default the first ROI
    feedback_contrast : str or None, default the feedback ROI's contrast if it is a top-k
        ROI, else the GLM's first contrast
    baseline : int N >= 1 (the first N volumes), ``"rest"`` (rest volumes of the design)
        or ``"auto"``: rest when the design has task columns, else the first
        ``DEFAULT_BASELINE_VOLUMES``
    rest_threshold : float in [0, 1), see :func:`task_rest_volumes`
    detrend : ``"linear"`` or ``"none"``
    task_covariates : bool, fit the line jointly with the design's task columns (see the
        module docstring); without a design there are none
    glm : GlmStage or None, needed by top-k ROIs and ``feedback="contrast"``
    design : Design or None, for rest volumes and the task/rest summary; default the
        GLM's design

    Raises
    ------
    RoiError
        Bad parameters, unknown names, a mask file that cannot be read, or a GLM needed
        and not given.
    """

    name = "roi"

    def __init__(self, rois: Mapping[str, RoiSpec], feedback: str = "psc",
                 feedback_roi: str | None = None, baseline: int | str = "auto",
                 rest_threshold: float = 0.1, detrend: str = "linear",
                 glm: GlmStage | None = None, design: Design | None = None,
                 feedback_contrast: str | None = None, task_covariates: bool = True) -> None:
        if not rois:
            raise RoiError("RoiStage: no ROI given")
        for name, spec in rois.items():
            if not isinstance(spec, (MaskRoi, SphereRoi, ContrastRoi)):
                raise RoiError(f"ROI {name!r}: {spec!r} is not a MaskRoi, SphereRoi or "
                               "ContrastRoi (see parse_roi_spec)")
        if feedback not in ("psc", "contrast"):
            raise RoiError(f"feedback {feedback!r}: allowed: psc, contrast")
        if detrend not in ("linear", "none"):
            raise RoiError(f"detrend {detrend!r}: allowed: linear, none")
        if not 0.0 <= rest_threshold < 1.0:
            raise RoiError(f"rest_threshold {rest_threshold!r}: allowed: [0, 1)")
        self.glm = glm
        self.design = design if design is not None else (glm.design if glm else None)
        labels = task_rest_volumes(self.design, rest_threshold) if self.design else None
        self.task_flags: np.ndarray | None = labels[0] if labels else None
        self.rest_flags: np.ndarray | None = labels[1] if labels else None
        if baseline == "auto":
            baseline = "rest" if self.rest_flags is not None else DEFAULT_BASELINE_VOLUMES
        if baseline == "rest":
            if self.rest_flags is None:
                raise RoiError("baseline 'rest' needs a design with task columns (give "
                               "glm= or design=), or use baseline=N (the first N volumes)")
        elif not is_integer(baseline) or int(baseline) < 1:  # type: ignore[arg-type]
            raise RoiError(f"baseline {baseline!r}: allowed: an integer N >= 1 (the first N "
                           "volumes), 'rest' or 'auto'")
        self.baseline: int | str = baseline if baseline == "rest" else int(baseline)
        self.detrend = detrend
        self.feedback = feedback
        self.feedback_roi = feedback_roi if feedback_roi is not None else next(iter(rois))
        if self.feedback_roi not in rois:
            raise RoiError(f"feedback_roi {self.feedback_roi!r}: not an ROI; ROIs: "
                           f"{', '.join(rois)}")
        needs_glm = [n for n, s in rois.items() if isinstance(s, ContrastRoi)]
        #: True when the stage reads the GLM (contrast feedback, top-k ROIs)
        self.needs_glm = bool(needs_glm) or feedback == "contrast"
        if (needs_glm or feedback == "contrast") and glm is None:
            what = f"top-k ROI {', '.join(needs_glm)}" if needs_glm else "feedback=contrast"
            raise RoiError(f"{what} needs the GLM stage (glm=...): is glm.events set?")
        known = list(glm.contrast_names) if glm is not None else []
        for n in needs_glm:
            contrast = rois[n].contrast  # type: ignore[union-attr]
            if contrast not in known:
                raise RoiError(f"ROI {n!r}: contrast {contrast!r} is not a GLM contrast; "
                               f"contrasts: {', '.join(known) or '(none)'}")
        self.feedback_contrast: str | None = None
        if feedback == "contrast":
            spec = rois[self.feedback_roi]
            chosen = feedback_contrast or (spec.contrast if isinstance(spec, ContrastRoi)
                                           else (known[0] if known else None))
            if chosen not in known:
                raise RoiError(f"feedback_contrast {chosen!r}: not a GLM contrast; "
                               f"contrasts: {', '.join(known) or '(none)'}")
            self.feedback_contrast = chosen
        self._task: np.ndarray | None = None
        if task_covariates and detrend == "linear" and self.design is not None \
                and self.design.task_names:
            self._task = np.ascontiguousarray(self.design.fixed[:, :len(self.design.task_names)])
        n_task = 0 if self._task is None else self._task.shape[1]
        self.tracks = {name: RoiTrack(name, spec, trend_init(detrend == "linear", n_task))
                       for name, spec in rois.items()}
        # Mask files are read now, not on the first volume (whose latency counts).
        self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for spec in rois.values():
            for part in (spec, getattr(spec, "within", None)):
                if isinstance(part, MaskRoi) and part.path not in self._files:
                    self._files[part.path] = load_mask(part.path)
        self.shape: tuple[int, int, int] | None = None
        self.affine: np.ndarray | None = None
        self._effect_key: tuple[int, int] | None = None
        self._effect: float | None = None
        self._effect_positions: np.ndarray | None = None

    # -- set-up on the first volume --

    def _resolve(self, spec: MaskRoi | SphereRoi) -> np.ndarray:
        assert self.shape is not None and self.affine is not None
        if isinstance(spec, MaskRoi):
            mask, affine = self._files[spec.path]
            return mask_on_grid(mask, affine, self.shape, self.affine, spec.path)
        return sphere_mask(spec.center_ras_mm, spec.radius_mm, self.shape, self.affine)

    def _glm_state(self) -> GlmState:
        state = self.glm.state if self.glm is not None else None
        if state is None:
            raise RoiError("RoiStage needs the GLM stage's state: run the GLM stage "
                           "before the ROI stage")
        return state

    def _start(self, volume: Volume) -> None:
        self.shape = volume.shape
        self.affine = np.asarray(volume.affine, dtype=np.float64)
        for track in self.tracks.values():
            spec = track.spec
            if not isinstance(spec, ContrastRoi):
                track.index = track.voxels = flat_index(self._resolve(spec))
                track.columns = np.arange(track.voxels.size, dtype=np.int64)
                # the voxels' values, so that the means over the earlier volumes can be
                # recomputed if some of them leave the run's validity mask
                track.history = _History(track.voxels.size,
                                         self.design.n_volumes if self.design else 256)
                log.info("ROI %s: %d voxels", track.name, track.index.size)
                continue
            glm_index = self._glm_state().index
            positions = None
            if spec.within is not None:
                inside = self._resolve(spec.within).ravel(order="F")[glm_index]
                positions = np.flatnonzero(inside).astype(np.int64)
                if positions.size == 0:
                    raise RoiError(f"ROI {track.name!r}: no voxel of its 'within' region is "
                                   "in the GLM mask")
            log.info("ROI %s: top %d of %d candidate voxels by t of %s", track.name,
                     spec.top_k, glm_index.size if positions is None else positions.size,
                     spec.contrast)
            track.candidate_positions = positions
            track.candidates = glm_index if positions is None else glm_index[positions]
            rows = spec.freeze_after or (self.design.n_volumes if self.design else 256)
            track.history = _History(track.candidates.size, rows)

    # -- per volume --

    def _is_baseline(self, index: int) -> bool:
        if self.baseline == "rest":
            assert self.rest_flags is not None
            return bool(index < self.rest_flags.size and self.rest_flags[index])
        return index < int(self.baseline)

    def _baseline_flags(self, x: np.ndarray) -> np.ndarray:
        index = x.astype(np.int64)
        if self.baseline == "rest":
            assert self.rest_flags is not None
            inside = index < self.rest_flags.size
            return inside & self.rest_flags[np.where(inside, index, 0)]
        return index < int(self.baseline)

    def _ready(self, track: RoiTrack, index: int) -> bool:
        """Does the baseline exist (see the module docstring)?"""
        if track.trend.n_base == 0:
            return False
        return self.baseline == "rest" or index >= int(self.baseline) - 1

    def _fitted(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which values enter the fit: finite ones (NaN voxels stay out) within the design
        when it gives task covariates."""
        keep = np.isfinite(y)
        if self._task is not None:
            keep &= x < self._task.shape[0]
        return keep

    def _add(self, track: RoiTrack, x: float, y: float) -> None:
        if not math.isfinite(y):
            return
        track.x.append(x)
        track.y.append(y)
        index = int(x)
        if self._task is None:
            trend_step(track.trend, x, y, self._is_baseline(index))
        elif index < self._task.shape[0]:
            trend_step(track.trend, x, y, self._is_baseline(index), self._task[index])

    def _rebuild(self, track: RoiTrack, hx: np.ndarray, hy: np.ndarray) -> float:
        """Replace the track's values and fit by ``hy`` (the means of its current voxels
        over the volumes ``hx``); returns the last value."""
        finite = np.isfinite(hy)
        track.x, track.y = hx[finite].tolist(), hy[finite].tolist()
        keep = self._fitted(hx, hy)
        task = None if self._task is None else self._task[hx[keep].astype(np.int64)]
        track.trend = trend_batch(hx[keep], hy[keep], self._baseline_flags(hx[keep]),
                                  self.detrend == "linear", task)
        return float(hy[-1]) if hy.size else math.nan

    def _fixed_value(self, track: RoiTrack, values: np.ndarray, x: float,
                     coverage: Coverage | None) -> float:
        """A mask or sphere ROI: store its voxels' values (``values``, over ``voxels``),
        drop the voxels that left the run's validity mask (its earlier means are then
        recomputed from the stored values over the voxels left), return the mean."""
        assert track.history is not None and track.columns is not None
        assert track.voxels is not None
        track.history.append(x, values)
        if coverage is not None and coverage.version != track.coverage_version:
            track.coverage_version = coverage.version
            keep = coverage.mask.ravel(order="F")[track.voxels[track.columns]]
            if not keep.all():
                track.columns = track.columns[keep]
                track.index = track.voxels[track.columns]
                track.version += 1
                log.info("ROI %s: %d of its voxels left the field of view; %d remain",
                         track.name, keep.size - track.columns.size, track.columns.size)
                hx = np.asarray(track.history.x)
                if track.columns.size == 0:
                    track.x, track.y = [], []
                    track.trend = trend_init(self.detrend == "linear",
                                             0 if self._task is None else self._task.shape[1])
                    return math.nan
                return self._rebuild(track, hx,
                                     track.history.sums(track.columns) / track.columns.size)
        y = roi_mean(values, track.columns)
        self._add(track, x, y)
        return y

    def _update_top_k(self, track: RoiTrack, flat: np.ndarray, x: float,
                      alerts: list[tuple[str, str, str]]) -> float:
        """Store the candidates' values, re-select if the GLM moved; return the ROI mean
        (an ``roi_frozen`` info alert goes to ``alerts`` when the selection is frozen)."""
        assert track.candidates is not None and isinstance(track.spec, ContrastRoi)
        assert track.history is not None and self.glm is not None
        values = flat[track.candidates]
        track.history.append(x, values)
        if track.selection is not None:
            track.sums.append(float(np.sum(values[track.selection], dtype=np.float64)))
        state = self._glm_state()
        old = track.selection
        # re-select when the GLM moved or voxels left the run (their t is NaN now)
        version = -1 if state.valid is None else int(state.valid.size
                                                      - np.count_nonzero(state.valid))
        if state.n != track.glm_n or version != track.coverage_version:
            track.glm_n = state.n
            track.coverage_version = version
            weights = self.glm.contrast_weights[self.glm.contrast_names.index(
                track.spec.contrast)]
            chosen = top_k_positions(contrast_t(state, weights, track.candidate_positions),
                                     track.spec.top_k)
            if chosen is not None and (old is None or not np.array_equal(chosen, old)):
                track.selection = chosen
                track.index = track.candidates[chosen]
                track.version += 1
        selection = track.selection
        if selection is None:
            return math.nan
        if selection is not old:
            # The history of the new voxel set replaces the old one (module docstring):
            # only the voxels that changed are gathered over the past volumes.
            if old is None:
                sums = track.history.sums(selection)
            else:
                sums = np.asarray(track.sums) \
                    + track.history.sums(np.setdiff1d(selection, old, assume_unique=True)) \
                    - track.history.sums(np.setdiff1d(old, selection, assume_unique=True))
                if not np.all(np.isfinite(sums)):  # NaN voxels do not subtract out
                    sums = track.history.sums(selection)
            track.sums = sums.tolist()
            y = self._rebuild(track, np.asarray(track.history.x), sums / selection.size)
        else:
            y = track.sums[-1] / selection.size
            self._add(track, x, y)
        freeze = track.spec.freeze_after
        if freeze is not None and x >= freeze - 1:
            track.frozen = True
            track.history = None
            track.sums = []
            alerts.append(("info", "roi_frozen",
                           f"ROI {track.name}: {selection.size} voxels of largest t of "
                           f"{track.spec.contrast} kept from volume {int(x)} on"))
        return y

    def _contrast_feedback(self) -> float | None:
        track = self.tracks[self.feedback_roi]
        if track.index is None or self.glm is None or self.glm.state is None:
            return None
        state = self.glm.state
        key = (state.n, track.version)
        if key != self._effect_key:
            if track.candidates is not None:  # a top-k ROI: positions known
                assert track.selection is not None
                positions = track.selection if track.candidate_positions is None \
                    else track.candidate_positions[track.selection]
            else:
                # A fixed ROI: its voxels inside the GLM mask (sorted both).
                if self._effect_positions is None:
                    where = np.searchsorted(state.index, track.index)
                    where = np.minimum(where, state.index.size - 1)
                    self._effect_positions = where[state.index[where] == track.index]
                    if self._effect_positions.size == 0:
                        raise RoiError(f"ROI {track.name!r}: no voxel in the GLM mask, so no "
                                       "contrast feedback")
                positions = self._effect_positions
            assert self.feedback_contrast is not None
            weights = self.glm.contrast_weights[self.glm.contrast_names.index(
                self.feedback_contrast)]
            value = mean_effect(state, weights, positions) if state.n else math.nan
            self._effect = value if math.isfinite(value) else None
            self._effect_key = key
        return self._effect

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Add one volume; ``upstream`` (earlier stages' metrics) is not used.

        Before the reslice stage (``volume.corrected_at`` set) the ROI's voxels are read
        motion-corrected through it; the values are those of the resliced volume."""
        if self.shape is None:
            self._start(volume)
        elif volume.shape != self.shape:
            raise RoiError(f"volume shape {volume.shape} differs from the series' {self.shape}")
        flat = volume.data.ravel(order="F")  # a view for the usual Fortran-ordered data
        x = float(volume.index)
        means: dict[str, float | None] = {}
        detrended: dict[str, float | None] = {}
        psc: dict[str, float | None] = {}
        alerts: list[tuple[str, str, str]] = []
        for name, track in self.tracks.items():
            if track.candidates is not None and not track.frozen:
                if volume.corrected_at is not None:
                    raise RoiError("a top-k ROI needs the resliced volume: the ROI stage "
                                    "must run after the reslice stage")
                y = self._update_top_k(track, flat, x, alerts)
            elif track.voxels is not None:  # a mask or sphere ROI
                if volume.corrected_at is not None:  # before the reslice stage
                    values = volume.corrected_at(track.voxels)
                else:
                    values = flat[track.voxels]
                y = self._fixed_value(track, values, x, volume.coverage)
            else:  # a top-k ROI, frozen
                assert track.index is not None
                if volume.corrected_at is not None:
                    values = volume.corrected_at(track.index)
                    y = roi_mean(values, np.arange(values.size))
                else:
                    y = roi_mean(flat, track.index)
                self._add(track, x, y)
            ok = math.isfinite(y)
            means[name] = y if ok else None
            detrended[name] = detrended_value(track.trend, x, y) if ok else None
            psc[name] = percent_change(track.trend, x, y) \
                if ok and self._ready(track, volume.index) else None
        value = psc[self.feedback_roi] if self.feedback == "psc" else self._contrast_feedback()
        return StageResult(metrics={"roi": psc, "roi_mean": means, "roi_detrended": detrended,
                                    "feedback": value}, alerts=alerts)

    # -- outputs --

    def maps(self) -> dict[str, np.ndarray]:
        """``roi:<name>``: (nx, ny, nz) float32 Fortran-ordered, 1 in the ROI, 0 outside
        (a top-k ROI once selected)."""
        found: dict[str, np.ndarray] = {}
        if self.shape is None:
            return found
        for name, track in self.tracks.items():
            if track.index is not None:
                out = np.zeros(self.shape, dtype=np.float32, order="F")
                out.ravel(order="F")[track.index] = 1.0
                found[f"roi:{name}"] = out
        return found

    def psc_series(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The ROI's volume indices and PSC of every volume under the final line and
        baseline (None without a baseline)."""
        track = self.tracks[name]
        x, y = np.asarray(track.x), np.asarray(track.y)
        if not self._ready(track, int(x[-1]) if x.size else -1):
            return x, None
        t = track.trend
        baseline = t.offset + t.base_y - t.slope * t.base_x
        return x, 100.0 * (((y - t.offset) - t.base_y) - t.slope * (x - t.base_x)) / baseline

    def summary(self) -> dict[str, Any]:
        """Per ROI: kind, voxels, volumes, baseline volumes, frozen (top-k), and the mean
        PSC over task and rest volumes of the design (recomputed under the final line and
        baseline; None when unknown); and the feedback source."""
        rois: dict[str, Any] = {}
        for name, track in self.tracks.items():
            kind = {MaskRoi: "mask", SphereRoi: "sphere", ContrastRoi: "top_k"}[type(track.spec)]
            entry: dict[str, Any] = {
                "kind": kind, "voxels": int(track.index.size) if track.index is not None
                else None, "volumes": len(track.y), "baseline_volumes": track.trend.n_base,
                "psc_task_mean": None, "psc_rest_mean": None, "psc_task_minus_rest": None}
            if kind == "top_k":
                entry["frozen"] = track.frozen
            x, values = self.psc_series(name)
            if values is not None and self.task_flags is not None:
                assert self.rest_flags is not None
                known = x < self.task_flags.size
                where = x[known].astype(np.int64)
                task = values[known][self.task_flags[where]]
                rest = values[known][self.rest_flags[where]]
                if task.size:
                    entry["psc_task_mean"] = float(task.mean())
                if rest.size:
                    entry["psc_rest_mean"] = float(rest.mean())
                if task.size and rest.size:
                    entry["psc_task_minus_rest"] = float(task.mean() - rest.mean())
            rois[name] = entry
        return {"roi": rois,
                "roi_feedback": {"source": self.feedback, "roi": self.feedback_roi,
                                 "contrast": self.feedback_contrast,
                                 "baseline": self.baseline, "detrend": self.detrend,
                                 "task_covariates": self._task is not None}}
