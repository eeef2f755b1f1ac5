"""QC maths on simulated runs with known noise and injected spikes, against offline
recomputations."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import signal

from rtsc.config import QcConfig, VerdictConfig, config_from_dict
from rtsc.errors import ConfigError
from rtsc.pipeline.qc.alerts import AlertEngine, check_rules, protocol_differences, series_rules
from rtsc.pipeline.qc.snr import slice_qc_init, slice_qc_step, tsnr_detrended_median, tsnr_init, tsnr_step
from rtsc.pipeline.qc.stages import QcStage, TimingStage, TimingState, timing_step
from rtsc.pipeline.stages import automatic_mask
from rtsc.pipeline.qc.verdict import verdict
from rtsc.volume import SeriesInfo, Volume
from anatomies import HEADS, simulated_head
from simulator.bold import plan_run, iter_volumes
from simulator.phantom import Grid

GRID = Grid((64, 64, 36), (3.0, 3.0, 3.0))
SIGMA = 10.0


def _run(n, seed, drift=0.0, spikes=(), sigma=SIGMA, head="phantom"):
    grid, kwargs = simulated_head(head, GRID)
    kwargs.setdefault("psf_samples", 1)
    plan = plan_run(grid, n, 2.0, seed=seed, noise_sigma=sigma, activation_pct=0.0,
                    drift_pct_per_min=drift, motion=np.zeros((n, 6)), spikes=spikes, **kwargs)
    return plan, np.stack([np.asfortranarray(v.quantised.astype(np.float32))
                           for v in iter_volumes(plan)], axis=-1)


@pytest.fixture(scope="module", params=HEADS)
def drifting_run(request):
    """60 volumes, 2 %/min drift, sigma 10, and the same run without noise; on the
    phantom and on real anatomy cut by the field of view."""
    plan, data = _run(60, seed=4, drift=2.0, head=request.param)
    _, clean = _run(60, seed=4, drift=2.0, sigma=0.0, head=request.param)
    return plan, data, clean


def _tsnr_over(data):
    first = np.asfortranarray(data[..., 0])
    mask = automatic_mask(first, 0.2)
    state = tsnr_init(first, mask)
    for t in range(data.shape[-1]):
        values = tsnr_step(state, np.asfortranarray(data[..., t]), float(t))
    return state, mask, values


def test_tsnr_equals_offline_recomputation(drifting_run):
    _, data, _ = drifting_run
    state, mask, values = _tsnr_over(data)
    y = data.astype(np.float64)
    tsnr = y.mean(-1) / y.std(-1, ddof=1)
    assert values.median == pytest.approx(np.median(tsnr[mask]), rel=1e-6)
    for k in range(data.shape[2]):
        if mask[..., k].any():
            assert values.slices[k] == pytest.approx(np.median(tsnr[..., k][mask[..., k]]), rel=1e-6)
    t = np.arange(data.shape[-1], dtype=np.float64)
    design = np.stack([np.ones_like(t), t], 1)
    flat = y[mask].T
    resid = flat - design @ np.linalg.lstsq(design, flat, rcond=None)[0]
    detrended = flat.mean(0) / np.sqrt((resid ** 2).sum(0) / (len(t) - 2))
    assert tsnr_detrended_median(state) == pytest.approx(np.median(detrended), rel=1e-6)


def test_tsnr_agrees_with_the_known_noise(drifting_run):
    """Expected tSNR per voxel: noise-free mean / sigma. The drift (2 %/min) inflates the
    plain tSNR's variance; the detrended tSNR removes it."""
    plan, data, clean = drifting_run
    state, mask, values = _tsnr_over(data)
    expected = np.median(clean.astype(np.float64).mean(-1)[mask]) / SIGMA
    detrended = tsnr_detrended_median(state)
    assert detrended == pytest.approx(expected, rel=0.05)
    assert values.median < 0.95 * detrended  # the drift is visible in the plain figure
    _, flat_data = _run(40, seed=5)
    _, flat_clean = _run(40, seed=5, sigma=0.0)
    _, mask2, values2 = _tsnr_over(flat_data)
    expected2 = np.median(flat_clean.astype(np.float64).mean(-1)[mask2]) / SIGMA
    assert values2.median == pytest.approx(expected2, rel=0.05)


