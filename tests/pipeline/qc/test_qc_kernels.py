"""QC kernels against naive NumPy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtsc.pipeline.qc._kernels import (segment_medians, tsnr_full_maps, tsnr_in_mask,
                                       welford_trend_tsnr, welford_trend_update, index_runs,
                                       welford_trend_between)
from rtsc.pipeline._mask_kernels import binary_dilation, percentile
from rtsc.pipeline.qc._slice_kernels import (LabelRuns, background_labels_of, slice_sums,
                                             slice_sums_runs)
from rtsc.pipeline.qc.snr import HEAD_FRACTION, background_labels


def naive_stats(series: np.ndarray, t: np.ndarray):
    """Two-pass float64 mean, variance (n-1) and residual variance of a line in t (n-2)."""
    y = series.astype(np.float64)
    mean = y.mean(axis=-1)
    var = y.var(axis=-1, ddof=1)
    design = np.stack([np.ones_like(t), t], axis=1)
    flat = y.reshape(-1, y.shape[-1]).T
    coef, *_ = np.linalg.lstsq(design, flat, rcond=None)
    resid = flat - design @ coef
    var_d = (resid ** 2).sum(axis=0) / (len(t) - 2)
    return mean, var, var_d.reshape(mean.shape)


def run_welford(series: np.ndarray, t: np.ndarray, order: str = "F"):
    shape = series.shape[:3]
    mean, m2, cxy = (np.zeros(shape, order=order) for _ in range(3))
    mean_t = m2t = 0.0
    for n, (vol, tn) in enumerate(zip(np.moveaxis(series, -1, 0), t), start=1):
        dx = tn - mean_t
        mean_t += dx / n
        m2t += dx * (tn - mean_t)
        welford_trend_update(np.asarray(vol, dtype=np.float32, order=order), mean, m2, cxy, n, dx)
    return mean, m2, cxy, m2t


@pytest.mark.parametrize("order", ["F", "C"])
def test_welford_trend_equals_two_pass_and_lstsq(rng, order):
    n = 25
    t = np.arange(n, dtype=np.float64)
    series = (500 + 3 * t + 10 * rng.standard_normal((6, 5, 4, n))).astype(np.float32)
    mean, m2, cxy, m2t = run_welford(series, t, order)
    ref_mean, ref_var, ref_var_d = naive_stats(series, t)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(m2 / (n - 1), ref_var, rtol=1e-10)
    np.testing.assert_allclose((m2 - cxy ** 2 / m2t) / (n - 2), ref_var_d, rtol=1e-9)


def test_welford_survives_a_large_offset(rng):
    """Catastrophic cancellation: 1e8 + small integers (exact in float32, steps of 8)."""
    n = 40
    t = np.arange(n, dtype=np.float64)
    steps = rng.integers(-20, 20, size=(4, 4, 2, n))
    series = (1e8 + 8.0 * steps).astype(np.float32)
    assert np.array_equal(series.astype(np.float64), 1e8 + 8.0 * steps)  # exact inputs
    mean, m2, cxy, m2t = run_welford(series, t)
    ref_var = (8.0 * steps).var(axis=-1, ddof=1)
    np.testing.assert_allclose(m2 / (n - 1), ref_var, rtol=1e-9)
    # the naive sum-of-squares formula loses everything here
    y = series.astype(np.float64)
    naive = ((y ** 2).sum(-1) - y.sum(-1) ** 2 / n) / (n - 1)
    assert np.abs(naive - ref_var).max() > 10 * np.abs(m2 / (n - 1) - ref_var).max()


def test_tsnr_in_mask_matches_numpy(rng):
    n = 12
    t = np.arange(n, dtype=np.float64)
    series = (200 + 5 * rng.standard_normal((5, 6, 3, n))).astype(np.float32)
    series[0, 0, 0] = 7.0  # zero variance -> NaN
    mean, m2, cxy, m2t = run_welford(series, t)
    indices = np.array([0, 3, 17, 40, 89], dtype=np.int64)
    plain, detr = np.zeros(5), np.zeros(5)
    tsnr_in_mask(mean, m2, cxy, indices, n, m2t, plain, detr)
    ref_mean, ref_var, ref_var_d = naive_stats(series, t)
    flat = lambda a: a.ravel(order="F")[indices[1:]]  # noqa: E731
    assert np.isnan(plain[0]) and np.isnan(detr[0])
    np.testing.assert_allclose(plain[1:], flat(ref_mean) / np.sqrt(flat(ref_var)), rtol=1e-10)
    np.testing.assert_allclose(detr[1:], flat(ref_mean) / np.sqrt(flat(ref_var_d)), rtol=1e-8)


def tsnr_maps_numpy(mean, m2, cxy, n, m2t):
    """The full-grid maps as NumPy expressions (what rtsc computed before the kernel)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / (n - 1) if n > 1 else np.zeros_like(m2)
        plain = np.where(var > 0, mean / np.sqrt(var), 0.0)
        if n > 2 and m2t > 0:
            var_d = (m2 - cxy ** 2 / m2t) / (n - 2)
            detrended = np.where(var_d > 0, mean / np.sqrt(var_d), 0.0)
        else:
            detrended = np.zeros_like(plain)
    return plain.astype(np.float32), detrended.astype(np.float32)


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("n", [1, 2, 3, 12])
def test_tsnr_full_maps_equal_numpy_bit_for_bit(rng, order, n):
    t = np.arange(n, dtype=np.float64)
    series = (200 + 5 * rng.standard_normal((7, 6, 5, n))).astype(np.float32)
    series[0, 0, 0] = 7.0  # zero variance -> 0
    series[1, 2, 3] = 0.0  # zero mean, zero variance
    series[2, 2, 2, :] = -3 * t - 1  # a pure line: detrended variance ~0, maybe negative
    mean, m2, cxy, m2t = run_welford(series, t, order)
    cxy.flat[5] = np.nan  # undefined stays 0, as np.where gives
    m2.flat[7] = -1.0
    plain, detrended = tsnr_full_maps(mean, m2, cxy, n, m2t)
    ref_plain, ref_detrended = tsnr_maps_numpy(mean, m2, cxy, n, m2t)
    assert plain.dtype == detrended.dtype == np.float32
    assert plain.flags.f_contiguous == (order == "F")
    np.testing.assert_array_equal(plain, ref_plain)
    np.testing.assert_array_equal(detrended, ref_detrended)
    if n > 2:
        assert np.count_nonzero(detrended) > 0.9 * detrended.size
    # no trend when the time axis has no spread
    _, flat_trend = tsnr_full_maps(mean, m2, cxy, n, 0.0)
    np.testing.assert_array_equal(flat_trend, tsnr_maps_numpy(mean, m2, cxy, n, 0.0)[1])


