"""Feedback kinds (difference, sliding-window correlation) and smoothing (EMA, Kalman),
each against an offline recomputation: NumPy least squares and correlation, SciPy's
lfilter, and the Kalman filter's batch least-squares equivalent."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nibabel.affines import apply_affine
from scipy import signal

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import ConfigError
from rtsc.pipeline.roi.feedback import (
    MOTION_REGRESSION_MIN,
    Ema,
    Kalman,
    MotionCleaner,
    SlidingCorrelation,
    window_correlation,
)
from rtsc.pipeline.roi.spec import RoiError, SphereRoi
from rtsc.pipeline.roi.stage import RoiStage

from test_roi import AFFINE, make_series, volume


def residual_correlation(a, b, confounds=None):
    """np.corrcoef of the lstsq residuals of a and b on [1, t, confounds]."""
    t = np.arange(a.size, dtype=float)
    x = np.column_stack([np.ones_like(t), t] + ([] if confounds is None else [confounds]))
    ra = a - x @ np.linalg.lstsq(x, a, rcond=None)[0]
    rb = b - x @ np.linalg.lstsq(x, b, rcond=None)[0]
    return float(np.corrcoef(ra, rb)[0, 1])


def test_window_correlation_equals_numpy(rng):
    for _ in range(20):
        w = int(rng.integers(12, 40))
        shared = rng.normal(size=w)
        a = 1000 + 3 * shared + rng.normal(size=w) + 0.5 * np.arange(w)
        b = 800 - 2 * shared + rng.normal(size=w)
        motion = rng.normal(size=(w, 6)) * [0.1, 0.1, 0.1, 0.002, 0.002, 0.002]
        assert window_correlation(a, b) == pytest.approx(residual_correlation(a, b), abs=1e-12)
        assert window_correlation(a, b, motion) == pytest.approx(
            residual_correlation(a, b, motion), abs=1e-12)
    t = np.arange(10.0)
    assert window_correlation(2.0 + 3.0 * t, np.sin(t)) is None  # a line: no residual
    assert window_correlation(np.r_[np.nan, t[1:]], np.sin(t)) is None
    # motion that is constant over the window (a still head) is dropped, not singular
    still = np.zeros((10, 6))
    assert window_correlation(np.sin(t), np.cos(t) + t ** 2, still) == pytest.approx(
        residual_correlation(np.sin(t), np.cos(t) + t ** 2), abs=1e-12)


def test_sliding_correlation_waits_for_a_full_window_and_for_every_value(rng):
    corr = SlidingCorrelation(5)
    a, b = rng.normal(size=12), rng.normal(size=12)
    out = [corr.update(a[i], None if i == 7 else b[i]) for i in range(12)]
    assert out[:4] == [None] * 4
    assert out[4] == pytest.approx(residual_correlation(a[:5], b[:5]), abs=1e-12)
    assert out[7:12] == [None] * 5  # volume 7 has no value: every window holding it
    with pytest.raises(ValueError, match="at least 10 volumes with motion regression"):
        SlidingCorrelation(9, motion=True)


def test_ema_equals_lfilter(rng):
    values = rng.normal(size=50).cumsum()
    for alpha in (0.05, 0.3, 1.0):
        ema = Ema(alpha)
        ours = [ema.update(float(v)) for v in values]
        reference, _ = signal.lfilter([alpha], [1.0, alpha - 1.0], values,
                                      zi=[(1.0 - alpha) * values[0]])
        np.testing.assert_allclose(ours, reference, rtol=1e-12)
    ema = Ema(0.5)
    assert [ema.update(v) for v in (2.0, None, 4.0)] == [2.0, None, 3.0]  # None: state kept
    with pytest.raises(ValueError, match=r"allowed \(0, 1\]"):
        Ema(0.0)


def kalman_batch(values, q_over_r):
    """The filter's estimate at each t as the last state of the least-squares fit of
    states x_0..x_t to values 0..t (weight 1) with steps x_i - x_{i-1} of weight
    1 / (Q / R): the random-walk model's posterior mean given the values so far."""
    out = []
    for t in range(values.size):
        n = t + 1
        rows = [np.eye(n)]
        if n > 1:
            steps = (np.eye(n, k=1) - np.eye(n))[:-1] / math.sqrt(q_over_r)
            rows.append(steps)
        x = np.vstack(rows)
        y = np.concatenate([values[:n], np.zeros(n - 1)])
        out.append(np.linalg.lstsq(x, y, rcond=None)[0][-1])
    return np.array(out)