def test_snr_and_background_noise(drifting_run):
    plan, data, clean = drifting_run
    first = np.asfortranarray(data[..., 0])
    state = slice_qc_init(first, 0.2, 3, 30)
    for t in range(10):
        values = slice_qc_step(state, np.asfortranarray(data[..., t]), 6.0, 8)
    assert values.noise_sigma == pytest.approx(SIGMA, rel=0.05)
    mask = state.labels == 1
    expected = clean[..., 9][mask].mean() / SIGMA
    assert values.snr == pytest.approx(expected, rel=0.05)


def test_injected_spikes_are_found_without_false_alarms():
    rng = np.random.default_rng(7)
    n = 150
    volumes = rng.choice(np.arange(12, n), size=60, replace=False)
    spikes = [(int(v), int(rng.integers(0, 36)), SIGMA) for v in volumes]  # amplitude = sigma
    _, data = _run(n, seed=6, spikes=spikes)
    state = slice_qc_init(np.asfortranarray(data[..., 0]), 0.2, 3, 30)
    found = set()
    flagged_volumes = set()
    for t in range(n):
        values = slice_qc_step(state, np.asfortranarray(data[..., t]), 6.0, 8)
        found |= {(t, k) for k in values.spikes}
        if values.spikes:
            flagged_volumes.add(t)
    truth = {(v, k) for v, k, _ in spikes}
    recall = len(found & truth) / len(truth)
    assert recall >= 0.95
    clean_volumes = set(range(8, n)) - set(volumes.tolist())
    false_volumes = flagged_volumes & clean_volumes
    assert len(false_volumes) <= 0.01 * len(clean_volumes)
    # and on a spiked volume, only the spiked slice is flagged
    wrong_slices = {(t, k) for t, k in found if t in set(volumes.tolist())} - truth
    assert len(wrong_slices) <= 0.01 * len(truth) * 36


def test_missing_slices_are_not_spikes():
    _, data = _run(20, seed=8)
    state = slice_qc_init(np.asfortranarray(data[..., 0]), 0.2, 3, 30)
    for t in range(20):
        vol = np.asfortranarray(data[..., t])
        skip: tuple[int, ...] = ()
        if t == 15:
            vol[..., 4] = 0
            skip = (4,)
        values = slice_qc_step(state, vol, 6.0, 8, skip=skip)
        assert values.spikes == []


# ---- usable frames, projections, criterion ----------------------------------------------

def offline_usable(fd, threshold, min_run):
    """Independent FIRMM count: groupby runs of good frames."""
    good = [bool(np.isfinite(f) and f <= threshold) for f in fd]
    total = 0
    for key, run in itertools.groupby(good):
        length = len(list(run))
        if key and length >= max(min_run, 1):
            total += length
    return total


def _info(tr=2.0, n_expected=100):
    return SeriesInfo("s", tr, n_expected, 1, "", "mosaic")


def _volume(index, info, data=None):
    data = np.ones((8, 8, 4), np.float32, order="F") * (100 + index % 3) if data is None else data
    return Volume(data, np.eye(4), index, info, None, 0.0, 0.0)