@pytest.mark.parametrize("order", ["F", "C"])
def test_welford_trend_tsnr_is_the_two_kernels_bit_for_bit(rng, order):
    """The fused pass leaves the same statistics and the same tSNR as the Welford kernel
    followed by the gather (and so as their NumPy references above), also with 1e8 added;
    split in two (the mask voxels, then the rest: ``between=False`` and
    welford_trend_between), the same bit for bit once both ran."""
    shape, n = (7, 6, 5), 9
    for offset in (0.0, 1e8):
        series = (offset + 300 + 8 * rng.integers(-20, 20, (*shape, n))).astype(np.float32)
        series[0, 0, 0] = 7.0  # zero variance -> NaN
        indices = np.sort(rng.choice(series[..., 0].size, 60, replace=False)).astype(np.int64)
        indices[:3] = [0, 1, 2]  # a run
        indices[-1] = series[..., 0].size - 1  # and the last voxel
        indices = np.unique(indices)
        zeros = lambda: np.zeros(shape, order=order)  # noqa: E731
        fused, apart = [zeros() for _ in range(3)], [zeros() for _ in range(3)]
        split = [zeros() for _ in range(3)]  # the mask now, the rest before the next step
        outside = np.ones(shape, dtype=bool).ravel(order="K")
        outside[indices] = False
        mean_t = 0.0
        runs = index_runs(indices)
        assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in zip(*runs)]), indices)
        for t in range(n):
            dx = t - mean_t
            mean_t += dx / (t + 1)
            vol = np.asarray(series[..., t], dtype=np.float32, order=order)
            plain = np.full(indices.size, -1.0)
            welford_trend_update(vol, *apart, t + 1, dx)
            if t == 0:  # no variance yet: the fused kernel starts at the second volume
                welford_trend_update(vol, *fused, t + 1, dx)
                welford_trend_update(vol, *split, t + 1, dx)
                continue
            welford_trend_tsnr(vol, *fused, t + 1, dx, runs, plain)
            split_plain = np.full(indices.size, -1.0)
            before = [a.ravel(order="K")[outside].copy() for a in split]
            welford_trend_tsnr(vol, *split, t + 1, dx, runs, split_plain, between=False)
            for a, b, kept in zip(split, fused, before):
                assert np.array_equal(a.ravel(order="K")[indices], b.ravel(order="K")[indices])
                assert np.array_equal(a.ravel(order="K")[outside], kept)  # not touched yet
            assert np.array_equal(split_plain, plain, equal_nan=True)
            welford_trend_between(vol, *split, t + 1, dx, runs)
            for a, b in zip(split, fused):
                assert np.array_equal(a, b)
            ref, unused = np.zeros(indices.size), np.zeros(indices.size)
            tsnr_in_mask(*apart, indices, t + 1, 1.0, ref, unused, detrended=False)
            for a, b in zip(fused, apart):
                assert np.array_equal(a, b)
            assert np.array_equal(plain, ref, equal_nan=True)
        assert np.isnan(plain[0])
    with pytest.raises(ValueError, match="increasing"):
        index_runs(indices[::-1])
    with pytest.raises(ValueError, match="increasing"):
        welford_trend_tsnr(vol, *fused, n, 0.0, (runs[0][::-1].copy(), runs[1][::-1].copy()),
                           plain)


