"""Recursive GLM: kernels against naive Givens, every step against lstsq, the end against
nilearn, detection on a simulated activation, forgetting, censoring and NaN safety."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from nilearn.glm.contrasts import compute_contrast
from nilearn.glm.first_level import run_glm

from rtsc.errors import RtscError
from rtsc.pipeline.glm._kernels import BLOCK, givens_row, rotate_voxels
from rtsc.conventions import MOTION_NAMES
from rtsc.pipeline.glm.design import (expand_motion, make_design,
                                  motion_confound_names)
from rtsc.pipeline.glm import recursive
from rtsc.pipeline.glm.recursive import GlmStage, glm_fit, glm_init, glm_update, t_threshold
from rtsc.volume import SeriesInfo, Volume
from anatomies import HEADS, simulated_head
from simulator.bold import simulate_run
from simulator.phantom import Grid

TR_S = 2.0
INFO = SeriesInfo("test", TR_S, None, 1, "test", "mosaic")


# ---- naive references -------------------------------------------------------------------------

def naive_givens_step(r, z, rss, x, y, lam=1.0):
    """One row of Gentleman's algorithm in plain numpy (loops over columns only)."""
    r, z, rss = r * math.sqrt(lam), z * math.sqrt(lam), rss * lam
    x, y = np.array(x, float), np.array(y, float)
    for k in range(x.size):
        if x[k] == 0.0:
            continue
        h = math.hypot(r[k, k], x[k])
        c, s = r[k, k] / h, x[k] / h
        rk, zk = r[k].copy(), z[k].copy()
        r[k], x = c * rk + s * x, c * x - s * rk
        z[k], y = c * zk + s * y, c * y - s * zk
    return r, z, rss + y * y


