"""DVARS online: after each volume, the value :func:`~rtsc.pipeline.qc.dvars.dvars_offline`
(Nipype's, as fMRIPrep runs it; definitions in :mod:`rtsc.pipeline.qc.dvars`) gives for
the last volume of the run truncated there, and the whole run's exact values at its end.

Steps 1-3 use whole-run statistics, so the value for volume ``t`` depends on the
volumes after it. :func:`dvars_step` estimates, after each volume, the value
:func:`dvars_offline` gives for the *last* volume of the run truncated at that volume;
:func:`dvars_finalize` (or :meth:`DvarsTracker.final`) recomputes the whole run's values
exactly at the end, from the masked series the state keeps. Online, per volume:

* the squared differences are exact, over every voxel kept (see below for "kept");
* the median is a histogram estimate: 16384 bins over the 20-80 % quantile band of the
  first volume, linear interpolation inside the bin holding the middle rank (the band
  is moved to the latest volume and refilled from the stored series if the median
  ever leaves it: one slower volume). ``dvars`` inherits its relative error, measured
  below 1e-5 (57 950-voxel, 300-volume simulated run: 7e-6 at most, 2e-7 typically;
  3543 voxels x 40 volumes: 1.1e-5 at most). ``std_dvars`` does not depend on the
  median;
* the robust SDs need each voxel's whole sorted series, so ``mean(diff_sdhat)`` is
  taken over an evenly spaced sample of ``sample_voxels`` voxels (4096 by default)
  whose series are kept sorted by insertion, which makes their percentiles exact, and
  whose AR(1) comes exactly from running sums of ``y = x - x_0``, ``y**2`` and
  ``y_t y_{t-1}`` (:func:`_ar1_from_sums` gives the algebra). When the mask has no
  more voxels than the sample, ``std_dvars`` is exact (1.5e-7 on the tests' run);
  with 4096 of 57 950 voxels its relative error over the run above was 0.12 %
  typically, 0.6 % at the 95th percentile and 1.2 % at worst.

Cost: 0.5-0.9 ms per volume (median; 1 ms at the 95th percentile) for 57 950 voxels
through :meth:`DvarsTracker.update` on the 2-vCPU test VM, the sampled percentiles
running on numba's threads; :func:`dvars_finalize` then takes ~0.7 s for 300 volumes
(0.1 s of it the exact median).

Voxels that leave the run (the run's validity mask, :class:`rtsc.volume.Coverage`: a
motion-corrected sample fell outside the acquired grid) leave every statistic:
:func:`dvars_restrict` marks them inactive, takes their values of every volume so far
out of the median histogram, and from then on the passes skip them (their robust SD
and AR(1) no longer enter ``mean(diff_sdhat)``, their differences no longer enter
``dvars``); :func:`dvars_finalize` uses the active voxels only. Since a voxel never
comes back, the values after volume ``t`` are those of :func:`dvars_offline` on the
voxels still active then (exactly as above: same estimates, same tolerances), and the
final values those of the voxels valid over the whole run.

Memory: the state keeps the masked series, ``4 * nvox`` bytes per volume (70 MB for
60 000 voxels x 300 volumes; reserved for ``n_expected`` volumes, at most 512, then by
blocks of 32, and mapped as each row is written: touching the reservation at the first
volume took 100-400 ms at 128x128x72, which the next volumes queued behind) up to
``memory_mb``; the rows of later volumes are appended to an unlinked
temporary file instead (memory stops growing with the series; the final values read
them back by blocks of voxels, and the median over everything in three passes,
:func:`exact_median`), plus the sample's sorted series, ``8 * sample_voxels * capacity``
bytes (room to insert on both sides; 4 MB at first, doubled when full: 17 MB from
volume 256 on), and a 130 kB histogram. With ``n_expected`` known, the sorted series'
buffer for it (at most 512 volumes: 17 MB) is allocated and mapped at the start and the
doublings move the rows inside it, and the reserved series rows are mapped ahead of use,
1 MB per volume: memory stops growing once those are resident (a 1000-volume soak grew
by every doubling's new buffer, the old one left as fragmentation, and by each lazily
mapped row), not at the series' end.
:func:`dvars_offline` needs about four times the series again while it runs;
:func:`dvars_finalize` works by blocks of 4096 voxels and 64 volumes instead.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from rtsc.pipeline.qc import _dvars_kernels as kernels
from rtsc.pipeline.stages import positions_in
from rtsc.pipeline.qc.dvars import (
    INTENSITY_NORMALIZATION,
    VARIANCE_TOL,
    dvars_by_chunks,
    exact_median,
)

log = logging.getLogger(__name__)

#: Voxels whose percentiles the online estimator tracks exactly.
SAMPLE_VOXELS = 4096

_BLOCK_VOLUMES = 32  # online series storage grows by this many volumes
# Volumes the sample's sorted series hold before their first doubling. Small, whatever
# the run's length: each volume inserts into every one of the 4096 rows, and rows 4 kB
# apart (512) cost twice the time of rows 1 kB apart (128): 0.9-1.6 ms against 0.4-0.55 ms
# per volume at 64x64x36 over the first 120 volumes. The doublings (at volumes 128 and
# 256: one copy of 4 and 8 MB, a few ms once) are cheaper than that by volume 10.
_SORTED_CAPACITY = 128
# Most volumes allocated up front from the header's run length: buffers grow with what
# arrives, not with what a header announces (NumberOfTemporalPositions 20000 made
# 780 MB at the first volume; 2**31 - 1, a MemoryError). A 17-minute run at TR 2 s;
# longer runs pay a block allocation every 32 volumes past it, as runs without a known
# length always did.
_PREALLOCATED_VOLUMES = 512
_NBINS = 16384       # interior bins of the median histogram
_BAND = (0.2, 0.8)   # its band: these quantiles of the first volume

@dataclass
class DvarsState:
    """Running state of the online DVARS for one series.

    Attributes
    ----------
    nvox : int
    intensity_normalization, remove_zerovariance, variance_tol
        As :func:`dvars_offline`.
    rows : list of (nvox,) float32
        The masked values of the first volumes, one row per volume (views into blocks
        of volumes allocated as needed: no copy when the run grows), up to
        ``memory_rows`` of them.
    memory_rows : int
        Rows kept in memory; the rows of later volumes are appended to ``spill``, an
        unlinked temporary file, so memory stops growing with the series.
    spill : file or None; n_spilled : int
    ring : list of two (nvox,) float32
        The last two spilled rows (the online pass needs the previous volume's).
    changed : (nvox,) bool
        Voxels whose value ever differed from their first.
    active : (nvox,) bool
        Voxels still in the run's validity mask (:func:`dvars_restrict`); the stored
        rows hold NaN for a voxel from the volume it became inactive.
    sample : (m,) int64
        Voxels whose percentiles and AR(1) are tracked exactly (evenly spaced in mask
        order).
    ordered : (m, 2 capacity + 16) float32; starts : (m,) int64
        Sorted series of the sampled voxels, ``ordered[i, starts[i]:starts[i] + n]``
        (room on both sides: an insertion moves the shorter side).
    ar : (m, 3) float64
        Running sums of ``y``, ``y**2`` and ``y_t y_{t-1}`` (``y = x - x_0``), sampled
        voxels.
    counts : (nbins + 2,) int64
        Median histogram of every value seen: below the band, interior bins, above.
    band_lo, band_width : float
        Median histogram band start and bin width, intensity units.
    median : float
        Current median of every value seen (NaN without normalisation).
    rebuilds : int
        Times the median left the band and the histogram was rebuilt.
    """

    nvox: int
    intensity_normalization: float
    remove_zerovariance: bool
    variance_tol: float
    changed: np.ndarray
    active: np.ndarray
    sample: np.ndarray
    ordered: np.ndarray
    starts: np.ndarray
    ar: np.ndarray
    counts: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)
    memory_rows: int = 1 << 62
    spill: BinaryIO | None = None
    n_spilled: int = 0
    ring: list[np.ndarray] = field(default_factory=list)
    band_lo: float = 0.0
    band_width: float = 1.0
    median: float = np.nan
    rebuilds: int = 0
    _spare: list[np.ndarray] = field(default_factory=list)
    # Rows at the head of _spare already mapped (touched ahead of use, see _reserve).
    _spare_mapped: int = 0
    # Flat buffer the sorted series are views of, sized for the run's expected length
    # (None: each doubling allocates a new buffer).
    _ordered_store: np.ndarray | None = None
    _out: np.ndarray = field(default_factory=lambda: np.zeros(2))
    _sample_out: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @property
    def n(self) -> int:
        """Volumes seen."""
        return len(self.rows) + self.n_spilled

    @property
    def n_active(self) -> int:
        """Voxels still in the statistics."""
        return int(np.count_nonzero(self.active))

    def row_views(self, rows: int = 64) -> Iterator[np.ndarray]:
        """Every row so far, in order, without copying those in memory: each as a
        (nvox,) view, then the spilled ones as (k, nvox) blocks of up to ``rows``."""
        yield from self.rows
        if self.n_spilled:
            spilled = self._spilled()
            for a in range(0, self.n_spilled, rows):
                yield np.asarray(spilled[a:a + rows])

    def row(self, t: int) -> np.ndarray:
        """Volume ``t``'s masked values: any in memory, or one of the last two."""
        if t < len(self.rows):
            return self.rows[t]
        if t < self.n - 2:
            raise IndexError(f"row {t} is on disk; read it with row_views")
        return self.ring[t % 2]

    def _spilled(self) -> np.ndarray:
        assert self.spill is not None
        self.spill.flush()
        return np.memmap(self.spill, dtype=np.float32, mode="r",
                         shape=(self.n_spilled, self.nvox))

    def voxel_block(self, a: int, b: int) -> np.ndarray:
        """Voxels a..b-1 over every volume so far, (b - a, n) float32."""
        parts = [np.stack([r[a:b] for r in self.rows], axis=1)] if self.rows else []
        if self.n_spilled:
            parts.append(np.asarray(self._spilled()[:, a:b]).T)
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def series(self) -> np.ndarray:
        """The masked series so far, (nvox, n) float32 (a copy)."""
        if not self.n:
            return np.zeros((self.nvox, 0), np.float32)
        return self.voxel_block(0, self.nvox)

    def close(self) -> None:
        """Release the temporary file (its space goes back when it is closed)."""
        if self.spill is not None:
            self.spill.close()
            self.spill = None


def dvars_init(nvox: int, n_expected: int | None = None,
               intensity_normalization: float = INTENSITY_NORMALIZATION,
               remove_zerovariance: bool = True, variance_tol: float = VARIANCE_TOL,
               sample_voxels: int = SAMPLE_VOXELS,
               memory_mb: float | None = None) -> DvarsState:
    """State for a series of ``nvox`` masked voxels.

    Parameters
    ----------
    nvox : int
    n_expected : int or None
        Volumes announced by the header, if known: the series buffer for that many (at
        most 512: a header's claim sizes nothing larger) is allocated here. All
        buffers are mapped when allocated (~1 ms per MB on the test VM: 80 ms for
        60 000 voxels x 300 volumes) so that volumes do not pay page faults. Without it,
        and past it, the series grows by blocks of 32 volumes (one block's allocation,
        7 MB at 60 000 voxels, falls on every 32nd volume); the sorted series of the
        sample are sized for 512 volumes and double (a copy) past that.
    intensity_normalization, remove_zerovariance, variance_tol
        As :func:`dvars_offline`.
    sample_voxels : int
        Voxels whose robust SD and AR(1) are tracked exactly; with ``nvox`` not larger
        every voxel is, and the online ``std_dvars`` is exact too.
    memory_mb : float or None
        Masked series kept in memory, MB (None: all of it); the rows of later volumes
        go to a temporary file, read back for the exact values at the end.
    """
    if nvox < 1:
        raise ValueError("the mask must hold at least one voxel")
    if sample_voxels < 1:
        raise ValueError("sample_voxels must be >= 1")
    ahead = min(max(int(n_expected or 0), 0), _PREALLOCATED_VOLUMES)
    capacity = _SORTED_CAPACITY
    sample = np.unique(np.linspace(0, nvox - 1, min(int(sample_voxels), nvox))
                       .round().astype(np.int64))
    final = capacity  # the sorted series' capacity after the doublings ``ahead`` needs
    while final < ahead:
        final *= 2
    # One buffer for all of them, mapped now: a doubling moves the rows inside it
    # instead of allocating a new buffer and freeing the old one (which the heap kept).
    store = _touched((sample.size * (2 * final + 16),))
    state = DvarsState(
        nvox=int(nvox), intensity_normalization=float(intensity_normalization),
        remove_zerovariance=bool(remove_zerovariance), variance_tol=float(variance_tol),
        changed=np.zeros(nvox, bool), active=np.ones(nvox, bool), sample=sample,
        ordered=_sorted_view(store, sample.size, capacity),
        starts=np.full(sample.size, capacity, np.int64), ar=np.zeros((sample.size, 3)),
        counts=np.zeros(_NBINS + 2, np.int64), _ordered_store=store if final > capacity else None)
    if memory_mb is not None:
        state.memory_rows = max(1, int(memory_mb * 2**20 // (4 * nvox)))
    if ahead:  # address space only: the pages are mapped as the rows are written
        state._spare.extend(np.empty((min(ahead, state.memory_rows), nvox), np.float32))
    return state


#: Bytes of reserved series rows mapped ahead of use per volume (see _map_ahead).
_MAP_AHEAD_BYTES = 1 << 20


def _touched(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 buffer of zeros whose pages are all mapped now, not on first use in a
    volume (np.zeros of a large buffer maps them on first write)."""
    buffer = np.empty(shape, np.float32)
    buffer.fill(0)
    return buffer


def _sorted_rows(m: int, capacity: int) -> np.ndarray:
    """Buffer for m sorted series of up to ``capacity`` values inserted from the middle.

    16 spare values per row keep the row stride off powers of two (rows at the same
    offset would otherwise share cache sets when the capacity is one)."""
    return _touched((m, 2 * capacity + 16))


def _sorted_view(store: np.ndarray, m: int, capacity: int) -> np.ndarray:
    """:func:`_sorted_rows`'s layout as a view of the front of the flat ``store``."""
    return store[:m * (2 * capacity + 16)].reshape(m, 2 * capacity + 16)


def _widen_in_place(store: np.ndarray, ordered: np.ndarray, capacity: int) -> np.ndarray:
    """The rows of ``ordered`` (a view of ``store``, ``capacity``) moved to the middle of
    rows of twice the capacity in the same buffer: what the doubling's copy into a new
    buffer gives (zeros outside the old rows), without a new buffer.

    Row i's new place starts after its old one and after the old end of every row below
    it, so moving the rows from the last down never overwrites a row not moved yet; a
    block's own overlap is handled by numpy (the assignment reads a copy).
    """
    m, width = ordered.shape
    wider = _sorted_view(store, m, 2 * capacity)
    for b in range(m, 0, -64):
        a = max(b - 64, 0)
        wider[a:b, capacity:capacity + width] = ordered[a:b]
    wider[:, :capacity] = 0
    wider[:, capacity + width:] = 0
    return wider


def _map_ahead(state: DvarsState) -> None:
    """Map (write) the next reserved rows, ``_MAP_AHEAD_BYTES`` per volume, ahead of use.

    The reservation is address space only (mapping it all at the first volume took
    100-400 ms at 128x128x72, which queued the next volumes); mapped a row at a time
    as the rows are written, the process's resident memory grew for the first
    ``memory_rows`` volumes. Ahead of use, 1 MB a volume, it is all resident after
    32 volumes or fewer (memory_mb 32) for about a millisecond a volume until then.
    """
    budget = _MAP_AHEAD_BYTES
    while state._spare_mapped < len(state._spare) and budget > 0:
        state._spare[state._spare_mapped].fill(0)
        state._spare_mapped += 1
        budget -= 4 * state.nvox


def _reserve(state: DvarsState) -> np.ndarray:
    """An empty row for the next volume; grows the sorted series when they are full."""
    if state.n >= state.memory_rows:
        if state.spill is None:
            log.info("DVARS: %d volumes of %d voxels in memory; later ones go to a "
                     "temporary file", state.memory_rows, state.nvox)
            state.spill = tempfile.TemporaryFile(prefix="rtsc-dvars-")
            state.ring = list(_touched((2, state.nvox)))
        row = state.ring[state.n % 2]
    else:
        if not state._spare:
            state._spare.extend(np.empty((min(_BLOCK_VOLUMES, state.memory_rows - state.n),
                                          state.nvox), np.float32))
        row = state._spare.pop(0)
        state._spare_mapped = max(state._spare_mapped - 1, 0)
        _map_ahead(state)
    capacity = (state.ordered.shape[1] - 16) // 2
    if state.n >= capacity:
        log.debug("DVARS sample buffers full at volume %d: doubling", state.n)
        # the sorted rows keep their place relative to the middle of the wider buffer
        store = state._ordered_store
        if store is not None and store.size >= state.sample.size * (4 * capacity + 16):
            state.ordered = _widen_in_place(store, state.ordered, capacity)
        else:
            ordered = _sorted_rows(state.sample.size, 2 * capacity)
            ordered[:, capacity:capacity + state.ordered.shape[1]] = state.ordered
            state.ordered = ordered
            state._ordered_store = None  # past the reservation: the old buffer goes
        state.starts += capacity
    return row


def _band_start(state: DvarsState, values: np.ndarray) -> None:
    """Place the median band on the central quantiles of ``values``; empty the counts."""
    if values.size == 0:  # no voxel left in the statistics
        state.band_lo, state.band_width = 0.0, 1.0
        state.counts[:] = 0
        return
    lo, hi = (float(q) for q in np.quantile(values.astype(np.float64), _BAND))
    width = (hi - lo) / _NBINS
    if not width > 0:
        width = max(abs(lo), 1.0) * 1e-6
    state.band_lo, state.band_width = lo, width
    state.counts[:] = 0


def _median(state: DvarsState) -> float:
    """Median of every value so far; the band moves to the latest volume if it left it."""
    value = kernels.hist_median(state.counts, state.band_lo, state.band_width)
    if value is not None:
        return value
    state.rebuilds += 1
    log.debug("DVARS median left its band at volume %d: rebuilding", state.n - 1)
    _band_start(state, state.row(state.n - 1)[state.active])
    for block in state.row_views():
        for row in np.atleast_2d(block):
            kernels.hist_add(row, state.band_lo, 1.0 / state.band_width, state.counts,
                             state.active)
    value = kernels.hist_median(state.counts, state.band_lo, state.band_width)
    return value if value is not None else float(
        exact_median(state.row_views, state.n * state.n_active, state.active))


def dvars_step(state: DvarsState, masked_values: np.ndarray) -> tuple[float, float]:
    """Add one volume; return the DVARS of the run truncated at this volume (last entry).

    Parameters
    ----------
    state : DvarsState
    masked_values : (nvox,) float32
        The volume's values in the mask (any fixed voxel order), finite for the active
        voxels; copied.

    Returns
    -------
    dvars : float
        Estimate of :func:`dvars_offline` ``dvars[-1]`` for volumes ``0..t``: NaN for the
        first volume (and at ``t = 1`` when ``remove_zerovariance``: the robust SD of two
        samples is 0, no voxel is kept).
    std_dvars : float
        Estimate of :func:`dvars_offline` ``std_dvars[-1]`` for volumes ``0..t``, NaN as
        ``dvars``.
    """
    values = np.asarray(masked_values)
    if values.dtype != np.float32 or values.shape != (state.nvox,):
        raise ValueError(f"masked_values must be ({state.nvox},) float32, "
                         f"got {values.shape} {values.dtype}")
    if not math.isfinite(float(values.sum(dtype=np.float64))) and not np.all(
            np.isfinite(values[state.active])):  # NaN and inf propagate
        raise ValueError("masked_values must be finite")
    x = _reserve(state)
    x[:] = values
    return _advance(state, x)


def _advance(state: DvarsState, x: np.ndarray) -> tuple[float, float]:
    """:func:`dvars_step` once the volume's values are in ``x``, the reserved row."""
    if state.n < state.memory_rows:
        state.rows.append(x)
    else:
        assert state.spill is not None
        state.spill.write(memoryview(x))
        state.n_spilled += 1
    n = state.n
    first, prev = state.row(0), state.row(max(n - 2, 0))
    normalise = state.intensity_normalization != 0
    if normalise:
        if n == 1:
            _band_start(state, x[state.active])
        kernels.hist_add(x, state.band_lo, 1.0 / state.band_width, state.counts, state.active)
        state.median = _median(state)
    median = float(np.float32(state.median)) if normalise else 1.0
    kernels.voxel_pass(x, first, prev, n, state.changed, state.remove_zerovariance,
                       state._out, state.active)
    kernels.sample_pass(x, first, prev, n, state.sample, state.ordered, state.starts,
                        state.ar, state.changed, median, state.intensity_normalization,
                        normalise, state.remove_zerovariance, state._sample_out, state.active)
    sum_d2, kept = state._out
    sum_sdhat, kept_sample = state._sample_out
    if n == 1 or kept == 0:
        return np.nan, np.nan
    scale = state.intensity_normalization / median if normalise else 1.0
    dvars = math.sqrt(sum_d2 / kept) * scale
    mean_sdhat = sum_sdhat / kept_sample if kept_sample else 0.0
    return dvars, (dvars / mean_sdhat if mean_sdhat > 0 else np.nan)


def dvars_finalize(state: DvarsState) -> tuple[np.ndarray, np.ndarray]:
    """Whole-run DVARS of every volume seen: :func:`dvars_offline` on the stored series.

    Returns
    -------
    dvars, std_dvars : (n,) float64 (see :func:`dvars_offline`)
    """
    n = state.n
    if n < 2 or state.n_active == 0:
        return np.full(n, np.nan), np.full(n, np.nan)
    median = exact_median(state.row_views, n * state.n_active, state.active) \
        if state.intensity_normalization != 0 else None
    active = state.active

    def voxels(a: int, b: int) -> np.ndarray:  # the active ones of voxels a..b-1
        block = state.voxel_block(a, b)
        return block if active[a:b].all() else block[active[a:b]]

    return dvars_by_chunks(voxels, state.nvox, n, median, state.intensity_normalization,
                            state.remove_zerovariance, state.variance_tol)


def dvars_restrict(state: DvarsState, keep: np.ndarray) -> int:
    """Take the voxels not in ``keep`` out of the statistics, for the whole run.

    Their values of every volume so far leave the median histogram (the band stays);
    from the next volume on the passes skip them (see the module docstring). Call it
    before adding the first volume they are invalid in.

    ``keep``: (nvox,) bool, the voxels (mask order) still valid. Returns the number of
    voxels newly taken out.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (state.nvox,):
        raise ValueError(f"keep must be ({state.nvox},) bool, got {keep.shape}")
    return dvars_restrict_voxels(state, np.flatnonzero(state.active & ~keep))


def dvars_restrict_voxels(state: DvarsState, positions: np.ndarray) -> int:
    """:func:`dvars_restrict` given the voxels that leave, as positions in the mask
    order ((k,) int, any of them possibly out already); returns how many left now."""
    positions = np.asarray(positions, dtype=np.int64)
    columns = np.unique(positions[state.active[positions]])  # each voxel once
    n_gone = int(columns.size)
    if n_gone == 0:
        return 0
    if state.n and state.intensity_normalization != 0:
        # only the leaving voxels' columns are read (n x k values, not n x nvox)
        parts = [row[columns] for row in state.rows]
        if state.n_spilled:
            parts.append(np.asarray(state._spilled()[:, columns]).ravel())
        kernels.hist_add(np.concatenate(parts), state.band_lo, 1.0 / state.band_width,
                         state.counts, None, -1)
    state.active[columns] = False
    log.debug("DVARS: %d voxels left the run's validity mask after volume %d (%d remain)",
              n_gone, state.n - 1, state.n_active)
    return n_gone


def warm_up() -> None:
    """Compile (or load from numba's cache) the DVARS kernels before the first volume."""
    kernels.warm_up()


class DvarsTracker:
    """Online DVARS of a series inside a fixed mask, for the registration stage.

    Parameters
    ----------
    mask : (nx, ny, nz) bool
        Voxels that count (e.g. the brain mask of the reference volume).
    n_expected : int or None
        Volumes announced by the header; sizes the buffers (see :func:`dvars_init`).
    intensity_normalization, remove_zerovariance, variance_tol, sample_voxels, memory_mb
        See :func:`dvars_init` (defaults: fMRIPrep's, 4096 sampled voxels, all in memory).
    """

    def __init__(self, mask: np.ndarray, n_expected: int | None = None,
                 intensity_normalization: float = INTENSITY_NORMALIZATION,
                 remove_zerovariance: bool = True, variance_tol: float = VARIANCE_TOL,
                 sample_voxels: int = SAMPLE_VOXELS, memory_mb: float | None = None) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3:
            raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
        self.shape = mask.shape
        # Fortran-order flat indices, ascending: a sequential gather from Volume.data
        self._index = np.flatnonzero(mask.ravel(order="F")).astype(np.int64)
        self.state = dvars_init(self._index.size, n_expected, intensity_normalization,
                                remove_zerovariance, variance_tol, sample_voxels, memory_mb)

    def restrict(self, valid: np.ndarray, left: np.ndarray | None = None) -> int:
        """Take the mask voxels outside ``valid`` ((nx, ny, nz) bool, the run's validity
        mask) out of the statistics for the whole run (:func:`dvars_restrict`); returns
        how many left. ``left``: the voxels that left since the validity mask applied
        last (:func:`~rtsc.pipeline.stages.coverage_left`), when known: only those are
        looked at."""
        if valid.shape != self.shape:
            raise ValueError(f"validity mask {valid.shape} does not match the mask {self.shape}")
        if left is not None:
            return dvars_restrict_voxels(self.state, positions_in(self._index, left))
        return dvars_restrict(self.state, np.asarray(valid).reshape(-1, order="F")[self._index])

    def update(self, data: np.ndarray) -> tuple[float, float]:
        """Add one volume; returns (dvars, std_dvars) as :func:`dvars_step`.

        Parameters
        ----------
        data : (nx, ny, nz) float32, Fortran-ordered (``Volume.data``)
        """
        if data.shape != self.shape:
            raise ValueError(f"volume shape {data.shape} does not match the mask {self.shape}")
        flat = np.asarray(data, dtype=np.float32).reshape(-1, order="F")
        x = _reserve(self.state)
        if not math.isfinite(kernels.gather(flat, self._index, x, self.state.active)):
            if self.state.n < self.state.memory_rows:
                self.state._spare.insert(0, x)
                self.state._spare_mapped += 1  # written: mapped
            raise ValueError("the volume holds NaN or infinite values in the mask")
        return _advance(self.state, x)

    def final(self) -> tuple[np.ndarray, np.ndarray]:
        """Whole-run (dvars, std_dvars), (n,) float64 each: Nipype's values, NaN first."""
        return dvars_finalize(self.state)
