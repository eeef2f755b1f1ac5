"""Rigid registration: kernels against naive references, accuracy against the simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from rtsc.config import MotionConfig, SimulatorConfig
from rtsc.pipeline.motion._kernels import ic_register, ic_step, interior_points, warm_up
from rtsc.pipeline.motion._resample_kernels import (
    GaussianSmoother,
    reslice,
    reslice_rows,
    row_extents,
    rows_to_mask,
    sample_rows,
    valid_rows,
)
from rtsc.conventions import (framewise_displacement, framewise_displacement_series,
                              rigid_matrix, rigid_params, rotation_matrix)
from rtsc.pipeline.motion.stages import MotionStage
from rtsc.pipeline.motion.register import (
    RigidRegistration,
    prepare_reference,
    registration_mask,
)
from rtsc.volume import SeriesInfo, Volume
from anatomies import HEADS, simulated_head
from simulator.bold import iter_volumes, simulate_run
from simulator.phantom import Grid
from simulator.scanner import make_plan

warm_up()

GRID = Grid((64, 64, 36), (3.0, 3.0, 3.0))


MOVING = dict(max_trans_mm=3.0, max_rot_deg=3.0, n_jumps=4, jump_mm=1.5)


@pytest.fixture(scope="module")
def moving_run():
    """64x64x36, 3 mm, Rician noise sigma 10, motion up to 3 mm and 3 degrees."""
    return simulate_run(GRID, 40, 2.0, seed=3, noise_sigma=10.0, motion_kwargs=MOVING)


@pytest.fixture(scope="module", params=HEADS)
def moving_head_run(request, moving_run):
    """The same run (seed, motion) on the phantom and on real anatomy cut by the field of
    view (axasc35: 64x64x31 at 3.25 x 3.25 x 3.6 mm; mni152 on the 3 mm grid)."""
    if request.param == "phantom":
        return GRID, moving_run
    grid, kwargs = simulated_head(request.param, GRID)
    return grid, simulate_run(grid, 40, 2.0, seed=3, noise_sigma=10.0, motion_kwargs=MOVING,
                              **kwargs)


def _volume(data: np.ndarray, index: int, affine: np.ndarray) -> Volume:
    info = SeriesInfo("test", 2.0, None, 1, "test", "mosaic")
    return Volume(np.asfortranarray(data, dtype=np.float32), affine, index, info, None, 0.0, 0.0)


# ---- kernels against naive references ---------------------------------------------------

def test_reslice_equals_scipy_map_coordinates(rng):
    volume = np.asfortranarray(rng.random((20, 18, 12), dtype=np.float32))
    q = np.eye(4)
    q[:3, :3] = rotation_matrix(0.05, -0.03, 0.08)
    q[:3, 3] = [0.7, -1.3, 0.4]
    ours = reslice(volume, q, volume.shape, fill=-7.0)
    coords = q[:3, :3] @ np.indices(volume.shape).reshape(3, -1) + q[:3, 3:4]
    top = np.array(volume.shape)[:, None] - 1
    # SPM's rule: within 0.05 voxel of the grid counts as inside (clamped onto it)
    inside = np.all((coords >= -0.05) & (coords <= top + 0.05), axis=0)
    assert np.any(inside & np.any((coords < 0) | (coords > top), axis=0))  # the rule is used
    clamped = np.clip(coords, 0, top)
    expected = ndimage.map_coordinates(volume.astype(np.float64), clamped, order=1)
    np.testing.assert_allclose(ours.ravel(order="C")[inside], expected[inside], atol=1e-5)
    assert np.all(ours.ravel(order="C")[~inside] == -7.0)
    assert np.all(np.isnan(reslice(volume, q, volume.shape).ravel(order="C")[~inside]))


def _naive_valid(q: np.ndarray, shape: tuple[int, int, int], tol: float = 0.05) -> np.ndarray:
    """Per voxel: is ``q @ (i, j, k, 1)`` within ``tol`` voxels of the grid (NumPy)."""
    coords = q[:3, :3] @ np.indices(shape).reshape(3, -1) + q[:3, 3:4]
    top = np.array(shape)[:, None] - 1
    return np.all((coords >= -tol) & (coords <= top + tol), axis=0).reshape(shape)


@pytest.mark.parametrize("shift", [0.0, 0.004, -0.049, 0.051, 0.3, -1.0, 3.5])
def test_valid_rows_is_the_sample_inside_the_grid_by_spm_rule(rng, shift):
    """Along every axis, a shift within 0.05 voxel keeps every voxel valid (clamped), a
    larger one loses the edge slab; oblique maps too. The reslice's NaN voxels are
    exactly the invalid ones, for reslice, reslice_rows and sample_rows."""
    shape = (20, 18, 12)
    volume = np.asfortranarray(rng.random(shape, dtype=np.float32) + 1.0)
    centre = np.array([9.5, 8.5, 5.5])[:, None, None, None]
    starts, stops = row_extents(np.linalg.norm(np.indices(shape) - centre, axis=0) < 7.0)
    everywhere = (np.zeros_like(starts), np.full_like(stops, shape[0]))
    for axis in range(4):
        q = np.eye(4)
        if axis < 3:
            q[axis, 3] = shift
        else:  # oblique: a rotation and a shift
            q[:3, :3] = rotation_matrix(0.02, -0.03, 0.05)
            q[:3, 3] = [shift, -0.5 * shift, 0.25 * shift]
        expected = _naive_valid(q, shape)
        if axis < 3:
            assert expected.all() == (abs(shift) <= 0.05)
        lo, hi = valid_rows(q, shape, *everywhere)
        np.testing.assert_array_equal(rows_to_mask(shape[0], *everywhere, lo, hi), expected)
        full = reslice(volume, q, shape)
        np.testing.assert_array_equal(np.isfinite(full), expected)
        lo, hi = valid_rows(q, shape, starts, stops)
        i = np.arange(shape[0])[:, None, None]
        outside = (i < starts[None]) | (i >= stops[None])
        mask = rows_to_mask(shape[0], starts, stops, lo, hi)
        np.testing.assert_array_equal(mask, outside | expected)
        rows = reslice_rows(volume, q, starts, stops)
        np.testing.assert_array_equal(np.isfinite(rows), mask)
        flat = np.arange(volume.size)
        np.testing.assert_array_equal(sample_rows(volume, q, starts, stops, flat),
                                      rows.ravel(order="F"))


def test_reslice_rows_interpolates_inside_the_extents_and_copies_outside(rng):
    volume = np.asfortranarray(rng.random((20, 18, 12), dtype=np.float32))
    q = np.eye(4)
    q[:3, :3] = rotation_matrix(0.05, -0.03, 0.08)
    q[:3, 3] = [0.7, -1.3, 0.4]
    centre = np.array([9.5, 8.5, 5.5])[:, None, None, None]
    mask = np.linalg.norm(np.indices(volume.shape) - centre, axis=0) < 6.0
    mask[:, 0, 0] = True  # a row that is inside from end to end
    starts, stops = row_extents(mask)
    i = np.arange(volume.shape[0])[:, None, None]
    inside = (i >= starts[None]) & (i < stops[None])
    assert np.all(inside[mask]) and inside.sum() < 0.5 * volume.size
    assert stops[0, 0] == volume.shape[0] and starts[0, 0] == 0
    assert starts[0, 5] == stops[0, 5] == 0  # j = 0, k = 5 holds no mask voxel
    ours = reslice_rows(volume, q, starts, stops)
    full = reslice(volume, q, volume.shape)
    assert ours.flags.f_contiguous and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[inside], full[inside])
    np.testing.assert_array_equal(ours[~inside], volume[~inside])
    with pytest.raises(ValueError):
        reslice_rows(volume, q, starts[:-1], stops)


def test_sample_rows_is_bit_identical_to_the_resliced_volume(rng):
    """The early ROI read (a few voxels) equals the whole reslice at those voxels, both
    within the head's rows and outside them (acquired values), and for reslice='full'."""
    volume = np.asfortranarray(rng.random((20, 18, 12), dtype=np.float32))
    q = np.eye(4)
    q[:3, :3] = rotation_matrix(0.05, -0.03, 0.08)
    q[:3, 3] = [0.7, -1.3, 0.4]
    centre = np.array([9.5, 8.5, 5.5])[:, None, None, None]
    starts, stops = row_extents(np.linalg.norm(np.indices(volume.shape) - centre, axis=0) < 6.0)
    flat = rng.choice(volume.size, size=500, replace=False)
    whole = reslice_rows(volume, q, starts, stops).ravel(order="F")
    np.testing.assert_array_equal(sample_rows(volume, q, starts, stops, flat), whole[flat])
    everywhere = (np.zeros_like(starts), np.full_like(stops, volume.shape[0]))
    np.testing.assert_array_equal(sample_rows(volume, q, *everywhere, flat),
                                  reslice(volume, q, volume.shape).ravel(order="F")[flat])
    with pytest.raises(ValueError):
        sample_rows(volume, q, starts, stops, np.array([volume.size]))


