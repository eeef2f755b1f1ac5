"""Activation time-to-criterion against a brute-force recomputation: least squares of
the ROI mean on the design's fixed columns so far, and the planned design's first N
rows for each N."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from rtsc.pipeline.glm.design import make_design
from rtsc.pipeline.roi.criterion import ActivationCriterionStage, planned_factors
from rtsc.volume import SeriesInfo, Volume

TR_S = 2.0
EVENTS = [(12.0, 16.0, "task"), (52.0, 16.0, "task"), (92.0, 16.0, "task"),
          (132.0, 16.0, "task"), (172.0, 16.0, "task")]
INFO = SeriesInfo("s", TR_S, None, 1, "test", "mosaic")
DATA = np.zeros((2, 2, 2), np.float32, order="F")


def brute_needed(effect, s2, fixed, c, rank, p, start):
    """Volumes after ``start`` until effect / sqrt(s2 c'(X_N'X_N)^+ c) reaches the
    threshold at N - rank degrees of freedom (0: already), None if never."""
    if effect <= 0:
        return None
    for N in range(start, fixed.shape[0] + 1):
        x = fixed[:N]
        gram = x.T @ x
        if not np.allclose(gram @ np.linalg.pinv(gram) @ c, c, atol=1e-8):
            continue
        f = c @ np.linalg.pinv(gram) @ c
        if effect / math.sqrt(s2 * f) >= scipy.stats.t.isf(p, max(N - rank, 1)):
            return N - start
    return None


def test_planned_factors_equal_brute_force():
    design = make_design(EVENTS, 100, TR_S)
    c = np.zeros(design.fixed.shape[1])
    c[0] = 1.0
    ours = planned_factors(np.asarray(design.fixed), c)
    for n in (1, 3, 5, 6, 10, 40, 100):
        x = design.fixed[:n]
        gram = x.T @ x
        if np.allclose(gram @ np.linalg.pinv(gram) @ c, c, atol=1e-8):
            assert ours[n - 1] == pytest.approx(c @ np.linalg.pinv(gram) @ c, rel=1e-8)
        else:
            assert np.isnan(ours[n - 1])
    assert np.isnan(ours[:5]).all()  # the task's first block starts at volume 6


@pytest.mark.parametrize("effect", [2.0, 0.6])
def test_every_volume_equals_the_brute_force_recomputation(rng, effect):
    """A strong effect (reached early) and a weak one (later, or not within the run)."""
    n = 100
    design = make_design(EVENTS, n, TR_S)
    weights = np.array([design.contrast("task")])[0]
    stage = ActivationCriterionStage(design, weights, "target", "task", p_value=0.001)
    fixed = np.asarray(design.fixed, dtype=float)
    c = np.array([weights[design.names.index(k)]
                  for k in design.task_names + design.drift_names])
    y = 1000.0 + effect * fixed[:, 0] + 0.02 * np.arange(n) + rng.normal(0.0, 2.0, n)
    outputs = []
    for t in range(n):
        upstream = {"roi_mean": {"target": float(y[t])}}
        out = stage.update(Volume(DATA, np.eye(4), t, INFO, None, 0.0, 0.0), upstream)
        outputs.append(out.metrics["activation_criterion"])
        if t % 3 == 0:
            out.after_publish()  # as the pipeline does; or left to the next volume
    outputs.append(stage.summary()["activation_criterion"])
    for t in range(n):
        got = outputs[t + 1]  # volume t's figures are in volume t + 1's message
        if got is not None:
            assert got["as_of"] == t
        x, yy = fixed[:t + 1], y[:t + 1]
        gram = x.T @ x
        rank = np.linalg.matrix_rank(gram, hermitian=True)  # the stage's rule, on X'X
        dof = t + 1 - rank
        if t < 2 or dof < 1:
            assert got is None
            continue
        pinv = np.linalg.pinv(gram, rcond=gram.shape[0] * np.finfo(float).eps, hermitian=True)
        u, _, _ = np.linalg.svd(gram, hermitian=True)
        row_space = u[:, :rank]
        if np.linalg.norm(c - row_space @ (row_space.T @ c)) > 1e-8:
            assert got is None  # the task column is still (nearly) zero: not estimable
            continue
        beta = np.linalg.lstsq(x, yy, rcond=None)[0]  # SVD on the rows themselves
        s2 = float(np.sum((yy - x @ beta) ** 2)) / dof
        f = c @ pinv @ c
        e, se = float(c @ beta), math.sqrt(s2 * f)
        # X'X squares the condition number: early, with drifts nearly collinear over a
        # few volumes (singular values down to 1e-8 of the largest), t agrees to 1e-2
        conditioning = np.linalg.cond(x[:, np.abs(x).sum(axis=0) > 0])
        assert got["t"] == pytest.approx(e / se, rel=1e-7 if conditioning < 1e3 else 1e-2)
        assert got["threshold"] == pytest.approx(scipy.stats.t.isf(0.001, dof), rel=1e-10)
        expected = [brute_needed(v, s2, fixed, c, rank, 0.001, t + 1)
                    for v in (e, e + se, e - se)]
        assert [got["volumes_needed"], *got["volumes_needed_range"]] == expected, t
    final = stage.summary()["activation_criterion"]
    assert (final["roi"], final["contrast"]) == ("target", "task")
    if effect == 2.0:
        assert final["volumes_needed"] == 0


def test_the_phrase_on_the_dashboard_and_in_the_report(tmp_path):
    from rtsc.output.report import build_report  # noqa: PLC0415
    from rtsc.pipeline.roi.criterion import activation_phrase  # noqa: PLC0415

    value = {"as_of": 30, "roi": "target", "contrast": "task", "t": 2.04, "threshold": 3.41,
             "volumes_needed": 18, "volumes_needed_range": [9, None]}
    assert activation_phrase(value) == "task t 2.0 of 3.4, ~18 (9-run end) more volumes"
    assert activation_phrase({**value, "volumes_needed": 0}) == "task t 2.0 of 3.4, reached"
    assert activation_phrase({**value, "volumes_needed": None}).endswith(
        "not within the run at this effect")
    assert activation_phrase(None) == ""
    (tmp_path / "confounds.tsv").write_text("global_signal\n600\n601\n")
    (tmp_path / "qc.json").write_text(__import__("json").dumps(
        {"n_volumes": 2, "activation_criterion": value}))
    assert "Time to criterion (feedback ROI, at the run's end): task t 2.0 of 3.4, ~18 " \
        "(9-run end) more volumes." in build_report(tmp_path)
