"""Framewise displacement and DVARS: against naive NumPy, against Nipype, online vs offline."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.algorithms import confounds

from rtsc.conventions import framewise_displacement, framewise_displacement_series
from rtsc.pipeline.qc import _dvars_kernels as kernels
from rtsc.pipeline.qc import dvars as motion_metrics
from rtsc.pipeline.qc import dvars_online
from rtsc.pipeline.qc.dvars import (
    _ar1_from_sums,
    dvars_offline,
    exact_median,
)
from rtsc.pipeline.qc.dvars_online import DvarsTracker, dvars_finalize, dvars_init, dvars_step
from simulator.bold import simulate_run
from simulator.phantom import Grid

N_VOLUMES = 40


@pytest.fixture(scope="module")
def run():
    """A small simulated run (3.5 k brain voxels, 40 volumes, motion, drift, activation)."""
    return simulate_run(Grid((32, 32, 16), (6, 6, 6)), N_VOLUMES, 2.0, seed=1)


@pytest.fixture(scope="module")
def truncated(run):
    """dvars_offline's last entry for every truncated run 0..t: (nt, 2)."""
    masked = run.data[run.brain_mask]
    return np.array([[series[-1] for series in dvars_offline(masked[:, :t + 1])]
                     for t in range(N_VOLUMES)])


def write_nifti(run, tmp_path: Path) -> tuple[str, str]:
    bold = tmp_path / "bold.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(run.data, run.affine), bold)
    nib.save(nib.Nifti1Image(run.brain_mask.astype(np.uint8), run.affine), mask)
    return str(bold), str(mask)


