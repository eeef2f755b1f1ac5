"""Quality-control maths: running tSNR, slice-wise spikes and SNR against the background.

Step functions over explicit dataclass states (tests call them directly); the stages
that hold them are in :mod:`rtsc.pipeline.qc.stages`.

- **tSNR** (:func:`tsnr_init`, :func:`tsnr_step`): per voxel, Welford's running mean
  and sum of squared deviations, plus the co-moment with the volume index, so that both
  the plain tSNR (mean / SD, n - 1 degrees of freedom) and the linearly detrended tSNR
  (mean / SD of the residual of a least-squares line in time, n - 2) are exact after
  every volume, without keeping the series. The live figure is the median over the
  automatic mask; per slice, the median over the mask voxels of each slice.
- **Spikes** (:func:`slice_qc_init`, :func:`slice_qc_step`): a k-space spike puts a
  grating over a whole slice, which raises the mean of its air (background) voxels.
  Each slice's background mean is compared with its own history: the deviation from
  the median of its last ``window`` unflagged values, in units of its standard error
  within the volume (background SD / sqrt(voxels)), scaled by a factor learned from
  all slices' histories together (1.4826 x the median absolute normalised deviation,
  which absorbs the spatial correlation of real noise). A robust z above
  ``threshold`` flags the slice. Pooling the spread over slices matters: a MAD from
  8-30 values of one slice is so unstable that a z of 6 is exceeded by 0.01-1% of
  clean slices, i.e. in up to a third of clean volumes. Judging each slice against its
  own median copes with slices whose intensity differs (cord slices differ by up to
  35%); the head's own motion does not move the air region.
- **SNR**: mean intensity in the head mask over the background noise SD, the latter
  from the Rayleigh-distributed magnitude of pure-noise voxels:
  ``sigma = sqrt(mean(M^2) / 2)`` (magnitude images; DICOM BOLD is magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rtsc.pipeline._mask_kernels import binary_dilation, percentile
from rtsc.pipeline.stages import positions_in
from rtsc.pipeline.qc._kernels import (
    BAND_MAX,
    index_runs,
    segment_medians,
    tsnr_full_maps,
    tsnr_in_mask,
    welford_trend_between,
    welford_trend_tsnr,
    welford_trend_update,
)
from rtsc.pipeline.qc._slice_kernels import (
    LabelRuns,
    background_labels_of,
    slice_check,
    slice_sums,
    slice_sums_runs,
)

#: A slice's robust spread is at least this fraction of its median (quantised or
#: zeroed backgrounds have a MAD of 0).
_MIN_RELATIVE_SPREAD = 1e-3
#: Fewer background voxels than this in a slice: no spike test for it.
_MIN_BACKGROUND_VOXELS = 20
#: Mask voxels leaving the run's validity at once, as a fraction of them, up to which
#: the tSNR medians keep their search bands (see :func:`tsnr_restrict`).
_FEW_LEFT = 0.01
#: Head fraction of the 98th percentile used to find the air (below the tSNR mask's).
HEAD_FRACTION = 0.05


# ---- tSNR -------------------------------------------------------------------------------

@dataclass
class TsnrState:
    """Running per-voxel statistics of a series.

    Attributes
    ----------
    mean, m2, cxy : (nx, ny, nz) float64, memory order of the first volume
        Mean, sum of squared deviations, co-moment with the time axis (volumes).
    indices : (m,) int64
        Flat indices (memory order) of the mask voxels, grouped by slice (so increasing
        in Fortran order, where slices are contiguous blocks: see ``increasing``).
    bounds : (nz + 1,) int64
        Slice k's voxels are ``indices[bounds[k]:bounds[k + 1]]``.
    n : int, volumes so far
    mean_t, m2t : float, running mean and M2 of the time axis (volume index)
    """

    mean: np.ndarray
    m2: np.ndarray
    cxy: np.ndarray
    indices: np.ndarray
    bounds: np.ndarray
    n: int = 0
    mean_t: float = 0.0
    m2t: float = 0.0
    plain: np.ndarray = field(default_factory=lambda: np.zeros(0))
    detrended: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scratch: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slice_medians: np.ndarray = field(default_factory=lambda: np.zeros(0))
    median: float = float("nan")
    #: relative half-widths of the bands searched for the medians (per slice, then all)
    bands: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: ``indices`` as runs of consecutive voxels (:func:`index_runs`) when they increase
    #: (Fortran order): then the tSNR is taken in the Welford pass; else None
    runs: tuple[np.ndarray, np.ndarray] | None = None
    #: The last volume's Welford step of the voxels outside the mask, not run yet
    #: (:func:`tsnr_step` with ``defer_outside``): (data, n, dx), or None
    pending: tuple[np.ndarray, int, float] | None = None


@dataclass(frozen=True)
class TsnrValues:
    """tSNR figures after one volume (NaN before two volumes).

    Attributes
    ----------
    median : float, median voxel tSNR in the mask
    slices : (nz,) float64, median voxel tSNR of the mask voxels of each slice
    """

    median: float
    slices: np.ndarray


def tsnr_init(first: np.ndarray, mask: np.ndarray) -> TsnrState:
    """State for a series; ``mask`` (nx, ny, nz) bool selects the summary voxels."""
    order = "F" if first.flags.f_contiguous and not first.flags.c_contiguous else "C"
    flat_mask = np.asarray(mask, dtype=bool).ravel(order=order)
    flat = np.flatnonzero(flat_mask).astype(np.int64)
    nx, ny, nz = first.shape
    slice_of = flat // (nx * ny) if order == "F" else flat % nz  # third axis of each voxel
    sort = np.lexsort((flat, slice_of))
    indices = flat[sort]
    counts = np.bincount(slice_of, minlength=nz)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    zeros = lambda: np.zeros(first.shape, dtype=np.float64, order=order)  # noqa: E731
    m = indices.size
    return TsnrState(mean=zeros(), m2=zeros(), cxy=zeros(), indices=indices, bounds=bounds,
                     plain=np.zeros(m), detrended=np.zeros(m), scratch=np.zeros(max(m, 1)),
                     slice_medians=np.full(nz, np.nan), bands=np.full(nz + 1, BAND_MAX),
                     runs=_runs_or_none(indices))


def _runs_or_none(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``indices`` as runs (:func:`index_runs`), or None when they do not increase."""
    try:
        return index_runs(indices)
    except ValueError:
        return None


