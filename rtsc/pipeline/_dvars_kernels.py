"""Numba kernels of the online DVARS estimator (see :mod:`rtsc.pipeline.motion_metrics`).

Two structures make the run-wide statistics of Nipype's ``compute_dvars`` exact
online without sorting the whole run at every volume:

* **Median band** (the intensity normalisation, median over all masked voxels and all
  volumes so far). A histogram of ``nbins`` equal-width interior bins over a value band
  chosen on the first volume, plus one bin below and one above. Each volume's in-band
  values are stored grouped by bin (a counting sort: ``offsets[t, j]`` is where interior
  bin ``j`` starts in volume ``t``'s segment of ``band_values``). The median rank is
  found in the cumulative counts; the exact value is then selected among the few
  thousand stored values of that one bin. Values outside the band are only counted.

* **Order-statistic blocks** (the per-voxel 25th and 75th percentiles, ``method="lower"``).
  Per voxel and per quantile, a sorted block of at most ``M`` consecutive order
  statistics of the voxel's series, ranks ``[lo, lo + m)``. A new value inside the
  block's value range is inserted (evicting the element farthest from the target
  rank when full); one below it only shifts ``lo``. While the target rank
  ``floor(q (n - 1))`` stays inside the block the percentile is read exactly; when it
  leaves, the block is refilled from the voxel's stored series (rare).

All kernels work on preallocated arrays; the public wrappers check dtype, shape and
contiguity.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# ---- median band --------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _bin_of(x: float, lo: float, inv_width: float, nbins: int) -> int:
    """0: below the band, 1..nbins: interior bins, nbins + 1: above (monotone in x)."""
    f = (x - lo) * inv_width
    if f < 0.0:
        return 0
    if f >= nbins:
        return nbins + 1
    return int(f) + 1


@numba.njit(cache=True, nogil=True)
def _band_add_volume(values: np.ndarray, lo: float, inv_width: float, nbins: int,
                     counts: np.ndarray, cursor: np.ndarray, offsets_row: np.ndarray,
                     out: np.ndarray) -> int:
    """Count one volume into ``counts`` and store its in-band values grouped by bin.

    values : (nvox,) float32; counts : (nbins + 2,) int64, updated; cursor : (nbins + 2,)
    int64 scratch; offsets_row : (nbins + 1,) int64, written (start of each interior bin
    in ``out``, then the end); out : (>= nvox,) float32. Returns the number stored.
    """
    for b in range(nbins + 2):
        cursor[b] = 0
    for i in range(values.size):
        cursor[_bin_of(values[i], lo, inv_width, nbins)] += 1
    for b in range(nbins + 2):
        counts[b] += cursor[b]
    total = 0
    for j in range(nbins):
        offsets_row[j] = total
        total += cursor[j + 1]
    offsets_row[nbins] = total
    for j in range(nbins):
        cursor[j + 1] = offsets_row[j]
    for i in range(values.size):
        b = _bin_of(values[i], lo, inv_width, nbins)
        if 1 <= b <= nbins:
            out[cursor[b]] = values[i]
            cursor[b] += 1
    return total


@numba.njit(cache=True, nogil=True)
def _band_find(rank: int, counts: np.ndarray) -> tuple[int, int]:
    """Bin holding ``rank`` (0-based) of the counted values, and the rank within it."""
    before = 0
    for b in range(counts.size):
        if rank < before + counts[b]:
            return b, rank - before
        before += counts[b]
    return counts.size - 1, rank - before


@numba.njit(cache=True, nogil=True)
def _band_gather(b: int, counts: np.ndarray, band_values: np.ndarray, vol_start: np.ndarray,
                 offsets: np.ndarray, nvol: int) -> np.ndarray:
    """All stored values of interior bin ``b`` (1..nbins), over volumes 0..nvol-1."""
    out = np.empty(counts[b], dtype=np.float32)
    k = 0
    j = b - 1
    for s in range(nvol):
        base = vol_start[s]
        for i in range(offsets[s, j], offsets[s, j + 1]):
            out[k] = band_values[base + i]
            k += 1
    return out


@numba.njit(cache=True, nogil=True)
def _band_median(counts: np.ndarray, band_values: np.ndarray, vol_start: np.ndarray,
                 offsets: np.ndarray, nvol: int) -> tuple[float, bool]:
    """Exact median of all counted values, as ``np.median`` gives it for float32.

    Returns (median, found); ``found`` is False when a middle rank falls outside the
    band (the caller then computes the median another way).
    """
    total = 0
    for b in range(counts.size):
        total += counts[b]
    nbins = counts.size - 2
    upper = total // 2
    b_hi, r_hi = _band_find(upper, counts)
    if b_hi == 0 or b_hi == nbins + 1:
        return np.nan, False
    values = np.partition(_band_gather(b_hi, counts, band_values, vol_start, offsets, nvol),
                          r_hi)
    v_hi = values[r_hi]
    if total % 2 == 1:
        return v_hi, True
    if r_hi > 0:
        v_lo = values[:r_hi].max()
    else:  # the lower middle value is the largest value of the previous non-empty bin
        b_lo = b_hi - 1
        while b_lo > 0 and counts[b_lo] == 0:
            b_lo -= 1
        if b_lo == 0:
            return np.nan, False
        v_lo = _band_gather(b_lo, counts, band_values, vol_start, offsets, nvol).max()
    # np.median of float32: the mean of the two middle values, in float32
    return np.float32(np.float32(v_lo + v_hi) / np.float32(2.0)), True


# ---- per-voxel pass -----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _normalise(x: float, median: np.float32, scale: np.float32, normalise: bool) -> np.float32:
    """Nipype's ``(mfunc / median) * intensity_normalization``, in float32."""
    if not normalise:
        return np.float32(x)
    return np.float32(np.float32(np.float32(x) / median) * scale)