def relative_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got / want - 1| where both are finite; asserts both are NaN at the same places."""
    got, want = np.asarray(got, float), np.asarray(want, float)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    return np.abs(got[finite] / want[finite] - 1)


# ---- naive references ---------------------------------------------------------------------


def naive_fd(params: np.ndarray, radius_mm: float) -> np.ndarray:
    fd = [0.0]
    for t in range(1, len(params)):
        trans = sum(abs(params[t][i] - params[t - 1][i]) for i in range(3))
        rot = sum(abs(params[t][i] - params[t - 1][i]) for i in range(3, 6))
        fd.append(trans + radius_mm * rot)
    return np.array(fd)


def naive_ar1(series: np.ndarray) -> np.ndarray:
    """Yule-Walker lag 1 per row, two-pass (demean, then r1 / r0), float64."""
    z = series.astype(np.float64) - series.astype(np.float64).mean(axis=1, keepdims=True)
    r0 = (z * z).sum(axis=1)
    r1 = (z[:, 1:] * z[:, :-1]).sum(axis=1)
    return np.where(r0 > 0, r1 / np.where(r0 > 0, r0, 1), 0.0)


def naive_hist(values: np.ndarray, lo: float, inv_width: float, nbins: int) -> np.ndarray:
    f = (values - np.float32(lo)) * np.float32(inv_width) + np.float32(1)
    bins = np.clip(f, np.float32(0), np.float32(nbins + 1)).astype(np.int64)
    return np.bincount(bins, minlength=nbins + 2)


def naive_kept(series: np.ndarray, remove_zero: bool) -> np.ndarray:
    """series (n, nvox): voxels kept by the online rule (non-constant from n = 3)."""
    n = series.shape[0]
    if not remove_zero:
        return np.ones(series.shape[1], bool)
    return (n >= 3) & (series != series[:1]).any(axis=0)


def naive_voxel_pass(series: np.ndarray, remove_zero: bool) -> tuple[float, int]:
    if series.shape[0] < 2:
        return 0.0, 0
    kept = naive_kept(series, remove_zero)
    d = series[-1, kept].astype(np.float64) - series[-2, kept]
    return float((d * d).sum()), int(kept.sum())


def naive_sample_pass(series: np.ndarray, index: np.ndarray, median: np.float32,
                      scale: float, remove_zero: bool) -> tuple[float, int]:
    if series.shape[0] < 2:
        return 0.0, 0
    kept = naive_kept(series, remove_zero)[index]
    sampled = series[:, index[kept]].T
    normalised = (sampled / median) * np.float32(scale)
    sd = (np.percentile(normalised, 75, axis=1, method="lower")
          - np.percentile(normalised, 25, axis=1, method="lower")) / np.float32(1.349)
    return float((np.sqrt(2 * (1 - naive_ar1(sampled))) * sd).sum()), int(kept.sum())


# ---- framewise displacement ---------------------------------------------------------------


def test_fd_hand_examples():
    zero = np.zeros(6)
    assert framewise_displacement(zero, [0, 0, 0, 0.01, 0, 0]) == pytest.approx(0.5)
    assert framewise_displacement(zero, [1, -2, 0.5, 0, 0, 0]) == pytest.approx(3.5)
    assert framewise_displacement([0, 0, 0, 0, 0, 0.02], [0, 0, 1, 0, -0.01, 0.01]) \
        == pytest.approx(1 + 50 * 0.02)
    assert framewise_displacement(zero, [0, 0, 0, 0, 0.01, 0], radius_mm=80) \
        == pytest.approx(0.8)


def test_fd_series_matches_naive(rng):
    params = np.concatenate([rng.normal(0, 0.5, (30, 3)), rng.normal(0, 0.01, (30, 3))], 1)
    for radius in (50.0, 65.0):
        fd = framewise_displacement_series(params, radius)
        np.testing.assert_allclose(fd, naive_fd(params, radius), rtol=1e-12, atol=1e-15)
        assert fd[0] == 0
        pairwise = [framewise_displacement(params[t - 1], params[t], radius)
                    for t in range(1, 30)]
        np.testing.assert_allclose(fd[1:], pairwise, rtol=1e-12)


def test_fd_edge_cases():
    np.testing.assert_array_equal(framewise_displacement_series(np.zeros((1, 6))), [0.0])
    assert framewise_displacement_series(np.zeros((0, 6))).shape == (0,)
    with pytest.raises(ValueError):
        framewise_displacement_series(np.zeros((5, 3)))
    with pytest.raises(ValueError):
        framewise_displacement(np.zeros(6), np.zeros(7))


# ---- DVARS offline ------------------------------------------------------------------------


@pytest.mark.parametrize("remove_zerovariance", [True, False])
def test_dvars_offline_matches_nipype(run, tmp_path, remove_zerovariance):
    bold, mask = write_nifti(run, tmp_path)
    std_ref, nstd_ref, _ = confounds.compute_dvars(
        bold, mask, remove_zerovariance=remove_zerovariance, variance_tol=1e-7)
    dvars, std_dvars = dvars_offline(run.data[run.brain_mask],
                                     remove_zerovariance=remove_zerovariance)
    assert dvars.shape == std_dvars.shape == (N_VOLUMES,)
    assert np.isnan(dvars[0]) and np.isnan(std_dvars[0])  # fMRIPrep's n/a first row
    # Nipype averages in float32 (1.2e-6 here); everything else agrees to ~1e-8
    assert relative_error(dvars[1:], nstd_ref).max() < 1e-5
    assert relative_error(std_dvars[1:], std_ref).max() < 1e-5


def test_dvars_offline_drops_constant_voxels(run):
    masked = run.data[run.brain_mask]
    padded = np.concatenate([masked, np.zeros((50, N_VOLUMES), np.float32)])
    # Nipype's remove_zerovariance: the zero voxels are dropped after normalisation
    # (they still move the median), so the result is that of the brain voxels with the
    # padded median
    dvars, std_dvars = dvars_offline(padded)
    median_ratio = np.median(padded) / np.median(masked)
    want_dvars, want_std = dvars_offline(masked)
    assert relative_error(dvars, want_dvars / median_ratio).max() < 1e-5
    assert relative_error(std_dvars, want_std).max() < 1e-5


def test_dvars_offline_degenerate():
    for data in (np.ones((5, 1), np.float32), np.zeros((0, 4), np.float32)):
        assert np.isnan(dvars_offline(data)[0]).all()
    # two volumes: every robust SD of two samples is 0, so no voxel is kept
    pair = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    assert np.isnan(dvars_offline(pair)[0]).all()
    dvars, std_dvars = dvars_offline(pair, remove_zerovariance=False)
    assert np.isfinite(dvars[1]) and np.isnan(std_dvars[1])
    with pytest.raises(ValueError):
        dvars_offline(np.zeros(5, np.float32))


def test_ar1_from_sums_survives_large_offset(rng):
    """Running sums over y = x - x_0: no cancellation even on a 1e6 baseline."""
    series = (1e6 + 10 * rng.standard_normal((200, 60))).astype(np.float32)
    y = series.astype(np.float64) - series[:, :1]
    ar1 = _ar1_from_sums(y.sum(1), (y * y).sum(1), (y[:, 1:] * y[:, :-1]).sum(1), y[:, -1],
                         series.shape[1])
    np.testing.assert_allclose(ar1, naive_ar1(series), rtol=1e-9, atol=1e-12)
    # the naive one-pass formula on raw values loses everything at this offset
    x = series.astype(np.float64)
    n = x.shape[1]
    r0 = (x * x).sum(1) - x.sum(1) ** 2 / n
    assert np.abs(r0 / ((x - x.mean(1, keepdims=True)) ** 2).sum(1) - 1).max() > 1e-6


# ---- kernels against naive NumPy ----------------------------------------------------------


def test_hist_add_and_median_match_naive(rng):
    nbins = 64
    counts = np.zeros(nbins + 2, np.int64)
    lo, width = 900.0, 200.0 / nbins
    seen = []
    for t in range(5):
        values = (1000 + 60 * rng.standard_normal(500) + 5 * t).astype(np.float32)
        kernels.hist_add(values, lo, 1.0 / width, counts)
        seen.append(values)
        want = sum(naive_hist(v, lo, 1.0 / width, nbins) for v in seen)
        np.testing.assert_array_equal(counts, want)
        median = kernels.hist_median(counts, lo, width)
        assert median is not None and abs(median - np.median(seen)) <= width
    assert kernels.hist_median(np.array([0, 0, 5], np.int64), lo, width) is None


@pytest.mark.parametrize("remove_zero", [True, False])
def test_voxel_and_sample_passes_match_naive(rng, remove_zero):
    nvox, nt = 40, 12
    series = (500 + 20 * rng.standard_normal((nt, nvox))).astype(np.float32)
    series[:, 3] = 7.0                       # a constant voxel
    series[:, 5] += np.float32(1e5)          # a bright one (cancellation)
    index = np.arange(0, nvox, 3, dtype=np.int64)
    changed = np.zeros(nvox, bool)
    ordered = np.zeros((index.size, 2 * nt), np.float32)
    starts = np.full(index.size, nt, np.int64)
    ar = np.zeros((index.size, 3))
    out, sample_out = np.zeros(2), np.zeros(2)
    median, scale = np.float32(480.0), 1000.0
    for n in range(1, nt + 1):
        rows = (series[n - 1], series[0], series[max(n - 2, 0)], n)
        kernels.voxel_pass(*rows, changed, remove_zero, out)
        kernels.sample_pass(*rows, index, ordered, starts, ar, changed, float(median), scale,
                            True, remove_zero, sample_out)
        sum_d2, kept = naive_voxel_pass(series[:n], remove_zero)
        assert out[1] == kept
        np.testing.assert_allclose(out[0], sum_d2, rtol=1e-12)
        sum_sdhat, kept_sample = naive_sample_pass(series[:n], index, median, scale,
                                                   remove_zero)
        assert sample_out[1] == kept_sample
        np.testing.assert_allclose(sample_out[0], sum_sdhat, rtol=1e-6)
        rows = [ordered[i, starts[i]:starts[i] + n] for i in range(index.size)]
        np.testing.assert_array_equal(rows, np.sort(series[:n, index].T, axis=1))


def test_kernel_wrappers_check_inputs():
    row = np.zeros(4, np.float32)
    changed, out = np.zeros(4, bool), np.zeros(2)
    with pytest.raises(TypeError):
        kernels.voxel_pass(row.astype(np.float64), row, row, 2, changed, True, out)
    with pytest.raises(ValueError):
        kernels.voxel_pass(row, row[:3], row, 2, changed, True, out)
    with pytest.raises(ValueError):
        kernels.voxel_pass(np.zeros((4, 2), np.float32)[:, 0], row, row, 2, changed, True, out)
    index = np.arange(2, dtype=np.int64)
    args = (np.zeros((2, 3)), changed, 1.0, 1.0, True, True, out)
    with pytest.raises(ValueError):        # ordered has 3 rows for 2 sampled voxels
        kernels.sample_pass(row, row, row, 1, index, np.zeros((3, 6), np.float32),
                            np.full(2, 3, np.int64), *args)
    with pytest.raises(ValueError):        # no room above the rows for volume 3
        kernels.sample_pass(row, row, row, 3, index, np.zeros((2, 4), np.float32),
                            np.full(2, 2, np.int64), *args)
    with pytest.raises(ValueError):        # a sampled voxel outside the volume
        kernels.sample_pass(row, row, row, 1, np.array([0, 4]), np.zeros((2, 6), np.float32),
                            np.full(2, 3, np.int64), *args)


# ---- DVARS online -------------------------------------------------------------------------


def test_online_equals_truncated_offline(run, truncated):
    """Sample holding every voxel: std_dvars exact, dvars to the median's histogram."""
    tracker = DvarsTracker(run.brain_mask)
    assert tracker.state.sample.size == tracker.state.nvox
    online = np.array([tracker.update(run.data[..., t]) for t in range(N_VOLUMES)])
    assert np.isnan(online[:2]).all()        # t = 0 and (no voxel kept) t = 1
    # measured: dvars 1.1e-5 at most (1.4e-6 median), std_dvars 1.5e-7
    assert relative_error(online[:, 0], truncated[:, 0]).max() < 3e-5
    assert relative_error(online[:, 1], truncated[:, 1]).max() < 1e-6
    assert tracker.state.rebuilds == 0


