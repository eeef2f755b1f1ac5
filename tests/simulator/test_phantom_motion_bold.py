"""Scanner simulator physics: phantom, motion convention and BOLD model have known answers."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.conventions import framewise_displacement_series, rigid_matrix, rotation_matrix
from simulator.bold import (
    block_events,
    drift_curve,
    iter_volumes,
    plan_run,
    regressor,
    simulate_run,
    spm_hrf,
)
from simulator.motion import displace, motion_trajectory, moved_coordinates
from simulator.phantom import HEAD_CENTER_RAS, HEAD_TILT_DEG, BrainPhantom, Grid

# 160 x 192 x 144 mm at 4 mm: covers the head, ~69k voxels, fast.
SMALL = Grid((40, 48, 36), (4.0, 4.0, 4.0))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture(scope="module")
def phantom() -> BrainPhantom:
    return BrainPhantom(seed=3)


# ---------------------------------------------------------------------------- grid


def test_grid_affine_is_dicom_axial_centred():
    grid = Grid((64, 60, 36), (3.0, 3.5, 4.0))
    aff = grid.affine()
    assert aff[0, 0] == -3.0 and aff[1, 1] == -3.5 and aff[2, 2] == 4.0
    centre = np.array([63 / 2, 59 / 2, 35 / 2, 1.0])
    np.testing.assert_allclose(aff @ centre, [0, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(grid.center_ras(), 0.0, atol=1e-12)
    xyz = grid.ras_coordinates().reshape(grid.shape + (3,))
    ijk = np.array([5, 7, 11])
    np.testing.assert_allclose(xyz[tuple(ijk)], aff[:3, :3] @ ijk + aff[:3, 3])


# ---------------------------------------------------------------------------- motion


def test_rotation_convention_right_handed():
    a = 0.3
    np.testing.assert_allclose(rotation_matrix(a, 0, 0) @ [0, 1, 0], [0, np.cos(a), np.sin(a)])
    np.testing.assert_allclose(rotation_matrix(0, a, 0) @ [0, 0, 1], [np.sin(a), 0, np.cos(a)])
    np.testing.assert_allclose(rotation_matrix(0, 0, a) @ [1, 0, 0], [np.cos(a), np.sin(a), 0])
    rx, ry, rz = 0.1, -0.2, 0.3
    composed = rotation_matrix(0, 0, rz) @ rotation_matrix(0, ry, 0) @ rotation_matrix(rx, 0, 0)
    r = rotation_matrix(rx, ry, rz)
    np.testing.assert_allclose(r, composed, atol=1e-15)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-15)
    assert np.isclose(np.linalg.det(r), 1.0)


def test_moved_coordinates_inverts_displace(rng):
    params = np.array([1.0, -2.0, 0.5, 0.02, -0.03, 0.01])
    c = np.array([3.0, -1.0, 2.0])
    x = rng.uniform(-80, 80, size=(50, 3))
    y = displace(x, params, c)
    np.testing.assert_allclose(moved_coordinates(y, params, c), x, atol=1e-12)
    m = rigid_matrix(params, c)
    np.testing.assert_allclose((m @ np.c_[x, np.ones(50)].T).T[:, :3], y, atol=1e-12)
    r = rotation_matrix(*params[3:])
    np.testing.assert_allclose(y[0], r @ (x[0] - c) + c + params[:3])


def test_head_moved_superior_gives_positive_trans_z(phantom):
    y = SMALL.ras_coordinates()
    c = SMALL.center_ras()
    params = np.array([0.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    moved = phantom.intensity(moved_coordinates(y, params, c))
    reference_below = phantom.intensity(y - [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(moved, reference_below)
    # and the head's intensity centroid went up by 2 mm on the grid (half a voxel:
    # point sampling of 2 mm wide edges aliases by a few hundredths of a mm)
    ref = phantom.intensity(y)
    shift = moved @ y / moved.sum() - ref @ y / ref.sum()
    np.testing.assert_allclose(shift, [0.0, 0.0, 2.0], atol=0.1)


def test_rotation_moves_the_centroid_as_design_says(phantom):
    # Rotating about a centre well below the head makes the convention visible:
    # rot_x > 0 turns +z towards -y, so the head tips backwards (posterior).
    y = SMALL.ras_coordinates()
    c = np.array([0.0, 0.0, -60.0])
    params = np.array([0.5, -0.3, 0.2, 0.04, 0.0, 0.0])
    ref = phantom.intensity(y)
    moved = phantom.intensity(moved_coordinates(y, params, c))
    centroid_ref = ref @ y / ref.sum()
    centroid_moved = moved @ y / moved.sum()
    np.testing.assert_allclose(centroid_moved, displace(centroid_ref, params, c), atol=0.05)
    assert centroid_moved[1] < centroid_ref[1] - 2.0


def test_framewise_displacement_matches_numpy(rng):
    params = motion_trajectory(60, 2.0, rng)
    d = np.abs(np.diff(params, axis=0))
    expected = np.r_[0.0, d[:, :3].sum(axis=1) + 50.0 * d[:, 3:].sum(axis=1)]
    np.testing.assert_allclose(framewise_displacement_series(params), expected)
    expected_r80 = np.r_[0.0, d[:, :3].sum(axis=1) + 80.0 * d[:, 3:].sum(axis=1)]
    np.testing.assert_allclose(framewise_displacement_series(params, radius_mm=80.0), expected_r80)
    two = np.array([[0, 0, 0, 0, 0, 0], [1.0, -0.5, 0, 0.01, 0, -0.02]])
    np.testing.assert_allclose(framewise_displacement_series(two), [0.0, 1.5 + 50 * 0.03])


def test_motion_trajectory_shape_bounds_and_jumps(rng):
    params = motion_trajectory(200, 2.0, rng, max_trans_mm=1.5, max_rot_deg=1.0, n_jumps=3)
    assert params.shape == (200, 6)
    np.testing.assert_array_equal(params[0], 0.0)
    assert np.abs(params[:, :3]).max() <= 1.5
    assert np.abs(params[:, 3:]).max() <= np.deg2rad(1.0) + 1e-15
    fd = framewise_displacement_series(params)
    assert np.sum(fd > 0.5) >= 2  # the jumps stand out of the drift
    assert np.median(fd) < 0.05  # the drift is slow
    no_jumps = motion_trajectory(200, 2.0, np.random.default_rng(1), n_jumps=0)
    assert framewise_displacement_series(no_jumps).max() < 0.1
    still = motion_trajectory(10, 2.0, rng, n_jumps=0, drift=False)
    np.testing.assert_array_equal(still, 0.0)
    again = motion_trajectory(200, 2.0, np.random.default_rng(7))
    np.testing.assert_array_equal(again, motion_trajectory(200, 2.0, np.random.default_rng(7)))


# ---------------------------------------------------------------------------- phantom


def test_phantom_anatomy_and_intensities(phantom):
    xyz = SMALL.ras_coordinates()
    img = phantom.intensity(xyz).reshape(SMALL.shape)
    head = img > 100
    extent = [np.ptp(np.nonzero(head.any(axis=tuple({0, 1, 2} - {a})))[0]) + 1 for a in range(3)]
    np.testing.assert_allclose(np.array(extent) * 4.0, [140, 170, 120], atol=12)
    corners = xyz[np.abs(xyz).min(axis=1) > 90]
    np.testing.assert_array_equal(phantom.intensity(corners), 0.0)
    fr = phantom.tissue_fractions(xyz)
    flat = img.ravel()
    for tissue, (lo, hi) in {"gm": (780, 1020), "wm": (560, 740), "csf": (1150, 1450)}.items():
        assert lo < np.median(flat[fr[tissue] > 0.9]) < hi, tissue
    brain = phantom.brain_mask(xyz)
    assert 500 < brain.sum() * 64 / 1000 < 1600  # ml


def test_phantom_kernel_equals_the_numpy_evaluation(rng):
    """The fused kernel against the term-by-term NumPy form: every point of a grid that
    crosses the whole head (background, scalp edge, folds, ventricles, fissure,
    activated ball) and random points; two seeds (the texture differs)."""
    grid = Grid((40, 48, 36), (4.0, 4.0, 4.0))
    points = np.concatenate([grid.ras_coordinates(),
                             rng.uniform(-90, 90, size=(20_000, 3))])
    for seed in (0, 7):
        phantom = BrainPhantom(seed=seed)
        near = phantom.activation_center_ras + rng.normal(0.0, 8.0, size=(5_000, 3))
        xyz = np.concatenate([points, near]).reshape(-1, 5, 3)  # (..., 3) kept
        intensity, activation = phantom.sample(xyz)
        ref_intensity, ref_activation = phantom.sample_reference(xyz)
        assert intensity.shape == xyz.shape[:-1]
        assert (ref_intensity == 0).any() and (ref_activation > 0.5).any()
        np.testing.assert_allclose(intensity, ref_intensity, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(activation, ref_activation, rtol=1e-12, atol=1e-12)


def test_phantom_is_not_symmetric(phantom):
    y = SMALL.ras_coordinates()
    img = phantom.intensity(y)
    head = img > 100
    scale = img[head].mean()
    flipped = phantom.intensity(y * [-1.0, 1.0, 1.0])
    assert np.abs(img - flipped)[head].mean() > 0.05 * scale
    # reflections through the head's own (tilted) mid-planes
    rot = rotation_matrix(*np.deg2rad(HEAD_TILT_DEG))
    for axis in range(3):
        flip = np.ones(3)
        flip[axis] = -1.0
        mirror = rot @ np.diag(flip) @ rot.T
        reflected = phantom.intensity((y - HEAD_CENTER_RAS) @ mirror.T + HEAD_CENTER_RAS)
        assert np.abs(img - reflected)[head].mean() > 0.05 * scale, axis


def test_rigid_registration_is_well_conditioned(phantom):
    # Gauss-Newton matrix of the 6 motion parameters (rotations as 50 mm arcs).
    y = SMALL.ras_coordinates()
    c = SMALL.center_ras()
    columns = []
    for k in range(6):
        step = np.zeros(6)
        step[k] = 0.1 if k < 3 else 0.1 / 50.0
        diff = phantom.intensity(moved_coordinates(y, step, c)) - phantom.intensity(
            moved_coordinates(y, -step, c)
        )
        columns.append(diff / 0.2)
    jac = np.stack(columns, axis=1)
    eig = np.linalg.eigvalsh(jac.T @ jac)
    assert eig[0] > 0 and eig[-1] / eig[0] < 50.0


def test_activation_region(phantom):
    centre = phantom.activation_center_ras
    assert centre[0] < -10 and centre[2] > 20  # left, superior
    assert phantom.tissue_fractions(centre[None])["gm"][0] > 0.5
    y = SMALL.ras_coordinates()
    w = phantom.activation(y)
    assert w.min() >= 0.0 and w.max() <= 1.0
    far = np.linalg.norm(y - centre, axis=1) > 25.0
    np.testing.assert_array_equal(w[far], 0.0)
    np.testing.assert_array_equal(phantom.activation_mask(y), w > 0.5)
    assert phantom.activation_mask(y).sum() >= 10
    intensity, weight = phantom.sample(y)
    np.testing.assert_array_equal(weight, w)
    np.testing.assert_array_equal(intensity, phantom.intensity(y))


def test_texture_depends_on_seed_anatomy_does_not():
    y = SMALL.ras_coordinates()
    a, b = BrainPhantom(0), BrainPhantom(1)
    assert not np.array_equal(a.intensity(y), b.intensity(y))
    np.testing.assert_array_equal(a.brain_mask(y), b.brain_mask(y))
    np.testing.assert_array_equal(a.activation(y), b.activation(y))
    np.testing.assert_array_equal(BrainPhantom(0).intensity(y), a.intensity(y))


# ---------------------------------------------------------------------------- BOLD


def test_hrf_peak_and_undershoot():
    dt = 2.0 / 16
    hrf = spm_hrf(2.0, oversampling=16)
    assert np.isclose(hrf.sum(), 1.0)
    assert 4.5 <= np.argmax(hrf) * dt <= 6.0
    assert 14.0 <= np.argmin(hrf) * dt <= 17.0
    assert hrf.min() < 0
    coarse = spm_hrf(1.0, oversampling=1)
    assert len(coarse) == 33 and np.argmax(coarse) == 5


def test_block_events_and_regressor():
    events = block_events(60, 2.0)
    assert [e[0] for e in events] == [10.0, 50.0, 90.0]
    assert all(kind == "task" for _, _, kind in events)
    assert events[-1][1] == 20.0
    assert block_events(10, 2.0) == [(10.0, 10.0, "task")]
    reg = regressor(events, 60, 2.0)
    assert reg.shape == (60,) and np.isclose(reg.max(), 1.0)
    assert reg[0] == 0.0
    t = np.arange(60) * 2.0
    late_task = (t >= 18) & (t < 30)  # 8-20 s into the first block
    late_rest = (t >= 38) & (t < 50)
    assert reg[late_task].min() > 0.8 and reg[late_rest].max() < 0.3
    np.testing.assert_array_equal(regressor(events, 60, 2.0, trial_type="other"), 0.0)


def test_drift_curve_rate(rng):
    drift = drift_curve(121, 1.0, 0.5, rng)  # 2 minutes
    assert drift[0] == 0.0
    assert np.isclose(drift[-1], 0.01)
    assert np.all(np.abs(np.diff(drift, 2)) < 1e-5)


def test_activation_mean_follows_regressor():
    n = 40
    run = simulate_run(
        SMALL, n, 2.0, seed=5, noise_sigma=0.0, drift_pct_per_min=0.0, motion=np.zeros((n, 6)),
        psf_samples=1,  # centre sampling: the exact amplitude below is per point
    )
    assert run.activation_mask.sum() >= 10
    mask_mean = run.data[run.activation_mask].mean(axis=0).astype(np.float64)
    base = mask_mean[0]
    assert run.regressor[0] == 0.0
    np.testing.assert_allclose(np.corrcoef(mask_mean, run.regressor)[0, 1], 1.0, atol=1e-6)
    # the exact size: pct/100 * mean(I * w) * regressor
    y = SMALL.ras_coordinates()
    intensity, weight = BrainPhantom(5).sample(y)
    m = run.activation_mask.ravel()
    amplitude = 0.03 * np.mean(intensity[m] * weight[m])
    np.testing.assert_allclose(mask_mean - base, amplitude * run.regressor, rtol=1e-4, atol=0.01)
    # far from the blob nothing changes
    far = run.brain_mask & (run.activation == 0)
    np.testing.assert_array_equal(np.ptp(run.data[far], axis=1), 0.0)


def test_quantised_is_rounded_data():
    for model in ("rician", "gaussian"):
        run = simulate_run(SMALL, 3, 2.0, seed=2, noise_model=model)
        assert run.quantised.dtype == np.int16 and run.data.dtype == np.float32
        expected = np.clip(np.rint(run.data), 0, 32767).astype(np.int16)
        np.testing.assert_array_equal(run.quantised, expected)
    assert (run.data < 0).any()  # gaussian noise in the background was clipped to 0
    assert run.quantised.min() == 0


def test_noise_level_and_motion_default():
    run = simulate_run(SMALL, 4, 2.0, seed=9, noise_sigma=10.0, drift_pct_per_min=0.0)
    assert run.motion.shape == (4, 6) and np.any(run.motion[1:] != 0)
    np.testing.assert_array_equal(run.motion[0], 0.0)
    plan = plan_run(SMALL, 4, 2.0, seed=9, noise_sigma=0.0, drift_pct_per_min=0.0)
    clean = next(iter_volumes(plan)).data
    inside = run.brain_mask & (clean > 500)
    residual = run.data[..., 0][inside] - clean[inside]
    assert abs(residual.std() - 10.0) < 0.5
    background = clean == 0
    # Rayleigh background: mean sigma * sqrt(pi / 2)
    assert abs(run.data[..., 0][background].mean() - 10.0 * np.sqrt(np.pi / 2)) < 0.3


@pytest.mark.slow
def test_determinism_and_volume_independence():
    a = simulate_run(SMALL, 6, 2.0, seed=11)
    b = simulate_run(SMALL, 6, 2.0, seed=11)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.motion, b.motion)
    c = simulate_run(SMALL, 6, 2.0, seed=12)
    assert not np.array_equal(a.data, c.data)
    plan = plan_run(SMALL, 6, 2.0, seed=11)
    (vol,) = list(iter_volumes(plan, start=4, stop=5))
    assert vol.index == 4
    np.testing.assert_array_equal(vol.data, a.data[..., 4])
    np.testing.assert_array_equal(vol.quantised, a.quantised[..., 4])


def test_moved_run_matches_phantom_sampling():
    motion = np.zeros((3, 6))
    motion[2] = [0.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    run = simulate_run(
        SMALL, 3, 2.0, noise_sigma=0.0, drift_pct_per_min=0.0, activation_pct=0.0, motion=motion,
        psf_samples=1,  # centre sampling, so the expected value is one phantom sample
    )
    y = SMALL.ras_coordinates()
    expected = BrainPhantom(0).intensity(y - [0.0, 0.0, 2.0]).reshape(SMALL.shape)
    np.testing.assert_allclose(run.data[..., 2], expected.astype(np.float32), rtol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        simulate_run(SMALL, 3, 2.0, motion=np.zeros((2, 6)))
    with pytest.raises(ValueError):
        simulate_run(SMALL, 3, 2.0, noise_model="poisson")
    with pytest.raises(ValueError):
        Grid((0, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        BrainPhantom().intensity(np.zeros((4, 2)))


def test_voxel_average_integrates_the_signal_over_each_voxel():
    """psf_samples=2: each voxel is the mean of I(1 + a w) over 8 points inside it."""
    from simulator.bold import voxel_average

    phantom = BrainPhantom(5)
    params = np.array([0.4, -0.3, 0.2, 0.02, -0.01, 0.03])
    y = SMALL.ras_coordinates()
    c = SMALL.center_ras()
    intensity, act = voxel_average(phantom, moved_coordinates(y, params, c), SMALL.affine(),
                                   params, 2)
    # Independent: sub-sample positions taken in the scanner frame, then moved.
    expected_i = np.zeros(len(y))
    expected_iw = np.zeros(len(y))
    for offset in np.array(np.meshgrid([-0.25, 0.25], [-0.25, 0.25], [-0.25, 0.25])).reshape(3, -1).T:
        sub = y + SMALL.affine()[:3, :3] @ offset
        i, w = phantom.sample(moved_coordinates(sub, params, c))
        expected_i += i / 8
        expected_iw += i * w / 8
    np.testing.assert_allclose(intensity, expected_i, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(intensity * act, expected_iw, rtol=1e-9, atol=1e-9)
    assert not np.allclose(intensity, phantom.sample(moved_coordinates(y, params, c))[0])
    assert rotation_matrix(0, 0, 0).shape == (3, 3)