@pytest.mark.parametrize("guess", [np.nan, 0.0, 1.0, 1e9])
def test_segment_medians_exact_whatever_the_guess(rng, guess):
    values = rng.standard_normal(1001) + 1.0
    values[rng.integers(0, 1001, 30)] = np.nan
    bounds = np.array([0, 0, 1, 2, 500, 777, 1001], dtype=np.int64)
    out = np.full(6, guess)
    whole = segment_medians(values, bounds, np.zeros(1001), out, guess)
    for s in range(6):
        seg = values[bounds[s]:bounds[s + 1]]
        seg = seg[np.isfinite(seg)]
        if seg.size == 0:
            assert np.isnan(out[s])
        else:
            assert out[s] == np.median(seg)
    assert whole == np.median(values[np.isfinite(values)])


def test_segment_medians_exact_as_the_bands_narrow_and_miss(rng):
    """Volume after volume, the bands shrink while the medians settle; a jump the band
    cannot hold (a miss) still gives the exact medians, and widens the band again."""
    bounds = np.array([0, 300, 301, 700, 1000], dtype=np.int64)
    out = np.full(4, np.nan)
    bands = np.full(5, np.nan)
    bands[:] = 0.05
    whole = np.nan
    base = rng.standard_normal(1000) * 5 + 100
    for t in range(30):
        values = base + rng.standard_normal(1000) * 0.01 + (50.0 if t == 20 else 0.0)
        values[rng.integers(0, 1000, 10)] = np.nan
        whole = segment_medians(values, bounds, np.zeros(1000), out, whole, bands)
        for s in range(4):
            seg = values[bounds[s]:bounds[s + 1]]
            assert out[s] == np.median(seg[np.isfinite(seg)])
        assert whole == np.median(values[np.isfinite(values)])
        if t == 19:
            assert bands.max() < 0.01  # settled: narrow bands
        if t == 20:
            assert bands.min() == 0.05  # every band missed the jump


def assert_slice_sums_equal_numpy(out: list[np.ndarray], data: np.ndarray,
                                  labels: np.ndarray) -> None:
    """``out`` (head sum and count, air sum, sum of squares and count per slice) against
    the NumPy reference: label 1 is the head, 2 the air."""
    d = data.astype(np.float64)
    nz = data.shape[2]
    np.testing.assert_allclose(out[0], [(d[..., k] * (labels[..., k] == 1)).sum() for k in range(nz)])
    np.testing.assert_array_equal(out[1], [(labels[..., k] == 1).sum() for k in range(nz)])
    np.testing.assert_allclose(out[2], [(d[..., k] * (labels[..., k] == 2)).sum() for k in range(nz)])
    np.testing.assert_allclose(out[3], [(d[..., k] ** 2 * (labels[..., k] == 2)).sum()
                                        for k in range(nz)])
    np.testing.assert_array_equal(out[4], [(labels[..., k] == 2).sum() for k in range(nz)])


@pytest.mark.parametrize("order", ["F", "C"])
def test_slice_sums_match_numpy(rng, order):
    data = np.asarray(rng.uniform(0, 100, (7, 6, 5)).astype(np.float32), order=order)
    labels = np.asarray(rng.integers(0, 3, data.shape).astype(np.uint8), order=order)
    slice_of = np.asarray(np.broadcast_to(np.arange(5, dtype=np.int32), data.shape), order=order)
    out = [np.zeros(5), np.zeros(5, np.int64), np.zeros(5), np.zeros(5), np.zeros(5, np.int64)]
    slice_sums(data, labels, slice_of, *out)
    assert_slice_sums_equal_numpy(out, data, labels)