def test_online_sampled_percentiles_within_measured_tolerance(run, truncated):
    """512 of 3543 voxels for the robust SDs: std_dvars is then a sample estimate."""
    tracker = DvarsTracker(run.brain_mask, sample_voxels=512)
    online = np.array([tracker.update(run.data[..., t]) for t in range(N_VOLUMES)])
    assert relative_error(online[:, 0], truncated[:, 0]).max() < 3e-5   # unaffected
    error = relative_error(online[:, 1], truncated[:, 1])
    # measured: 4.3 % at worst, 1.2 % median
    assert error.max() < 0.08 and np.median(error) < 0.025


def test_final_equals_nipype(run, tmp_path):
    tracker = DvarsTracker(run.brain_mask, sample_voxels=256)
    for t in range(N_VOLUMES):
        tracker.update(np.asfortranarray(run.data[..., t]))
    dvars, std_dvars = tracker.final()
    std_ref, nstd_ref, _ = confounds.compute_dvars(*write_nifti(run, tmp_path),
                                                   remove_zerovariance=True,
                                                   variance_tol=1e-7)
    assert np.isnan(dvars[0]) and np.isnan(std_dvars[0])
    assert relative_error(dvars[1:], nstd_ref).max() < 1e-5
    assert relative_error(std_dvars[1:], std_ref).max() < 1e-5