def test_ic_step_equals_numpy(rng):
    volume = np.asfortranarray(rng.random((16, 16, 10), dtype=np.float32))
    points = np.argwhere(np.ones((16, 16, 10), bool))[::3].astype(np.int32)
    values = rng.random(len(points), dtype=np.float32)
    jac = rng.standard_normal((len(points), 6)).astype(np.float32)
    q = np.eye(4)
    q[:3, 3] = [0.3, 0.6, -0.2]
    b = np.zeros(6)
    sse, used = ic_step(volume, q, points, values, jac, b)
    coords = (points + q[:3, 3]).T
    inside = np.all((coords >= 0) & (coords <= np.array(volume.shape)[:, None] - 1), axis=0)
    sampled = ndimage.map_coordinates(volume.astype(np.float64), coords, order=1)
    r = (sampled - values)[inside]
    assert used == inside.sum()
    np.testing.assert_allclose(b, jac[inside].T.astype(np.float64) @ r, rtol=1e-4)
    assert sse == pytest.approx(float(r @ r), rel=1e-5)


@pytest.mark.slow
def test_ic_register_equals_the_python_gauss_newton_loop(moving_run):
    """The compiled iterations are the textbook loop (Baker & Matthews' inverse
    compositional update) written with numpy matrices and one ic_step per iteration."""
    run = moving_run
    reg = RigidRegistration(run.data[..., 0], GRID.affine())
    ref = reg.reference
    ras_to_vox = np.linalg.inv(ref.affine)
    np.testing.assert_allclose(ref.ras_to_vox, ras_to_vox)
    for t in (5, 17, 33):
        data = reg._smooth(np.asfortranarray(run.data[..., t], dtype=np.float32))
        start = rigid_matrix(run.motion[t - 1], ref.center)  # warm start nearby
        matrix, b = start.copy(), np.zeros(6)
        for iteration in range(1, 31):
            q = ras_to_vox @ matrix @ ref.affine
            sse, used = ic_step(data, q, ref.points, ref.values, ref.jacobian, b)
            delta = ref.hessian_inv @ b
            matrix = matrix @ np.linalg.inv(rigid_matrix(delta, ref.center))
            if np.linalg.norm(delta[:3]) + 50.0 * np.linalg.norm(delta[3:]) < 1e-3:
                break
        out, iterations, sse_out, used_out, converged = ic_register(
            data, ref.affine, ref.ras_to_vox, start, ref.points, ref.values, ref.jacobian,
            ref.hessian_inv, ref.center, 30, 1e-3, 50.0)
        assert converged and iterations == iteration >= 2
        np.testing.assert_allclose(out, matrix, rtol=0, atol=1e-9)
        assert used_out == used and sse_out == pytest.approx(sse, rel=1e-9)
        assert not np.shares_memory(out, start)


