"""ROI stage: masks against brute force, every volume against an offline recomputation,
recovery of a simulated activation, top-k selection and contrast feedback against the
whole-brain GLM fit, spec parsing and error messages."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from rtsc.errors import ConfigError
from rtsc.pipeline.glm.design import make_design
from rtsc.pipeline.glm.recursive import GlmStage, glm_fit
from rtsc.pipeline.glm.subset import contrast_t, mean_effect
from rtsc.pipeline.roi.stage import RoiStage
from rtsc.pipeline.roi.trend import trend_batch, trend_init, trend_step
from rtsc.pipeline.roi.spec import (ContrastRoi, MaskRoi, RoiError, SphereRoi, load_mask,
                                    parse_roi_spec, sphere_mask)
from rtsc.volume import SeriesInfo, Volume
from anatomies import HEADS, simulated_head
from simulator.bold import simulate_run
from simulator.phantom import Grid

TR_S = 2.0
INFO = SeriesInfo("test", TR_S, None, 1, "test", "mosaic")


def volume(data, index, affine):
    return Volume(np.asfortranarray(data, dtype=np.float32), np.asarray(affine, float), index,
                  INFO, None, 0.0, 0.0)


# ---- naive references ---------------------------------------------------------------------------

def naive_sphere(shape, affine, center, radius):
    """Every voxel centre through nibabel's apply_affine, distance <= radius."""
    ijk = np.indices(shape).reshape(3, -1).T
    distance = np.linalg.norm(apply_affine(affine, ijk) - np.asarray(center), axis=1)
    return (distance <= radius).reshape(shape), float(distance.min())


def rest_flags(design, threshold=0.1):
    """Rest volumes: every canonical task column at most ``threshold`` of its peak."""
    x = design.fixed[:, [design.task_names.index(t) for t in design.trial_types]]
    return np.all(x / np.abs(x).max(axis=0) <= threshold, axis=1)


def offline(x, y, baseline, ready, linear=True, task=None, shift=0.0):
    """Detrended value and PSC of the last volume from lstsq of all values so far on
    [1, x, task] (``shift`` is added to the baseline in the PSC's denominator only)."""
    if linear:
        columns = [np.ones_like(x), x] + ([] if task is None else [task[:x.size]])
        b = np.linalg.lstsq(np.column_stack(columns), y, rcond=None)[0]
        slope = b[1]
    else:
        slope = 0.0
    d = y - slope * x
    if not ready or not baseline.any():
        return d[-1], None
    level = d[baseline].mean()
    return d[-1], 100.0 * (d[-1] - level) / (level + shift)


def assert_close(ours, reference, rtol=1e-9, atol=1e-12):
    if reference is None:
        assert ours is None
    else:
        assert ours is not None and math.isclose(ours, reference, rel_tol=rtol, abs_tol=atol), \
            (ours, reference)


# ---- synthetic data -------------------------------------------------------------------------------

SHAPE = (12, 10, 8)
AFFINE = np.array([[-3.0, 0.0, 0.0, 16.0], [0.0, 3.0, 0.0, -14.0], [0.0, 0.0, 3.5, -12.0],
                   [0.0, 0.0, 0.0, 1.0]])
EVENTS = [(12.0, 16.0, "task"), (52.0, 16.0, "task"), (92.0, 16.0, "task")]


def make_series(rng, n=60, offset=0.0):
    """Blocks of 2 % in an activated blob, a drift of 0.4 per volume, noise SD 5; values
    multiples of 8 so that ``offset`` (1e8) is held exactly in float32."""
    design = make_design(EVENTS, n, TR_S)
    base = rng.uniform(800, 1200, SHAPE)
    active = np.zeros(SHAPE)
    active[4:9, 3:8, 2:6] = 1.0
    task = design.fixed[:, 0]
    data = np.empty(SHAPE + (n,))
    for t in range(n):
        data[..., t] = base * (1 + 0.02 * task[t] * active) + 0.4 * t \
            + rng.normal(0.0, 5.0, SHAPE)
    data = 8.0 * np.round(data / 8.0) + offset
    assert np.array_equal(data.astype(np.float32).astype(float), data)
    return data, design


def write_mask(path, mask, affine, values=1.0):
    nib.save(nib.Nifti1Image(np.where(mask, values, 0.0).astype(np.float32), affine), path)
    return str(path)


# ---- masks -----------------------------------------------------------------------------------------