def test_tracker_matches_step_on_masked_values(run):
    tracker = DvarsTracker(run.brain_mask)
    state = dvars_init(int(run.brain_mask.sum()))
    for t in range(6):
        volume = np.asfortranarray(run.data[..., t])
        # the tracker reads voxels in memory (Fortran) order, the step here in C order
        got = tracker.update(volume)
        want = dvars_step(state, np.ascontiguousarray(volume[run.brain_mask]))
        np.testing.assert_allclose(got, want, rtol=1e-9)
    with pytest.raises(ValueError):
        tracker.update(np.zeros((4, 4, 4), np.float32))
    spoilt = np.asfortranarray(run.data[..., 6])
    spoilt[run.brain_mask.nonzero()[0][0], run.brain_mask.nonzero()[1][0],
           run.brain_mask.nonzero()[2][0]] = np.nan
    with pytest.raises(ValueError):
        tracker.update(spoilt)
    assert tracker.state.n == 6                # refused volumes leave no trace
    got = tracker.update(np.asfortranarray(run.data[..., 6]))
    want = dvars_step(state, np.ascontiguousarray(run.data[..., 6][run.brain_mask]))
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_online_buffers_grow_and_band_rebuilds(rng, monkeypatch):
    """The series grows by blocks and the sorted samples double when full, with or
    without n_expected; a large intensity jump pushes the median out of the first
    volume's band and the histogram is rebuilt."""
    monkeypatch.setattr(dvars_online, "_SORTED_CAPACITY", 16)
    nvox, nt = 300, 80
    data = (1000 + 10 * rng.standard_normal((nvox, nt))).astype(np.float32)
    data[:, 20:] *= 3                           # median leaves the band once past half
    grown = dvars_init(nvox)
    sized = dvars_init(nvox, n_expected=50)
    for t in range(nt):
        a = dvars_step(grown, data[:, t])
        b = dvars_step(sized, data[:, t])
        np.testing.assert_array_equal(a, b)
    assert grown.ordered.shape[1] == 2 * 128 + 16 and grown.rebuilds >= 1
    want = dvars_offline(data)
    np.testing.assert_allclose(dvars_finalize(grown), want, rtol=1e-12)
    assert relative_error(a, [want[0][-1], want[1][-1]]).max() < 1e-4
    assert abs(grown.median / np.median(data) - 1) < 1e-4