@pytest.mark.parametrize("shape", [(20, 17, 9), (64, 64, 36)])
def test_gaussian_smoother_equals_scipy_inside(rng, shape):
    volume = np.asfortranarray(rng.random(shape, dtype=np.float32))
    ours = GaussianSmoother(shape, 1.2)(volume)
    expected = ndimage.gaussian_filter(volume.astype(np.float64), 1.2, truncate=3.0)
    inner = tuple(slice(4, -4) for _ in shape)  # away from edges (we renormalise there)
    np.testing.assert_allclose(ours[inner], expected[inner], atol=1e-5)
    ones = np.asfortranarray(np.ones(shape, np.float32))
    np.testing.assert_allclose(GaussianSmoother(shape, 1.2)(ones), 1.0, atol=1e-5)


def test_params_matrix_round_trip_and_convention():
    center = np.array([1.0, -2.0, 3.0])
    params = np.array([0.5, -1.2, 2.0, 0.02, -0.03, 0.04])
    matrix = rigid_matrix(params, center)
    np.testing.assert_allclose(rigid_params(matrix, center), params, atol=1e-12)
    # Rx(a) turns +y towards +z; a point at c + y moves to c + (0, cos a, sin a).
    rx = rigid_matrix(np.array([0, 0, 0, 0.1, 0, 0]), center)
    np.testing.assert_allclose(rx @ np.r_[center + [0, 1, 0], 1],
                               np.r_[center + [0, np.cos(0.1), np.sin(0.1)], 1], atol=1e-12)


