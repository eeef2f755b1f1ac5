"""Recursive GLM: after every volume, the OLS fit of all volumes so far, without refitting.

Algorithm: sequential Givens QR (Gentleman 1973), one row per volume
--------------------------------------------------------------------
Every in-mask voxel shares the design X (n x p), so the model is kept as

* ``R`` (p x p, upper triangular, shared): ``R'R = X'X``;
* ``z = Q'y`` (p x V): the data of each voxel rotated into the column space;
* ``rss`` (V): the squared parts of the data rotated *out* of the column space, added
  up as they appear.

A new volume brings a row ``x`` and a value ``y`` per voxel. ``x`` is rotated into
``R`` with at most p Givens rotations (p x p work, once); the same rotations, applied
to each voxel's ``(z, y)``, update ``z`` and leave a remainder whose square goes into
``rss``. That is about 6p flops per voxel on one contiguous pass over ``z``, vectorised:
with 12 columns, 0.7 ms per volume for 44 600 voxels (64 x 64 x 36) and 4.4 ms for
353 000 (128 x 128 x 72), medians of the whole stage update with the state cold in
cache (benchmarks/glm.py; the kernel alone, warm, 0.3 ms at 44 600).

Solving costs p x p work plus one product per output: with ``P = R^-1`` (triangular
inverse) the betas are ``P z``, a contrast's effect is ``(c'P) z`` and its variance
factor ``|P'c|**2 = c'(X'X)^-1 c``; the residual variance is ``rss / (n - rank)``.

Why this and not X'X / X'y
--------------------------
X'y has the same memory traffic per volume (a p x V float64 array read and written)
and about the same time (a prototype: 0.17 ms against 0.20 ms for one rotation per pass
at 40 000 voxels), but solving the normal equations squares the condition number, and
``RSS = y'y - b'X'y`` subtracts two large numbers. Orthogonal rotations keep both: ``R`` is the QR factor of X as a
batch QR would produce it (backward stable column by column, so no column scaling is
needed), and ``rss`` is a sum of squares, never a difference. Each voxel's value also
has its first value subtracted (an exact float64 difference of float32 values) before
it enters, which takes the mean intensity (~1000, or 1e8 in the tests) out of the
arithmetic; the constant column absorbs it exactly: ``pinv(X) y = pinv(X) (y - o 1)
+ o pinv(X) 1``, where ``1 = X e_c`` (``e_c`` picks the constant column), so ``Q'1 =
R e_c`` and ``pinv(X) 1 = e_c`` whenever X has full rank. Measured against
``numpy.linalg.lstsq`` on the same rows after each of 80 volumes (17 columns, from
rank-deficient to full): at most 3e-12 in betas (relative, per voxel), 1e-11 in
residual variance and 7e-10 in t (largest for t near 0); with 1e8 added to the data,
1.5e-14 from lstsq on the data without it (tests/pipeline/glm/test_glm.py).

Rank-deficient steps (early in the run)
---------------------------------------
A column that is zero in every row so far (a condition whose first event has not come,
motion confounds at the first volume) stays an exactly zero column and row of ``R``:
it gets beta 0, as the minimum-norm solution gives. The remaining block is solved by
the triangular inverse when numpy.linalg.lstsq would call it full rank (singular values
above ``eps * max(n, p) * s_max``, lstsq's rule); otherwise (n < p, collinear
columns) by the SVD pseudo-inverse of ``R`` with that rule, which is lstsq's
minimum-norm solution, and the dropped directions of ``z`` count as residual. The
residual variance is NaN while ``n <= rank``; a contrast that is not estimable (not in
the row space of the rows so far, e.g. it weighs a condition not seen yet) has NaN
effect and t; a voxel with zero residual variance has NaN t. Nothing raises.

Forgetting factor (neurofeedback)
---------------------------------
With ``forgetting`` = lambda < 1, ``R``, ``z`` and ``rss`` are multiplied by
sqrt(lambda) (``rss`` by lambda) before each new row: the fit is weighted least
squares with weight ``lambda**(n-1-i)`` on volume i, i.e. OLS on rows and data scaled
by ``lambda**((n-1-i)/2)``, and the t-values are those of that weighted model (the
variance of old volumes taken as growing by 1/lambda per volume), with ``n - rank``
degrees of freedom. lambda = 1 is exact OLS. The memory is about ``1 / (1 - lambda)``
volumes. A sliding window (downdating) is not implemented: hyperbolic rotations are
unstable when the window drops a row that carried a column alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import scipy.linalg
import scipy.stats

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import RtscError
from rtsc.pipeline.glm._kernels import BLOCK, givens_row, rotate_voxels
from rtsc.pipeline.glm.design import (Design, expand_motion,
                                  motion_confound_names)
from rtsc.pipeline.stages import (
    NO_FIELDS,
    StageResult,
    automatic_mask,
    coverage_news,
    valid_mask,
)
from rtsc.volume import Coverage, Volume

_EPS = float(np.finfo(np.float64).eps)
_MOTION_CONFOUNDS = frozenset(motion_confound_names(24))
#: A contrast farther than this (relative) from the row space so far is not estimable.
_ESTIMABLE_TOL = 1e-8


@dataclass
class GlmState:
    """Sufficient statistics of the recursive GLM (see the module docstring).

    Attributes
    ----------
    shape : (nx, ny, nz), the volume grid
    index : (V,) int64, in-mask voxels, sorted flat Fortran-order indices
    forgetting : float in (0, 1]
    r : (p, p) float64, upper triangular, ``R'R = X'WX``
    z : (p, V) float64, ``Q'(y - offset)`` per voxel, intensity units
    rss : (V,) float64, residual sum of squares outside the column space, intensity**2
    offset : (V,) float32, each voxel's first value (zeros without a constant column)
    constant : int or None, the design's constant column (offsets are used only with one)
    n : int, rows (volumes) added
    valid : (V,) bool or None
        Voxels still in the run's validity mask (:func:`glm_restrict`); None: all. A
        voxel that left has NaN in every output of :func:`glm_fit`.
    """

    shape: tuple[int, int, int]
    index: np.ndarray
    forgetting: float
    r: np.ndarray
    z: np.ndarray
    rss: np.ndarray
    offset: np.ndarray
    constant: int | None
    n: int = 0
    valid: np.ndarray | None = None
    # Scratch of the kernels, kept so that an update allocates nothing per voxel.
    coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    active: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ybuf: np.ndarray = field(default_factory=lambda: np.zeros(BLOCK))

    @property
    def p(self) -> int:
        """Number of design columns."""
        return int(self.r.shape[0])


def glm_init(shape: tuple[int, int, int], index: np.ndarray, p: int,
             forgetting: float = 1.0, constant: int | None = None) -> GlmState:
    """An empty model.

    Parameters
    ----------
    shape : (nx, ny, nz), grid of the volumes that will arrive
    index : (V,) ints, in-mask voxels as flat Fortran-order indices (any order; kept sorted)
    p : int, number of design columns
    forgetting : float in (0, 1], 1 = exact OLS
    constant : int or None, index of the design's constant column (every
        :class:`Design` has one: ``design.column("constant")``); with it each voxel's
        first value is subtracted before it enters (see the module docstring)
    """
    if not 0.0 < forgetting <= 1.0:
        raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    if constant is not None and not 0 <= constant < p:
        raise ValueError(f"constant column {constant!r} outside 0..{p - 1}")
    index = np.array(index, dtype=np.int64)  # a copy: the state owns it
    if index.size > 1 and not np.all(index[1:] > index[:-1]):
        # np.unique hashes (numpy 2): 240 ms for the 400 000 voxels of a 128x128x72 mask at
        # the series' first volume, which every volume queued behind it waited for; the
        # masks given are sorted already (np.flatnonzero), so this is rarely taken
        index = np.unique(index)
    size = int(np.prod(shape))
    if index.size and (index[0] < 0 or index[-1] >= size):
        raise ValueError(f"mask index outside the {tuple(shape)} grid")
    v = index.size
    return GlmState(shape=tuple(int(s) for s in shape), index=index,  # type: ignore[arg-type]
                    forgetting=float(forgetting), r=np.zeros((p, p)), z=np.zeros((p, v)),
                    rss=np.zeros(v), offset=np.zeros(v, np.float32), constant=constant,
                    coef=np.zeros((p, 4)),
                    active=np.zeros(p, np.int64))


def glm_update(state: GlmState, data: np.ndarray, row: np.ndarray) -> GlmState:
    """Add one volume (in place; returns the same state).

    Parameters
    ----------
    state : GlmState
    data : (nx, ny, nz) float32, Fortran-ordered, intensity units
    row : (p,) float64, this volume's design row
    """
    if data.shape != state.shape:
        raise ValueError(f"volume shape {data.shape} differs from the model's {state.shape}")
    row = np.asarray(row, dtype=np.float64)
    if row.shape != (state.p,) or not np.all(np.isfinite(row)):
        raise ValueError(f"row must be ({state.p},) finite floats")
    if state.n == 0 and state.constant is not None:
        state.offset = np.ascontiguousarray(data.ravel(order="F")[state.index], np.float32)
    n_active = givens_row(state.r, row, state.forgetting, state.coef, state.active)
    rotate_voxels(data, state.index, state.offset, state.coef, state.active, n_active,
                  state.z, state.rss, state.ybuf, state.forgetting)
    state.n += 1
    return state


def glm_restrict(state: GlmState, valid: np.ndarray) -> int:
    """Take the voxels outside ``valid`` ((nx, ny, nz) bool, the run's validity mask) out
    of the fit for the whole run; returns how many left.

    Voxels are independent given the shared ``R``, so the others' fits are unchanged;
    the ones that left (fed NaN from the volume their sample fell outside the grid) get
    NaN outputs (:func:`glm_fit`) and drop out of peak t and counts.
    """
    keep = np.asarray(valid, dtype=bool).ravel(order="F")[state.index]
    before = keep.size
    if state.valid is not None:
        before = int(np.count_nonzero(state.valid))
        keep &= state.valid
    state.valid = keep
    return before - int(np.count_nonzero(keep))


@dataclass(frozen=True)
class GlmFit:
    """The fit of the volumes so far.

    Attributes
    ----------
    n : int, volumes in the fit
    rank : int, numerical rank of the rows so far (lstsq's rule)
    dof : int, ``n - rank`` residual degrees of freedom
    beta : (p, V) float64 or None, minimum-norm OLS (or WLS) betas, each column's units
        (intensity per column unit)
    sigma2 : (V,) float64, residual variance, intensity**2; NaN while dof <= 0
    estimable : (q,) bool, per contrast
    effect : (q, V) float64, ``c'beta``, intensity units; NaN if not estimable
    variance : (q, V) float64, ``c'(X'X)^+ c * sigma2``, intensity**2
    t : (q, V) float64, ``effect / sqrt(variance)``; NaN where undefined
    """

    n: int
    rank: int
    dof: int
    beta: np.ndarray | None
    sigma2: np.ndarray
    estimable: np.ndarray
    effect: np.ndarray
    variance: np.ndarray
    t: np.ndarray


def lstsq_rank(singular_values: np.ndarray, n: int, p: int) -> int:
    """Numerical rank by numpy.linalg.lstsq's rule: the singular values above
    ``eps * max(n, p)`` times the largest.

    Parameters
    ----------
    singular_values : (m,) float64, descending (``np.linalg.svd``'s order)
    n : int, rows (volumes) in the fit
    p : int, columns of the design

    Returns
    -------
    rank : int, 0 for an all-zero (or NaN) spectrum
    """
    s = singular_values
    return int(np.sum(s > _EPS * max(n, p) * s[0])) if s.size else 0


def _pseudo_inverse(r: np.ndarray, n: int) -> tuple[np.ndarray, int, np.ndarray,
                                                    np.ndarray | None, np.ndarray]:
    """``P = pinv(R)`` with lstsq's rank rule.

    Returns
    -------
    P : (p, p) float64
    rank : int
    rowspace : (rank, p) orthonormal rows spanning the row space of X so far
    dropped : (p, d) or None, unit directions of z that count as residual (rank-deficient
        nonzero block only)
    nonzero : (a,) int, the columns that are not identically zero so far
    """
    p = r.shape[0]
    nonzero = np.flatnonzero(np.any(r != 0.0, axis=0))
    pinv = np.zeros((p, p))
    if nonzero.size == 0:
        return pinv, 0, np.zeros((0, p)), None, nonzero
    block = r[np.ix_(nonzero, nonzero)]
    u, s, vt = np.linalg.svd(block)
    rank = lstsq_rank(s, n, p)
    rowspace = np.zeros((rank, p))
    rowspace[:, nonzero] = vt[:rank]
    if rank == nonzero.size:
        # Full rank: back substitution, whose error is componentwise (column scales
        # do not matter), instead of the SVD's normwise error.
        pinv[np.ix_(nonzero, nonzero)] = scipy.linalg.solve_triangular(block, np.eye(rank))
        return pinv, rank, rowspace, None, nonzero
    pinv[np.ix_(nonzero, nonzero)] = (vt[:rank].T / s[:rank]) @ u[:, :rank].T
    dropped = np.zeros((p, nonzero.size - rank))
    dropped[nonzero] = u[:, rank:]
    return pinv, rank, rowspace, dropped, nonzero


#: Voxels per block in :func:`_dropped_squares`: a (d, block) float64 block stays in
#: cache (d < p, at most a few dozen columns).
_DROPPED_BLOCK = 4096


def _dropped_squares(dropped: np.ndarray, z: np.ndarray, z_one: np.ndarray | None,
                     offset: np.ndarray) -> np.ndarray:
    """Per voxel, the squared norm of the data's part along the dropped directions:
    ``|D'(z_j + z_one o_j)|**2`` (``z_one`` None: no offsets), block by block of voxels.

    Early in a long run (n < p) ``D`` has about p - n columns; whole-volume (d, V)
    temporaries cost 250 ms at 353 000 voxels and 19 dropped directions, where the
    blocks, in cache, cost a few ms.

    Parameters
    ----------
    dropped : (p, d) float64
    z : (p, V) float64
    z_one : (p,) float64 or None
    offset : (V,) float64

    Returns
    -------
    squares : (V,) float64
    """
    d_t = np.ascontiguousarray(dropped.T)
    shift = None if z_one is None else d_t @ z_one
    v = z.shape[1]
    squares = np.empty(v)
    for start in range(0, v, _DROPPED_BLOCK):
        stop = min(start + _DROPPED_BLOCK, v)
        lost = d_t @ z[:, start:stop]
        if shift is not None:
            lost += shift[:, None] * offset[None, start:stop]
        squares[start:stop] = np.einsum("ij,ij->j", lost, lost)
    return squares


def glm_fit(state: GlmState, contrasts: np.ndarray | None = None,
            with_beta: bool = True) -> GlmFit:
    """Betas, residual variance and contrasts of the volumes added so far.

    Parameters
    ----------
    state : GlmState
    contrasts : (q, p) or (p,) float64 weights, or None
    with_beta : compute the (p, V) betas (contrasts do not need them)

    Returns
    -------
    fit : GlmFit
    """
    p, v = state.p, state.index.size
    c = np.zeros((0, p)) if contrasts is None else np.atleast_2d(np.asarray(contrasts, float))
    if c.shape[1] != p:
        raise ValueError(f"contrasts must have {p} columns, got {c.shape}")
    pinv, rank, rowspace, dropped, _ = _pseudo_inverse(state.r, state.n)
    offset = state.offset.astype(np.float64)
    # The offsets' share: Q'(o 1) = o R e_c, and pinv(X) 1 = pinv(R) R e_c, which is
    # e_c exactly when the nonzero columns so far have full rank.
    constant = state.constant
    z_one = state.r[:, constant] if constant is not None else np.zeros(p)
    if constant is not None and dropped is None and np.any(z_one != 0.0):
        one_beta = np.zeros(p)
        one_beta[constant] = 1.0
    else:
        one_beta = pinv @ z_one
    rss = state.rss.copy()
    if dropped is not None:
        rss += _dropped_squares(dropped, state.z, z_one if constant is not None else None,
                                offset)
    dof = state.n - rank
    sigma2 = rss / dof if dof > 0 else np.full(v, np.nan)
    beta = None
    if with_beta:
        beta = pinv @ state.z
        if constant is not None:
            beta += np.outer(one_beta, offset)
    # Estimable: c lies in the row space of the rows so far.
    norms = np.linalg.norm(c, axis=1)
    outside = np.linalg.norm(c - (c @ rowspace.T) @ rowspace, axis=1)
    estimable = (norms > 0) & (outside <= _ESTIMABLE_TOL * np.maximum(norms, 1e-300))
    cp = c @ pinv
    effect = cp @ state.z
    if constant is not None:
        effect += np.outer(c @ one_beta, offset)
    factor = np.einsum("ij,ij->i", cp, cp)
    variance = factor[:, None] * sigma2[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = effect / np.sqrt(variance)
    t[~(variance > 0)] = np.nan
    effect[~estimable] = np.nan
    t[~estimable] = np.nan
    variance[~estimable] = np.nan
    if state.valid is not None:  # voxels that left the acquired grid (glm_restrict)
        gone = ~state.valid
        for values in (effect, t, variance) + ((beta,) if beta is not None else ()):
            values[:, gone] = np.nan
        sigma2 = np.where(gone, np.nan, sigma2)
    return GlmFit(n=state.n, rank=rank, dof=dof, beta=beta, sigma2=sigma2,
                  estimable=estimable, effect=effect, variance=variance, t=t)


def t_threshold(dof: int, p_value: float = 0.001) -> float:
    """One-sided Student t threshold for ``p_value`` with ``dof`` degrees of freedom.

    NaN when there are no degrees of freedom.
    """
    return float(scipy.stats.t.isf(p_value, dof)) if dof > 0 else math.nan


class GlmStage:
    """The GLM as a pipeline stage: one row per volume, t-maps on demand.

    Parameters
    ----------
    design : Design, built for the run (``n_volumes`` from the header or config)
    contrasts : dict name -> expression over trial types (config ``glm.contrasts``);
        empty: one contrast per trial type, named after it
    mask : (nx, ny, nz) bool or None; None: :func:`automatic_mask` of the first volume
        this stage sees (the motion-corrected one when motion correction runs first)
    mask_fraction : float in [0, 1], for the automatic mask
    forgetting : float in (0, 1], 1 = exact OLS (see the module docstring)
    p_value : float, one-sided threshold for the counts in :meth:`summary`

    Notes
    -----
    ``update(volume, upstream)`` takes the design's extra columns from ``upstream``, the
    metrics earlier stages produced for this volume: motion confounds (any of
    ``motion_confound_names(24)``) are derived from ``trans_x`` ... ``rot_z`` (mm,
    radians; derivatives against the previous volume that had them); every other extra
    column is read under its own name. A volume that lacks a needed value (absent, None
    or NaN, e.g. a failed registration) or lies beyond the design's ``n_volumes`` is
    left out of the fit (censored, as scrubbing would) with a ``glm_censored`` flag and
    a warning alert; the fit stays exact over the volumes kept. ``upstream=None`` when
    the design has extra columns is a wiring error (RtscError).
    """

    name = "glm"
    produces = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, design: Design, contrasts: Mapping[str, str] | None = None,
                 mask: np.ndarray | None = None, mask_fraction: float = 0.2,
                 forgetting: float = 1.0, p_value: float = 0.001) -> None:
        self.design = design
        expressions = dict(contrasts) if contrasts else {t: t for t in design.trial_types}
        self.contrast_names = list(expressions)
        self.contrast_weights = np.array([design.contrast(e) for e in expressions.values()]) \
            if expressions else np.zeros((0, design.p))
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.mask_fraction = float(mask_fraction)
        if not 0.0 < forgetting <= 1.0:
            raise RtscError(f"glm forgetting factor {forgetting!r}: allowed (0, 1]")
        self.forgetting = float(forgetting)
        self.p_value = float(p_value)
        self.state: GlmState | None = None
        self.censored: list[int] = []
        self.coverage: Coverage | None = None  # the run's validity mask last applied
        self._motion_needed = any(n in _MOTION_CONFOUNDS for n in design.extra_names)
        self._previous_motion: np.ndarray | None = None
        #: Leave the fit's per-volume update for after the ``volume`` message
        #: (StageResult.after_publish): only when no stage after this one reads the fit
        #: of the same volume (:func:`rtsc.pipeline.series.build_stages` decides).
        self.defer_update = False

    @property
    def consumes(self) -> frozenset[str]:
        """The design's per-volume columns from ``upstream``: the six motion parameters
        when there are motion confounds, every other extra column by its name."""
        names = {n for n in self.design.extra_names if n not in _MOTION_CONFOUNDS}
        if self._motion_needed:
            names.update(MOTION_NAMES)
        return frozenset(names)

    def _extra_values(self, upstream: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
        values: dict[str, float] = {}
        missing: list[str] = []

        def number(key: str) -> float | None:
            value = upstream.get(key)
            if value is None or isinstance(value, bool):
                return None
            value = float(value)
            return value if math.isfinite(value) else None

        if self._motion_needed:
            params = [number(k) for k in MOTION_NAMES]
            if any(v is None for v in params):
                missing += [k for k, v in zip(MOTION_NAMES, params) if v is None]
            else:
                now = np.array(params, dtype=np.float64)
                values.update(expand_motion(now, self._previous_motion))
                self._previous_motion = now
        for name in self.design.extra_names:
            if name not in _MOTION_CONFOUNDS:
                value = number(name)
                if value is None:
                    missing.append(name)
                else:
                    values[name] = value
        return values, missing

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Add one volume to the fit (or censor it); see the class notes.

        With :attr:`defer_update` the fit's update (the whole-volume pass, and the
        set-up at the first volume) is returned as the result's ``after_publish``
        instead of run here; the ``glm_censored`` flag and alert are decided here
        either way.
        """
        reason = None
        values: dict[str, float] = {}
        if volume.index >= self.design.n_volumes:
            reason = f"it is beyond the design's {self.design.n_volumes} volumes"
        elif self.design.extra_names:
            if upstream is None:
                raise RtscError("GlmStage: the design has per-volume columns "
                                f"({', '.join(self.design.extra_names)}) but no upstream "
                                "metrics were passed")
            values, missing = self._extra_values(upstream)
            if missing:
                reason = f"no value for {', '.join(missing)}"
        row = None if reason is not None else self.design.row(volume.index, values)
        result = StageResult() if reason is None else StageResult(
            flags=["glm_censored"], alerts=[(
                "warning", "glm_censored",
                f"volume {volume.index} left out of the GLM: {reason}")])
        if reason is not None:
            self.censored.append(volume.index)
        if self.defer_update:
            result.after_publish = lambda: self._fit_volume(volume, row)
        else:
            self._fit_volume(volume, row)
        return result

    def _fit_volume(self, volume: Volume, row: np.ndarray | None) -> None:
        """Set up the fit at the first volume, apply the run's coverage, and add the
        volume's design ``row`` (None: censored, the fit only follows the coverage)."""
        if self.state is None:
            mask = self.mask if self.mask is not None else \
                automatic_mask(volume.data, self.mask_fraction)
            mask = valid_mask(mask, volume.coverage)
            if mask.shape != volume.shape:
                raise RtscError(f"glm mask shape {mask.shape} differs from the volumes' "
                                f"{volume.shape}")
            index = np.flatnonzero(mask.ravel(order="F"))
            self.state = glm_init(volume.shape, index, self.design.p, self.forgetting,
                                  constant=self.design.column("constant"))
            self.coverage = volume.coverage
        coverage = coverage_news(volume, self.coverage)
        if coverage is not None:  # voxels left the acquired grid: out of the fit
            glm_restrict(self.state, coverage.mask)
            self.coverage = coverage
        if row is not None:
            glm_update(self.state, volume.data, row)

    def fit(self, with_beta: bool = True) -> GlmFit | None:
        """The fit so far with this stage's contrasts (None before the first volume)."""
        if self.state is None:
            return None
        return glm_fit(self.state, self.contrast_weights, with_beta=with_beta)

    def _to_volume(self, values: np.ndarray) -> np.ndarray:
        assert self.state is not None
        out = np.zeros(self.state.shape, dtype=np.float32, order="F")
        out.ravel(order="K")[self.state.index] = values
        return out

    def maps(self) -> dict[str, np.ndarray]:
        """``t:<contrast>`` (t-values) and ``beta:<contrast>`` (effect, intensity units),
        (nx, ny, nz) float32 each: 0 outside the mask, NaN inside where not defined yet."""
        fit = self.fit(with_beta=False)
        if fit is None:
            return {}
        found: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.contrast_names):
            found[f"t:{name}"] = self._to_volume(fit.t[j])
            found[f"beta:{name}"] = self._to_volume(fit.effect[j])
        return found

    def summary(self) -> dict[str, Any]:
        """Volumes used, censored volumes, rank, dof, and per contrast the peak t and the
        number of voxels above the one-sided ``p_value`` threshold (uncorrected)."""
        fit = self.fit(with_beta=False)
        out: dict[str, Any] = {"glm_volumes": fit.n if fit else 0,
                               "glm_censored": list(self.censored),
                               "glm_columns": len(self.design.names),
                               "glm_rank": fit.rank if fit else 0,
                               "glm_dof": fit.dof if fit else 0,
                               "glm_p_value": self.p_value}
        contrasts: dict[str, Any] = {}
        if fit is not None:
            threshold = t_threshold(fit.dof, self.p_value)
            for j, name in enumerate(self.contrast_names):
                t = fit.t[j]
                finite = t[np.isfinite(t)]
                contrasts[name] = {
                    "peak_t": float(finite.max()) if finite.size else None,
                    "voxels_above": int(np.sum(finite > threshold))
                    if math.isfinite(threshold) else 0,
                    "threshold_t": threshold if math.isfinite(threshold) else None}
        out["glm_contrasts"] = contrasts
        return out