@pytest.mark.parametrize("q_over_r", [0.01, 0.1, 2.0])
def test_kalman_equals_the_batch_least_squares_of_its_model(rng, q_over_r):
    values = 5.0 + rng.normal(size=40)
    kalman = Kalman(q_over_r)
    ours = [kalman.update(float(v)) for v in values]
    np.testing.assert_allclose(ours, kalman_batch(values, q_over_r), rtol=1e-9)


def motion_cleaned(values, motion):
    """Offline: each value less what a constant and the centred motion parameters fitted
    over the volumes so far explain (pseudo-inverse), from MOTION_REGRESSION_MIN on."""
    out = []
    for t in range(len(values)):
        if values[t] is None or t + 1 < MOTION_REGRESSION_MIN:
            out.append(values[t])
            continue
        m = motion[:t + 1] - motion[:t + 1].mean(axis=0)
        beta = np.linalg.pinv(np.column_stack([np.ones(t + 1), m])) @ np.array(values[:t + 1])
        out.append(values[t] - m[-1] @ beta[1:])
    return out


def test_motion_cleaner_takes_the_motion_part_out(rng):
    n = 80
    motion = rng.normal(size=(n, 6)) * [0.2, 0.2, 0.2, 0.003, 0.003, 0.003]
    noise = rng.normal(scale=0.05, size=n)
    values = 2.0 + 3.0 * motion[:, 0] - 40.0 * motion[:, 4] + noise
    cleaner = MotionCleaner()
    cleaned = np.array([cleaner.update(float(v), m.tolist()) for v, m in zip(values, motion)])
    np.testing.assert_array_equal(cleaned[:MOTION_REGRESSION_MIN - 1],
                                  values[:MOTION_REGRESSION_MIN - 1])  # too few volumes yet
    late = slice(40, n)
    assert abs(np.corrcoef(values[late], motion[late, 0])[0, 1]) > 0.8
    assert abs(np.corrcoef(cleaned[late], motion[late, 0])[0, 1]) < 0.3
    assert np.std(cleaned[late] - 2.0) < 0.08  # the level kept, the noise left
    assert cleaner.update(None, motion[0].tolist()) is None
    assert cleaner.update(1.5, [None] * 6) == 1.5  # no registration: unchanged


@pytest.mark.parametrize("kind, smoothing, regress", [
    ("difference", "none", False), ("difference", "ema", False), ("correlation", "none", True),
    ("correlation", "kalman", True), ("psc", "none", True), ("difference", "kalman", True)])