def test_framewise_displacement_power():
    a = np.zeros(6)
    b = np.array([0.1, -0.2, 0.05, 0.01, 0.0, -0.002])
    assert framewise_displacement(a, b, 50.0) == pytest.approx(0.35 + 50 * 0.012)


# ---- accuracy against the simulator's ground truth -------------------------------------

def test_superior_move_reads_positive_trans_z():
    run = simulate_run(GRID, 2, 2.0, seed=1, noise_sigma=10.0,
                       motion=np.array([[0, 0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]], float))
    reg = RigidRegistration(run.data[..., 0], GRID.affine())
    result = reg.register(np.asfortranarray(run.data[..., 1]))
    # One volume, no warm start: the per-volume maximum error, 0.1 mm / 0.1 degree.
    assert result.params[2] == pytest.approx(2.0, abs=0.1)
    np.testing.assert_allclose(result.params[[0, 1]], 0, atol=0.1)
    np.testing.assert_allclose(np.degrees(result.params[3:]), 0, atol=0.1)


@pytest.mark.slow
def test_accuracy_on_a_moving_run(moving_head_run):
    """Measured (max |error|): phantom 0.026 mm / 0.063 deg, axasc35 0.027 mm / 0.023 deg,
    mni152 0.048 mm / 0.041 deg."""
    grid, run = moving_head_run
    assert np.abs(run.motion[:, :3]).max() > 1.5 and np.degrees(np.abs(run.motion[:, 3:]).max()) > 2
    stage = MotionStage(MotionConfig())
    for t in range(run.data.shape[-1]):
        out = stage.update(_volume(run.data[..., t], t, grid.affine()))
        assert "registration_failed" not in out.flags
    estimated = np.array(stage.state.params)
    error = estimated - run.motion
    trans, rot = np.abs(error[:, :3]), np.degrees(np.abs(error[:, 3:]))
    print(f"max error {trans.max():.4f} mm, {rot.max():.4f} deg")
    assert np.median(trans) < 0.03 and trans.max() < 0.1, (np.median(trans), trans.max())
    assert np.median(rot) < 0.03 and rot.max() < 0.1, (np.median(rot), rot.max())
    fd = np.array(stage.state.fd)
    assert np.corrcoef(fd[1:], framewise_displacement_series(run.motion)[1:])[0, 1] > 0.98


@pytest.mark.slow
def test_abrupt_moves_are_not_taken_for_failures():
    """The default simulator run (abrupt moves of ~1 mm) registers without a failure.

    Regression: a correct registration after a move has a residual 2-3x that before it
    (partial volume), which a whole-run residual median once flagged for 17 volumes.
    """
    plan = make_plan(SimulatorConfig(n_volumes=80))  # `rtsc demo`'s run: moves at 14, 17
    n = 24
    true_fd = framewise_displacement_series(plan.motion[:n])
    assert np.sum(true_fd > 0.5) >= 2  # the run holds abrupt moves
    stage = MotionStage(MotionConfig())
    flags = []
    for v in iter_volumes(plan):
        if v.index == n:
            break
        flags.append(stage.update(_volume(v.quantised, v.index, plan.grid.affine())).flags)
    assert not any("registration_failed" in f for f in flags)
    error = np.abs(np.array(stage.state.params) - plan.motion[:n])
    assert error[:, :3].max() < 0.1 and np.degrees(error[:, 3:]).max() < 0.1