@pytest.mark.parametrize("min_run", [0, 5])
def test_usable_frames_and_projections_equal_offline(rng, min_run):
    n, tr, n_expected = 80, 2.0, 100
    fd = np.abs(rng.normal(0.15, 0.15, n))
    fd[0] = 0.0
    fd[[10, 33]] = np.nan  # registration failed
    cfg = QcConfig(min_run_frames=min_run)
    base = {"0.2": 3.0, "0.3": 4.0}
    stage = QcStage(cfg, 0.2, [0.2, 0.3, 0.4], session_base_minutes=base)
    info = _info(tr, n_expected)
    for t in range(n):
        up = {"framewise_displacement": None if np.isnan(fd[t]) else float(fd[t])}
        m = stage.update(_volume(t, info), up).metrics
        for thr in (0.2, 0.3, 0.4):
            key = f"{thr:g}"
            count = offline_usable(fd[:t + 1], thr, min_run)
            assert m["usable_frames"][key] == count
            assert m["clean_minutes"][key] == pytest.approx(count * tr / 60)
            assert m["projected_minutes"][key] == pytest.approx(
                (count + count / (t + 1) * (n_expected - t - 1)) * tr / 60)
            assert m["session_clean_minutes"][key] == pytest.approx(
                base.get(key, 0.0) + count * tr / 60)
        crit = m["criterion"]
        minutes = base["0.2"] + offline_usable(fd[:t + 1], 0.2, min_run) * tr / 60
        assert crit["minutes"] == pytest.approx(minutes)
        fraction = offline_usable(fd[:t + 1], 0.2, min_run) / (t + 1)
        expected_eta = (12.5 - minutes) * 60 / fraction if fraction else None
        assert crit["eta_s"] == pytest.approx(expected_eta)
        assert crit["reached"] is False and crit["fraction"] == pytest.approx(minutes / 12.5)


def test_criterion_reached_over_several_series():
    """12.5 minutes at TR 2 s = 375 clean frames: two series of 200 reach it."""
    cfg = QcConfig()
    info = _info(2.0, 200)
    first = QcStage(cfg, 0.2, [0.2])
    for t in range(200):
        m = first.update(_volume(t, info), {"framewise_displacement": 0.05}).metrics
    assert m["criterion"]["reached"] is False
    assert m["criterion"]["eta_s"] == pytest.approx((12.5 - 200 * 2 / 60) * 60)
    second = QcStage(cfg, 0.2, [0.2], session_base_minutes=m["clean_minutes"])
    for t in range(200):
        m2 = second.update(_volume(t, info), {"framewise_displacement": 0.05}).metrics
        if m2["criterion"]["reached"]:
            break
    assert t == 175 - 1  # frame 175 of the second series completes 375
    assert m2["criterion"]["eta_s"] == 0.0


def test_respiration_filter_removes_breathing_and_equals_lfilter(rng):
    tr, n, bpm = 0.8, 200, 18.0
    t = np.arange(n) * tr
    params = np.zeros((n, 6))
    params[:, 1] = 0.3 * np.sin(2 * np.pi * bpm / 60 * t)  # apparent A-P motion
    params[:, 2] = np.cumsum(rng.normal(0, 0.005, n))  # slow real drift
    params[60, :3] += 0.8  # a real move
    cfg = QcConfig(respiration_filter=True, breaths_per_min=bpm)
    stage = QcStage(cfg, 0.2, [0.2])
    info = _info(tr, n)
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    raw_fd = np.r_[0, np.abs(np.diff(params, axis=0)).sum(1)]
    live = []
    for i in range(n):
        up = dict(zip(names, params[i]), framewise_displacement=float(raw_fd[i]))
        live.append(stage.update(_volume(i, info), up).metrics["framewise_displacement_filtered"])
    b, a = signal.iirnotch(bpm / 60, bpm / 6.0, fs=1 / tr)
    zi = signal.lfilter_zi(b, a)[:, None] * params[0]
    filtered, _ = signal.lfilter(b, a, params, axis=0, zi=zi)
    offline = np.r_[0, np.abs(np.diff(filtered, axis=0))[:, :3].sum(1)
                    + 50 * np.abs(np.diff(filtered, axis=0))[:, 3:].sum(1)]
    np.testing.assert_allclose(live, offline, atol=1e-12)
    late = slice(100, None)  # after the filter's transient
    assert np.median(offline[late]) < 0.25 * np.median(raw_fd[late])
    assert (raw_fd[late] > 0.2).mean() > 0.5 and (offline[late] > 0.2).mean() < 0.05


def test_no_motion_stage_means_no_usable_frames():
    stage = QcStage(QcConfig(), 0.2, [0.2])
    for t in range(3):
        m = stage.update(_volume(t, _info(2.0, 10)), {}).metrics
    assert m["usable_frames"] == {} and m["criterion"] is None
    summary = stage.summary()
    assert summary["fd_num"] is None and summary["tsnr"] is not None
    assert verdict({**summary, "n_volumes": 3}, VerdictConfig(), 0.2)[0] == "pass"