def test_slice_sums_over_label_runs_match_numpy(rng):
    """The run form gives the per-label sums of the NumPy reference (and so of
    :func:`slice_sums`), with runs that span rows and stop at slice boundaries."""
    shape = (9, 7, 5)
    d = np.asfortranarray(rng.random(shape, dtype=np.float32) * 100 + 1e4)
    labels = np.asfortranarray(rng.integers(0, 3, shape).astype(np.uint8))
    labels[:, :, 2] = 2  # a whole slice: one run
    labels[:, :, 3] = 0  # none
    out = [np.zeros(5), np.zeros(5, np.int64), np.zeros(5), np.zeros(5), np.zeros(5, np.int64)]
    slice_sums_runs(d, LabelRuns.of(labels == 1), LabelRuns.of(labels == 2), *out)
    assert_slice_sums_equal_numpy(out, d, labels)
    runs = LabelRuns.of(labels == 2)
    assert runs.bounds[3] - runs.bounds[2] == 1 and runs.bounds[4] == runs.bounds[3]


def test_wrappers_refuse_bad_input():
    data = np.zeros((2, 2, 2), dtype=np.float64, order="F")
    state = [np.zeros((2, 2, 2), order="F") for _ in range(3)]
    with pytest.raises(TypeError):
        welford_trend_update(data, *state, n=1, dx=0.0)
    with pytest.raises(ValueError):
        welford_trend_update(np.zeros((2, 2, 3), np.float32, order="F"), *state, n=1, dx=0.0)