def test_stage_feedback_equals_its_offline_recomputation(rng, kind, smoothing, regress):
    """Two spheres on a simulated block design (one activated): every volume's
    ``feedback_raw`` equals the PSC or the difference of the published PSCs (with motion
    regression, less their motion part fitted offline), or the correlation of the
    published ROI means over the window with the motion parameters regressed out;
    ``feedback`` equals SciPy's / the batch filter of those raw values."""
    data, design = make_series(rng, n=60)
    n = data.shape[-1]
    active = SphereRoi(apply_affine(AFFINE, [6.0, 5.0, 3.5]), 6.0)
    other = SphereRoi(apply_affine(AFFINE, [2.0, 2.0, 1.5]), 5.0)
    window = 12
    stage = RoiStage({"a": active, "b": other}, feedback=kind, feedback_roi_b="b",
                     design=design, window=window, motion_regression=regress,
                     smoothing=smoothing, ema_alpha=0.3, kalman_q_over_r=0.2)
    motion = rng.normal(size=(n, 6)) * [0.2, 0.2, 0.2, 0.003, 0.003, 0.003]
    published = []
    for t in range(n):
        upstream = dict(zip(MOTION_NAMES, motion[t].tolist()))
        published.append(stage.update(volume(data[..., t], t, AFFINE), upstream).metrics)
    raw = [m["feedback_raw"] for m in published]
    if kind in ("difference", "psc"):
        expected = [None if m["roi"]["a"] is None or m["roi"]["b"] is None
                    else m["roi"]["a"] - m["roi"]["b"] for m in published] \
            if kind == "difference" else [m["roi"]["a"] for m in published]
        if regress:
            plain = expected
            expected = motion_cleaned(expected, motion)
            changed = [t for t in range(n) if plain[t] is not None and plain[t] != raw[t]]
            assert changed and min(changed) == MOTION_REGRESSION_MIN - 1
        np.testing.assert_allclose(np.array(raw, dtype=float), np.array(expected, dtype=float),
                                   rtol=1e-9, atol=1e-9)
        assert any(v is not None for v in raw)
    else:
        means = np.array([[m["roi_mean"]["a"], m["roi_mean"]["b"]] for m in published])
        assert raw[:window - 1] == [None] * (window - 1)
        for t in range(window - 1, n):
            part = slice(t - window + 1, t + 1)
            assert raw[t] == pytest.approx(residual_correlation(
                means[part, 0], means[part, 1], motion[part]), abs=1e-10)
    values = [m["feedback"] for m in published]
    known = [i for i, v in enumerate(raw) if v is not None]
    assert [i for i, v in enumerate(values) if v is not None] == known
    series = np.array([raw[i] for i in known])
    if smoothing == "none":
        reference = series
    elif smoothing == "ema":
        reference = signal.lfilter([0.3], [1.0, -0.7], series, zi=[0.7 * series[0]])[0]
    else:
        reference = kalman_batch(series, 0.2)
    np.testing.assert_allclose([values[i] for i in known], reference, rtol=1e-9, atol=1e-12)
    summary = stage.summary()["roi_feedback"]
    assert (summary["source"], summary["roi_b"], summary["smoothing"]) == \
        (kind, None if kind == "psc" else "b", smoothing)


def test_bad_feedback_settings_name_what_is_allowed():
    sphere = SphereRoi(apply_affine(AFFINE, [6.0, 5.0, 3.5]), 6.0)
    with pytest.raises(RoiError, match="needs feedback_roi_b, an ROI other than 'a'"):
        RoiStage({"a": sphere}, feedback="difference")
    with pytest.raises(RoiError, match="needs feedback_roi_b"):
        RoiStage({"a": sphere, "b": sphere}, feedback="correlation", feedback_roi_b="a")
    with pytest.raises(RoiError, match="feedback_smoothing 'median'"):
        RoiStage({"a": sphere}, smoothing="median")
    with pytest.raises(RoiError, match="allowed: psc, contrast, difference, correlation"):
        RoiStage({"a": sphere}, feedback="mean")


def test_config_checks_name_the_key(tmp_path):
    from rtsc.config import config_from_dict  # noqa: PLC0415
    from rtsc.pipeline.glm.build import check_glm_config  # noqa: PLC0415

    spheres = {"a": {"center_ras_mm": [0, 0, 0], "radius_mm": 5},
               "b": {"center_ras_mm": [20, 0, 0], "radius_mm": 5}}

    def check(**glm):
        check_glm_config(config_from_dict({"glm": {"roi": spheres, **glm}}))

    check(feedback="difference", feedback_roi_b="b")
    with pytest.raises(ConfigError, match="glm.feedback_roi_b: feedback: correlation needs"):
        check(feedback="correlation")
    with pytest.raises(ConfigError, match="glm.feedback_roi_b: 'c' is not an ROI; ROIs: a, b"):
        check(feedback="difference", feedback_roi_b="c")
    with pytest.raises(ConfigError, match="glm.feedback_motion_regression: needs motion"):
        check_glm_config(config_from_dict({"motion": {"enabled": False}, "glm": {
            "roi": spheres, "feedback": "correlation", "feedback_roi_b": "b",
            "feedback_motion_regression": True}}))
    with pytest.raises(ConfigError, match="glm.feedback_window: 5 with"):
        check(feedback="correlation", feedback_roi_b="b", feedback_window=5,
              feedback_motion_regression=True)
    with pytest.raises(ConfigError, match="glm.feedback_smoothing"):
        config_from_dict({"glm": {"feedback_smoothing": "median"}})
    check(feedback="psc", feedback_motion_regression=True)
    check(feedback="difference", feedback_roi_b="b", feedback_motion_regression=True)
    with pytest.raises(ConfigError, match="glm.feedback_motion_regression: true with feedback: "
                                          "contrast, whose GLM already has the motion"):
        check(feedback="contrast", feedback_motion_regression=True)