@pytest.mark.slow
def test_two_millimetre_jumps_are_not_taken_for_failures():
    """Moves of 2.0 and 2.3 mm (the display tests' run) raise the residual of a correct
    registration 3.4x at once (1.8 -> 6.1): the moved volume sets the new level instead
    of failing with the two after it (their FD was published as null, so the jump was
    never announced)."""
    plan = make_plan(SimulatorConfig(n_volumes=24, n_jumps=2))
    true_fd = framewise_displacement_series(plan.motion)
    assert np.sum(true_fd > 1.5) == 2
    stage = MotionStage(MotionConfig())
    flags, fd = [], []
    for v in iter_volumes(plan):
        out = stage.update(_volume(v.quantised, v.index, plan.grid.affine()))
        flags.append(out.flags)
        fd.append(out.metrics["framewise_displacement"])
    assert not any("registration_failed" in f for f in flags)
    jumps = np.flatnonzero(true_fd > 1.5)
    np.testing.assert_allclose(np.array(fd)[jumps], true_fd[jumps], atol=0.1)
    error = np.abs(np.array(stage.state.params) - plan.motion)
    assert error[:, :3].max() < 0.1 and np.degrees(error[:, 3:]).max() < 0.1


@pytest.mark.slow
def test_resliced_volume_matches_the_reference(moving_run):
    """After correction, a moved volume lines up with the reference (noise aside)."""
    run = moving_run
    reg = RigidRegistration(run.data[..., 0], GRID.affine())
    t = int(np.argmax(np.abs(run.motion[:, :3]).sum(axis=1)))
    moved = np.asfortranarray(run.data[..., t])
    result = reg.register(moved)
    corrected = reg.reslice(moved, result.matrix)
    brain = run.brain_mask
    before = np.abs(moved - run.data[..., 0])[brain].mean()
    after = np.abs(corrected - run.data[..., 0])[brain].mean()
    assert after < 0.5 * before
    # Interpolating the head only changes nothing inside it; the background is acquired.
    full = RigidRegistration(run.data[..., 0], GRID.affine(), reslice_margin=None)
    everywhere = full.reslice(moved, result.matrix)
    np.testing.assert_array_equal(corrected[brain], everywhere[brain])
    head = ndimage.binary_dilation(registration_mask(run.data[..., 0]), iterations=3)
    # outside the head's extent along each row (i): before its first or after its last voxel
    background = ~(np.maximum.accumulate(head, axis=0)
                   & np.maximum.accumulate(head[::-1], axis=0)[::-1])
    assert background.mean() > 0.3
    np.testing.assert_array_equal(corrected[background], moved[background])


@pytest.mark.slow
def test_failed_volume_is_flagged_and_does_not_poison(moving_run):
    run = moving_run
    stage = MotionStage(MotionConfig())
    affine = GRID.affine()
    alerts = []
    for t in range(12):
        data = run.data[..., t].copy()
        if t == 8:
            data[:, :, 10:20] = 0.0  # signal dropout in ten slices
        out = stage.update(_volume(data, t, affine))
        alerts.extend(out.alerts)
        if t == 8:
            assert "registration_failed" in out.flags
            assert out.metrics["trans_x"] is None and out.metrics["framewise_displacement"] is None
        else:
            assert "registration_failed" not in out.flags
    assert [a[1] for a in alerts] == ["registration_failed"]
    estimated = np.array(stage.state.params)
    good = [t for t in range(12) if t != 8]
    assert np.abs(estimated[good, :3] - run.motion[good, :3]).max() < 0.1