def test_respiration_filter_off_when_breathing_aliases():
    stage = QcStage(QcConfig(respiration_filter=True, breaths_per_min=18.0), 0.2, [0.2])
    out = stage.update(_volume(0, _info(2.0, 10)), {"framewise_displacement": 0.0})
    assert [a[1] for a in out.alerts] == ["respiration_filter_off"]


# ---- timing ------------------------------------------------------------------------------

def test_timing_flags_late_and_missing_volumes():
    state = TimingState()
    # TR 2 s: late above 3 s, or above (gap - 1 + 1.5) TR across missing volumes
    arrivals = {0: 0.0, 1: 2.0, 2: 4.1, 3: 7.5, 5: 11.5, 6: 13.4, 9: 20.0, 12: 27.7}
    events = {i: timing_step(state, i, t, 2.0, 1.5) for i, t in arrivals.items()}
    assert [i for i, e in events.items() if e.late] == [3, 12]  # 3.4 > 3; 6.6 < 7; 7.7 > 7
    assert list(events[5].missing) == [4] and list(events[9].missing) == [7, 8]
    assert state.missing == [[4, 4], [7, 8], [10, 11]] and state.late == [3, 12]


def test_timing_keeps_a_huge_gap_as_one_range():
    """Issue 16 item 3: a volume numbered 3,000,000 is one range in the volume message,
    not 3 M indices (25.9 MB before)."""
    stage = TimingStage()
    stage.update(_volume(0, _info(2.0, None)))
    out = stage.update(_volume(2_999_999, _info(2.0, None)))
    assert out.metrics["missing_before"] == [1, 2_999_998]
    assert len(json.dumps(out.metrics)) < 500 and "1-2999998" in out.alerts[0][2]
    assert stage.state.missing == [[1, 2_999_998]]


# ---- alerts and verdict -----------------------------------------------------------------

def test_alert_rule_fires_once_and_rearms():
    cfg = config_from_dict({}).qc
    engine = AlertEngine(cfg.alerts, tr_s=2.0)
    fd = [0.1] * 5 + [0.6, 0.7, 0.1, 0.9, 0.8, 0.7, 0.6] + [0.1] * 12 + [0.6, 0.6, 0.6]
    fired = []
    for i, f in enumerate(fd):
        for level, code, text in engine.update({"index": i, "framewise_displacement": f,
                                                "flags": [], "latency_s": 0.01}):
            fired.append((i, code, level))
    assert fired == [(8, "motion", "warning"), (26, "motion", "warning")]


def test_a_single_head_jump_alerts_at_once():
    """Isolated jumps (the demo's 2.4 mm moves) never make 3 of 10 volumes over 0.5 mm,
    so the motion rule stays silent; qc.fd_jump_mm catches each at its volume, and a
    jump lasting two volumes is one alert."""
    cfg = config_from_dict({}).qc
    fd = [0.1] * 6 + [2.4] + [0.1] * 10 + [2.4, 1.5] + [0.1] * 12 + [0.9, 2.4]
    alerts = {}
    for rules in (cfg.alerts, series_rules(cfg)):
        engine = AlertEngine(rules, tr_s=2.0)
        alerts[len(rules)] = [(i, code) for i, f in enumerate(fd) for _, code, _ in engine.update(
            {"index": i, "framewise_displacement": f, "flags": [], "latency_s": 0.01})]
    assert alerts[len(cfg.alerts)] == []
    assert alerts[len(cfg.alerts) + 1] == [(6, "motion_jump"), (17, "motion_jump"),
                                           (32, "motion_jump")]
    off = config_from_dict({"qc": {"fd_jump_mm": None}}).qc
    assert series_rules(off) == list(off.alerts)


