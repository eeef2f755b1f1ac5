"""Numba kernels of the slice-wise spike check and SNR (:mod:`rtsc.pipeline.qc.snr`):
per-slice sums over the head and the air, and the robust test of each slice against
its history; no I/O, no allocation in the loops. The public wrappers check dtype,
shape and contiguity and make flat views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from rtsc.pipeline.motion._kernels import _flat
from rtsc.pipeline.qc._kernels import _middle, _same_layout


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _slice_sums(data: np.ndarray, labels: np.ndarray, slice_of: np.ndarray,
                fg_sum: np.ndarray, fg_n: np.ndarray, bg_sum: np.ndarray, bg_sq: np.ndarray,
                bg_n: np.ndarray, block: int) -> None:
    """Per-slice sums of the foreground (label 1) and background (label 2) voxels.

    ``block`` > 0: the arrays are Fortran-ordered and slice s is the contiguous block
    ``[s * block, (s + 1) * block)`` (``slice_of`` is not read); 0: use ``slice_of``.
    Reassociation is allowed so the sums vectorise (the order of float64 additions
    changes; no NaN or infinity assumptions are made).
    """
    for s in range(fg_sum.size):
        fg_sum[s] = 0.0
        fg_n[s] = 0
        bg_sum[s] = 0.0
        bg_sq[s] = 0.0
        bg_n[s] = 0
    if block > 0:
        for s in range(fg_sum.size):
            f_sum = 0.0
            b_sum = 0.0
            b_sq = 0.0
            f_n = 0
            b_n = 0
            for v in range(s * block, (s + 1) * block):  # branch-free
                label = labels[v]
                y = np.float64(data[v])
                f = np.float64(label == 1)
                b = np.float64(label == 2)
                f_sum += f * y
                f_n += label == 1
                by = b * y
                b_sum += by
                b_sq += by * y
                b_n += label == 2
            fg_sum[s] = f_sum
            fg_n[s] = f_n
            bg_sum[s] = b_sum
            bg_sq[s] = b_sq
            bg_n[s] = b_n
        return
    for v in range(data.size):
        label = labels[v]
        if label == 0:
            continue
        s = slice_of[v]
        y = np.float64(data[v])
        if label == 1:
            fg_sum[s] += y
            fg_n[s] += 1
        else:
            bg_sum[s] += y
            bg_sq[s] += y * y
            bg_n[s] += 1


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _slice_sums_runs(data: np.ndarray, fg_starts: np.ndarray, fg_stops: np.ndarray,
                     fg_bounds: np.ndarray, bg_starts: np.ndarray, bg_stops: np.ndarray,
                     bg_bounds: np.ndarray, fg_sum: np.ndarray, bg_sum: np.ndarray,
                     bg_sq: np.ndarray) -> None:
    """:func:`_slice_sums`' sums over runs of consecutive voxels of each label: slice s's
    foreground runs are ``fg_starts[r]:fg_stops[r]`` for ``fg_bounds[s] <= r <
    fg_bounds[s + 1]``, its background runs likewise. Contiguous runs without a label
    test vectorise (1.3 -> 0.24 ms CPU at 128x128x72); reassociated as there."""
    for s in range(fg_sum.size):
        f_sum = 0.0
        for r in range(fg_bounds[s], fg_bounds[s + 1]):
            run = data[fg_starts[r]:fg_stops[r]]  # a view from 0: the loop vectorises
            for v in range(run.size):
                f_sum += np.float64(run[v])
        b_sum = 0.0
        b_sq = 0.0
        for r in range(bg_bounds[s], bg_bounds[s + 1]):
            run = data[bg_starts[r]:bg_stops[r]]
            for v in range(run.size):
                y = np.float64(run[v])
                b_sum += y
                b_sq += y * y
        fg_sum[s] = f_sum
        bg_sum[s] = b_sum
        bg_sq[s] = b_sq


@numba.njit(cache=True, nogil=True)
def _slice_check(fg_sum: np.ndarray, fg_n: np.ndarray, bg_sum: np.ndarray, bg_sq: np.ndarray,
                 bg_n: np.ndarray, skip: np.ndarray, history: np.ndarray,
                 history_se: np.ndarray, filled: np.ndarray, position: np.ndarray,
                 min_history: int, threshold: float, min_voxels: int, min_relative: float,
                 z: np.ndarray, flagged: np.ndarray, bg_mean: np.ndarray, se: np.ndarray,
                 work: np.ndarray) -> tuple[float, float]:
    """The spike test of one volume from its slice sums (see ``slice_check``)."""
    window, nz = history.shape
    for s in range(nz):
        n = bg_n[s]
        if n >= min_voxels and not skip[s]:
            m = bg_sum[s] / n
            var = max(bg_sq[s] / n - m * m, 0.0)
            bg_mean[s] = m
            se[s] = np.sqrt(var / n)
        else:
            bg_mean[s] = np.nan
            se[s] = np.nan
    # each slice's median over its stored values (rows 0..filled-1 of the ring)
    median = np.empty(nz)
    column = np.empty(window)
    for s in range(nz):
        f = filled[s]
        if f == 0:
            median[s] = np.nan
            continue
        for r in range(f):
            column[r] = history[r, s]
        median[s] = _middle(column[:f], (f - 1) // 2, f // 2)
    # spread pooled over the slices that have enough history
    count = 0
    for s in range(nz):
        if filled[s] < min_history:
            continue
        for r in range(filled[s]):
            d = abs(history[r, s] - median[s]) / history_se[r, s]
            if np.isfinite(d):
                work[count] = d
                count += 1
    scale = 1.4826 * _middle(work[:count], (count - 1) // 2, count // 2) if count else 1.0
    for s in range(nz):
        z[s] = np.nan
        flagged[s] = False
        if filled[s] >= min_history and np.isfinite(bg_mean[s]):
            spread = max(scale * se[s], min_relative * abs(median[s]) + 1e-9)
            z[s] = (bg_mean[s] - median[s]) / spread
            flagged[s] = abs(z[s]) > threshold
    # learn the unflagged slices; SNR over them
    f_sum = 0.0
    f_n = 0
    b_sq = 0.0
    b_n = 0
    for s in range(nz):
        if not np.isfinite(bg_mean[s]) or flagged[s]:
            continue
        history[position[s], s] = bg_mean[s]
        history_se[position[s], s] = se[s]
        position[s] = (position[s] + 1) % window
        filled[s] = min(filled[s] + 1, window)
        f_sum += fg_sum[s]
        f_n += fg_n[s]
        b_sq += bg_sq[s]
        b_n += bg_n[s]
    sigma = np.sqrt(b_sq / (2.0 * b_n)) if b_n else np.nan
    fg_mean = f_sum / f_n if f_n else np.nan
    snr = fg_mean / sigma if sigma > 0 else np.nan
    return sigma, snr


def slice_sums(data: np.ndarray, labels: np.ndarray, slice_of: np.ndarray,
               fg_sum: np.ndarray, fg_n: np.ndarray, bg_sum: np.ndarray, bg_sq: np.ndarray,
               bg_n: np.ndarray) -> None:
    """Per-slice sums over the foreground and the background of one volume.

    Parameters
    ----------
    data : (nx, ny, nz) float32, contiguous
    labels : (nx, ny, nz) uint8, same memory order: 0 ignored, 1 foreground (head),
        2 background (air)
    slice_of : (nx, ny, nz) int32, same memory order: the slice (k) of each voxel
    fg_sum, bg_sum, bg_sq : (nz,) float64, written (intensity, intensity squared)
    fg_n, bg_n : (nz,) int64, written (voxel counts)
    """
    _same_layout(data, labels, "data and labels")
    _same_layout(data, slice_of, "data and slice_of")
    fortran = data.flags.f_contiguous and not data.flags.c_contiguous
    block = data.shape[0] * data.shape[1] if fortran else 0
    _slice_sums(_flat(data, np.float32, "data"), _flat(labels, np.uint8, "labels"),
                _flat(slice_of, np.int32, "slice_of"), fg_sum, fg_n, bg_sum, bg_sq, bg_n, block)


@numba.njit(cache=True, nogil=True)
def _label_runs(labels: np.ndarray, value: int, block: int, starts: np.ndarray,
                stops: np.ndarray, bounds: np.ndarray, counts: np.ndarray) -> int:
    """Runs of the voxels of ``labels`` (flat, Fortran order, slices of ``block``
    voxels) equal to ``value``, slice by slice, runs never crossing a slice; writes them
    when ``starts`` is long enough (else counts only) and returns how many."""
    nz = labels.size // block
    r = 0
    write = starts.size > 0
    bounds[0] = 0
    for z in range(nz):
        base = z * block
        inside = False
        count = 0
        for p in range(block):
            hit = labels[base + p] == value
            if hit:
                count += 1
                if not inside:
                    if write:
                        starts[r] = base + p
                    inside = True
            elif inside:
                if write:
                    stops[r] = base + p
                r += 1
                inside = False
        if inside:
            if write:
                stops[r] = base + block
            r += 1
        bounds[z + 1] = r
        counts[z] = count
    return r


@numba.njit(cache=True, nogil=True)
def _background_labels(first: np.ndarray, head: np.ndarray, threshold: np.float32,
                       labels: np.ndarray) -> None:
    """``labels`` 2 where not ``head``, then 1 where ``first > threshold`` (a float32
    comparison, as NumPy's with a Python float), 0 elsewhere; 3-D arrays, any layouts,
    walked in Fortran order."""
    nx, ny, nz = first.shape
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                if first[i, j, k] > threshold:
                    labels[i, j, k] = 1
                elif head[i, j, k]:
                    labels[i, j, k] = 0
                else:
                    labels[i, j, k] = 2


def background_labels_of(first: np.ndarray, head: np.ndarray, threshold: float,
                         labels: np.ndarray) -> None:
    """Fill ``labels`` ((nx, ny, nz) uint8) with 1 where ``first > threshold``, else 2
    outside ``head`` ((nx, ny, nz) bool), else 0: what ``labels[~head] = 2;
    labels[first > threshold] = 1`` on zeros gives, in one pass without the whole-volume
    bool temporaries (``first`` float32: ``threshold`` is compared as float32, NumPy's
    rule for a Python float against a float32 array)."""
    if first.dtype != np.float32 or head.dtype != np.bool_ or labels.dtype != np.uint8:
        raise TypeError("first must be float32, head bool and labels uint8")
    if not (first.shape == head.shape == labels.shape) or first.ndim != 3:
        raise ValueError("first, head and labels must share one 3-D shape")
    _background_labels(first, head, np.float32(threshold), labels)


@dataclass(frozen=True)
class LabelRuns:
    """The voxels of one label as runs of consecutive voxels, slice by slice, of a
    Fortran-ordered (nx, ny, nz) volume: slice s holds runs ``bounds[s] <= r <
    bounds[s + 1]``, run r the flat voxels ``starts[r]:stops[r]``; ``counts[s]`` voxels.
    """

    starts: np.ndarray
    stops: np.ndarray
    bounds: np.ndarray
    counts: np.ndarray

    @staticmethod
    def of(selected: np.ndarray) -> "LabelRuns":
        """Runs of the True voxels of ``selected`` ((nx, ny, nz) bool, Fortran order)."""
        nx, ny, nz = selected.shape
        by_slice = np.asarray(selected, dtype=bool).reshape(nx * ny, nz, order="F").T
        edges = np.diff(np.pad(by_slice.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        slice_a, start = np.nonzero(edges == 1)  # row-major: by slice, then position
        _, stop = np.nonzero(edges == -1)
        offset = slice_a.astype(np.int64) * (nx * ny)
        counts = by_slice.sum(axis=1).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(slice_a, minlength=nz))])
        return LabelRuns(start + offset, stop + offset, bounds.astype(np.int64), counts)

    @staticmethod
    def of_label(labels: np.ndarray, value: int) -> "LabelRuns":
        """``LabelRuns.of(labels == value)`` from a kernel ((nx, ny, nz) uint8, Fortran
        order): the same arrays without the whole-volume diff, pad and nonzero."""
        if labels.dtype != np.uint8 or labels.ndim != 3 or not labels.flags.f_contiguous:
            raise ValueError("labels must be a Fortran-ordered (nx, ny, nz) uint8 array")
        nx, ny, nz = labels.shape
        flat = labels.ravel(order="F")
        block = nx * ny
        bounds = np.zeros(nz + 1, dtype=np.int64)
        counts = np.zeros(nz, dtype=np.int64)
        if block == 0 or nz == 0:
            empty = np.zeros(0, dtype=np.int64)
            return LabelRuns(empty, empty.copy(), bounds, counts)
        empty = np.zeros(0, dtype=np.int64)
        n = _label_runs(flat, value, block, empty, empty, bounds, counts)
        starts, stops = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        _label_runs(flat, value, block, starts, stops, bounds, counts)
        return LabelRuns(starts, stops, bounds, counts)


def slice_sums_runs(data: np.ndarray, fg: LabelRuns, bg: LabelRuns, fg_sum: np.ndarray,
                    fg_n: np.ndarray, bg_sum: np.ndarray, bg_sq: np.ndarray,
                    bg_n: np.ndarray) -> None:
    """:func:`slice_sums` over a Fortran-ordered volume whose labels are given as runs:
    ``fg`` the foreground's (label 1), ``bg`` the background's (label 2)."""
    nz = fg_sum.size
    if data.dtype != np.float32 or data.ndim != 3 or not data.flags.f_contiguous \
            or data.shape[2] != nz:
        raise ValueError(f"data must be a Fortran-ordered float32 volume of {nz} slices")
    for runs in (fg, bg):
        if runs.bounds.shape != (nz + 1,) or (runs.stops.size
                                              and runs.stops.max() > data.size):
            raise ValueError("runs do not fit the volume")
    _slice_sums_runs(data.ravel(order="F"), fg.starts, fg.stops, fg.bounds, bg.starts,
                     bg.stops, bg.bounds, fg_sum, bg_sum, bg_sq)
    fg_n[:] = fg.counts
    bg_n[:] = bg.counts


def slice_check(fg_sum: np.ndarray, fg_n: np.ndarray, bg_sum: np.ndarray, bg_sq: np.ndarray,
                bg_n: np.ndarray, skip: np.ndarray, history: np.ndarray,
                history_se: np.ndarray, filled: np.ndarray, position: np.ndarray,
                min_history: int, threshold: float, min_voxels: int, min_relative: float,
                z: np.ndarray, flagged: np.ndarray, bg_mean: np.ndarray, se: np.ndarray,
                work: np.ndarray) -> tuple[float, float]:
    """Test each slice's air mean against its own history; learn the unflagged ones.

    For slice s with at least ``min_voxels`` air voxels and not in ``skip``: its mean
    ``x`` and standard error ``se = sqrt(var / n)``; with at least ``min_history``
    stored values, ``z = (x - median(history)) / max(c * se, min_relative * |median| +
    1e-9)``, ``c`` = 1.4826 x the median of ``|history - median| / history_se`` over
    all slices with enough history; ``|z| > threshold`` flags it. Unflagged slices go
    into their ring buffers (``history``, ``history_se``, ``position``, ``filled``).

    Parameters
    ----------
    fg_sum, fg_n, bg_sum, bg_sq, bg_n : (nz,) the sums of :func:`slice_sums`
    skip : (nz,) bool, slices not to test or learn (missing, zero-filled)
    history, history_se : (window, nz) float64, updated
    filled, position : (nz,) int64, updated
    z, bg_mean, se : (nz,) float64, written (NaN: not tested / no air)
    flagged : (nz,) bool, written
    work : (window * nz,) float64, work space

    Returns
    -------
    noise_sigma : float, sqrt(sum M^2 / (2 n)) over the air of the unflagged slices
    snr : float, head mean / noise_sigma over the same slices
    """
    nz = history.shape[1]
    for name, arr in (("skip", skip), ("z", z), ("flagged", flagged), ("bg_mean", bg_mean),
                      ("se", se), ("filled", filled), ("position", position)):
        if arr.shape != (nz,):
            raise ValueError(f"{name} must have shape ({nz},)")
    if work.size < history.size or history_se.shape != history.shape:
        raise ValueError("work must hold window * nz values; history_se as history")
    sigma, snr = _slice_check(fg_sum, fg_n, bg_sum, bg_sq, bg_n, skip, history, history_se,
                              filled, position, int(min_history), float(threshold),
                              int(min_voxels), float(min_relative), z, flagged, bg_mean, se,
                              work)
    return float(sigma), float(snr)


def warm_up() -> None:
    """Compile (or load from cache) the slice kernels before the first volume arrives."""
    probe = np.ones((2, 2, 2), dtype=np.float32, order="F")
    nz = probe.shape[2]
    slice_sums(probe, np.ones(probe.shape, dtype=np.uint8, order="F"),
               np.zeros(probe.shape, dtype=np.int32, order="F"), np.zeros(nz),
               np.zeros(nz, dtype=np.int64), np.zeros(nz), np.zeros(nz),
               np.zeros(nz, dtype=np.int64))
    f64, i64 = (lambda: np.zeros(nz)), (lambda: np.zeros(nz, dtype=np.int64))  # noqa: E731
    runs = LabelRuns.of(np.ones(probe.shape, dtype=bool, order="F"))
    LabelRuns.of_label(np.ones(probe.shape, dtype=np.uint8, order="F"), 1)
    for first in (probe, np.ascontiguousarray(probe)):
        for head_order in "FC":  # the head mask comes C-ordered from binary_dilation
            background_labels_of(first, np.ones(probe.shape, dtype=bool, order=head_order),
                                 0.5, np.zeros(probe.shape, dtype=np.uint8, order="F"
                                               if first is probe else "C"))
    slice_sums_runs(probe, runs, runs, f64(), i64(), f64(), f64(), i64())
    slice_check(f64(), i64(), f64(), f64(), i64(), np.zeros(nz, dtype=bool),
                np.full((3, nz), np.nan), np.full((3, nz), np.nan), i64(), i64(), 2, 6.0, 1,
                1e-3, f64(), np.zeros(nz, dtype=bool), f64(), f64(), np.zeros(3 * nz))
