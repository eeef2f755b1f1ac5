"""Framewise displacement and DVARS, offline (as Nipype/fMRIPrep) and online.

Framewise displacement (FD) is Power et al. 2012 (DESIGN.md "Conventions"): the sum of
the absolute backward differences of ``trans_x, trans_y, trans_z`` (mm) and of
``rot_x, rot_y, rot_z`` (radians) turned into arc length on a sphere of ``radius_mm``.
The first volume has FD 0.

DVARS follows ``nipype.algorithms.confounds.compute_dvars`` with the settings of
Nipype's ``ComputeDVARS`` interface as fMRIPrep runs it (``remove_zerovariance=True``,
``variance_tol=1e-7``, ``intensity_normalization=1000``): fMRIPrep's ``dvars`` column is
Nipype's ``dvars_nstd`` and ``std_dvars`` is ``dvars_stdz``. For the masked voxels
x time matrix:

1. scale everything by ``1000 / median`` (one median over all voxels and time points);
2. robust SD per voxel: (75th - 25th percentile, numpy ``method="lower"``) / 1.349;
   voxels whose robust SD is not above ``variance_tol`` are dropped;
3. AR(1) per voxel by Yule-Walker on the demeaned series,
   ``ar1 = sum_t z_t z_{t-1} / sum_t z_t**2``;
4. ``diff_sdhat = sqrt(2 (1 - ar1)) * sd``;
   ``dvars_nstd[t] = sqrt(mean_v (x[v, t] - x[v, t-1])**2)``;
   ``dvars_std = dvars_nstd / mean_v(diff_sdhat)``.

Nipype returns ``nt - 1`` values (one per backward difference) and its output files
have ``nt - 1`` rows; fMRIPrep aligns them to the volumes by leaving the first row of
its confounds file ``n/a``. Here every array has one entry per volume and the first
entry is NaN (published as null, written ``n/a``).

Steps 1-3 use whole-run statistics, so the value for volume ``t`` depends on the
volumes after it. :func:`dvars_step` returns, after each volume, the value
:func:`dvars_offline` gives for the *last* volume of the run truncated at that volume;
:func:`dvars_finalize` (or :meth:`DvarsTracker.final`) gives the whole run's values at
the end. The online estimate is exact, not approximate (up to float rounding):

* the median is exact: a histogram over a band of intensities fixed on the first
  volume, the band's values stored grouped by bin, and a selection inside the one bin
  that holds the middle rank (see :mod:`rtsc.pipeline._dvars_kernels`); if the median
  ever leaves the band the band is rebuilt from the stored series (one slow volume);
* the AR(1) coefficient comes from running sums of ``y = x - x_0``, ``y**2`` and
  ``y_t y_{t-1}`` (see :func:`_ar1_from_sums` for the algebra);
* the per-voxel percentiles come from small sorted blocks of order statistics that
  follow the target ranks; a block is refilled from the voxel's stored series when its
  rank leaves it (rare: counted in ``DvarsState.refills``).

The one approximation against Nipype itself is float rounding: Nipype's AR(1) goes
through a float32 FFT, here float64 sums are used; the two agree to ~1e-6 relative.

Memory: the state keeps the masked series, ``4 * nvox * nt`` bytes (69 MB at 60 000
voxels x 300 volumes), plus the in-band values of the median (about 60 % of that
again), plus ~1 MB per 1000 voxels of per-voxel state (blocks of 32 order statistics
for each of the two percentiles, the three AR sums).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from rtsc.pipeline import _dvars_kernels as kernels

log = logging.getLogger(__name__)

#: Defaults of Nipype's ComputeDVARS interface, as fMRIPrep runs it.
INTENSITY_NORMALIZATION = 1000.0
VARIANCE_TOL = 1e-7

_BLOCK = 32
_NBINS = 4096        # interior bins of the median band
_BAND = (0.2, 0.8)   # band of the median histogram: quantiles of the first volume


# ---- framewise displacement ---------------------------------------------------------------


def framewise_displacement(params_prev: np.ndarray, params_cur: np.ndarray,
                           radius_mm: float = 50.0) -> float:
    """Power et al. 2012 FD between two consecutive parameter sets.

    Parameters
    ----------
    params_prev, params_cur : (6,) float
        ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians).
    radius_mm : float
        Sphere radius turning rotations into arc length, mm.

    Returns
    -------
    fd : float, mm
    """
    delta = np.abs(np.asarray(params_cur, dtype=np.float64)
                   - np.asarray(params_prev, dtype=np.float64))
    if delta.shape != (6,):
        raise ValueError(f"motion parameters must have shape (6,), got {delta.shape}")
    return float(delta[:3].sum() + radius_mm * delta[3:].sum())


def framewise_displacement_series(params: np.ndarray, radius_mm: float = 50.0) -> np.ndarray:
    """FD of every volume of a run; the first volume has FD 0.

    Parameters
    ----------
    params : (n, 6) float
        Per volume ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians).
    radius_mm : float

    Returns
    -------
    fd : (n,) float64, mm
    """
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"motion parameters must have shape (n, 6), got {params.shape}")
    fd = np.zeros(params.shape[0])
    if params.shape[0] > 1:
        delta = np.abs(np.diff(params, axis=0))
        fd[1:] = delta[:, :3].sum(axis=1) + radius_mm * delta[:, 3:].sum(axis=1)
    return fd


# ---- DVARS offline ------------------------------------------------------------------------


def _ar1_from_sums(s1: np.ndarray, s2: np.ndarray, p: np.ndarray, y_last: np.ndarray,
                   n: int) -> np.ndarray:
    """Yule-Walker lag-1 coefficient of demeaned series from running sums.

    With ``y_t = x_t - x_0`` (so ``y_0 = 0``; AR(1) of the demeaned series does not
    depend on the shift), ``S1 = sum y``, ``S2 = sum y**2``, ``P = sum_{t>=1} y_t y_{t-1}``
    and ``m = S1 / n``::

        r0 = sum (y_t - m)**2                 = S2 - S1 m
        r1 = sum_{t>=1} (y_t - m)(y_{t-1} - m) = P - m (2 S1 - y_0 - y_{n-1}) + (n - 1) m**2

    and ``ar1 = r1 / r0`` (0 for a constant series). Each new volume adds one term to
    each sum, so the online update is exact; the shift by the first value keeps the
    sums small (no cancellation for bright voxels).
    """
    mean = s1 / n
    r0 = s2 - s1 * mean
    r1 = p - mean * (2.0 * s1 - y_last) + (n - 1) * mean * mean
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r0 > 0, r1 / np.where(r0 > 0, r0, 1.0), 0.0)


def dvars_offline(data: np.ndarray,
                  intensity_normalization: float = INTENSITY_NORMALIZATION,
                  remove_zerovariance: bool = True,
                  variance_tol: float = VARIANCE_TOL) -> tuple[np.ndarray, np.ndarray]:
    """DVARS of a whole run, as Nipype's ``compute_dvars`` computes it.

    Parameters
    ----------
    data : (nvox, nt) float
        Masked voxels x time, image intensity units (cast to float32, as Nipype does).
    intensity_normalization : float
        Scale so that the median is this value (0: no scaling).
    remove_zerovariance, variance_tol : bool, float
        Drop voxels whose robust SD is not above ``variance_tol`` (Nipype's
        ``ComputeDVARS`` defaults; ``compute_dvars`` itself defaults to False).

    Returns
    -------
    dvars : (nt,) float64
        Nipype's ``dvars_nstd`` (fMRIPrep ``dvars``), intensity units scaled to a median of
        ``intensity_normalization``; NaN for the first volume.
    std_dvars : (nt,) float64
        Nipype's ``dvars_stdz`` (fMRIPrep ``std_dvars``), dimensionless; NaN for the first
        volume, and NaN throughout when no voxel is kept or the predicted SD is 0.
    """
    mfunc = np.asarray(data, dtype=np.float32)
    if mfunc.ndim != 2:
        raise ValueError(f"data must be (nvox, nt), got shape {mfunc.shape}")
    nt = mfunc.shape[1]
    dvars = np.full(nt, np.nan)
    std_dvars = np.full(nt, np.nan)
    if nt < 2 or mfunc.shape[0] == 0:
        return dvars, std_dvars
    if intensity_normalization != 0:
        mfunc = (mfunc / np.median(mfunc)) * np.float32(intensity_normalization)
    func_sd = (np.percentile(mfunc, 75, axis=1, method="lower")
               - np.percentile(mfunc, 25, axis=1, method="lower")) / np.float32(1.349)
    if remove_zerovariance:
        keep = func_sd > variance_tol
        mfunc = mfunc[keep]
        func_sd = func_sd[keep]
    if mfunc.shape[0] == 0:
        return dvars, std_dvars
    y = mfunc.astype(np.float64) - mfunc[:, :1]
    ar1 = _ar1_from_sums(y.sum(axis=1), np.square(y).sum(axis=1),
                         (y[:, 1:] * y[:, :-1]).sum(axis=1), y[:, -1], nt)
    diff_sd_mean = float((np.sqrt(2.0 * (1.0 - ar1)) * func_sd.astype(np.float64)).mean())
    dvars[1:] = np.sqrt(np.square(np.diff(mfunc, axis=1).astype(np.float64)).mean(axis=0))
    if diff_sd_mean > 0:
        std_dvars[1:] = dvars[1:] / diff_sd_mean
    return dvars, std_dvars


# ---- DVARS online -------------------------------------------------------------------------


@dataclass
class DvarsState:
    """Running state of the online DVARS for one series.

    Attributes
    ----------
    nvox : int
    n : int
        Volumes seen.
    series : (capacity, nvox) float32
        The masked values of every volume, time-major (rows ``0..n-1`` are valid).
    ar : (nvox, 3) float64
        Running sums of ``y``, ``y**2`` and ``y_t y_{t-1}`` with ``y = x - x_0``.
    block : (nvox, 2, M + 1) float32; qlo, qm : (nvox, 2) int64
        Order-statistic blocks of the 25th and 75th percentiles (first rank, size).
    band_lo, band_inv_width : float
        Median band start (intensity units) and inverse bin width.
    counts : (nbins + 2,) int64
        Histogram of every value seen: below the band, interior bins, above.
    band_values : (capacity,) float32; vol_start : (capacity + 1,) int64;
    offsets : (capacity, nbins + 1) int64
        In-band values of each volume grouped by bin (see ``_dvars_kernels``).
    median : float
        Current median of all values (float32 semantics).
    refills, rebuilds : int
        Diagnostics: block refills from the series, median band rebuilds.
    """

    nvox: int
    intensity_normalization: float = INTENSITY_NORMALIZATION
    remove_zerovariance: bool = True
    variance_tol: float = VARIANCE_TOL
    n: int = 0
    series: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    ar: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    block: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, _BLOCK + 1), np.float32))
    qlo: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    qm: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    band_lo: float = 0.0
    band_inv_width: float = 1.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(_NBINS + 2, np.int64))
    band_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    vol_start: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, _NBINS + 1), np.int64))
    median: float = np.nan
    refills: int = 0
    rebuilds: int = 0
    _cursor: np.ndarray = field(default_factory=lambda: np.zeros(_NBINS + 2, np.int64))
    _scratch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _out: np.ndarray = field(default_factory=lambda: np.zeros(4))


def dvars_init(nvox: int, n_expected: int | None = None,
               intensity_normalization: float = INTENSITY_NORMALIZATION,
               remove_zerovariance: bool = True,
               variance_tol: float = VARIANCE_TOL) -> DvarsState:
    """State for a series of ``nvox`` masked voxels.

    ``n_expected`` (volumes announced by the header, if known) sizes the buffers up
    front; without it they start at 64 volumes and double when full (a copy).
    """
    if nvox < 1:
        raise ValueError("the mask must hold at least one voxel")
    capacity = max(int(n_expected or 0), 64)
    state = DvarsState(nvox=int(nvox), intensity_normalization=float(intensity_normalization),
                       remove_zerovariance=bool(remove_zerovariance),
                       variance_tol=float(variance_tol))
    state.series = np.empty((capacity, nvox), np.float32)
    state.ar = np.zeros((nvox, 3))
    state.block = np.zeros((nvox, 2, _BLOCK + 1), np.float32)
    state.qlo = np.zeros((nvox, 2), np.int64)
    state.qm = np.zeros((nvox, 2), np.int64)
    state.band_values = np.empty(capacity * nvox // 2, np.float32)
    state.vol_start = np.zeros(capacity + 1, np.int64)
    state.offsets = np.zeros((capacity, _NBINS + 1), np.int64)
    state._scratch = np.empty(capacity, np.float32)
    return state


def _grow(array: np.ndarray, size: int) -> np.ndarray:
    """A copy of ``array`` with its first axis enlarged to ``size``."""
    grown = np.empty((size,) + array.shape[1:], dtype=array.dtype)
    grown[:array.shape[0]] = array
    return grown


def _reserve(state: DvarsState) -> None:
    """Room for one more volume (doubling the buffers when full)."""
    if state.n >= state.series.shape[0]:
        capacity = 2 * state.series.shape[0]
        state.series = _grow(state.series, capacity)
        state.offsets = _grow(state.offsets, capacity)
        state.vol_start = _grow(state.vol_start, capacity + 1)
        state._scratch = np.empty(capacity, np.float32)
    need = int(state.vol_start[state.n]) + state.nvox
    if need > state.band_values.size:
        state.band_values = _grow(state.band_values, max(need, 2 * state.band_values.size))


def _band_start(state: DvarsState, values: np.ndarray) -> None:
    """Place the median band on ``values`` (its central quantiles) and empty it."""
    lo, hi = (float(q) for q in np.quantile(values, _BAND))
    width = (hi - lo) / _NBINS
    if not width > 0:
        width = max(abs(lo), 1.0) * 1e-6
    state.band_lo = lo
    state.band_inv_width = 1.0 / width
    state.counts[:] = 0
    state.vol_start[0] = 0


def _band_add(state: DvarsState, t: int) -> None:
    start = int(state.vol_start[t])
    stored = kernels.band_add_volume(state.series[t], state.band_lo, state.band_inv_width,
                                     state.counts, state._cursor, state.offsets[t],
                                     state.band_values[start:])
    state.vol_start[t + 1] = start + stored


def _median(state: DvarsState) -> float:
    """Exact median of every value so far; rebuilds the band if the median left it."""
    value = kernels.band_median(state.counts, state.band_values, state.vol_start,
                                state.offsets, state.n)
    if value is not None:
        return value
    state.rebuilds += 1
    log.debug("DVARS median left its band at volume %d: rebuilding", state.n - 1)
    _band_start(state, state.series[state.n - 1])
    for t in range(state.n):
        _band_add(state, t)
    value = kernels.band_median(state.counts, state.band_values, state.vol_start,
                                state.offsets, state.n)
    if value is None:  # cannot happen with a band on the latest volume; stay exact anyway
        value = float(np.median(state.series[:state.n]))
    return value


def dvars_step(state: DvarsState, masked_values: np.ndarray) -> tuple[float, float]:
    """Add one volume; return DVARS of the run truncated at this volume, last entry.

    Parameters
    ----------
    state : DvarsState
    masked_values : (nvox,) float32
        The volume's values in the mask (any fixed voxel order), finite.

    Returns
    -------
    dvars : float
        :func:`dvars_offline` ``dvars[-1]`` for volumes ``0..t`` (NaN for the first).
    std_dvars : float
        :func:`dvars_offline` ``std_dvars[-1]`` for volumes ``0..t`` (NaN for the first,
        and while no voxel has a robust SD above ``variance_tol``: always at ``t = 1``).
    """
    values = np.ascontiguousarray(masked_values)
    if values.dtype != np.float32 or values.shape != (state.nvox,):
        raise ValueError(f"masked_values must be ({state.nvox},) float32, "
                         f"got {values.shape} {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError("masked_values must be finite")
    _reserve(state)
    t = state.n
    state.series[t] = values
    state.n = t + 1
    normalise = state.intensity_normalization != 0
    if normalise:
        if t == 0:
            _band_start(state, values)
        _band_add(state, t)
        state.median = _median(state)
    kernels.voxel_pass(state.series[t], state.series, state.n, state.ar, state.block,
                       state.qlo, state.qm, state.median if normalise else 1.0,
                       state.intensity_normalization, normalise, state.remove_zerovariance,
                       state.variance_tol, state._scratch, state._out)
    sum_d2, sum_sdhat, kept, refills = state._out
    state.refills += int(refills)
    if t == 0 or kept == 0:
        return np.nan, np.nan
    dvars = float(np.sqrt(sum_d2 / kept))
    mean_sdhat = sum_sdhat / kept
    return dvars, (dvars / mean_sdhat if mean_sdhat > 0 else np.nan)


def dvars_finalize(state: DvarsState) -> tuple[np.ndarray, np.ndarray]:
    """Whole-run DVARS of every volume seen, exactly :func:`dvars_offline`.

    Returns
    -------
    dvars, std_dvars : (n,) float64 (see :func:`dvars_offline`)
    """
    return dvars_offline(state.series[:state.n].T, state.intensity_normalization,
                         state.remove_zerovariance, state.variance_tol)


class DvarsTracker:
    """Online DVARS of a series inside a fixed mask, for the registration stage.

    Parameters
    ----------
    mask : (nx, ny, nz) bool
        Voxels that count (e.g. the brain mask of the reference volume).
    n_expected : int or None
        Volumes announced by the header; sizes the buffers (see :func:`dvars_init`).
    **options
        ``intensity_normalization``, ``remove_zerovariance``, ``variance_tol``.
    """

    def __init__(self, mask: np.ndarray, n_expected: int | None = None,
                 **options: float | bool) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3:
            raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
        self.shape = mask.shape
        # Fortran-order flat indices, ascending: a sequential gather from Volume.data
        self._index = np.flatnonzero(mask.ravel(order="F"))
        self._values = np.empty(self._index.size, np.float32)
        self.state = dvars_init(self._index.size, n_expected, **options)  # type: ignore[arg-type]

    def update(self, data: np.ndarray) -> tuple[float, float]:
        """Add one volume; returns (dvars, std_dvars) as :func:`dvars_step`.

        Parameters
        ----------
        data : (nx, ny, nz) float32, Fortran-ordered (``Volume.data``)
        """
        if data.shape != self.shape:
            raise ValueError(f"volume shape {data.shape} does not match the mask {self.shape}")
        flat = np.asarray(data, dtype=np.float32).reshape(-1, order="F")
        np.take(flat, self._index, out=self._values)
        return dvars_step(self.state, self._values)

    def final(self) -> tuple[np.ndarray, np.ndarray]:
        """Whole-run (dvars, std_dvars), (n,) float64 each: Nipype's values, NaN first."""
        return dvars_finalize(self.state)