def test_alert_rules_on_tr_units_and_flags():
    cfg = config_from_dict({}).qc
    engine = AlertEngine(cfg.alerts, tr_s=0.5)
    codes = []
    for i in range(12):
        header = {"index": i, "latency_s": 0.7 if i in (2, 3, 9) else 0.01,
                  "flags": ["spike"] if i in (4, 5, 7) else []}
        codes += [(i, c) for _, c, _ in engine.update(header)]
    # lag > 1 TR (0.5 s): re-armed after 3 volumes without; consecutive spike volumes
    # are one condition, a spike after a clean volume a new one
    assert codes == [(2, "processing_lag"), (4, "spike"), (7, "spike"), (9, "processing_lag")]


def test_alert_rules_are_checked():
    bad = config_from_dict({"qc": {"alerts": [{"count": 4, "window": 3}]}}).qc.alerts
    with pytest.raises(ConfigError, match=r"qc.alerts\[0\].count"):
        check_rules(bad)
    bad = config_from_dict({"qc": {"alerts": [{"count": 2, "clear_count": 2}]}}).qc.alerts
    with pytest.raises(ConfigError, match=r"qc.alerts\[0\].clear_count"):
        check_rules(bad)
    with pytest.raises(ConfigError, match="qc.alerts"):
        config_from_dict({"qc": {"alerts": [{"op": "=="}]}})


def test_protocol_differences():
    protocol = config_from_dict({"qc": {"protocol": {"shape": [64, 64, 36], "tr_s": 2.0}}}).qc.protocol
    assert protocol_differences((64, 64, 36), (3, 3, 3), 2.0, protocol) == []
    found = protocol_differences((64, 64, 32), (3, 3, 3), 2.5, protocol)
    assert len(found) == 2 and "64x64x32" in found[0] and "2.5" in found[1]


def test_verdict_levels():
    good = {"n_volumes": 100, "fd_mean": 0.1, "tsnr": 60.0, "usable_frames": {"0.2": 95},
            "n_missing_volumes": 0, "missing_volumes": [], "spike_volumes": [],
            "registration_failed": []}
    assert verdict(good, VerdictConfig(), 0.2) == ("pass", [])
    level, reasons = verdict({**good, "spike_volumes": [3]}, VerdictConfig(), 0.2)
    assert level == "warn" and reasons == ["warn: 1 volumes with spikes"]
    level, reasons = verdict({**good, "usable_frames": {"0.2": 40}, "fd_mean": 0.3},
                             VerdictConfig(), 0.2)
    assert level == "fail" and len(reasons) == 2
    level, _ = verdict({**good, "incomplete": True, "n_expected": 120}, VerdictConfig(), 0.2)
    assert level == "fail"
    level, _ = verdict({**good, "tsnr": 10.0}, VerdictConfig(tsnr_fail=None), 0.2)
    assert level == "warn"
    level, reasons = verdict({**good, "n_missing_volumes": 30, "missing_volumes": [[5, 34]]},
                             VerdictConfig(), 0.2)
    assert level == "fail" and reasons == ["fail: 30 volumes missing (23.1% > 10%)"]


@pytest.mark.parametrize("by_left", [False, True])
def test_tsnr_of_voxels_leaving_the_validity_mask(by_left):
    """tsnr_restrict mid-run: the median and slice medians are those of the voxels
    still valid (whole series, NumPy), a slice with none left is NaN; also given the
    voxels that left (``by_left``, Coverage.left; some outside the mask), when the state
    is edited instead of rebuilt: the same indices, bounds and runs as rebuilt."""
    from rtsc.pipeline.qc.snr import tsnr_restrict  # noqa: PLC0415

    rng = np.random.default_rng(8)
    shape = (10, 9, 6)
    n = 15
    base = 500.0 + 500.0 * rng.random(shape)
    data = [np.asfortranarray(base + rng.normal(0.0, 20.0, shape), np.float32)
            for _ in range(n)]
    mask = np.ones(shape, bool)
    mask[0] = False
    valid = np.ones(shape, bool)
    state = tsnr_init(data[0], mask)
    for t in range(n):
        if t in (6, 9):
            before = valid.copy()
            if t == 6:
                valid[:, :, 5] = False
                valid[:4, :, 0] = False
            else:
                valid[3, 2:5, 2] = False  # inside runs: they split
            left = np.flatnonzero((before & ~valid).ravel(order="F")) if by_left else None
            assert tsnr_restrict(state, valid, left) == int((mask & before & ~valid).sum())
            rebuilt = tsnr_init(data[0], mask & valid)
            np.testing.assert_array_equal(state.indices, rebuilt.indices)
            np.testing.assert_array_equal(state.bounds, rebuilt.bounds)
            for ours, theirs in zip(state.runs, rebuilt.runs):
                np.testing.assert_array_equal(ours, theirs)
        volume = data[t].copy(order="F")
        volume[~valid] = np.nan
        values = tsnr_step(state, volume, float(t))
    stack = np.stack(data, axis=-1).astype(np.float64)
    voxel = stack.mean(axis=-1) / stack.std(axis=-1, ddof=1)
    keep = mask & valid
    assert values.median == pytest.approx(float(np.median(voxel[keep])), rel=1e-9)
    for k in range(5):
        assert values.slices[k] == pytest.approx(
            float(np.median(voxel[:, :, k][keep[:, :, k]])), rel=1e-9)
    assert np.isnan(values.slices[5])


