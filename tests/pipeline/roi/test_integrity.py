"""Feedback integrity: the correlations against NumPy over each window, the alert once
per episode when the feedback follows FD, and the stage in the built pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.pipeline.roi.integrity import NUISANCES, FeedbackIntegrityStage, window_r
from rtsc.volume import SeriesInfo, Volume

INFO = SeriesInfo("s", 2.0, None, 1, "test", "mosaic")
DATA = np.zeros((2, 2, 2), np.float32, order="F")


def run(stage, rows):
    out = []
    for t, row in enumerate(rows):
        upstream = dict(zip(("feedback", *NUISANCES), row))
        out.append(stage.update(Volume(DATA, np.eye(4), t, INFO, None, 0.0, 0.0), upstream))
    return out


def test_correlations_equal_numpy_over_each_window(rng):
    n, w = 80, 20
    fd = np.abs(rng.normal(0.1, 0.05, n))
    dvars = 30 + rng.normal(0, 2, n)
    gs = 1000 + rng.normal(0, 3, n)
    feedback = rng.normal(0, 1, n) + 4.0 * fd
    feedback[30] = np.nan  # a volume without a value: left out of its windows
    rows = [(None if np.isnan(f) else f, a, b, c)
            for f, a, b, c in zip(feedback, fd, dvars, gs)]
    out = run(FeedbackIntegrityStage(window=w, threshold=1.0), rows)
    for t in range(n):
        got = out[t].metrics["feedback_integrity"]
        if t < w - 1:
            assert got == dict.fromkeys(NUISANCES)
            continue
        part = slice(t - w + 1, t + 1)
        keep = np.isfinite(feedback[part])
        for key, series in zip(NUISANCES, (fd, dvars, gs)):
            expected = np.corrcoef(feedback[part][keep], series[part][keep])[0, 1]
            assert got[key] == pytest.approx(expected, abs=1e-12)
    assert window_r(np.ones(8), np.arange(8.0)[:, None], 4) == [None]  # constant feedback
    assert window_r(np.r_[np.full(6, np.nan), 1.0, 2.0], np.arange(8.0)[:, None], 4) == [None]


def test_feedback_that_follows_motion_raises_one_alert_per_episode(rng):
    """Clean, then 40 volumes in which the feedback follows FD (a subject moving with
    the task), then clean again, then following again: two alerts, each at the first
    window where |r| reaches the threshold (DVARS and the global signal constant: no r,
    so the episodes are FD's alone)."""
    n, w = 200, 30
    fd = np.abs(rng.normal(0.15, 0.1, n))
    feedback = rng.normal(0, 1, n)
    following = np.r_[np.zeros(50), np.ones(40), np.zeros(60), np.ones(50)].astype(bool)
    feedback[following] = 5.0 * fd[following] + rng.normal(0, 0.05, following.sum())
    rows = [(f, d, 40.0, 900.0) for f, d in zip(feedback, fd)]
    stage = FeedbackIntegrityStage(window=w, threshold=0.6)
    out = run(stage, rows)
    alerts = [(t, a) for t, o in enumerate(out) for a in o.alerts]
    assert len(alerts) == 2 and stage.n_alerts == 2
    for t, (level, code, text) in alerts:
        assert (level, code) == ("warning", "feedback_follows_head") and "FD" in text
        r = out[t].metrics["feedback_integrity"]["framewise_displacement"]
        assert abs(r) >= 0.6 and abs(out[t - 1].metrics["feedback_integrity"]
                                     ["framewise_displacement"] or 0) < 0.6
    assert 50 < alerts[0][0] < 90 and 150 < alerts[1][0] < 200
    assert stage.summary()["feedback_integrity"]["peak_abs_r"]["framewise_displacement"] > 0.9
    with pytest.raises(ValueError, match="at least 6 volumes"):
        FeedbackIntegrityStage(window=5)


def test_the_global_signal_and_dvars_inform_without_alerting(rng):
    """A feedback that follows the global signal and DVARS (the brain's own signal moves
    all three) is published with its r, and raises no alert: only FD does."""
    n = 60
    shared = rng.normal(size=n)
    rows = [(s, 0.1 + 0.01 * rng.normal(), 40.0 + 3 * s, 900.0 + 5 * s) for s in shared]
    out = run(FeedbackIntegrityStage(window=30, threshold=0.6), rows)
    last = out[-1].metrics["feedback_integrity"]
    assert last["dvars"] == pytest.approx(1.0) and last["global_signal"] == pytest.approx(1.0)
    assert not [a for o in out for a in o.alerts]


def test_the_built_pipeline_runs_it_after_the_stages_it_reads(tmp_path):
    from rtsc.config import config_from_dict  # noqa: PLC0415
    from rtsc.pipeline.series import build_stages  # noqa: PLC0415

    roi = {"center_ras_mm": [0, 0, 0], "radius_mm": 6}
    stages, _ = build_stages(config_from_dict({"glm": {"roi": roi}}), INFO)
    names = [s.name for s in stages]
    assert names.index("feedback_integrity") > max(names.index(n) for n in
                                                   ("roi", "motion", "dvars", "signal"))
    off = config_from_dict({"glm": {"roi": roi, "feedback_integrity_window": 0}})
    assert "feedback_integrity" not in [s.name for s in build_stages(off, INFO)[0]]
    assert "feedback_integrity" not in [s.name for s in build_stages(
        config_from_dict({}), INFO)[0]]
