"""DVARS offline, as Nipype/fMRIPrep compute it (online: :mod:`.dvars_online`).

Framewise displacement, the other motion metric of fMRIPrep's confounds, is
:func:`rtsc.conventions.framewise_displacement`.

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

Two deliberate differences from Nipype's numbers, both at float rounding level: Nipype
takes the AR(1) through a float32 FFT and averages the squared differences in float32
(1.2e-6 relative error on the tests' run, all of it that float32 mean); here both are
float64. Online, a voxel is kept when its series is not constant (from the third
volume on), which is Nipype's "robust SD > 1e-7" except for series whose 25th and 75th
percentiles tie (quantised data with noise under one unit).

The online estimate of these values, volume by volume, is :mod:`rtsc.pipeline.qc.dvars_online`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from rtsc.pipeline.qc import _dvars_kernels as kernels

log = logging.getLogger(__name__)

#: Defaults of Nipype's ComputeDVARS interface, as fMRIPrep runs it.
INTENSITY_NORMALIZATION = 1000.0
VARIANCE_TOL = 1e-7

_CHUNK = 4096        # voxels per float64 block in dvars_offline


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
    nvox, nt = mfunc.shape
    if nt < 2 or nvox == 0:
        return np.full(nt, np.nan), np.full(nt, np.nan)
    median = np.median(mfunc) if intensity_normalization != 0 else None
    return dvars_by_chunks(lambda a, b: mfunc[a:b], nvox, nt, median,
                            intensity_normalization, remove_zerovariance, variance_tol)


def dvars_by_chunks(voxels: Callable[[int, int], np.ndarray], nvox: int, nt: int,
                     median: np.float32 | None, intensity_normalization: float,
                     remove_zerovariance: bool, variance_tol: float,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dvars_offline` from blocks of voxels: ``voxels(a, b)`` is the (b - a, nt)
    float32 series of voxels a..b-1, and ``median`` the median of all of them (np.float32;
    None without normalisation). Every step but the median is per voxel, so the blocks
    give the same numbers as the whole matrix (up to float64 summation order)."""
    dvars = np.full(nt, np.nan)
    std_dvars = np.full(nt, np.nan)
    sum_d2 = np.zeros(nt - 1)
    sum_sdhat, kept = 0.0, 0
    for a in range(0, nvox, _CHUNK):
        block = np.asarray(voxels(a, min(a + _CHUNK, nvox)), dtype=np.float32)
        if median is not None:
            block = (block / median) * np.float32(intensity_normalization)
        func_sd = (np.percentile(block, 75, axis=1, method="lower")
                   - np.percentile(block, 25, axis=1, method="lower")) / np.float32(1.349)
        if remove_zerovariance:
            keep = func_sd > variance_tol
            block = block[keep]
            func_sd = func_sd[keep]
        if block.shape[0] == 0:
            continue
        y = block.astype(np.float64)  # float64, one block of voxels at a time
        y -= y[:, :1].copy()
        ar1 = _ar1_from_sums(y.sum(axis=1), np.square(y).sum(axis=1),
                             (y[:, 1:] * y[:, :-1]).sum(axis=1), y[:, -1], nt)
        sum_d2 += np.square(np.diff(y, axis=1)).sum(axis=0)
        sum_sdhat += float((np.sqrt(2.0 * (1.0 - ar1)) * func_sd.astype(np.float64)).sum())
        kept += block.shape[0]
    if kept == 0:
        return dvars, std_dvars
    diff_sd_mean = sum_sdhat / kept
    dvars[1:] = np.sqrt(sum_d2 / kept)
    if diff_sd_mean > 0:
        std_dvars[1:] = dvars[1:] / diff_sd_mean
    return dvars, std_dvars


def exact_median(blocks: Callable[[], Iterator[np.ndarray]], total: int,
                 active: np.ndarray | None = None, bins: int = 1 << 16) -> np.float32:
    """``np.median`` of values too many to hold at once, in three passes over them.

    Parameters
    ----------
    blocks : callable
        Returns a fresh iterator over float32 arrays, (k, nvox) or (nvox,), that together
        hold all values (row views: nothing is copied).
    total : int
        How many values they hold (> 0), counting only the active columns.
    active : (nvox,) bool or None
        The columns that count (None: all).

    The first pass finds the values' range, the second counts them into ``bins`` bins
    over it, the third keeps only those in the bins of the two middle ranks, few enough
    to sort (numba kernels: no float64 copy of a block). Returns exactly what
    ``np.median`` of all values returns.
    """
    lo_hi = np.array([np.inf, -np.inf])
    for block in blocks():
        kernels.range_of(block, active, lo_hi)
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if not lo < hi:
        return np.float32(lo)
    scale = (bins - 1) / (hi - lo)
    counts = np.zeros(bins, np.int64)
    for block in blocks():
        kernels.rank_counts(block, active, lo, scale, counts)
    ranks = ((total - 1) // 2, total // 2)
    cumulative = np.cumsum(counts)
    wanted = np.searchsorted(cumulative, ranks, side="right")  # bin of each middle rank
    below = int(cumulative[wanted[0] - 1]) if wanted[0] > 0 else 0
    middle = np.empty(int(cumulative[wanted[1]]) - below, np.float32)
    k = 0
    for block in blocks():
        k = kernels.rank_pick(block, active, lo, scale, wanted[0], wanted[1], middle, k)
    middle.sort()
    pair = middle[[ranks[0] - below, ranks[1] - below]]
    return np.median(pair) if total % 2 == 0 else np.float32(pair[0])