def test_an_absurd_run_length_allocates_no_more_than_512_volumes(rng, monkeypatch):
    """Issue 16 item 3: buffers were sized for the header's NumberOfTemporalPositions
    (20000: 780 MB at the first volume of a real service run; 2**31 - 1: MemoryError
    and a series without qc.json). At most 512 volumes are allocated ahead; past them
    the buffers grow with what arrives, with unchanged values."""
    nvox, nt = 300, 40
    data = (1000 + 10 * rng.standard_normal((nvox, nt))).astype(np.float32)
    claimed = dvars_init(nvox, n_expected=2**31 - 1)
    ahead = claimed._ordered_store.nbytes + sum(row.nbytes for row in claimed._spare)
    # sorted samples reserved for 512 volumes (used at their first capacity,
    # dvars_online._SORTED_CAPACITY, until full), 512 rows
    assert claimed.ordered.shape == (nvox, 2 * 128 + 16)
    assert ahead == 4 * nvox * (2 * 512 + 16) + 4 * nvox * 512  # 1.8 MB, not 5 TB
    twenty = dvars_init(nvox, n_expected=20000)
    assert twenty.ordered.shape == claimed.ordered.shape
    monkeypatch.setattr(dvars_online, "_PREALLOCATED_VOLUMES", 16)  # grow past it here
    small = dvars_init(nvox, n_expected=2**31 - 1)
    plain = dvars_init(nvox)
    for t in range(nt):
        np.testing.assert_array_equal(dvars_step(small, data[:, t]), dvars_step(plain, data[:, t]))
    np.testing.assert_allclose(dvars_finalize(small), dvars_offline(data), rtol=1e-12)