def test_tsnr_outside_the_mask_after_the_message_is_the_same_statistics():
    """tsnr_step(defer_outside=True): the figures at once, the voxels outside the mask
    when caught up (the stage's after_publish, or the next reader: the next step, the
    maps, a validity restriction); the statistics equal a whole pass's bit for bit, and
    the stage's maps through SeriesPipeline (work after the message run or not) equal
    the NumPy tSNR of the whole series."""
    from rtsc.pipeline.qc.snr import tsnr_catch_up, tsnr_maps, tsnr_restrict  # noqa: PLC0415
    from rtsc.pipeline.series import SeriesPipeline  # noqa: PLC0415

    rng = np.random.default_rng(11)
    shape, n = (10, 9, 6), 12
    base = 500.0 + 500.0 * rng.random(shape)
    data = [np.asfortranarray(base + rng.normal(0.0, 20.0, shape), np.float32)
            for _ in range(n)]
    mask = np.zeros(shape, bool)
    mask[2:8, 1:7, 1:5] = True
    valid = np.ones(shape, bool)
    whole, deferred = tsnr_init(data[0], mask), tsnr_init(data[0], mask)
    for t in range(n):
        if t == 8:  # a restriction with a step pending: caught up by the mask before it
            valid[:, :, 4] = False  # a slice of the mask
            assert deferred.pending is not None
            tsnr_restrict(whole, valid), tsnr_restrict(deferred, valid)
        volume = data[t].copy(order="F")
        volume[~valid] = np.nan
        a = tsnr_step(whole, volume, float(t))
        b = tsnr_step(deferred, volume, float(t), defer_outside=True)
        assert a.median == b.median or (np.isnan(a.median) and np.isnan(b.median))
        np.testing.assert_array_equal(a.slices, b.slices)
        if t % 3 == 0:
            tsnr_catch_up(deferred)
            assert deferred.pending is None
            for name in ("mean", "m2", "cxy"):
                np.testing.assert_array_equal(getattr(deferred, name), getattr(whole, name))
    for x, y in zip(tsnr_maps(deferred), tsnr_maps(whole)):
        np.testing.assert_array_equal(x, y)

    info = SeriesInfo("s", 2.0, n, 1, "test", "mosaic")
    config = QcConfig()
    stage, direct = QcStage(config, 0.2, [0.5]), QcStage(config, 0.2, [0.5])
    pipeline = SeriesPipeline([stage])
    for t, volume_data in enumerate(data):
        volume = Volume(volume_data, np.eye(4), t, info, None, 0.0, 0.0)
        pipeline.process(volume)
        if t % 2:
            assert pipeline.run_later() == []
        direct.update(volume)  # its work after the message never run
    stack = np.stack(data, axis=-1).astype(np.float64)
    expected = (stack.mean(axis=-1) / stack.std(axis=-1, ddof=1)).astype(np.float32)
    for maps in (pipeline.maps(), direct.maps()):
        np.testing.assert_allclose(maps["tsnr"], expected, rtol=1e-6)