OBLIQUE = np.array([[-2.9, 0.3, 0.1, 20.0], [0.25, 3.1, -0.4, -18.0], [0.05, 0.5, 3.9, -7.0],
                    [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("affine", [AFFINE, OBLIQUE])
def test_sphere_mask_equals_brute_force(rng, affine):
    for _ in range(20):
        center = apply_affine(affine, rng.uniform(-3, np.array(SHAPE) + 2))  # some cut by edges
        radius = float(rng.uniform(2.0, 12.0))
        try:
            ours = sphere_mask(center, radius, SHAPE, affine)
        except RoiError:
            ours = np.zeros(SHAPE, bool, order="F")
        reference, _ = naive_sphere(SHAPE, affine, center, radius)
        assert ours.flags.f_contiguous and ours.dtype == bool
        np.testing.assert_array_equal(ours, reference)


def test_empty_sphere_names_centre_radius_and_nearest_distance():
    center, radius = (200.0, -5.0, 3.0), 4.0
    _, nearest = naive_sphere(SHAPE, AFFINE, center, radius)
    with pytest.raises(RoiError) as info:
        sphere_mask(center, radius, SHAPE, AFFINE)
    message = str(info.value)
    assert "[200.0, -5.0, 3.0]" in message and "radius 4 mm" in message
    assert f"{nearest:.2f} mm away" in message


def test_mask_nifti_round_trip(rng, tmp_path):
    mask = rng.random(SHAPE) < 0.1
    values = rng.uniform(0.5, 3.0, SHAPE)  # any nonzero value is in the ROI
    path = write_mask(tmp_path / "roi.nii.gz", mask, AFFINE, values)
    loaded, affine = load_mask(path)
    np.testing.assert_array_equal(loaded, mask)
    np.testing.assert_allclose(affine, AFFINE)
    stage = RoiStage({"m": MaskRoi(path)}, baseline=3)
    data = rng.uniform(500, 1500, SHAPE)
    out = stage.update(volume(data, 0, AFFINE + 4e-4), None)  # within the 1e-3 mm tolerance
    shown = stage.maps()["roi:m"]
    assert shown.dtype == np.float32 and shown.flags.f_contiguous
    np.testing.assert_array_equal(shown, mask.astype(np.float32))
    expected = data.astype(np.float32)[mask].astype(float).mean()
    assert out.metrics["roi_mean"]["m"] == pytest.approx(expected, rel=1e-12)
    assert stage.summary()["roi"]["m"]["voxels"] == mask.sum()


def test_mask_grid_mismatch_and_empty_masks(rng, tmp_path):
    mask = rng.random(SHAPE) < 0.2
    data = rng.uniform(500, 1500, SHAPE)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    path = write_mask(tmp_path / "shifted.nii.gz", mask, shifted)
    with pytest.raises(RoiError) as info:
        RoiStage({"m": MaskRoi(path)}, baseline=3).update(volume(data, 0, AFFINE))
    message = str(info.value)
    assert "shifted.nii.gz" in message and message.count(str(SHAPE)) == 2
    assert "16.01" in message and "tolerance 0.001 mm" in message  # the mask's x offset
    path = write_mask(tmp_path / "small.nii.gz", mask[:-1], AFFINE)
    with pytest.raises(RoiError, match=r"(?s)small\.nii\.gz.*\(11, 10, 8\).*\(12, 10, 8\)"):
        RoiStage({"m": MaskRoi(path)}, baseline=3).update(volume(data, 0, AFFINE))
    path = write_mask(tmp_path / "empty.nii.gz", np.zeros(SHAPE, bool), AFFINE)
    with pytest.raises(RoiError, match=r"empty\.nii\.gz.*empty ROI"):
        RoiStage({"m": MaskRoi(path)}, baseline=3).update(volume(data, 0, AFFINE))
    with pytest.raises(RoiError, match="cannot be read"):
        RoiStage({"m": MaskRoi(str(tmp_path / "missing.nii.gz"))})


# ---- spec parsing ------------------------------------------------------------------------------------

def test_parse_roi_spec_forms():
    assert parse_roi_spec(None) == {} and parse_roi_spec({}) == {}
    assert parse_roi_spec("m.nii.gz") == {"roi": MaskRoi("m.nii.gz")}
    sphere = {"center_ras_mm": [1, 2.5, -3], "radius_mm": 6}
    assert parse_roi_spec(sphere) == {"roi": SphereRoi((1.0, 2.5, -3.0), 6.0)}
    named = parse_roi_spec({"motor": sphere, "v1": {"mask": "v1.nii"},
                            "loc": {"contrast": "task", "top_k": 50, "within": sphere,
                                    "freeze_after": 40},
                            "loc2": {"contrast": "task", "top_k": 5, "within": "w.nii"}})
    assert list(named) == ["motor", "v1", "loc", "loc2"]
    assert named["v1"] == MaskRoi("v1.nii")
    assert named["loc"] == ContrastRoi("task", 50, SphereRoi((1.0, 2.5, -3.0), 6.0), 40)
    assert named["loc2"] == ContrastRoi("task", 5, MaskRoi("w.nii"))


@pytest.mark.parametrize("value, where", [
    (3, "glm.roi: 3 is not an ROI"),
    ({"center_ras_mm": [1, 2], "radius_mm": 5}, "glm.roi: center_ras_mm [1, 2]"),
    ({"center_ras_mm": [1, 2, 3], "radius_mm": -5}, "glm.roi: radius_mm -5"),
    ({"center_ras_mm": [1, 2, 3], "radius_mm": True}, "glm.roi: radius_mm True"),
    ({"center_ras_mm": [1, 2, 3]}, "glm.roi: fields ['center_ras_mm']"),
    ({"center_ras_mm": [1, 2, 3], "radius_mm": 5, "motor": 1}, "glm.roi: mixes ROI fields"),
    ({"a": {"center_ras_mm": [0, 0, 0], "radius_mm": 0}}, "glm.roi.a: radius_mm 0"),
    ({"a": {"radius": 5}}, "glm.roi.a: unknown field(s) radius"),
    ({"bad name": "m.nii"}, "glm.roi: ROI name 'bad name'"),
    ({"contrast": "task", "top_k": 0}, "glm.roi: top_k 0"),
    ({"contrast": "task"}, "glm.roi: a top-k ROI needs contrast and top_k"),
    ({"contrast": "task", "top_k": 5, "within": {"contrast": "task", "top_k": 5}},
     "glm.roi.within: a top-k ROI cannot be nested"),
    ({"contrast": "task", "top_k": 5, "freeze_after": 0}, "glm.roi: freeze_after 0"),
    ({"a": None}, "glm.roi.a: None is not an ROI"),
])
def test_parse_roi_spec_errors_name_the_key(value, where):
    with pytest.raises(ConfigError) as info:
        parse_roi_spec(value)
    message = str(info.value)
    assert message.startswith(where), message
    assert "allowed: null; a mask NIfTI path" in message


# ---- every volume against the offline recomputation ------------------------------------------------

@pytest.mark.parametrize("baseline, detrend, covariates", [
    (8, "linear", True), ("rest", "linear", True), (8, "linear", False), ("rest", "none", True)])
def test_every_volume_equals_offline(rng, tmp_path, baseline, detrend, covariates):
    data, design = make_series(rng)
    n = data.shape[-1]
    blob = np.zeros(SHAPE, bool)
    blob[5:8, 4:7, 3:5] = True
    path = write_mask(tmp_path / "blob.nii.gz", blob, AFFINE)
    center = apply_affine(AFFINE, [6.0, 5.0, 3.5])
    stage = RoiStage({"ball": SphereRoi(center, 7.0), "blob": MaskRoi(path)}, baseline=baseline,
                     detrend=detrend, design=design, task_covariates=covariates)
    task = design.fixed[:, :1] if covariates else None
    masks = {"ball": naive_sphere(SHAPE, AFFINE, center, 7.0)[0], "blob": blob}
    is_base = rest_flags(design) if baseline == "rest" else np.arange(n) < baseline
    means = {name: [] for name in masks}
    for t in range(n):
        out = stage.update(volume(data[..., t], t, AFFINE)).metrics
        assert out["feedback"] == out["roi"]["ball"]  # feedback: PSC of the first ROI
        x = np.arange(t + 1.0)
        ready = is_base[:t + 1].any() and (baseline == "rest" or t >= baseline - 1)
        for name, mask in masks.items():
            means[name].append(data[..., t].astype(np.float32)[mask].astype(float).mean())
            y = np.array(means[name])
            detrended, psc = offline(x, y, is_base[:t + 1], ready, detrend == "linear", task)
            assert_close(out["roi_mean"][name], y[-1])
            assert_close(out["roi_detrended"][name], detrended)
            assert_close(out["roi"][name], psc)
    assert stage.tracks["ball"].trend.n_base == is_base.sum()


def test_cancellation_adding_1e8(rng):
    """1e8 + data (multiples of 8, exact in float32): the means shift by 1e8 and the PSC
    has the offline numerator over a baseline 1e8 higher, to 1e-9."""
    data, design = make_series(rng, offset=0.0)
    shifted = data + 1e8
    assert np.array_equal(shifted.astype(np.float32).astype(float) - 1e8, data)
    center = apply_affine(AFFINE, [6.0, 5.0, 3.5])
    mask = naive_sphere(SHAPE, AFFINE, center, 7.0)[0]
    stage = RoiStage({"ball": SphereRoi(center, 7.0)}, baseline=8, design=design)
    y = []
    for t in range(data.shape[-1]):
        out = stage.update(volume(shifted[..., t], t, AFFINE)).metrics
        y.append(data[..., t][mask].mean())
        x = np.arange(t + 1.0)
        detrended, psc = offline(x, np.array(y), x < 8, t >= 7, True, design.fixed[:, :1],
                                 shift=1e8)
        assert_close(out["roi_mean"]["ball"] - 1e8, y[-1])
        assert_close(out["roi_detrended"]["ball"] - 1e8, detrended)
        assert_close(out["roi"]["ball"], psc)


def test_trend_batch_equals_steps(rng):
    """Welford steps, the two-pass batch and lstsq agree with 1e8 added to the values; a
    task column that is zero at first is left out until it starts."""
    n = 50
    x = np.arange(float(n))
    task = np.column_stack([np.r_[np.zeros(10), rng.random(n - 10)], rng.random(n)])
    y = 1e8 + rng.normal(0, 3, n) + 0.2 * x + 5 * task[:, 0]
    base = rng.random(n) < 0.3
    state = trend_init(True, 2)
    for i in range(n):
        trend_step(state, x[i], y[i], bool(base[i]), task[i])
        if i in (0, 5, 12, n - 1):
            batch = trend_batch(x[:i + 1], y[:i + 1], base[:i + 1], True, task[:i + 1])
            reference = offline(x[:i + 1], y[:i + 1] - 1e8, base[:i + 1], False, True, task)
            columns = np.column_stack([np.ones(i + 1), x[:i + 1], task[:i + 1]])
            slope = np.linalg.lstsq(columns, y[:i + 1] - 1e8, rcond=None)[0][1]
            assert state.slope == pytest.approx(slope, rel=1e-9, abs=1e-12)
            assert batch.slope == pytest.approx(slope, rel=1e-9, abs=1e-12)
            assert reference[0] == pytest.approx(y[i] - 1e8 - slope * x[i], rel=1e-9)
            for name in ("n", "offset", "mean_y", "n_base", "base_x", "base_y"):
                assert getattr(state, name) == pytest.approx(getattr(batch, name), rel=1e-12,
                                                             abs=1e-9)
            np.testing.assert_allclose(state.cxy, batch.cxy, rtol=1e-10, atol=1e-9)


# ---- a simulated run ----------------------------------------------------------------------------

N_SIM = 100


def _simulated(head: str):
    grid, kwargs = simulated_head(head, Grid((40, 40, 24), (4.0, 4.0, 4.0)))
    run = simulate_run(grid, N_SIM, TR_S, seed=3, motion=np.zeros((N_SIM, 6)),
                       activation_pct=3.0, noise_sigma=10.0, **kwargs)
    design = make_design(run.events, N_SIM, TR_S)
    center = apply_affine(run.affine, np.argwhere(run.activation_mask).mean(axis=0))
    return run, design, center


@pytest.fixture(scope="module")
def simulated():
    return _simulated("phantom")


@pytest.mark.parametrize("head", HEADS)
def test_sphere_on_the_activation_recovers_the_signal_change(simulated, head):
    """On the phantom and on real anatomy cut by the field of view."""
    run, design, center = simulated if head == "phantom" else _simulated(head)
    stage = RoiStage({"motor": SphereRoi(center, 8.0)}, design=design)
    assert stage.baseline == "rest"  # "auto" with a design
    psc = []
    for t in range(N_SIM):
        psc.append(stage.update(volume(run.data[..., t], t, run.affine)).metrics["roi"]["motor"])
    defined = np.array([p is not None for p in psc])
    assert defined.all()  # the run starts at rest: a baseline from volume 0
    r = np.corrcoef(np.array(psc, float), run.regressor)[0, 1]
    assert r > 0.9, r  # measured 0.987 (0.78 without the task covariate)
    # Expected task - rest PSC: the ROI mean is sum_v I_v (1 + a w_v reg) / k, i.e. a
    # change of a * reg * (intensity-weighted mean of w) in percent.
    mask = naive_sphere(run.grid.shape, run.affine, center, 8.0)[0]
    rest = rest_flags(design)
    task = np.any(design.fixed[:, :1] / np.abs(design.fixed[:, :1]).max() >= 0.5, axis=1)
    intensity = run.data[..., rest].mean(axis=-1)[mask]
    weight = float((intensity * run.activation[mask]).sum() / intensity.sum())
    expected = run.activation_pct * weight * (run.regressor[task].mean()
                                              - run.regressor[rest].mean())
    summary = stage.summary()["roi"]["motor"]
    print(f"{head}: r {r:.3f}, task - rest {summary['psc_task_minus_rest']:.2f} % "
          f"(expected {expected:.2f})")
    assert summary["voxels"] == mask.sum() > 20
    # measured 2.46 against 2.57 expected
    assert summary["psc_task_minus_rest"] == pytest.approx(expected, rel=0.1), expected
    assert summary["psc_task_minus_rest"] == pytest.approx(
        summary["psc_task_mean"] - summary["psc_rest_mean"])


@pytest.mark.slow
def test_top_k_and_contrast_feedback_follow_the_glm(simulated):
    run, design, center = simulated
    glm = GlmStage(design, {"task": "task"})
    k, k_local, freeze = 30, 12, 40
    stage = RoiStage({"top": ContrastRoi("task", k),
                      "local": ContrastRoi("task", k_local, SphereRoi(center, 12.0), freeze)},
                     feedback="contrast", glm=glm)
    assert stage.feedback_contrast == "task" and stage.baseline == "rest"
    rest = rest_flags(design)
    in_sphere = naive_sphere(run.grid.shape, run.affine, center, 12.0)[0].ravel(order="F")
    frozen_index = None
    selected_once = False
    stage_alerts = []
    constant = np.zeros((1, design.p))
    constant[0, design.column("constant")] = 1.0
    for t in range(N_SIM):
        vol = volume(run.data[..., t], t, run.affine)
        glm.update(vol)
        result = stage.update(vol)
        out = result.metrics
        stage_alerts.extend(result.alerts)
        fit = glm_fit(glm.state, glm.contrast_weights)
        tmap, index = fit.t[0], glm.state.index
        # The short cuts (full rank: one solve; otherwise glm_fit) against glm_fit. Both
        # are within ~cond(R) * eps of lstsq (2e-7 in t at volume 6, cond 4e8, just after
        # the first event), so they agree to that, and to 1e-9 once conditioned.
        s = np.linalg.svd(glm.state.r, compute_uv=False)
        cond = s[0] / s[-1] if s[-1] > 0 else np.inf
        np.testing.assert_allclose(contrast_t(glm.state, glm.contrast_weights[0]), tmap,
                                   rtol=1e-9, atol=1e-12 + 1e-15 * min(cond, 1e12))
        some = np.arange(0, index.size, 7)
        effect_some = mean_effect(glm.state, glm.contrast_weights[0], some)
        # Effects: the same rounding relative to the effects' size (their mean may cancel).
        scale = (1e-9 + 1e-15 * min(cond, 1e12)) * np.abs(fit.effect[0]).mean()
        if fit.estimable[0]:
            assert_close(effect_some, fit.effect[0][some].mean(), atol=scale)
        else:
            assert math.isnan(effect_some)
        # A contrast on the constant (the mean image) exercises the offsets' share.
        mean_image = glm_fit(glm.state, constant).effect[0]
        np.testing.assert_allclose(contrast_t(glm.state, constant[0], some),
                                   glm_fit(glm.state, constant).t[0][some], rtol=1e-9,
                                   atol=1e-12 + 1e-15 * min(cond, 1e12))
        mean_some = mean_effect(glm.state, constant[0], some)
        if np.isnan(mean_image[0]):  # not estimable while the drifts are collinear with it
            assert math.isnan(mean_some)
        else:
            assert_close(mean_some, mean_image[some].mean())
        frozen_alerts = [a for a in stage_alerts if a[1] == "roi_frozen"]
        assert len(frozen_alerts) == (t >= freeze - 1)
        if not np.isfinite(tmap).any():
            assert out["roi_mean"]["top"] is None and out["feedback"] is None
            assert stage.tracks["top"].index is None and not selected_once
            continue
        selected_once = True
        order = np.argsort(-tmap)  # NaN last
        expected = np.sort(index[order[:k]])
        np.testing.assert_array_equal(stage.tracks["top"].index, expected)
        candidates = np.flatnonzero(in_sphere[index])
        local = np.sort(index[candidates[np.argsort(-tmap[candidates])[:k_local]]])
        if t < freeze:
            np.testing.assert_array_equal(stage.tracks["local"].index, local)
            frozen_index = local
        else:
            np.testing.assert_array_equal(stage.tracks["local"].index, frozen_index)
            assert stage.tracks["local"].frozen and stage.tracks["local"].history is None
        # The feedback: the whole-brain effect averaged over the ROI.
        effect = fit.effect[0][np.searchsorted(index, expected)].mean()
        assert_close(out["feedback"], effect, atol=scale)
        # The time course is that of the current voxels over volumes 0..t.
        for name, voxels in (("top", expected), ("local", stage.tracks["local"].index)):
            y = run.data[..., :t + 1].reshape(-1, t + 1, order="F")[voxels].astype(float)
            y = y.mean(axis=0)
            detrended, psc = offline(np.arange(t + 1.0), y, rest[:t + 1], True, True,
                                     design.fixed[:, :1])
            assert_close(out["roi_mean"][name], y[-1])
            assert_close(out["roi_detrended"][name], detrended)
            assert_close(out["roi"][name], psc)
    assert not np.array_equal(stage.tracks["top"].index, frozen_index)  # "top" kept moving
    inside = run.activation_mask.ravel(order="F")[stage.tracks["top"].index]
    assert inside.mean() >= 0.9, inside.mean()
    maps = stage.maps()
    assert sorted(maps) == ["roi:local", "roi:top"] and maps["roi:top"].sum() == k
    summary = stage.summary()
    assert summary["roi"]["local"]["frozen"] and not summary["roi"]["top"]["frozen"]
    assert summary["roi"]["top"]["psc_task_minus_rest"] > 1.0


# ---- wiring and edge cases ----------------------------------------------------------------------

def test_construction_errors(tmp_path):
    design = make_design(EVENTS, 60, TR_S)
    glm = GlmStage(design, {"task": "task"})
    sphere = SphereRoi((0.0, 0.0, 0.0), 5.0)
    with pytest.raises(RoiError, match="no ROI"):
        RoiStage({})
    with pytest.raises(RoiError, match="top-k ROI loc needs the GLM stage"):
        RoiStage({"loc": ContrastRoi("task", 10)})
    with pytest.raises(RoiError, match="feedback=contrast needs the GLM stage"):
        RoiStage({"s": sphere}, feedback="contrast")
    with pytest.raises(RoiError, match="contrast 'tap' is not a GLM contrast; contrasts: task"):
        RoiStage({"loc": ContrastRoi("tap", 10)}, glm=glm)
    with pytest.raises(RoiError, match="baseline 'rest' needs a design"):
        RoiStage({"s": sphere}, baseline="rest")
    with pytest.raises(RoiError, match="baseline 0: allowed"):
        RoiStage({"s": sphere}, baseline=0)
    with pytest.raises(RoiError, match="feedback_roi 'x': not an ROI; ROIs: s"):
        RoiStage({"s": sphere}, feedback_roi="x")
    with pytest.raises(RoiError, match="feedback 'mean': allowed: psc, contrast"):
        RoiStage({"s": sphere}, feedback="mean")
    with pytest.raises(RoiError, match="detrend 'cosine'"):
        RoiStage({"s": sphere}, detrend="cosine")
    assert RoiStage({"s": sphere}).baseline == 10  # auto without a design
    assert RoiStage({"s": sphere}, glm=glm).baseline == "rest"  # auto with the GLM's design
    with pytest.raises(RoiError, match="run the GLM stage before the ROI stage"):
        RoiStage({"loc": ContrastRoi("task", 10)}, glm=glm).update(
            volume(np.ones(SHAPE), 0, AFFINE))
    far = ContrastRoi("task", 10, SphereRoi((0.0, 0.0, 0.0), 100.0))
    stage = RoiStage({"loc": far}, glm=glm)
    data = np.ones(SHAPE)
    data[:2] = 100.0  # the automatic GLM mask keeps these slabs only
    glm.update(volume(data, 0, AFFINE))
    assert stage.update(volume(data, 0, AFFINE)).metrics["roi"] == {"loc": None}
    outside = RoiStage({"loc": ContrastRoi("task", 10, SphereRoi(
        tuple(apply_affine(AFFINE, [10.0, 5.0, 4.0])), 2.0))}, glm=glm)
    with pytest.raises(RoiError, match="no voxel of its 'within' region is in the GLM mask"):
        outside.update(volume(data, 0, AFFINE))


def test_volumes_beyond_the_design_are_reported_but_not_fitted(rng):
    """With task covariates, the fit and the baseline stop at the design's last volume;
    later volumes are still reported, detrended with the last line."""
    data, _ = make_series(rng, n=60)
    short = make_design(EVENTS, 50, TR_S)
    center = apply_affine(AFFINE, [6.0, 5.0, 3.5])
    mask = naive_sphere(SHAPE, AFFINE, center, 7.0)[0]
    stage = RoiStage({"ball": SphereRoi(center, 7.0)}, design=short)
    rest = rest_flags(short)
    y = []
    for t in range(60):
        out = stage.update(volume(data[..., t], t, AFFINE)).metrics
        y.append(data[..., t][mask].mean())
        m = min(t + 1, 50)  # volumes in the fit
        x = np.arange(float(m))
        columns = np.column_stack([np.ones(m), x, short.fixed[:m, :1]])
        slope = np.linalg.lstsq(columns, np.array(y[:m]), rcond=None)[0][1] if m > 1 else 0.0
        d = np.array(y[:m]) - slope * x
        level = d[rest[:m]].mean()
        detrended = y[-1] - slope * t
        assert_close(out["roi_mean"]["ball"], y[-1])
        assert_close(out["roi_detrended"]["ball"], detrended)
        assert_close(out["roi"]["ball"], 100.0 * (detrended - level) / level)
    assert stage.tracks["ball"].trend.n == 50 and len(stage.tracks["ball"].y) == 60


@pytest.mark.parametrize("early", [False, True])
def test_roi_voxels_leaving_the_validity_mask_leave_its_whole_history(rng, early):
    """Some of a sphere's voxels leave the run's validity mask at volume 12 (NaN from
    then on, as the reslice gives them): from then on every value, the trend and the
    PSC are the offline ones of the voxels left, over all volumes (the means of the
    earlier volumes recomputed), whether the ROI reads the resliced volume or (early)
    ``corrected_at``."""
    import dataclasses  # noqa: PLC0415

    from rtsc.volume import Coverage  # noqa: PLC0415

    data, design = make_series(rng)
    n = data.shape[-1]
    center = apply_affine(AFFINE, [6.0, 5.0, 3.5])
    sphere = naive_sphere(SHAPE, AFFINE, center, 7.0)[0]
    stage = RoiStage({"ball": SphereRoi(center, 7.0)}, baseline=8, design=design)
    valid = np.ones(SHAPE, bool)
    coverage = Coverage.of(valid)
    for t in range(n):
        if t == 12:
            valid[:, :, 4:] = False
            coverage = Coverage.of(valid, version=1)
            assert 0 < (sphere & valid).sum() < sphere.sum()
        frame = data[..., t].astype(np.float32)
        frame[~valid] = np.nan
        vol = dataclasses.replace(volume(frame, t, AFFINE), coverage=coverage)
        if early:
            flat = np.asfortranarray(frame).ravel(order="F")
            vol = dataclasses.replace(vol, corrected_at=lambda index, flat=flat: flat[index])
        out = stage.update(vol).metrics
        keep = sphere & valid
        y = np.array([data[..., s].astype(np.float32)[keep].astype(float).mean()
                      for s in range(t + 1)])
        x = np.arange(t + 1.0)
        detrended, psc = offline(x, y, x < 8, t >= 7, True, design.fixed[:t + 1, :1])
        assert_close(out["roi_mean"]["ball"], y[-1])
        assert_close(out["roi_detrended"]["ball"], detrended)
        assert_close(out["roi"]["ball"], psc)
    assert stage.summary()["roi"]["ball"]["voxels"] == int((sphere & valid).sum())