def tsnr_restrict(state: TsnrState, valid: np.ndarray, left: np.ndarray | None = None) -> int:
    """Leave the mask voxels outside ``valid`` ((nx, ny, nz) bool, the run's validity
    mask) out of the tSNR figures from now on; returns how many left.

    Each voxel's running statistics are its own, so the remaining voxels' tSNR is
    exactly that of their whole series; a voxel that left holds NaN (it was fed NaN)
    and is no longer in ``indices``. ``left`` (:func:`~rtsc.pipeline.stages.coverage_left`:
    the voxels that left since the validity mask applied last, Fortran-order flat
    indices) spares the look at every mask voxel of the Fortran-ordered state.
    """
    tsnr_catch_up(state)  # the pending step is by the runs of the mask before this
    order = "F" if state.mean.flags.f_contiguous and not state.mean.flags.c_contiguous else "C"
    nx, ny, nz = state.mean.shape
    m_before = state.indices.size
    if left is not None and order == "F" and state.runs is not None:  # indices increase
        gone = positions_in(state.indices, left)
        if gone.size == 0:
            return 0
        # A few voxels at the grid's edge, most of the time: the state is edited, not
        # rebuilt (the runs split where a voxel left, the slices' bounds move down).
        removed = state.indices[gone]
        state.indices = np.delete(state.indices, gone)
        state.bounds = state.bounds.copy()
        state.bounds[1:] -= np.cumsum(np.bincount(removed // (nx * ny), minlength=nz))
        state.runs = _runs_without(state.runs, removed)
        n_gone = int(gone.size)
    else:
        keep = np.asarray(valid, dtype=bool).ravel(order=order)[state.indices]
        n_gone = int(keep.size - np.count_nonzero(keep))
        if n_gone == 0:
            return 0
        state.indices = state.indices[keep]  # still grouped by slice
        slice_of = state.indices // (nx * ny) if order == "F" else state.indices % nz
        counts = np.bincount(slice_of, minlength=nz)
        state.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        state.runs = _runs_or_none(state.indices)
    m = state.indices.size  # fewer: the work buffers shrink to views
    state.plain, state.detrended = state.plain[:m], state.detrended[:m]
    state.scratch = state.scratch[:max(m, 1)]
    # The last medians stay as guesses (they only speed the exact selection up); beyond
    # a few edge voxels they are searched in the widest band again.
    if n_gone > _FEW_LEFT * m_before:
        state.bands[:] = BAND_MAX
    return n_gone


def _runs_without(runs: tuple[np.ndarray, np.ndarray],
                  removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``runs`` (:func:`index_runs`) without the flat indices ``removed`` (unique, each
    inside a run): a run ``[a, b)`` losing ``v`` becomes ``[a, v)`` and ``[v + 1, b)``,
    i.e. ``v`` joins the stops and ``v + 1`` the starts; empty runs are dropped."""
    starts = np.sort(np.concatenate([runs[0], removed + 1]))
    stops = np.sort(np.concatenate([runs[1], removed]))
    nonempty = starts < stops
    return starts[nonempty], stops[nonempty]


def tsnr_step(state: TsnrState, data: np.ndarray, t: float,
              defer_outside: bool = False) -> TsnrValues:
    """Add one volume acquired at time ``t`` (its index: missing volumes keep their
    place on the time axis) and return the tSNR figures.

    Parameters
    ----------
    state : TsnrState
    data : (nx, ny, nz) float32, same memory order as the first volume; with
        ``defer_outside``, kept (not copied) and not to be changed until
        :func:`tsnr_catch_up`
    t : float, volume index (or seconds)
    defer_outside : bool
        Update only the mask voxels' statistics now (the figures need no others) and
        leave the rest of the grid, which only the maps read, for
        :func:`tsnr_catch_up`: at 128x128x72 the mask is about a third of the grid.
        Every function here that reads the other voxels catches up first, so the
        statistics are always those of whole passes.
    """
    tsnr_catch_up(state)
    state.n += 1
    dx = t - state.mean_t
    state.mean_t += dx / state.n
    state.m2t += dx * (t - state.mean_t)
    if state.n < 2 or state.indices.size == 0:
        welford_trend_update(data, state.mean, state.m2, state.cxy, state.n, dx)
        nz = state.bounds.size - 1
        return TsnrValues(float("nan"), np.full(nz, np.nan))
    if state.runs is not None:  # one pass: the statistics and the mask voxels' tSNR
        welford_trend_tsnr(data, state.mean, state.m2, state.cxy, state.n, dx, state.runs,
                           state.plain, between=not defer_outside)
        if defer_outside:
            state.pending = (data, state.n, dx)
    else:
        welford_trend_update(data, state.mean, state.m2, state.cxy, state.n, dx)
        tsnr_in_mask(state.mean, state.m2, state.cxy, state.indices, state.n, state.m2t,
                     state.plain, state.detrended, detrended=False)
    # the previous medians (in state) are the guesses that speed up the exact selection
    state.median = segment_medians(state.plain, state.bounds, state.scratch,
                                   state.slice_medians, state.median, state.bands)
    return TsnrValues(state.median, state.slice_medians.copy())


def tsnr_catch_up(state: TsnrState) -> None:
    """Run the Welford step of the voxels outside the mask that :func:`tsnr_step` left
    (``defer_outside``); nothing when none is pending."""
    if state.pending is None:
        return
    data, n, dx = state.pending
    state.pending = None
    assert state.runs is not None  # set only when the step went by runs
    welford_trend_between(data, state.mean, state.m2, state.cxy, n, dx, state.runs)


def tsnr_detrended_median(state: TsnrState) -> float:
    """Median over the mask of the linearly detrended tSNR (NaN before three volumes)."""
    if state.n < 3 or state.indices.size == 0:
        return float("nan")
    tsnr_in_mask(state.mean, state.m2, state.cxy, state.indices, state.n, state.m2t,
                 state.plain, state.detrended, detrended=True)
    return segment_medians(state.detrended, state.bounds[[0, -1]], state.scratch,
                           np.full(1, np.nan))


def tsnr_maps(state: TsnrState) -> tuple[np.ndarray, np.ndarray]:
    """Full-grid tSNR and detrended tSNR maps, (nx, ny, nz) float32 (0 where undefined)."""
    tsnr_catch_up(state)
    return tsnr_full_maps(state.mean, state.m2, state.cxy, state.n, state.m2t)


# ---- slice-wise spikes and SNR ------------------------------------------------------------

@dataclass
class SliceQcState:
    """Per-series state of the slice checks.

    Attributes
    ----------
    labels : (nx, ny, nz) uint8, 1 head mask (tSNR/SNR), 2 air, 0 neither
    slice_of : (nx, ny, nz) int32 or None, slice index of each voxel (made when first
        needed: the runs serve Fortran-ordered volumes without it)
    history : (window, nz) float64, last unflagged background means per slice (NaN empty)
    history_se : (window, nz) float64, their standard errors within their volumes
    filled : (nz,) int64, values stored per slice (saturates at ``window``)
    position : (nz,) int64, next write row per slice
    """

    labels: np.ndarray
    slice_of: np.ndarray | None
    history: np.ndarray
    history_se: np.ndarray
    filled: np.ndarray
    position: np.ndarray
    fg_sum: np.ndarray
    fg_n: np.ndarray
    bg_sum: np.ndarray
    bg_sq: np.ndarray
    bg_n: np.ndarray
    work: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: the labels 1 and 2 as runs of voxels (Fortran-ordered volumes), else None
    runs: tuple[LabelRuns, LabelRuns] | None = None


@dataclass(frozen=True)
class SliceQcValues:
    """Slice checks of one volume.

    Attributes
    ----------
    spikes : list of int, slices flagged
    z : (nz,) float64, robust z of each slice's background mean (NaN: not tested)
    background_mean : (nz,) float64, intensity units (NaN: no air in the slice)
    background_se : (nz,) float64, its standard error within the volume
    noise_sigma : float, background noise SD (Rayleigh), intensity units
    snr : float, head-mask mean / noise_sigma (NaN without air)
    """

    spikes: list[int]
    z: np.ndarray
    background_mean: np.ndarray
    background_se: np.ndarray
    noise_sigma: float
    snr: float


def background_labels(first: np.ndarray, mask_fraction: float, dilate_vox: int) -> np.ndarray:
    """Label volume: 1 in the automatic mask (``mask_fraction`` of the 98th percentile),
    2 in the air (outside the head, found at :data:`HEAD_FRACTION` and dilated by
    ``dilate_vox`` voxels), 0 elsewhere; (nx, ny, nz) uint8 in ``first``'s memory order."""
    p98 = percentile(first, 98)
    head = first > HEAD_FRACTION * p98
    if dilate_vox > 0:
        head = binary_dilation(head, dilate_vox)
    order = "F" if first.flags.f_contiguous and not first.flags.c_contiguous else "C"
    if first.dtype == np.float32:  # one pass, no whole-volume bool temporaries
        labels = np.empty(first.shape, dtype=np.uint8, order=order)
        background_labels_of(first, head, mask_fraction * p98, labels)
        return labels
    labels = np.zeros(first.shape, dtype=np.uint8, order=order)
    labels[~head] = 2
    labels[first > mask_fraction * p98] = 1
    return labels


def _slice_index(labels: np.ndarray) -> np.ndarray:
    """(nx, ny, nz) int32 in ``labels``' memory order: the slice (k) of each voxel."""
    nz = labels.shape[2]
    slice_of = np.empty(labels.shape, dtype=np.int32, order="F" if labels.flags.f_contiguous
                        and not labels.flags.c_contiguous else "C")
    slice_of[...] = np.arange(nz, dtype=np.int32)[None, None, :]
    return slice_of


def slice_qc_init(first: np.ndarray, mask_fraction: float, dilate_vox: int,
                  window: int) -> SliceQcState:
    """State for a series whose first (acquired) volume is ``first``."""
    labels = background_labels(first, mask_fraction, dilate_vox)
    nz = first.shape[2]
    runs = (LabelRuns.of_label(labels, 1), LabelRuns.of_label(labels, 2)) \
        if labels.flags.f_contiguous else None
    # the slice index volume serves only the general path (slice_qc_step): not made
    # while the runs serve (a 4.7 MB int32 volume at 128x128x72 spared)
    slice_of = _slice_index(labels) if runs is None else None
    zeros = lambda dtype=np.float64: np.zeros(nz, dtype=dtype)  # noqa: E731
    return SliceQcState(labels=labels, slice_of=slice_of,
                        history=np.full((window, nz), np.nan),
                        history_se=np.full((window, nz), np.nan), filled=zeros(np.int64),
                        position=zeros(np.int64), fg_sum=zeros(), fg_n=zeros(np.int64),
                        bg_sum=zeros(), bg_sq=zeros(), bg_n=zeros(np.int64),
                        work=np.zeros(window * nz), runs=runs)


def slice_qc_step(state: SliceQcState, data: np.ndarray, threshold: float, min_history: int,
                  skip: tuple[int, ...] = ()) -> SliceQcValues:
    """Check one acquired volume's slices; add the unflagged ones to their histories.

    Parameters
    ----------
    state : SliceQcState
    data : (nx, ny, nz) float32, same memory order as the first volume (not resliced)
    threshold : float, |robust z| above it flags a slice as a spike
    min_history : int, values a slice needs before it is tested
    skip : slice indices not to test or learn from (missing, zero-filled slices)
    """
    if state.runs is not None and data.flags.f_contiguous:
        slice_sums_runs(data, *state.runs, state.fg_sum, state.fg_n, state.bg_sum,
                        state.bg_sq, state.bg_n)
    else:
        if state.slice_of is None:
            state.slice_of = _slice_index(state.labels)
        slice_sums(data, state.labels, state.slice_of, state.fg_sum, state.fg_n,
                   state.bg_sum, state.bg_sq, state.bg_n)
    nz = state.fg_sum.size
    skip_mask = np.zeros(nz, dtype=bool)
    skip_mask[list(skip)] = True
    z, bg_mean, se = np.empty(nz), np.empty(nz), np.empty(nz)
    flagged = np.zeros(nz, dtype=bool)
    sigma, snr = slice_check(state.fg_sum, state.fg_n, state.bg_sum, state.bg_sq, state.bg_n,
                             skip_mask, state.history, state.history_se, state.filled,
                             state.position, min_history, threshold, _MIN_BACKGROUND_VOXELS,
                             _MIN_RELATIVE_SPREAD, z, flagged, bg_mean, se, state.work)
    return SliceQcValues(spikes=[int(k) for k in np.flatnonzero(flagged)], z=z,
                         background_mean=bg_mean, background_se=se, noise_sigma=sigma, snr=snr)