def test_jump_over_limit_is_flagged():
    run = simulate_run(GRID, 3, 2.0, seed=2, noise_sigma=10.0,
                       motion=np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                                        [0, 0, 6.0, 0, 0, 0]], float))
    stage = MotionStage(MotionConfig(max_jump_mm=5.0))
    flags = [stage.update(_volume(run.data[..., t], t, GRID.affine())).flags for t in range(3)]
    assert flags[2] == ["registration_failed"] and flags[1] == []


def test_reference_volume_n_and_prepare_reference_mask():
    run = simulate_run(GRID, 4, 2.0, seed=4, noise_sigma=10.0)
    stage = MotionStage(MotionConfig(reference="volume:2"))
    flags = [stage.update(_volume(run.data[..., t], t, GRID.affine())).flags for t in range(4)]
    assert flags[:2] == [["before_reference"], ["before_reference"]]
    assert stage.state.params[0] == pytest.approx(np.zeros(6), abs=1e-9)  # volume 2 itself
    ref = prepare_reference(run.data[..., 0], GRID.affine())
    assert ref.jacobian.shape == (len(ref.points), 6) and np.all(np.isfinite(ref.hessian_inv))


def test_rows_to_mask_equals_the_per_voxel_rule(rng):
    """The row fills give the per-voxel rule (outside [start, stop) or inside [lo, hi)),
    also for intervals that overhang the row or each other."""
    nx, ny, nz = 17, 6, 5
    starts = rng.integers(-2, nx + 2, (ny, nz))
    stops = starts + rng.integers(-3, nx, (ny, nz))
    lo = rng.integers(-2, nx + 2, (ny, nz))
    hi = lo + rng.integers(-3, nx, (ny, nz))
    i = np.arange(nx)[:, None, None]
    expected = (i < starts[None]) | (i >= stops[None]) | ((lo[None] <= i) & (i < hi[None]))
    mask = rows_to_mask(nx, starts, stops, lo, hi)
    assert mask.flags.f_contiguous
    np.testing.assert_array_equal(mask, expected)


REALDATA = Path("/work/shared/realdata/dcm_qa_nih/Ref")


def _argwhere_interior(mask: np.ndarray) -> np.ndarray:
    """The former numpy rule of prepare_reference: mask voxels off the border."""
    interior = np.zeros(mask.shape, dtype=bool)
    interior[1:-1, 1:-1, 1:-1] = True
    return np.argwhere(mask & interior).astype(np.int32)


@pytest.mark.parametrize("order", ["F", "C"])
def test_interior_points_equals_argwhere(rng, order):
    for shape in [(128, 128, 72), (5, 4, 3), (3, 3, 3), (2, 9, 9), (7, 1, 5)]:
        mask = np.asarray(rng.random(shape) > 0.4, order=order)
        points = interior_points(mask)
        assert points.dtype == np.int32 and points.shape[1] == 3
        np.testing.assert_array_equal(points, _argwhere_interior(mask))
    run = simulate_run(GRID, 1, 2.0, seed=5, noise_sigma=10.0)
    mask = np.asarray(registration_mask(np.asarray(run.data[..., 0], np.float32)), order=order)
    np.testing.assert_array_equal(interior_points(mask), _argwhere_interior(mask))
    view = mask[::2, 1:, :]  # not contiguous
    np.testing.assert_array_equal(interior_points(view), _argwhere_interior(view))


def test_interior_points_on_real_scanner_volumes():
    nibabel = pytest.importorskip("nibabel")
    files = sorted(REALDATA.glob("*.nii.gz"))[:4]
    if not files:
        pytest.skip(f"no real data under {REALDATA}")
    for path in files:
        image = nibabel.load(path)
        data = np.asarray(image.dataobj[..., 0] if image.ndim == 4 else image.dataobj,
                          dtype=np.float32, order="F")
        mask = registration_mask(data)
        assert mask.any()
        np.testing.assert_array_equal(interior_points(mask), _argwhere_interior(mask))
        ref = prepare_reference(data, image.affine)
        np.testing.assert_array_equal(ref.points, _argwhere_interior(mask))
