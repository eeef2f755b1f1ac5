"""The percentile rank, the live figures and the protocol fingerprint against plain numpy
recomputations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from rtsc.history.fingerprint import Protocol
from rtsc.history.percentile import FIGURES, LiveState, end_figures, live_step, \
    percentile_rank, site_percentiles
from rtsc.volume import SeriesInfo


def numpy_rank(values: np.ndarray, x: float) -> float:
    """The definition, recomputed over an unsorted array."""
    return 100.0 * (np.sum(values < x) + 0.5 * np.sum(values == x)) / values.size


def test_percentile_rank_equals_numpy_and_scipy(rng):
    for n in (1, 2, 7, 50):
        values = rng.integers(0, 12, n).astype(np.float64)  # ties on purpose
        earlier = np.sort(values)
        for x in [*values, -1.0, 12.0, 5.5, *rng.uniform(-1, 13, 5)]:
            rank = percentile_rank(earlier, x)
            assert rank == numpy_rank(values, x)
            assert rank == pytest.approx(stats.percentileofscore(values, x, kind="mean"),
                                         abs=1e-12)
    assert percentile_rank(np.array([1.0, 2.0]), None) is None
    assert percentile_rank(np.array([1.0, 2.0]), float("nan")) is None
    assert percentile_rank(np.zeros(0), 1.0) is None
    assert percentile_rank(np.array([1.0, 2.0, 3.0]), 0.0) == 0.0
    assert percentile_rank(np.array([1.0, 2.0, 3.0]), 4.0) == 100.0


def test_site_percentiles_need_min_series():
    earlier = {name: np.arange(4.0) for name in FIGURES}
    figures = {name: 1.0 for name in FIGURES}
    assert set(site_percentiles(earlier, figures, 5).values()) == {None}
    assert site_percentiles(earlier, figures, 4) == {name: 37.5 for name in FIGURES}
    earlier["snr"] = np.arange(2.0)
    assert site_percentiles(earlier, {**figures, "fd_mean": None}, 3) == {
        "tsnr": 37.5, "snr": None, "fd_mean": None, "usable_fraction": 37.5,
        "dvars_std": 37.5}


def test_live_figures_equal_numpy_over_the_volumes_so_far(rng):
    n = 40
    fd = rng.gamma(2.0, 0.1, n)
    fd[[0, 7]] = np.nan  # before the reference, a failed registration
    snr = rng.normal(60, 5, n)
    snr[3] = np.nan
    std = rng.normal(1.0, 0.2, n)
    std[0] = np.nan
    tsnr = rng.normal(50, 3, n)
    usable = np.cumsum(np.nan_to_num(fd) <= 0.2)
    state = LiveState()
    for i in range(n):
        metrics = {"framewise_displacement": None if np.isnan(fd[i]) else fd[i],
                   "snr": snr[i], "std_dvars": std[i], "tsnr": tsnr[i],
                   "usable_frames": {"0.2": int(usable[i]), "0.5": i + 1}}
        state, figures = live_step(state, metrics, "0.2")
        upto = slice(0, i + 1)
        assert figures["tsnr"] == tsnr[i]
        assert figures["fd_mean"] == pytest.approx(np.nanmean(fd[upto]), rel=1e-12) \
            if np.isfinite(fd[upto]).any() else figures["fd_mean"] is None
        assert figures["snr"] == np.nanmedian(snr[upto])
        assert figures["usable_fraction"] == usable[i] / (i + 1)
        assert (figures["dvars_std"] is None) if i == 0 else \
            figures["dvars_std"] == pytest.approx(np.nanmean(std[upto]), rel=1e-12)
    summary = {"n_volumes": n, "tsnr": tsnr[-1], "snr_background": float(np.nanmedian(snr)),
               "fd_mean": float(np.nanmean(fd)), "usable_frames": {"0.2": int(usable[-1])},
               "dvars_std": float(np.nanmean(std))}
    end = end_figures(summary, 0.2)
    for name in FIGURES:
        assert end[name] == pytest.approx(figures[name], rel=1e-12)
    assert end_figures({"n_volumes": 0, "tsnr": float("nan")}, 0.2) == dict.fromkeys(FIGURES)


def test_fingerprint_parts():
    info = SeriesInfo("s", 2.0, 100, 3, "ep2d_bold", "mosaic", sequence="*epfid2d1_64",
                      station_hash="0123456789abcdef")
    base = Protocol.of(info, (64, 64, 36), (3.0, 3.0, 3.3), "brain")
    # the same protocol: voxel sizes from an affine's float noise, TR to the ms
    same = Protocol.of(dataclasses.replace(info, series="t", tr_s=2.0000004, series_number=4),
                       (64, 64, 36), (3.0000001, 2.9999999, 3.3), "brain")
    assert same == base and same.fingerprint == base.fingerprint
    assert len(base.fingerprint) == 16 and int(base.fingerprint, 16) >= 0
    others = [Protocol.of(info, (64, 64, 35), (3.0, 3.0, 3.3), "brain"),
              Protocol.of(info, (64, 72, 36), (3.0, 3.0, 3.3), "brain"),
              Protocol.of(info, (64, 64, 36), (3.0, 3.0, 3.5), "brain"),
              Protocol.of(info, (64, 64, 36), (3.0, 3.0, 3.3), "spinal_cord")]
    for change in ({"tr_s": 2.5}, {"sequence": "*epfid2d1_72"}, {"description": "rest"},
                   {"station_hash": None}):
        others.append(Protocol.of(dataclasses.replace(info, **change), (64, 64, 36),
                                  (3.0, 3.0, 3.3), "brain"))
    prints = {p.fingerprint for p in others}
    assert len(prints) == len(others) and base.fingerprint not in prints
