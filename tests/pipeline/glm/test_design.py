"""Design matrix: HRFs and columns against nilearn, events.tsv parsing, contrasts, rows."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import (make_first_level_design_matrix, spm_dispersion_derivative,
                                     spm_time_derivative)
from nilearn.glm.first_level import spm_hrf as nilearn_spm_hrf

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import RtscError
from rtsc.pipeline.glm import design as dm
from rtsc.pipeline.glm.design import expand_motion, make_design, motion_confound_names
from rtsc.pipeline.glm.paradigm import DesignError, parse_contrast, read_events

EVENTS = [(10.0, 20.0, "tap"), (50.0, 20.0, "tap"), (3.0, 0.0, "rest"), (33.3, 1.5, "rest"),
          (91.7, 4.0, "rest"), (-30.0, 5.0, "tap"), (120.0, 0.0, "tap")]
NILEARN_HRF = {"spm": "spm", "spm_derivative": "spm + derivative",
               "delayed": "spm + derivative + dispersion"}


def nilearn_design(events: list, n: int, tr_s: float, hrf: str = "spm", **kwargs) -> pd.DataFrame:
    frame = pd.DataFrame(events, columns=["onset", "duration", "trial_type"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # early-onset events, duplicated events
        return make_first_level_design_matrix(dm.frame_times(n, tr_s), frame,
                                              hrf_model=NILEARN_HRF[hrf], **kwargs)


# ---- HRFs and columns against nilearn -------------------------------------------------------

@pytest.mark.parametrize("tr_s", [0.8, 2.0, 2.5])
def test_hrfs_equal_nilearn(tr_s):
    np.testing.assert_allclose(dm.spm_hrf(tr_s), nilearn_spm_hrf(tr_s), rtol=0, atol=1e-15)
    np.testing.assert_allclose(dm.spm_time_derivative(tr_s), spm_time_derivative(tr_s),
                               rtol=0, atol=1e-13)
    np.testing.assert_allclose(dm.spm_dispersion_derivative(tr_s),
                               spm_dispersion_derivative(tr_s), rtol=0, atol=1e-12)
    hrf = dm.spm_hrf(tr_s, oversampling=50)
    t = np.linspace(0, 32, hrf.size)
    assert abs(hrf.sum() - 1) < 1e-12 and 4.5 < t[np.argmax(hrf)] < 6.0  # peak ~5 s
    assert t[np.argmin(hrf)] > 10  # undershoot after


@pytest.mark.parametrize("hrf", ["spm", "spm_derivative", "delayed"])
@pytest.mark.parametrize("n,tr_s", [(100, 2.0), (37, 0.8)])
def test_task_columns_equal_nilearn(hrf, n, tr_s):
    ours = make_design(EVENTS, n, tr_s, hrf=hrf, drift="none")
    ref = nilearn_design(EVENTS, n, tr_s, hrf, drift_model=None)
    assert list(ours.names) == list(ref.columns)
    assert ours.trial_types == ("rest", "tap")
    # Same arithmetic step by step: equal to the last bits (orthogonalised derivatives
    # differ by pinv rounding only).
    np.testing.assert_allclose(ours.matrix(), ref.to_numpy(), rtol=0, atol=1e-14)
    assert np.abs(ref.to_numpy()).max() > 0.5  # the comparison is not of zeros


@pytest.mark.parametrize("high_pass_s", [128.0, 60.0, 1000.0])
def test_cosine_drift_equals_nilearn(high_pass_s):
    ours = make_design(EVENTS, 150, 2.0, high_pass_s=high_pass_s)
    ref = nilearn_design(EVENTS, 150, 2.0, drift_model="cosine", high_pass=1.0 / high_pass_s)
    assert list(ours.names) == list(ref.columns)
    np.testing.assert_allclose(ours.matrix(), ref.to_numpy(), rtol=0, atol=1e-14)
    n_drifts = len(ours.drift_names) - 1
    assert n_drifts == int(np.floor(2 * 150 * 2.0 / high_pass_s))


def test_polynomial_drift_equals_nilearn():
    ours = make_design(EVENTS, 60, 2.0, drift="polynomial", drift_order=3)
    ref = nilearn_design(EVENTS, 60, 2.0, drift_model="polynomial", drift_order=3)
    assert list(ours.names) == list(ref.columns)
    np.testing.assert_allclose(ours.matrix(), ref.to_numpy(), rtol=0, atol=1e-12)


def test_extra_columns_sit_where_nilearn_puts_added_regressors(rng):
    names = motion_confound_names(24)
    values = rng.normal(size=(80, 24))
    ours = make_design(EVENTS, 80, 2.0, hrf="spm_derivative", extra_names=names)
    ref = nilearn_design(EVENTS, 80, 2.0, "spm_derivative", add_regs=values,
                         add_reg_names=list(names), high_pass=1 / 128.0)
    assert list(ours.names) == list(ref.columns)
    X = ours.matrix({name: values[:, j] for j, name in enumerate(names)})
    np.testing.assert_allclose(X, ref.to_numpy(), rtol=0, atol=1e-14)
    for i in (0, 17, 79):
        row = ours.row(i, {name: values[i, j] for j, name in enumerate(names)})
        np.testing.assert_array_equal(row, X[i])


def test_no_events_gives_drifts_and_constant():
    design = make_design(None, 50, 2.0)
    assert design.task_names == () and design.names[-1] == "constant"
    np.testing.assert_array_equal(design.matrix()[:, -1], 1.0)


def test_events_before_the_grid_are_clipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rtsc.pipeline.glm.design"):
        make_design([(-30.0, 5.0, "a"), (10.0, 5.0, "a")], 40, 2.0)
    assert "clipped" in caplog.text


def test_bad_design_parameters():
    with pytest.raises(DesignError, match="n_volumes"):
        make_design(EVENTS, 1, 2.0)
    with pytest.raises(DesignError, match="allowed: spm, spm_derivative, delayed"):
        make_design(EVENTS, 10, 2.0, hrf="glover")
    with pytest.raises(DesignError, match="drift"):
        make_design(EVENTS, 10, 2.0, drift="spline")
    with pytest.raises(DesignError, match="not unique"):
        make_design([(1.0, 1.0, "constant")], 10, 2.0)


# ---- events.tsv -------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "events.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_events_bids_file(tmp_path):
    path = write(tmp_path, "onset\tduration\ttrial_type\tresponse_time\n"
                           "10\t20\ttap\tn/a\n50.5\t0\trest\t1.2\n\n")
    assert read_events(path) == [(10.0, 20.0, "tap"), (50.5, 0.0, "rest")]
    no_type = write(tmp_path, "onset\tduration\n1\t2\n", "plain.tsv")
    assert read_events(no_type) == [(1.0, 2.0, "task")]
    design = make_design(path, 40, 2.0)  # a path goes straight into make_design
    assert design.trial_types == ("rest", "tap")


@pytest.mark.parametrize("text, expected", [
    ("onset\tduration\ttrial_type\n10\t20\ttap\nabc\t20\ttap\n", r"line 3, column onset: 'abc'"),
    ("onset\tduration\ttrial_type\n10\t-1\ttap\n", r"line 2, column duration: -1 is negative"),
    ("onset\tduration\ttrial_type\n10\tn/a\ttap\n", r"line 2, column duration: 'n/a'"),
    ("onset\tduration\ttrial_type\n10\tinf\ttap\n",
     r"line 2, column duration: 'inf' is not a finite"),
    ("onset\tduration\ttrial_type\n10\t2\tn/a\n", r"line 2, column trial_type"),
    ("onset\tduration\ttrial_type\n10\t2\n", r"line 2: 2 fields, the header has 3"),
    ("onset,duration,trial_type\n10,2,tap\n", r"no 'onset' column .*tab-separated"),
    ("onset\ttrial_type\n10\ttap\n", r"no 'duration' column"),
    ("onset\tduration\ttrial_type\n", r"a header but no events"),
    ("", r"empty"),
])
def test_read_events_errors_name_file_line_and_column(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(DesignError, match=expected) as info:
        read_events(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RtscError)


def test_read_events_missing_file(tmp_path):
    with pytest.raises(DesignError, match="cannot be read"):
        read_events(tmp_path / "nope.tsv")


@pytest.mark.parametrize("events, expected", [
    ([(1.0, 2.0)], "event 0"),
    ([(1.0, 2.0, "a"), ("x", 2.0, "a")], "event 1: onset 'x'"),
    ([(1.0, float("nan"), "a")], "duration nan"),
    ([(1.0, -2.0, "a")], "duration -2.0"),
    ([(1.0, 2.0, "")], "trial_type ''"),
])
def test_event_list_errors(events, expected):
    with pytest.raises(DesignError, match=expected):
        make_design(events, 10, 2.0)


# ---- contrasts ---------------------------------------------------------------------------------

def test_contrast_weights():
    known = ("a", "b", "c")
    assert parse_contrast("a", known) == {"a": 1.0}
    assert parse_contrast("a - b", known) == {"a": 1.0, "b": -1.0}
    assert parse_contrast("2*a - b", known) == {"a": 2.0, "b": -1.0}
    assert parse_contrast("(a + b) / 2 - c", known) == {"a": 0.5, "b": 0.5, "c": -1.0}
    assert parse_contrast("-a + 3 * (b - c) * 0.5", known) == {"a": -1.0, "b": 1.5, "c": -1.5}
    assert parse_contrast("a - b + b", known) == {"a": 1.0}
    assert parse_contrast("left-hand", ("left-hand", "rest")) == {"left-hand": 1.0}


def test_design_contrast_vector_is_zero_on_nuisance():
    design = make_design(EVENTS, 60, 2.0, hrf="spm_derivative",
                         extra_names=motion_confound_names(6))
    weights = design.contrast("tap - rest")
    expected = np.zeros(design.p)
    expected[design.column("tap")] = 1.0
    expected[design.column("rest")] = -1.0
    np.testing.assert_array_equal(weights, expected)
    derivative = design.contrast("tap_derivative")
    assert derivative[design.column("tap_derivative")] == 1.0 and derivative.sum() == 1.0


@pytest.mark.parametrize("expression, expected", [
    ("tap - walk", r"unknown name 'walk'; known: rest, tap"),
    ("trans_x", r"unknown name 'trans_x'"),
    ("tap * rest", "product of conditions is not linear"),
    ("tap / rest", "division by a condition"),
    ("tap / 0", "division by zero"),
    ("tap + 1", "constant term"),
    ("tap - tap", "every weight is zero"),
    ("tap -", "not a valid expression"),
    ("__import__('os').system('true')", "only names, numbers"),
    ("tap.real", "only names, numbers"),
    ("tap ** 2", "only names, numbers"),
    ("True * tap", "only names, numbers"),
])
def test_contrast_errors(expression, expected):
    design = make_design(EVENTS, 60, 2.0, extra_names=("trans_x",))
    with pytest.raises(DesignError, match=expected):
        design.contrast(expression)


# ---- rows and motion confounds -------------------------------------------------------------------

def test_row_errors():
    design = make_design(EVENTS, 20, 2.0, extra_names=("trans_x", "resp"))
    with pytest.raises(DesignError, match="no value for resp"):
        design.row(3, {"trans_x": 0.1})
    with pytest.raises(DesignError, match="resp is nan"):
        design.row(3, {"trans_x": 0.1, "resp": float("nan")})
    with pytest.raises(DesignError, match="outside the design's 20 volumes"):
        design.row(20, {"trans_x": 0.1, "resp": 1.0})
    assert not design.fixed.flags.writeable


def test_motion_confounds():
    assert motion_confound_names(6) == MOTION_NAMES
    names24 = motion_confound_names(24)
    assert len(set(names24)) == 24 and "rot_z_derivative1_power2" in names24
    with pytest.raises(DesignError, match="allowed: 6, 12, 24"):
        motion_confound_names(18)
    first = expand_motion([0.1, -0.2, 0.3, 0.01, 0.0, -0.02], None)
    assert first["trans_y"] == -0.2 and first["trans_y_derivative1"] == 0.0
    assert first["trans_z_power2"] == pytest.approx(0.09)
    second = expand_motion([0.3, -0.2, 0.3, 0.01, 0.0, -0.02], [0.1, -0.2, 0.3, 0.01, 0.0, -0.02])
    assert second["trans_x_derivative1"] == pytest.approx(0.2)
    assert second["trans_x_derivative1_power2"] == pytest.approx(0.04)
    assert set(second) == set(names24)