def ols_reference(X, Y, C, weights=None):
    """numpy.linalg.lstsq OLS (WLS with ``weights``): beta, sigma2, effect, t, estimable."""
    X = np.asarray(X, float)
    Y = np.asarray(Y, float)
    if weights is not None:
        X = X * np.sqrt(weights)[:, None]
        Y = Y * np.sqrt(weights)[:, None]
    n, p = X.shape
    beta, _, rank, _ = np.linalg.lstsq(X, Y, rcond=None)
    dof = n - rank
    rss = ((Y - X @ beta) ** 2).sum(axis=0)
    sigma2 = rss / dof if dof > 0 else np.full(Y.shape[1], np.nan)
    pinv = np.linalg.pinv(X, rcond=np.finfo(float).eps * max(n, p))
    effect = C @ beta
    factor = ((C @ pinv) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = effect / np.sqrt(factor[:, None] * sigma2[None, :])
    estimable = np.linalg.norm(C - C @ pinv @ X, axis=1) <= 1e-8 * np.linalg.norm(C, axis=1)
    t[~estimable] = np.nan
    return beta, sigma2, effect, t, estimable, rank


def random_walk_motion(rng, n):
    motion = np.cumsum(rng.normal(0.0, 0.05, (n, 6)), axis=0)
    motion[:, 3:] *= 0.01  # radians
    motion[0] = 0.0  # the reference volume: its confounds are exactly zero columns
    return motion


def motion_rows(motion):
    return [expand_motion(motion[i], motion[i - 1] if i else None) for i in range(len(motion))]


def volume(data, index):
    return Volume(np.asfortranarray(data, dtype=np.float32), np.eye(4), index, INFO, None, 0.0, 0.0)


def make_synthetic(rng):
    """Two conditions ('b' starts at volume ~30), 12 motion confounds, 80 volumes, a
    (6, 5, 4) grid with a known beta per voxel, noise SD 10, baseline ~1000."""
    n = 80
    events = [(10.0, 10.0, "a"), (40.0, 10.0, "a"), (60.0, 8.0, "b"), (100.0, 8.0, "b"),
              (120.0, 10.0, "a"), (140.0, 6.0, "b")]
    design = make_design(events, n, TR_S, extra_names=motion_confound_names(12))
    motion = random_walk_motion(rng, n)
    extras = motion_rows(motion)
    X = np.array([design.row(i, extras[i]) for i in range(n)])
    shape = (6, 5, 4)
    n_vox = int(np.prod(shape))
    beta = rng.normal(0.0, 5.0, (design.p, n_vox))
    beta[design.column("constant")] = rng.uniform(500, 1500, n_vox)
    Y = (X @ beta + rng.normal(0.0, 10.0, (n, n_vox))).astype(np.float32)
    index = np.sort(rng.choice(n_vox, 70, replace=False))
    return {"design": design, "X": X, "Y": Y, "shape": shape, "index": index,
            "motion": motion, "extras": extras}


@pytest.fixture
def synthetic(rng):
    return make_synthetic(rng)


def as_volume_array(values, shape):
    """(n_vox,) values in Fortran-order flat positions -> (nx, ny, nz) float32, Fortran."""
    return np.asfortranarray(np.asarray(values, np.float32).reshape(shape, order="F"))


# ---- kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_kernels_equal_naive_givens(rng, lam):
    p, shape = 7, (11, 9, 13)
    n_vox = int(np.prod(shape))
    index = np.sort(rng.choice(n_vox, 2 * BLOCK + 37, replace=False)).astype(np.int64)
    offset = rng.uniform(0, 100, index.size).astype(np.float32)
    r, z, rss = np.zeros((p, p)), np.zeros((p, index.size)), np.zeros(index.size)
    ref = (r.copy(), z.copy(), rss.copy())
    coef, active, ybuf = np.zeros((p, 4)), np.zeros(p, np.int64), np.zeros(BLOCK)
    for step in range(12):
        x = rng.normal(size=p)
        x[rng.random(p) < 0.3] = 0.0  # zero entries: rotations that are skipped
        if step == 0:
            x[:3] = 0.0  # columns still empty after the first row
        data = np.asfortranarray(rng.normal(500, 50, shape).astype(np.float32))
        n_active = givens_row(r, x, lam, coef, active)
        rotate_voxels(data, index, offset, coef, active, n_active, z, rss, ybuf, lam)
        y = data.ravel(order="F")[index].astype(float) - offset.astype(float)
        ref = naive_givens_step(*ref, x, y, lam)
        np.testing.assert_allclose(r, ref[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(z, ref[1], rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(rss, ref[2], rtol=1e-11, atol=1e-9)
    assert np.all(np.tril(r, -1) == 0.0)


def test_factor_is_the_qr_of_the_stacked_rows(rng):
    p, n, shape = 5, 30, (4, 4, 4)
    X = rng.normal(size=(n, p))
    Y = rng.normal(100, 10, (n,) + shape).astype(np.float32)
    state = glm_init(shape, np.arange(64), p)  # no offsets: z is Q'y itself
    for i in range(n):
        glm_update(state, np.asfortranarray(Y[i]), X[i])
    q, r = np.linalg.qr(X)
    y = Y.reshape(n, -1, order="F").astype(float)
    np.testing.assert_allclose(np.abs(state.r), np.abs(r), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.r.T @ state.r, X.T @ X, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(np.abs(state.z), np.abs(q.T @ y), rtol=1e-10)
    # Orthogonality: nothing of y is lost or created.
    np.testing.assert_allclose((state.z ** 2).sum(0) + state.rss, (y ** 2).sum(0), rtol=1e-12)


# ---- every step against lstsq -----------------------------------------------------------------

def assert_fit_equals_reference(fit, ref, design, rtol=1e-6):
    beta, sigma2, effect, t, estimable, rank = ref
    assert fit.rank == rank
    np.testing.assert_array_equal(fit.estimable, estimable)
    err = np.linalg.norm(fit.beta - beta, axis=0) / np.linalg.norm(beta, axis=0)
    assert err.max() < rtol, err.max()
    # Task betas one by one (a floor of 1e-9 of the voxel's beta norm for the exact
    # zeros of conditions not seen yet, which lstsq returns as ~1e-13).
    task = [design.column(name) for name in design.task_names]
    floor = 1e-9 * np.linalg.norm(beta, axis=0)
    assert np.all(np.abs(fit.beta[task] - beta[task]) <= rtol * np.abs(beta[task]) + floor)
    if fit.dof > 0:
        np.testing.assert_allclose(fit.sigma2, sigma2, rtol=rtol)
    else:
        assert np.all(np.isnan(fit.sigma2))
    for j in np.flatnonzero(estimable):
        np.testing.assert_allclose(fit.effect[j], effect[j], rtol=rtol,
                                   atol=rtol * np.abs(effect[j]).max())
    np.testing.assert_array_equal(np.isnan(fit.t), np.isnan(t))
    np.testing.assert_allclose(fit.t[~np.isnan(t)], t[~np.isnan(t)], rtol=rtol)


def test_every_step_equals_lstsq(synthetic):
    s = synthetic
    design, X, Y, shape, index = s["design"], s["X"], s["Y"], s["shape"], s["index"]
    C = np.array([design.contrast(e) for e in ("a", "a - b", "2*b - a")])
    state = glm_init(shape, index, design.p, constant=design.column("constant"))
    b_starts = int(np.flatnonzero(X[:, design.column("b")])[0])
    checks = {0, 1, 2, 5, design.p - 2, design.p - 1, design.p + 3, b_starts - 1, b_starts + 4,
              50, len(X) - 1}
    seen = set()
    for i in range(len(X)):
        glm_update(state, as_volume_array(Y[i], shape), X[i])
        if i not in checks:
            continue
        fit = glm_fit(state, C)
        ref = ols_reference(X[:i + 1], Y[:i + 1, index].astype(float), C)
        assert_fit_equals_reference(fit, ref, design)
        seen.add((fit.dof > 0, bool(fit.estimable[0]), bool(fit.estimable[1])))
    # The checks covered n <= rank, a condition not seen yet (t of 'a' defined, of
    # 'a - b' not), and the full model.
    assert {(False, False, False), (True, True, False), (True, True, True)} <= seen


def test_dropped_directions_summed_block_by_block(rng, synthetic, monkeypatch):
    """The data's part along the dropped directions (n < p) is summed over blocks of
    voxels: with blocks of 16 (70 voxels: four whole blocks and a part) it equals the
    whole-array expression, and every step still equals lstsq."""
    monkeypatch.setattr(recursive, "_DROPPED_BLOCK", 16)
    p, d, v = 9, 4, 70
    dropped = np.linalg.qr(rng.normal(size=(p, d)))[0]
    z, z_one = rng.normal(size=(p, v)), rng.normal(size=p)
    offset = rng.uniform(0.0, 100.0, v)
    lost = dropped.T @ z + np.outer(dropped.T @ z_one, offset)
    np.testing.assert_allclose(recursive._dropped_squares(dropped, z, z_one, offset),
                               (lost ** 2).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(recursive._dropped_squares(dropped, z, None, offset),
                               ((dropped.T @ z) ** 2).sum(axis=0), rtol=1e-12)
    test_every_step_equals_lstsq(synthetic)


def test_collinear_columns_give_the_lstsq_minimum_norm_solution(synthetic):
    """A nuisance column that is a combination of two others: rank p - 1 at every step,
    residual degrees of freedom > 0, and the part of the data along the dropped
    direction is residual (as in lstsq)."""
    s = synthetic
    design, X, Y, shape, index = s["design"], s["X"], s["Y"], s["shape"], s["index"]
    extra = X[:, design.column("trans_x")] - 2.0 * X[:, design.column("drift_1")]
    X = np.column_stack([X, extra])
    p = X.shape[1]
    C = np.zeros((2, p))
    C[:, :design.p] = [design.contrast("a"), design.contrast("a - b")]
    state = glm_init(shape, index, p, constant=design.column("constant"))
    for i in range(len(X)):
        glm_update(state, as_volume_array(Y[i], shape), X[i])
        if i in (45, len(X) - 1):
            fit = glm_fit(state, C)
            ref = ols_reference(X[:i + 1], Y[:i + 1, index], C)
            assert fit.rank == p - 1 and fit.dof > 0 and fit.estimable.all()
            assert_fit_equals_reference(fit, ref, design)


def test_cancellation_adding_1e8(synthetic):
    """1e8 + data (multiples of 8 so that float32 holds them exactly): every figure
    equals lstsq on the data without the 1e8 (constant beta shifted by 1e8)."""
    s = synthetic
    design, X, shape, index = s["design"], s["X"], s["shape"], s["index"]
    Y = 8.0 * np.round(s["Y"].astype(float) / 8.0)
    shifted = (Y + 1e8).astype(np.float32)
    assert np.array_equal(shifted.astype(float) - 1e8, Y)
    C = np.array([design.contrast("a - b")])
    state = glm_init(shape, index, design.p, constant=design.column("constant"))
    for i in range(len(X)):
        glm_update(state, as_volume_array(shifted[i], shape), X[i])
    fit = glm_fit(state, C)
    beta, sigma2, effect, t, estimable, rank = ols_reference(X, Y[:, index], C)
    beta[design.column("constant")] += 1e8
    assert_fit_equals_reference(fit, (beta, sigma2, effect, t, estimable, rank), design,
                                rtol=1e-9)


@pytest.mark.parametrize("lam", [0.9, 0.98])
def test_forgetting_factor_is_weighted_least_squares(synthetic, lam):
    s = synthetic
    design, X, Y, shape, index = s["design"], s["X"], s["Y"], s["shape"], s["index"]
    C = np.array([design.contrast(e) for e in ("a", "a - b")])
    state = glm_init(shape, index, design.p, forgetting=lam, constant=design.column("constant"))
    for i in range(len(X)):
        glm_update(state, as_volume_array(Y[i], shape), X[i])
        if i in (5, 40, len(X) - 1):
            weights = lam ** np.arange(i, -1, -1.0)  # lambda**(n-1-j) on volume j
            ref = ols_reference(X[:i + 1], Y[:i + 1, index], C, weights)
            assert_fit_equals_reference(glm_fit(state, C), ref, design)
    ols = ols_reference(X, Y[:, index], C)
    assert not np.allclose(glm_fit(state, C).beta, ols[0], rtol=1e-3)  # it did forget


# ---- NaN safety ---------------------------------------------------------------------------------

def test_rank_deficient_steps_are_nan_safe(synthetic):
    s = synthetic
    design, X, Y, shape = s["design"], s["X"], s["Y"], s["shape"]
    index = np.arange(int(np.prod(shape)))
    Y = Y.copy()
    Y[:, 0] = 1234.0  # a voxel that never changes
    C = np.array([design.contrast(e) for e in ("a", "b")])
    state = glm_init(shape, index, design.p, constant=design.column("constant"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        fit = glm_fit(state, C)  # before any volume
        assert fit.n == 0 and np.all(np.isnan(fit.t)) and not fit.estimable.any()
        for i in range(len(X)):
            glm_update(state, as_volume_array(Y[i], shape), X[i])
            fit = glm_fit(state, C)
            assert np.all(np.isfinite(fit.beta))
            if fit.dof <= 0:
                assert np.all(np.isnan(fit.sigma2)) and np.all(np.isnan(fit.t))
            if not X[:i + 1, design.column("b")].any():
                assert np.all(np.isnan(fit.t[1])) and np.all(np.isnan(fit.effect[1]))
            if fit.dof > 0 and fit.estimable[0]:
                assert np.all(np.isfinite(fit.t[0, 1:]))
    assert fit.sigma2[0] == 0.0 and np.all(np.isnan(fit.t[:, 0]))
    assert fit.beta[design.column("constant"), 0] == 1234.0
    assert np.all(fit.beta[:, 0][np.arange(design.p) != design.column("constant")] == 0.0)


def test_init_and_update_validation():
    with pytest.raises(ValueError, match="forgetting"):
        glm_init((2, 2, 2), np.arange(3), 3, forgetting=0.0)
    with pytest.raises(ValueError, match="outside"):
        glm_init((2, 2, 2), np.array([0, 8]), 3)
    state = glm_init((2, 2, 2), np.arange(3), 3, constant=2)
    with pytest.raises(ValueError, match="shape"):
        glm_update(state, np.zeros((2, 2, 3), np.float32, order="F"), np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        glm_update(state, np.zeros((2, 2, 2), np.float32, order="F"), np.array([1, np.nan, 1]))
    with pytest.raises(ValueError, match="Fortran"):
        glm_update(state, np.zeros((2, 2, 2), np.float32), np.ones(3))
    assert math.isnan(t_threshold(0)) and t_threshold(100) == pytest.approx(3.174, abs=1e-3)


# ---- the stage -----------------------------------------------------------------------------------

def test_stage_censors_volumes_without_their_regressors(synthetic):
    s = synthetic
    n = 40
    design = make_design([(10.0, 10.0, "a"), (40.0, 10.0, "a")], n, TR_S,
                         extra_names=motion_confound_names(12) + ("resp",))
    motion, shape = s["motion"][:n], s["shape"]
    mask = np.zeros(shape, dtype=bool)
    mask[1:5, 1:4, :] = True
    Y = s["Y"][:n]
    stage = GlmStage(design, {"a": "a"}, mask=mask)
    resp = np.sin(np.arange(n + 2) * 0.7)
    kept, rows, previous = [], [], None
    for i in range(n + 2):
        upstream = dict(zip(MOTION_NAMES, map(float, motion[min(i, n - 1)])))
        upstream["resp"] = float(resp[i])
        if i == 7:
            upstream["rot_x"] = None  # registration failed
        if i == 9:
            del upstream["resp"]
        data = as_volume_array(Y[min(i, n - 1)], shape)
        result = stage.update(volume(data, i), upstream)
        if i in (7, 9) or i >= n:
            assert result.flags == ["glm_censored"]
            assert result.alerts[0][:2] == ("warning", "glm_censored")
            assert f"volume {i}" in result.alerts[0][2]
        else:
            assert result.flags == []
            kept.append(i)
        if i < n and i != 7:
            # Derivatives go back to the last volume that had motion (6 for 8).
            values = expand_motion(motion[i], previous)
            previous = motion[i]
            if i != 9:
                values["resp"] = resp[i]
                rows.append(design.row(i, values))
    assert stage.censored == [7, 9, n, n + 1]
    fit = stage.fit()
    index = np.flatnonzero(mask.ravel(order="F"))
    ref = ols_reference(np.array(rows), Y[kept][:, index], stage.contrast_weights)
    assert_fit_equals_reference(fit, ref, design)
    summary = stage.summary()
    assert summary["glm_volumes"] == len(kept) and summary["glm_censored"] == [7, 9, n, n + 1]
    with pytest.raises(RtscError, match="no upstream"):
        GlmStage(design).update(volume(Y[0].reshape(shape, order="F"), 0), None)


def test_stage_end_of_run_t_map_equals_nilearn(rng):
    """A simulated run through GlmStage (12 motion confounds fed as upstream metrics):
    the final t-map equals nilearn's run_glm(noise_model='ols') + compute_contrast."""
    n = 60
    grid = Grid((32, 32, 18), (6.0, 6.0, 6.0))
    run = simulate_run(grid, n, TR_S, seed=2, motion=np.zeros((n, 6)))
    events = run.events + [(25.0, 3.0, "cue"), (95.0, 3.0, "cue")]
    design = make_design(events, n, TR_S, extra_names=motion_confound_names(12))
    motion = random_walk_motion(rng, n)
    stage = GlmStage(design, {"task": "task", "cue_vs_task": "cue - 0.5*task"})
    for i in range(n):
        stage.update(volume(run.data[..., i], i), dict(zip(MOTION_NAMES, motion[i])))
    maps = stage.maps()
    index = stage.state.index
    extras = motion_rows(motion)
    X = design.matrix({name: [e[name] for e in extras] for name in design.extra_names})
    Y = np.stack([np.asfortranarray(run.data[..., i]).ravel(order="F")[index]
                  for i in range(n)]).astype(float)
    labels, results = run_glm(Y, X, noise_model="ols")
    for j, name in enumerate(stage.contrast_names):
        reference = compute_contrast(labels, results, stage.contrast_weights[j]).stat()
        ours = maps[f"t:{name}"].ravel(order="F")[index].astype(float)
        assert np.corrcoef(ours, reference)[0, 1] > 0.9999
        rel = np.abs(ours - reference) / np.maximum(np.abs(reference), 1e-3)
        assert rel.max() < 1e-4, rel.max()  # float32 maps: ~1e-7 in fact
        effect = compute_contrast(labels, results, stage.contrast_weights[j]).effect_size()
        np.testing.assert_allclose(maps[f"beta:{name}"].ravel(order="F")[index], effect,
                                   rtol=1e-5, atol=1e-4 * np.abs(effect).max())


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_stage_detects_the_simulated_activation(head):
    """Default SNR (noise 10, 3 % activation), TR 2 s, 100 volumes, no motion (the motion
    stage runs upstream; here the GLM alone is tested); on the phantom and on real
    anatomy cut by the field of view (axasc35 on its own 64x64x31 grid). Measured peak t:
    phantom 12.5, axasc35 20.4, mni152 14.0 (all active voxels detected)."""
    n = 100
    grid, kwargs = simulated_head(head, Grid((48, 48, 27), (4.0, 4.0, 4.0)))
    run = simulate_run(grid, n, TR_S, seed=0, motion=np.zeros((n, 6)), **kwargs)
    stage = GlmStage(make_design(run.events, n, TR_S), {"task": "task"}, mask_fraction=0.2)
    for i in range(n):
        stage.update(volume(run.data[..., i], i))
    tmap = stage.maps()["t:task"]
    fit = stage.fit(with_beta=False)
    threshold = scipy.stats.t.isf(0.001, fit.dof)
    in_mask = np.zeros(grid.shape, dtype=bool, order="F")
    in_mask.ravel(order="K")[stage.state.index] = True
    active = run.activation_mask & in_mask
    null = run.brain_mask & (run.activation == 0) & in_mask
    assert active.sum() == run.activation_mask.sum() > 50  # the mask keeps them all
    assert null.sum() > 10000
    detected = float(np.mean(tmap[active] > threshold))
    false_positive = float(np.mean(tmap[null] > threshold))
    print(f"{head}: peak t {tmap.max():.1f}, detected {detected:.3f} of {active.sum()}, "
          f"false positives {false_positive:.4f} of {null.sum()}")
    assert detected >= 0.9, detected  # measured 1.0 (smallest t 3.7, median 8.3)
    assert false_positive <= 0.003, false_positive  # measured 0.0012 (nominal 0.001)
    summary = stage.summary()
    assert summary["glm_contrasts"]["task"]["voxels_above"] == int(np.sum(tmap > threshold))
    assert summary["glm_contrasts"]["task"]["threshold_t"] == pytest.approx(threshold)


def test_stage_maps_and_summary(synthetic):
    s = synthetic
    design, Y, shape = s["design"], s["Y"], s["shape"]
    mask = np.zeros(shape, dtype=bool)
    mask[::2] = True
    stage = GlmStage(design, {"a": "a", "a_minus_b": "a - b"}, mask=mask)
    assert stage.maps() == {} and stage.fit() is None
    assert stage.summary()["glm_volumes"] == 0
    for i in range(len(Y)):
        stage.update(volume(as_volume_array(Y[i], shape), i),
                     {k: float(v) for k, v in zip(MOTION_NAMES, s["motion"][i])})
    maps = stage.maps()
    assert sorted(maps) == ["beta:a", "beta:a_minus_b", "t:a", "t:a_minus_b"]
    fit = stage.fit()
    for name, j in (("a", 0), ("a_minus_b", 1)):
        t = maps[f"t:{name}"]
        assert t.dtype == np.float32 and t.shape == shape and t.flags.f_contiguous
        assert np.all(t[~mask] == 0.0)
        np.testing.assert_allclose(t.ravel(order="F")[stage.state.index], fit.t[j], rtol=1e-6)
    summary = stage.summary()
    assert summary["glm_rank"] == design.p and summary["glm_dof"] == len(Y) - design.p
    assert summary["glm_contrasts"]["a"]["peak_t"] == pytest.approx(float(np.nanmax(fit.t[0])))
    default = GlmStage(design)  # one contrast per trial type
    assert default.contrast_names == ["a", "b"]
    with pytest.raises(RtscError, match="forgetting"):
        GlmStage(design, forgetting=1.5)


def test_voxels_leaving_the_validity_mask_leave_the_fit(synthetic):
    """glm_restrict mid-run (the voxels that left are NaN from then on, as the reslice
    gives them): the voxels left have the lstsq fit of all their volumes, the ones
    that left NaN everywhere; contrast_t and mean_effect (the ROI's) skip them too."""
    from rtsc.pipeline.glm.recursive import glm_restrict  # noqa: PLC0415
    from rtsc.pipeline.glm.subset import contrast_t, mean_effect  # noqa: PLC0415

    s = synthetic
    design, X, Y, shape, index = s["design"], s["X"], s["Y"], s["shape"], s["index"]
    C = np.array([design.contrast(e) for e in ("a", "a - b")])
    state = glm_init(shape, index, design.p, constant=design.column("constant"))
    valid = np.ones(shape, bool, order="F")  # so that ravel(order="F") is a view
    gone = index[::3]
    for i in range(len(X)):
        if i == 30:
            valid.ravel(order="F")[gone] = False  # Fortran flat indices, as the mask's
            assert glm_restrict(state, valid) == gone.size
        y = Y[i].copy()
        if i >= 30:
            y[gone] = np.nan
        glm_update(state, as_volume_array(y, shape), X[i])
    fit = glm_fit(state, C)
    left = np.isin(index, gone)
    ref = ols_reference(X, Y[:, index[~left]].astype(float), C)
    kept = dataclasses.replace(fit, beta=fit.beta[:, ~left], sigma2=fit.sigma2[~left],
                               effect=fit.effect[:, ~left], variance=fit.variance[:, ~left],
                               t=fit.t[:, ~left])
    assert_fit_equals_reference(kept, ref, design)
    for values in (fit.beta, fit.effect, fit.variance, fit.t, fit.sigma2[None]):
        assert np.isnan(values[:, left]).all()
    t = contrast_t(state, C[0])
    np.testing.assert_allclose(t[~left], fit.t[0, ~left], rtol=1e-9)
    assert np.isnan(t[left]).all()
    positions = np.arange(index.size)
    assert mean_effect(state, C[0], positions) == pytest.approx(
        float(fit.effect[0, ~left].mean()), rel=1e-9)