@numba.njit(cache=True, nogil=True)
def _refill(series: np.ndarray, n: int, v: int, k: int, block: np.ndarray, j: int,
            qlo: np.ndarray, qm: np.ndarray, scratch: np.ndarray) -> None:
    """Rebuild voxel ``v``'s block ``j`` from its stored series, centred on rank ``k``."""
    capacity = block.shape[2] - 1
    for t in range(n):
        scratch[t] = series[t, v]
    ordered = np.sort(scratch[:n])
    m = min(capacity, n)
    start = min(max(k - capacity // 2, 0), n - m)
    for i in range(m):
        block[v, j, i] = ordered[start + i]
    qlo[v, j] = start
    qm[v, j] = m


@numba.njit(cache=True, nogil=True, inline="always")
def _block_update(x: np.float32, n: int, k: int, v: int, j: int, block: np.ndarray,
                  qlo: np.ndarray, qm: np.ndarray) -> None:
    """Account for value ``x``, the ``n``-th of voxel ``v``; ``k`` is the new target rank."""
    capacity = block.shape[2] - 1  # one spare slot for the insertion before eviction
    m = qm[v, j]
    lo = qlo[v, j]
    before = n - 1
    if m > 0:
        fits_low = x >= block[v, j, 0] or lo == 0
        fits_high = x <= block[v, j, m - 1] or lo + m == before
    else:
        fits_low = fits_high = lo == before
    if not (fits_low and fits_high):
        if m > 0 and x < block[v, j, 0]:
            qlo[v, j] = lo + 1
        return
    i = m
    while i > 0 and block[v, j, i - 1] > x:
        block[v, j, i] = block[v, j, i - 1]
        i -= 1
    block[v, j, i] = x
    m += 1
    if m > capacity:  # evict the end farther from the target rank
        if k - lo > lo + m - 1 - k:
            for i in range(m - 1):
                block[v, j, i] = block[v, j, i + 1]
            qlo[v, j] = lo + 1
        m -= 1
    qm[v, j] = m


@numba.njit(cache=True, nogil=True)
def _voxel_pass(x: np.ndarray, series: np.ndarray, n: int, ar: np.ndarray, block: np.ndarray,
                qlo: np.ndarray, qm: np.ndarray, median: float, scale: float, normalise: bool,
                remove_zero: bool, tol: float, scratch: np.ndarray,
                out: np.ndarray) -> None:
    """Update every voxel with its ``n``-th value ``x`` (already stored as series[n-1]).

    Accumulates, over the voxels kept (robust SD > tol when ``remove_zero``):
    out[0] = sum of squared normalised backward differences, out[1] = sum of
    sqrt(2 (1 - ar1)) * robust SD, out[2] = number kept, out[3] = refills done.
    """
    median32 = np.float32(median)
    scale32 = np.float32(scale)
    inv1349 = np.float32(1.349)
    k25 = (n - 1) // 4                    # floor(0.25 (n - 1)), numpy's "lower" index
    k75 = (3 * (n - 1)) // 4              # floor(0.75 (n - 1))
    sum_d2 = 0.0
    sum_sdhat = 0.0
    kept = 0
    refills = 0
    for v in range(x.size):
        xv = x[v]
        _block_update(xv, n, k25, v, 0, block, qlo, qm)
        _block_update(xv, n, k75, v, 1, block, qlo, qm)
        if n == 1:
            ar[v, 0] = 0.0
            ar[v, 1] = 0.0
            ar[v, 2] = 0.0
            continue
        first = np.float64(series[0, v])
        prev = series[n - 2, v]
        y = np.float64(xv) - first
        y_prev = np.float64(prev) - first
        s1 = ar[v, 0] + y
        s2 = ar[v, 1] + y * y
        p = ar[v, 2] + y * y_prev
        ar[v, 0] = s1
        ar[v, 1] = s2
        ar[v, 2] = p
        if not qlo[v, 0] <= k25 < qlo[v, 0] + qm[v, 0]:
            _refill(series, n, v, k25, block, 0, qlo, qm, scratch)
            refills += 1
        if not qlo[v, 1] <= k75 < qlo[v, 1] + qm[v, 1]:
            _refill(series, n, v, k75, block, 1, qlo, qm, scratch)
            refills += 1
        q25 = _normalise(block[v, 0, k25 - qlo[v, 0]], median32, scale32, normalise)
        q75 = _normalise(block[v, 1, k75 - qlo[v, 1]], median32, scale32, normalise)
        sd = np.float32(np.float32(q75 - q25) / inv1349)
        if remove_zero and not sd > tol:
            continue
        # Yule-Walker lag-1 on the demeaned series, from sums of y = x - x_0 (y_0 = 0)
        mean = s1 / n
        r0 = s2 - s1 * mean
        r1 = p - mean * (2.0 * s1 - y) + (n - 1) * mean * mean
        ar1 = r1 / r0 if r0 > 0.0 else 0.0
        sum_sdhat += math.sqrt(2.0 * (1.0 - ar1)) * np.float64(sd)
        d = np.float64(_normalise(xv, median32, scale32, normalise)
                       - _normalise(prev, median32, scale32, normalise))
        sum_d2 += d * d
        kept += 1
    out[0] = sum_d2
    out[1] = sum_sdhat
    out[2] = kept
    out[3] = refills


# ---- checked wrappers ---------------------------------------------------------------------


def _check(array: np.ndarray, dtype: type, ndim: int, name: str) -> None:
    if array.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def band_add_volume(values: np.ndarray, lo: float, inv_width: float, counts: np.ndarray,
                    cursor: np.ndarray, offsets_row: np.ndarray, out: np.ndarray) -> int:
    """Checked wrapper of :func:`_band_add_volume`; returns the number of values stored.

    Parameters
    ----------
    values : (nvox,) float32
    lo, inv_width : float
        Band start (intensity units) and 1 / bin width.
    counts : (nbins + 2,) int64, updated in place
    cursor : (nbins + 2,) int64 scratch
    offsets_row : (nbins + 1,) int64, written
    out : (>= nvox,) float32, written
    """
    _check(values, np.float32, 1, "values")
    _check(counts, np.int64, 1, "counts")
    _check(cursor, np.int64, 1, "cursor")
    _check(offsets_row, np.int64, 1, "offsets_row")
    _check(out, np.float32, 1, "out")
    nbins = counts.size - 2
    if cursor.size != nbins + 2 or offsets_row.size != nbins + 1 or out.size < values.size:
        raise ValueError("band arrays do not match nbins / nvox")
    return int(_band_add_volume(values, float(lo), float(inv_width), nbins, counts, cursor,
                                offsets_row, out))


def band_median(counts: np.ndarray, band_values: np.ndarray, vol_start: np.ndarray,
                offsets: np.ndarray, nvol: int) -> float | None:
    """Exact ``np.median`` (float32 semantics) of the counted values, or None if it lies
    outside the band.

    Parameters
    ----------
    counts : (nbins + 2,) int64
    band_values : (>= vol_start[nvol],) float32
    vol_start : (>= nvol,) int64, start of each volume's segment in ``band_values``
    offsets : (>= nvol, nbins + 1) int64
    nvol : int
    """
    _check(counts, np.int64, 1, "counts")
    _check(band_values, np.float32, 1, "band_values")
    _check(vol_start, np.int64, 1, "vol_start")
    _check(offsets, np.int64, 2, "offsets")
    if offsets.shape[1] != counts.size - 1 or offsets.shape[0] < nvol or vol_start.size < nvol:
        raise ValueError("band arrays do not match nbins / nvol")
    value, found = _band_median(counts, band_values, vol_start, offsets, int(nvol))
    return float(value) if found else None


def voxel_pass(x: np.ndarray, series: np.ndarray, n: int, ar: np.ndarray, block: np.ndarray,
               qlo: np.ndarray, qm: np.ndarray, median: float, scale: float, normalise: bool,
               remove_zero: bool, tol: float, scratch: np.ndarray,
               out: np.ndarray) -> None:
    """Checked wrapper of :func:`_voxel_pass`.

    Parameters
    ----------
    x : (nvox,) float32, the new volume's masked values (equal to ``series[n - 1]``)
    series : (>= n, nvox) float32, time-major
    n : int, volumes so far including ``x``
    ar : (nvox, 3) float64, running sums of y, y**2, y_t y_{t-1} with y = x - x_0
    block : (nvox, 2, M + 1) float32; qlo, qm : (nvox, 2) int64
    median, scale : float, normalisation ``x / median * scale`` (float32 arithmetic)
    normalise, remove_zero : bool; tol : float, robust SD threshold
    scratch : (>= n,) float32
    out : (4,) float64, written (see :func:`_voxel_pass`)
    """
    nvox = x.size
    _check(x, np.float32, 1, "x")
    _check(series, np.float32, 2, "series")
    _check(ar, np.float64, 2, "ar")
    _check(block, np.float32, 3, "block")
    _check(qlo, np.int64, 2, "qlo")
    _check(qm, np.int64, 2, "qm")
    _check(scratch, np.float32, 1, "scratch")
    _check(out, np.float64, 1, "out")
    if (series.shape[1] != nvox or series.shape[0] < n or ar.shape != (nvox, 3)
            or block.shape[:2] != (nvox, 2) or block.shape[2] < 2
            or qlo.shape != (nvox, 2) or qm.shape != (nvox, 2)
            or scratch.size < n or out.size != 4 or n < 1):
        raise ValueError("voxel_pass arrays do not match nvox / n")
    _voxel_pass(x, series, int(n), ar, block, qlo, qm, float(median), float(scale),
                bool(normalise), bool(remove_zero), float(tol), scratch, out)


def warm_up() -> None:
    """Compile (or load from cache) the kernels before the first volume arrives."""
    nbins = 4
    values = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    counts = np.zeros(nbins + 2, np.int64)
    offsets = np.zeros((1, nbins + 1), np.int64)
    band = np.zeros(3, np.float32)
    band_add_volume(values, 0.0, 1.0, counts, np.zeros(nbins + 2, np.int64), offsets[0], band)
    band_median(counts, band, np.zeros(1, np.int64), offsets, 1)
    series = values[None, :].copy()
    voxel_pass(values, series, 1, np.zeros((3, 3)), np.zeros((3, 2, 5), np.float32),
               np.zeros((3, 2), np.int64), np.zeros((3, 2), np.int64), 2.0, 1000.0, True,
               True, 1e-7, np.zeros(1, np.float32), np.zeros(4))
