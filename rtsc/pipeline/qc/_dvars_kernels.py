"""Numba kernels of the online DVARS estimator (see :mod:`rtsc.pipeline.qc.dvars_online`).

Three kernels, each one pass over one volume's masked values:

* :func:`_hist_add` counts the values into the median histogram: ``nbins`` equal-width
  bins over a band of intensities fixed on the first volume, plus one bin below and
  one above (``counts[0]`` and ``counts[nbins + 1]``);
* :func:`_voxel_pass` adds up, over every kept voxel, the squared backward
  difference (``dvars``) and remembers which voxels ever changed (Nipype drops voxels
  of zero robust SD);
* :func:`_sample_pass` keeps the whole series of a fixed sample of voxels sorted
  (insertion, moving the shorter side) to read their exact 25th / 75th percentiles
  (numpy ``method="lower"``), and their running sums for the exact Yule-Walker AR(1)
  coefficient.

Every kernel takes ``active``, (nvox,) bool: the voxels still in the run's validity
mask (a voxel whose motion-corrected sample left the acquired grid leaves the
statistics; see :func:`rtsc.pipeline.qc.dvars_online.dvars_restrict`). Inactive voxels
are skipped as if they were not in the mask.

No allocation, no I/O; the public wrappers check dtype, shape and contiguity.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Indices into the ``out`` arrays of _voxel_pass and _sample_pass.
SUM_D2, N_KEPT = 0, 1
SUM_SDHAT, N_SAMPLE = 0, 1


@numba.njit(cache=True, nogil=True)
def _hist_add(values: np.ndarray, lo: float, inv_width: float, counts: np.ndarray,
              active: np.ndarray, weight: int) -> None:
    """counts[0] += values below ``lo``; counts[1 + floor((x - lo) inv_width)] += 1 inside;
    counts[-1] += values past the last interior bin; active values only, each counting
    ``weight`` (-1 takes values out again).

    Branch-free float32 arithmetic: bin edges move by float32 rounding (~1e-3 of a bin),
    which only matters through the interpolation; the map stays monotone in x.
    """
    lo32 = np.float32(lo)
    inv32 = np.float32(inv_width)
    top = np.float32(counts.size - 1)
    for i in range(values.size):
        if not active[i]:
            continue
        f = (values[i] - lo32) * inv32 + np.float32(1.0)
        counts[int(min(max(f, np.float32(0.0)), top))] += weight


@numba.njit(cache=True, nogil=True)
def _hist_rank(rank: int, counts: np.ndarray, lo: float, width: float) -> float:
    """Value of 0-based ``rank``: its bin from the counts, its place in the bin by linear
    interpolation (values spread evenly in the bin). NaN in an outer bin."""
    before = 0
    for b in range(counts.size):
        c = counts[b]
        if rank < before + c:
            if b == 0 or b == counts.size - 1:
                return np.nan
            return lo + (b - 1 + (rank - before + 0.5) / c) * width
        before += c
    return np.nan


@numba.njit(cache=True, nogil=True, inline="always")
def _normalise(x: np.float32, median: np.float32, scale: np.float32,
               normalise: bool) -> np.float32:
    """Nipype's ``(mfunc / median) * intensity_normalization``, in float32."""
    if not normalise:
        return x
    return np.float32(np.float32(x / median) * scale)


@numba.njit(cache=True, nogil=True, inline="always")
def _kept(changed: bool, n: int, remove_zero: bool) -> bool:
    """Whether Nipype keeps a voxel: always, or when dropping zero-variance voxels, if
    its robust SD can be > 0 (n >= 3: at n = 2 both "lower" percentiles are the first
    sorted value) and its series is not constant (ties aside, see motion_metrics)."""
    return not remove_zero or (n >= 3 and changed)