def test_buffers_reserved_for_the_run_up_front(rng, monkeypatch):
    """Issue 18 (soak memory flat): with n_expected, the sorted samples' buffer for the
    whole run is allocated at the start and each doubling moves the rows inside it
    (no new buffer; the same buffer contents, margins included, and values as the
    doublings into new buffers), and the reserved series rows are mapped ahead of use,
    _MAP_AHEAD_BYTES per volume."""
    monkeypatch.setattr(dvars_online, "_SORTED_CAPACITY", 16)
    monkeypatch.setattr(dvars_online, "_MAP_AHEAD_BYTES", 3 * 4 * 300)  # 3 rows a volume
    nvox, nt = 300, 70
    data = (1000 + 10 * rng.standard_normal((nvox, nt))).astype(np.float32)
    data[:, 40:] *= 3                           # a band rebuild too
    plain = dvars_init(nvox)                    # doubles into new buffers
    sized = dvars_init(nvox, n_expected=nt)
    store = sized._ordered_store
    assert store.nbytes == 4 * nvox * (2 * 128 + 16)  # 16 -> 32 -> 64 -> 128 >= 70
    assert plain._ordered_store is None and len(sized._spare) == nt
    want = []
    for t in range(nt):
        want.append(dvars_step(plain, data[:, t]))
        np.testing.assert_array_equal(dvars_step(sized, data[:, t]), want[-1])
        np.testing.assert_array_equal(sized.ordered, plain.ordered)
        np.testing.assert_array_equal(sized.starts, plain.starts)
        assert np.shares_memory(sized.ordered, store) and sized._ordered_store is store
        # each volume takes a mapped row and maps three more
        assert sized._spare_mapped == min(2 * (t + 1) + 1, len(sized._spare))
    assert sized.ordered.shape == (nvox, 2 * 128 + 16) and plain.rebuilds >= 1
    np.testing.assert_allclose(dvars_finalize(sized), dvars_offline(data), rtol=1e-12)
    # a run longer than announced grows past the reservation as before
    short = dvars_init(nvox, n_expected=20)
    for t in range(nt):
        np.testing.assert_array_equal(dvars_step(short, data[:, t]), want[t])
    assert short.ordered.shape == plain.ordered.shape and short._ordered_store is None


@pytest.mark.parametrize("total", [1, 2, 7, 1000, 1001])
def test_exact_median_equals_numpy(rng, total):
    """Odd and even counts, ties (quantised values), several blocks of unequal sizes."""
    for values in (rng.normal(1000, 50, total).astype(np.float32),
                   np.rint(rng.normal(1000, 2, total)).astype(np.float32)):
        blocks = np.array_split(values, 5) if total >= 5 else [values]
        got = exact_median(lambda: iter(blocks), total, bins=64)
        assert got == np.median(values) and got.dtype == np.float32
    assert exact_median(lambda: iter([np.full(9, 3.5, np.float32)]), 9) == 3.5


@pytest.mark.parametrize("rows", [37, 38])
def test_exact_median_of_active_columns_of_row_blocks(rng, rows):
    """2-D blocks and single rows mixed; inactive columns hold outliers that would move
    the median if they counted. Odd and even totals (501 columns, 37 or 38 rows)."""
    series = rng.normal(1000, 40, (rows, 501)).astype(np.float32)
    active = rng.random(501) > 0.3
    series[:, ~active] = 1e6
    parts = [series[:10], *series[10:20], series[20:]]
    got = exact_median(lambda: iter(parts), int(active.sum()) * rows, active)
    assert got == np.median(series[:, active])
    assert exact_median(lambda: iter(parts), series.size) == np.median(series)


def test_spilled_series_gives_identical_values(rng, monkeypatch):
    """With a memory budget of 5 volumes the later rows go to a temporary file: the
    live values, a median rebuild and the final values are those of the unlimited
    state, and memory holds only the budgeted rows and the last two."""
    monkeypatch.setattr(dvars_online, "_SORTED_CAPACITY", 16)
    nvox, nt = 3000, 40
    data = (1000 + 10 * rng.standard_normal((nvox, nt))).astype(np.float32)
    data[:, 12:] *= 3                           # forces a band rebuild over spilled rows
    unlimited = dvars_init(nvox)
    budget_mb = 5 * 4 * nvox / 2**20
    spilled = dvars_init(nvox, n_expected=nt, memory_mb=budget_mb)
    for t in range(nt):
        np.testing.assert_array_equal(dvars_step(spilled, data[:, t]),
                                      dvars_step(unlimited, data[:, t]))
    assert spilled.rebuilds >= 1 and spilled.rebuilds == unlimited.rebuilds
    assert len(spilled.rows) == 5 and spilled.n_spilled == nt - 5 and spilled.n == nt
    assert len(spilled._spare) == 0             # nothing allocated past the budget
    np.testing.assert_array_equal(spilled.series(), data)
    want = dvars_offline(data)
    got = dvars_finalize(spilled)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(dvars_finalize(unlimited), want, rtol=1e-12)
    spilled.close()
    assert spilled.spill is None