def naive_slice_check(bg_sum, bg_sq, bg_n, history, history_se, filled, min_history,
                      threshold, min_voxels, min_relative):
    """NumPy reference of the spike test (without the history update)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(bg_n >= min_voxels, bg_sum / np.maximum(bg_n, 1), np.nan)
        se = np.sqrt(np.maximum(bg_sq / np.maximum(bg_n, 1) - mean ** 2, 0) / np.maximum(bg_n, 1))
        median = np.array([np.median(history[:f, s]) if f else np.nan
                           for s, f in enumerate(filled)])
        enough = filled >= min_history
        pooled = (np.abs(history - median) / history_se)[:, enough]
        pooled = pooled[np.isfinite(pooled)]
        scale = 1.4826 * np.median(pooled) if pooled.size else 1.0
        spread = np.maximum(scale * se, min_relative * np.abs(median) + 1e-9)
        z = np.where(enough & np.isfinite(mean), (mean - median) / spread, np.nan)
    return z, np.isfinite(z) & (np.abs(z) > threshold)


def test_slice_check_matches_numpy_and_learns_unflagged(rng):
    from rtsc.pipeline.qc._slice_kernels import slice_check

    window, nz = 10, 12
    filled = rng.integers(0, window + 1, nz).astype(np.int64)
    filled[:3] = window
    history = np.full((window, nz), np.nan)
    history_se = np.full((window, nz), np.nan)
    base = rng.uniform(10, 20, nz)
    for s in range(nz):
        history[:filled[s], s] = base[s] + 0.1 * rng.standard_normal(filled[s])
        history_se[:filled[s], s] = rng.uniform(0.08, 0.12, filled[s])
    bg_n = rng.integers(1000, 3000, nz).astype(np.int64)
    bg_n[5] = 3  # too little air
    values = base + 0.1 * rng.standard_normal(nz)
    values[[1, 7]] += 3.0  # spikes
    sd = 0.1 * np.sqrt(bg_n)
    bg_sum = values * bg_n
    bg_sq = (sd ** 2 + values ** 2) * bg_n
    z_ref, flag_ref = naive_slice_check(bg_sum, bg_sq, bg_n, history, history_se, filled,
                                        4, 6.0, 20, 1e-3)
    position = filled % window
    h, hse, f, pos = history.copy(), history_se.copy(), filled.copy(), position.copy()
    z, mean, se = np.empty(nz), np.empty(nz), np.empty(nz)
    flagged = np.zeros(nz, dtype=bool)
    fg_sum, fg_n = rng.uniform(1e5, 2e5, nz), rng.integers(100, 200, nz).astype(np.int64)
    sigma, snr = slice_check(fg_sum, fg_n, bg_sum, bg_sq, bg_n, np.zeros(nz, dtype=bool),
                             h, hse, f, pos, 4, 6.0, 20, 1e-3, z, flagged, mean, se,
                             np.zeros(window * nz))
    np.testing.assert_allclose(z, z_ref, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(flagged, flag_ref)
    if filled[1] >= 4:
        assert flagged[1]
    learned = np.isfinite(mean) & ~flagged
    np.testing.assert_array_equal(f, np.minimum(filled + learned, window))
    for s in np.flatnonzero(learned):
        assert h[position[s], s] == mean[s] and hse[position[s], s] == se[s]
    use = learned
    expected_sigma = np.sqrt(bg_sq[use].sum() / (2 * bg_n[use].sum()))
    assert sigma == pytest.approx(expected_sigma, rel=1e-12)
    assert snr == pytest.approx(fg_sum[use].sum() / fg_n[use].sum() / expected_sigma, rel=1e-12)


REALDATA = Path("/work/shared/realdata/dcm_qa_nih/Ref")


def _numpy_labels(first: np.ndarray, head: np.ndarray, threshold: float) -> np.ndarray:
    """The former NumPy rule of background_labels (labels on zeros)."""
    order = "F" if first.flags.f_contiguous and not first.flags.c_contiguous else "C"
    labels = np.zeros(first.shape, dtype=np.uint8, order=order)
    labels[~head] = 2
    labels[first > threshold] = 1
    return labels


def _assert_runs_equal(a: LabelRuns, b: LabelRuns) -> None:
    for name in ("starts", "stops", "bounds", "counts"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def _label_volumes(rng):
    """Random labels with whole, empty and edge-touching slices; simulated and real
    scanner volumes through background_labels."""
    shape = (9, 7, 5)
    labels = np.asfortranarray(rng.integers(0, 3, shape).astype(np.uint8))
    labels[:, :, 2] = 2
    labels[:, :, 3] = 0
    yield labels
    yield np.asfortranarray(rng.integers(0, 3, (1, 1, 4)).astype(np.uint8))
    yield np.ones((4, 3, 1), dtype=np.uint8, order="F")
    from simulator.bold import simulate_run
    from simulator.phantom import Grid
    run = simulate_run(Grid((64, 64, 36), (3.0, 3.0, 3.0)), 1, 2.0, seed=2, noise_sigma=10.0)
    yield background_labels(np.asfortranarray(run.data[..., 0], dtype=np.float32), 0.2, 2)
    try:
        import nibabel
    except ImportError:
        return
    for path in sorted(REALDATA.glob("*.nii.gz"))[:4]:
        image = nibabel.load(path)
        first = np.asarray(image.dataobj[..., 0] if image.ndim == 4 else image.dataobj,
                           dtype=np.float32, order="F")
        yield background_labels(first, 0.2, 2)


def test_label_runs_kernel_equals_numpy(rng):
    n = 0
    for labels in _label_volumes(rng):
        for value in (0, 1, 2):
            _assert_runs_equal(LabelRuns.of_label(labels, value), LabelRuns.of(labels == value))
        n += 1
    assert n >= 4


@pytest.mark.parametrize("order", ["F", "C"])
def test_background_labels_kernel_equals_numpy(rng, order):
    volumes = [np.asarray(rng.random((20, 17, 6), dtype=np.float32) * 100.0, order=order)]
    from simulator.bold import simulate_run
    from simulator.phantom import Grid
    run = simulate_run(Grid((64, 64, 36), (3.0, 3.0, 3.0)), 1, 2.0, seed=2, noise_sigma=10.0)
    volumes.append(np.asarray(run.data[..., 0], dtype=np.float32, order=order))
    try:
        import nibabel
        for path in sorted(REALDATA.glob("*.nii.gz"))[:4]:
            image = nibabel.load(path)
            volumes.append(np.asarray(image.dataobj[..., 0] if image.ndim == 4
                                      else image.dataobj, dtype=np.float32, order=order))
    except ImportError:
        pass
    volumes[0][0, 0, 0] = np.nan  # NaN: neither head by intensity nor above the threshold
    for first in volumes:
        p98 = percentile(first, 98)
        head = binary_dilation(first > HEAD_FRACTION * p98, 2)
        for fraction in (0.2, 0.5):
            expected = _numpy_labels(first, head, fraction * p98)
            # a threshold exactly on a voxel's value: float32 comparison, as NumPy's
            for threshold in (fraction * p98, float(first.flat[7]),
                              float(np.nextafter(first.flat[7], np.float32(0)))):
                labels = np.empty(first.shape, dtype=np.uint8, order=order)
                background_labels_of(first, head, threshold, labels)
                np.testing.assert_array_equal(labels, _numpy_labels(first, head, threshold))
            got = background_labels(first, fraction, 2)
            np.testing.assert_array_equal(got, expected)
            assert got.flags.f_contiguous == expected.flags.f_contiguous