@numba.njit(cache=True, nogil=True)
def _voxel_pass(x: np.ndarray, first: np.ndarray, prev: np.ndarray, n: int,
                changed: np.ndarray, remove_zero: bool, out: np.ndarray,
                active: np.ndarray) -> None:
    """Add volume ``n - 1`` (values ``x``) for every voxel.

    x, first, prev : (nvox,) float32, volumes n - 1, 0 and n - 2; changed : (nvox,)
    bool, set where a value differs from the voxel's first (reset at n == 1). Over the
    kept voxels (:func:`_kept`): out[SUM_D2] = sum of squared raw backward differences
    (float64), out[N_KEPT] = count.
    """
    if n == 1:
        for v in range(x.size):
            changed[v] = False
        out[SUM_D2] = 0.0
        out[N_KEPT] = 0.0
        return
    sum_d2 = 0.0
    kept = 0
    for v in range(x.size):
        if not active[v]:
            continue
        moved = changed[v] or x[v] != first[v]
        changed[v] = moved
        if _kept(moved, n, remove_zero):
            d = np.float64(x[v]) - np.float64(prev[v])
            sum_d2 += d * d
            kept += 1
    out[SUM_D2] = sum_d2
    out[N_KEPT] = kept


@numba.njit(cache=True, nogil=True, inline="always")
def _insert_sorted(row: np.ndarray, start: int, n: int, value: np.float32) -> int:
    """Insert ``value`` into the sorted ``row[start:start + n]``; return the new start.

    The elements on the shorter side of ``value`` move: the larger ones one place up,
    or (while ``start > 0``) the smaller ones one place down. A volume whose values all
    drop (a spike, a motion artefact) then costs no more than one whose values rise.
    """
    end = start + n
    if start > 0 and n > 0 and value < row[start + n // 2]:
        j = start - 1
        while j + 1 < end and row[j + 1] < value:
            row[j] = row[j + 1]
            j += 1
        row[j] = value
        return start - 1
    j = end
    while j > start and row[j - 1] > value:
        row[j] = row[j - 1]
        j -= 1
    row[j] = value
    return start


@numba.njit(cache=True, nogil=True, parallel=True)
def _sample_pass(x: np.ndarray, first: np.ndarray, prev: np.ndarray, n: int,
                 index: np.ndarray, ordered: np.ndarray, starts: np.ndarray, ar: np.ndarray,
                 changed: np.ndarray, median: float, scale: float, normalise: bool,
                 remove_zero: bool, out: np.ndarray, active: np.ndarray) -> None:
    """Add volume ``n - 1`` for the sampled voxels (after :func:`_voxel_pass`).

    x, first, prev : as :func:`_voxel_pass`; index : (m,) int64 sampled voxels.
    ordered : (m, width) float32 and starts : (m,) int64: the sorted values of voxel
    index[i] are ordered[i, starts[i]:starts[i] + k] (k = n - 1 on entry, n on exit;
    rows start empty at some c >= n with width >= 2 c). ar : (m, 3) float64, running
    sums of y, y**2 and y_t y_{t-1} with y = x - x_0 (reset at n == 1). Parallel over
    the sampled voxels (rows are independent; the two sums are reductions). Over the
    kept sampled voxels:
    out[SUM_SDHAT] = sum of sqrt(2 (1 - ar1)) * robust SD (normalised units, Nipype's
    float32 arithmetic for the SD), out[N_SAMPLE] = count.
    """
    median32 = np.float32(median)
    scale32 = np.float32(scale)
    inv1349 = np.float32(1.349)
    k25 = (n - 1) // 4            # floor(0.25 (n - 1)): numpy's "lower" index
    k75 = (3 * (n - 1)) // 4
    sum_sdhat = 0.0
    kept = 0
    for i in numba.prange(index.size):
        v = index[i]
        if not active[v]:
            continue
        value = x[v]
        start = _insert_sorted(ordered[i], starts[i], n - 1, value)
        starts[i] = start
        y = np.float64(value) - np.float64(first[v])
        if n == 1:
            ar[i, 0] = 0.0
            ar[i, 1] = 0.0
            ar[i, 2] = 0.0
            continue
        s1 = ar[i, 0] + y
        s2 = ar[i, 1] + y * y
        p = ar[i, 2] + y * (np.float64(prev[v]) - np.float64(first[v]))
        ar[i, 0] = s1
        ar[i, 1] = s2
        ar[i, 2] = p
        if not _kept(changed[v], n, remove_zero):
            continue
        # Yule-Walker lag 1 of the demeaned series (y_0 = 0; see motion_metrics)
        mean = s1 / n
        r0 = s2 - s1 * mean
        r1 = p - mean * (2.0 * s1 - y) + (n - 1) * mean * mean
        ar1 = r1 / r0 if r0 > 0.0 else 0.0
        q25 = _normalise(ordered[i, start + k25], median32, scale32, normalise)
        q75 = _normalise(ordered[i, start + k75], median32, scale32, normalise)
        sd = np.float32(np.float32(q75 - q25) / inv1349)
        sum_sdhat += math.sqrt(2.0 * (1.0 - ar1)) * np.float64(sd)
        kept += 1
    out[SUM_SDHAT] = sum_sdhat
    out[N_SAMPLE] = kept


@numba.njit(cache=True, nogil=True)
def _gather(flat: np.ndarray, index: np.ndarray, out: np.ndarray, active: np.ndarray) -> float:
    """out[i] = flat[index[i]] for the active voxels, NaN for the others; returns the
    float64 sum of the active values (NaN or inf if any is, NaN at once for an index
    outside ``flat``)."""
    total = 0.0
    size = flat.size
    for i in range(index.size):
        k = index[i]
        if k < 0 or k >= size:
            return np.nan
        if not active[i]:
            out[i] = np.nan
            continue
        value = flat[k]
        out[i] = value
        total += value
    return total


@numba.njit(cache=True, nogil=True)
def _range_of(block: np.ndarray, active: np.ndarray, lo_hi: np.ndarray) -> None:
    """lo_hi[0] = min(lo_hi[0], active values), lo_hi[1] = max(lo_hi[1], them)."""
    lo, hi = lo_hi[0], lo_hi[1]
    for t in range(block.shape[0]):
        for v in range(block.shape[1]):
            if active[v]:
                x = np.float64(block[t, v])
                if x < lo:
                    lo = x
                if x > hi:
                    hi = x
    lo_hi[0], lo_hi[1] = lo, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _rank_bin(x: np.float32, lo: float, scale: float) -> np.int64:
    # the same float64 arithmetic as numpy's ((x.astype(float64) - lo) * scale).astype(int64)
    return np.int64((np.float64(x) - lo) * scale)


@numba.njit(cache=True, nogil=True)
def _rank_counts(block: np.ndarray, active: np.ndarray, lo: float, scale: float,
                 counts: np.ndarray) -> None:
    """counts[_rank_bin(x)] += 1 for the active values (every one between lo and hi)."""
    for t in range(block.shape[0]):
        for v in range(block.shape[1]):
            if active[v]:
                counts[_rank_bin(block[t, v], lo, scale)] += 1


@numba.njit(cache=True, nogil=True)
def _rank_pick(block: np.ndarray, active: np.ndarray, lo: float, scale: float,
               first: int, last: int, out: np.ndarray, k: int) -> int:
    """Append the active values of bins first..last to ``out`` from ``k``; the new k."""
    for t in range(block.shape[0]):
        for v in range(block.shape[1]):
            if active[v]:
                b = _rank_bin(block[t, v], lo, scale)
                if first <= b <= last:
                    out[k] = block[t, v]
                    k += 1
    return k


# ---- checked wrappers ---------------------------------------------------------------------


def _check(array: np.ndarray, dtype: type, ndim: int, name: str) -> None:
    if array.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def hist_add(values: np.ndarray, lo: float, inv_width: float, counts: np.ndarray,
             active: np.ndarray | None = None, weight: int = 1) -> None:
    """Count ``values`` into the median histogram (see :func:`_hist_add`).

    Parameters
    ----------
    values : (nvox,) float32, finite where active
    lo : float, band start, intensity units
    inv_width : float, 1 / bin width
    counts : (nbins + 2,) int64, updated in place
    active : (nvox,) bool or None (all)
    weight : int, 1 to add, -1 to take values out
    """
    _check(values, np.float32, 1, "values")
    _check(counts, np.int64, 1, "counts")
    if counts.size < 3:
        raise ValueError("counts needs at least one interior bin")
    _hist_add(values, float(lo), float(inv_width), counts,
              _active(active, values.size), int(weight))


def _active(active: np.ndarray | None, size: int) -> np.ndarray:
    if active is None:
        return np.ones(size, np.bool_)
    _check(active, np.bool_, 1, "active")
    if active.size != size:
        raise ValueError(f"active must be ({size},), got {active.shape}")
    return active


def hist_median(counts: np.ndarray, lo: float, width: float) -> float | None:
    """Median of the counted values (interpolated in its bin), or None when a middle
    rank lies outside the band.

    Parameters
    ----------
    counts : (nbins + 2,) int64
    lo, width : float, band start and bin width, intensity units
    """
    _check(counts, np.int64, 1, "counts")
    total = int(counts.sum())
    if total == 0:
        return None
    upper = _hist_rank(total // 2, counts, float(lo), float(width))
    value = upper if total % 2 else 0.5 * (
        _hist_rank(total // 2 - 1, counts, float(lo), float(width)) + upper)
    return None if math.isnan(value) else float(value)


def gather(flat: np.ndarray, index: np.ndarray, out: np.ndarray,
           active: np.ndarray | None = None) -> float:
    """``out[:] = flat[index]`` where ``active`` (NaN elsewhere); returns the sum of the
    active values gathered (float64), NaN when one is NaN or an index falls outside
    ``flat`` (``out`` then incomplete).

    Parameters
    ----------
    flat : (size,) float32, a volume in memory order
    index : (nvox,) int64, positions in ``flat`` (ascending: sequential reads)
    out : (nvox,) float32, written
    active : (nvox,) bool or None (all)
    """
    _check(flat, np.float32, 1, "flat")
    _check(index, np.int64, 1, "index")
    _check(out, np.float32, 1, "out")
    if out.size != index.size:
        raise ValueError("out and index differ in size")
    return float(_gather(flat, index, out, _active(active, index.size)))


def _check_pass(x: np.ndarray, first: np.ndarray, prev: np.ndarray, n: int,
                changed: np.ndarray, out: np.ndarray) -> None:
    for name, row in (("x", x), ("first", first), ("prev", prev)):
        _check(row, np.float32, 1, name)
    _check(changed, np.bool_, 1, "changed")
    _check(out, np.float64, 1, "out")
    if n < 1 or not x.size == first.size == prev.size == changed.size or out.size < 2:
        raise ValueError("x, first, prev, changed and out do not match (nvox,)")


def voxel_pass(x: np.ndarray, first: np.ndarray, prev: np.ndarray, n: int,
               changed: np.ndarray, remove_zero: bool, out: np.ndarray,
               active: np.ndarray | None = None) -> None:
    """Checked wrapper of :func:`_voxel_pass`.

    Parameters
    ----------
    x, first, prev : (nvox,) float32, volumes n - 1, 0 and n - 2 (any at n == 1)
    n : int, volumes so far
    changed : (nvox,) bool, updated
    remove_zero : bool
    out : (2,) float64, written: sum of squared raw differences, voxels kept
    active : (nvox,) bool or None (all), the voxels still in the run's validity mask
    """
    _check_pass(x, first, prev, n, changed, out)
    _voxel_pass(x, first, prev, int(n), changed, bool(remove_zero), out,
                _active(active, x.size))


def sample_pass(x: np.ndarray, first: np.ndarray, prev: np.ndarray, n: int,
                index: np.ndarray, ordered: np.ndarray, starts: np.ndarray, ar: np.ndarray,
                changed: np.ndarray, median: float, scale: float, normalise: bool,
                remove_zero: bool, out: np.ndarray, active: np.ndarray | None = None) -> None:
    """Checked wrapper of :func:`_sample_pass` (call after :func:`voxel_pass`).

    Parameters
    ----------
    x, first, prev, n, changed, remove_zero : as :func:`voxel_pass` (``changed`` read
        only)
    index : (m,) int64, sampled voxels, each in [0, nvox)
    ordered : (m, width) float32, sorted series of the sampled voxels (updated)
    starts : (m,) int64, where each row's sorted values start (updated); rows start
        empty at some c >= n with width >= 2 c
    ar : (m, 3) float64, running sums of the sampled voxels (updated)
    median, scale : float, normalisation ``x / median * scale`` in float32
    normalise : bool
    out : (2,) float64, written: sum of the predicted difference SDs, voxels kept
    active : (nvox,) bool or None (all); an inactive sampled voxel is skipped
    """
    _check_pass(x, first, prev, n, changed, out)
    _check(index, np.int64, 1, "index")
    _check(ordered, np.float32, 2, "ordered")
    _check(starts, np.int64, 1, "starts")
    _check(ar, np.float64, 2, "ar")
    m = index.size
    if ordered.shape[0] != m or starts.shape != (m,) or ar.shape != (m, 3):
        raise ValueError("ordered must be (m, width), starts (m,) and ar (m, 3)")
    if m and not (starts.min() >= 0 and starts.max() + n <= ordered.shape[1]):
        raise ValueError("a sorted row would overflow: ordered needs width >= 2 n")
    if m and not (index.min() >= 0 and index.max() < x.size):
        raise ValueError("index holds voxels outside [0, nvox)")
    _sample_pass(x, first, prev, int(n), index, ordered, starts, ar, changed, float(median),
                 float(scale), bool(normalise), bool(remove_zero), out, _active(active, x.size))


def _rows(block: np.ndarray) -> np.ndarray:
    block = block.reshape(1, -1) if block.ndim == 1 else block
    if block.dtype != np.float32 or block.ndim != 2:
        raise TypeError(f"blocks must be 1-D or 2-D float32, got {block.dtype} {block.shape}")
    return block


def range_of(block: np.ndarray, active: np.ndarray | None, lo_hi: np.ndarray) -> None:
    """Widen ``lo_hi`` ((2,) float64: min, max) to the active values of ``block``
    ((k, nvox) or (nvox,) float32; ``active`` (nvox,) bool or None: all)."""
    rows = _rows(block)
    _range_of(rows, _active(active, rows.shape[1]), lo_hi)


def rank_counts(block: np.ndarray, active: np.ndarray | None, lo: float, scale: float,
                counts: np.ndarray) -> None:
    """Count the active values into bins ``int((x - lo) * scale)`` (float64 arithmetic;
    every value must lie in the range the bins were laid on)."""
    _check(counts, np.int64, 1, "counts")
    rows = _rows(block)
    _rank_counts(rows, _active(active, rows.shape[1]), float(lo), float(scale), counts)


def rank_pick(block: np.ndarray, active: np.ndarray | None, lo: float, scale: float,
              first: int, last: int, out: np.ndarray, k: int) -> int:
    """Copy the active values of bins ``first..last`` (as :func:`rank_counts` bins them)
    into ``out[k:]``; returns the new ``k``. ``out`` must have room for them."""
    _check(out, np.float32, 1, "out")
    rows = _rows(block)
    return _rank_pick(rows, _active(active, rows.shape[1]), float(lo), float(scale),
                      int(first), int(last), out, int(k))


def warm_up() -> None:
    """Compile (or load from cache) the kernels before the first volume arrives."""
    series = np.array([[1.0, 2.0], [2.0, 3.0], [4.0, 3.0]], dtype=np.float32)
    counts = np.zeros(6, np.int64)
    hist_add(series[0], 0.0, 1.0, counts)
    hist_median(counts, 0.0, 1.0)
    changed = np.zeros(2, bool)
    out = np.zeros(2)
    index = np.arange(2, dtype=np.int64)
    ordered = np.zeros((2, 6), np.float32)
    starts = np.full(2, 3, np.int64)
    ar = np.zeros((2, 3))
    gather(series.ravel(), np.array([1, 4], np.int64), np.zeros(2, np.float32))
    both = np.ones(2, np.bool_)
    range_of(series, both, np.array([np.inf, -np.inf]))
    rank_counts(series, both, 1.0, 1.0, np.zeros(4, np.int64))
    rank_pick(series, both, 1.0, 1.0, 1, 2, np.zeros(6, np.float32), 0)
    for n in (1, 2, 3):
        rows = (series[n - 1], series[0], series[max(n - 2, 0)], n)
        voxel_pass(*rows, changed, True, out)
        sample_pass(*rows, index, ordered, starts, ar, changed, 2.0, 1000.0, True, True, out)