def test_online_without_normalisation_or_removal(run, truncated):
    masked = run.data[run.brain_mask]
    options = {"intensity_normalization": 0.0, "remove_zerovariance": False}
    state = dvars_init(masked.shape[0], **options)
    online = np.array([dvars_step(state, np.ascontiguousarray(masked[:, t]))
                       for t in range(8)])
    want = np.array([[s[-1] for s in dvars_offline(masked[:, :t + 1], **options)]
                     for t in range(8)])
    assert np.isnan(online[0]).all() and np.isfinite(online[1, 0]) and np.isnan(online[1, 1])
    assert relative_error(online, want).max() < 1e-9


def test_step_rejects_bad_input():
    state = dvars_init(3)
    with pytest.raises(ValueError):
        dvars_step(state, np.zeros(3, np.float64))
    with pytest.raises(ValueError):
        dvars_step(state, np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        dvars_step(state, np.array([1, np.nan, 2], np.float32))
    assert state.n == 0
    with pytest.raises(ValueError):
        dvars_init(0)


@pytest.mark.parametrize("sample_voxels, memory_mb, by_left", [
    (4096, None, False), (300, None, False), (4096, 0.02, False), (4096, None, True),
    (300, 0.02, True)])
def test_voxels_leaving_the_validity_mask_leave_dvars(sample_voxels, memory_mb, by_left):
    """Voxels restricted away mid-run (and NaN from then on, as the reslice gives them)
    leave the online DVARS: after each volume the live values are those of
    dvars_offline on the voxels still valid, and the final ones those of the voxels
    valid for the whole run (naive NumPy selection of the series); also with most rows
    in the temporary file (memory_mb: 6 rows in memory), and given the voxels that left
    (``by_left``, Coverage.left; some of them outside the mask) instead of the mask."""
    from rtsc.pipeline.qc.dvars_online import DvarsTracker  # noqa: PLC0415

    rng = np.random.default_rng(4)
    shape = (12, 10, 8)
    n = 24
    base = 800.0 + 400.0 * rng.random(shape)
    data = [np.asfortranarray(base + rng.normal(0.0, 10.0, shape) + 3.0 * t, np.float32)
            for t in range(n)]
    mask = np.ones(shape, bool)
    mask[:2] = False
    valid = np.ones(shape, bool)
    leaving = {9: (slice(None), slice(None), 7), 15: (slice(None), slice(0, 3), 0)}
    tracker = DvarsTracker(mask, n_expected=n, sample_voxels=sample_voxels,
                           memory_mb=memory_mb)
    live = []
    for t in range(n):
        if t in leaving:
            before = valid.copy()
            valid[leaving[t]] = False
            left = np.flatnonzero((before & ~valid).ravel(order="F")) if by_left else None
            assert tracker.restrict(valid, left) == int((mask & ~valid).sum()) - (
                0 if t == 9 else int((mask[leaving[9]]).sum()))
        volume = data[t].copy(order="F")
        volume[~valid] = np.nan  # what the reslice gives an invalid voxel
        live.append(tracker.update(volume))
        series = np.stack([d[mask & valid] for d in data[:t + 1]], axis=1)
        dvars, std_dvars = motion_metrics.dvars_offline(series)
        if t >= 2:
            assert live[-1][0] == pytest.approx(dvars[-1], rel=2e-5)
            if sample_voxels >= mask.sum():  # every voxel tracked: exact
                assert live[-1][1] == pytest.approx(std_dvars[-1], rel=1e-6)
            else:
                assert live[-1][1] == pytest.approx(std_dvars[-1], rel=0.05)
    final = tracker.final()
    series = np.stack([d[mask & valid] for d in data], axis=1)
    expected = motion_metrics.dvars_offline(series)
    np.testing.assert_allclose(final[0][1:], expected[0][1:], rtol=1e-6)
    np.testing.assert_allclose(final[1][1:], expected[1][1:], rtol=1e-6)
    assert tracker.state.n_active == int((mask & valid).sum())
    assert (tracker.state.n_spilled > 0) == (memory_mb is not None)
