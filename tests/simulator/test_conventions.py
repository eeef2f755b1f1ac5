"""rtsc.conventions against formulas written out here, and the simulator's truth against them.

rtsc and the simulator share :mod:`rtsc.conventions`, so a test that compared the two
would pass whatever the convention said. These tests check the shared functions, and
the simulator's ground truth (its motion.tsv and where its images put the head),
against independent statements of the convention: scipy's rotations with the order
and sign the module docstring states, and Power's FD in plain numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from rtsc.config import SimulatorConfig
from rtsc.conventions import (FD_RADIUS_MM, MOTION_NAMES, framewise_displacement,
                              framewise_displacement_series, rigid_matrix, rigid_params,
                              rotation_matrix)
from rtsc.pipeline.motion._kernels import _rigid_step_inverse
from simulator.bold import iter_volumes, plan_run
from simulator.motion import displace, moved_coordinates
from simulator.phantom import Grid
from simulator.scanner import run_simulation

# The stated convention, independently: R = Rz @ Ry @ Rx about fixed axes is scipy's
# extrinsic "xyz" sequence (lower case), active rotations, radians.
SEQUENCE = "xyz"


def scipy_rotation(rot: np.ndarray) -> Rotation:
    return Rotation.from_euler(SEQUENCE, rot)


def power_fd(params: np.ndarray, radius_mm: float = 50.0) -> np.ndarray:
    """Power et al. 2012, written out: first volume 0, then the summed absolute backward
    differences with the rotations as arc length on a sphere of ``radius_mm``."""
    fd = [0.0]
    for t in range(1, len(params)):
        d = np.abs(params[t] - params[t - 1])
        fd.append(d[0] + d[1] + d[2] + radius_mm * (d[3] + d[4] + d[5]))
    return np.array(fd)


def test_names_and_radius():
    assert MOTION_NAMES == ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
    assert FD_RADIUS_MM == 50.0


def test_rotation_matches_scipy_extrinsic_xyz():
    rng = np.random.default_rng(1)
    for rot in rng.uniform(-1.5, 1.5, size=(50, 3)):
        np.testing.assert_allclose(rotation_matrix(*rot), scipy_rotation(rot).as_matrix(),
                                   atol=1e-14)
    # The sign, stated in words: a positive rot_x moves anterior points superior.
    assert (rotation_matrix(0.1, 0, 0) @ [0, 1, 0])[2] > 0


def test_rigid_matrix_is_rotation_about_the_centre_then_translation():
    rng = np.random.default_rng(2)
    for _ in range(20):
        params = np.r_[rng.uniform(-5, 5, 3), rng.uniform(-0.3, 0.3, 3)]
        centre = rng.uniform(-40, 40, 3)
        x = rng.uniform(-90, 90, size=(30, 3))
        expected = scipy_rotation(params[3:]).apply(x - centre) + centre + params[:3]
        m = rigid_matrix(params, centre)
        np.testing.assert_allclose(x @ m[:3, :3].T + m[:3, 3], expected, atol=1e-11)
        np.testing.assert_allclose(m[3], [0, 0, 0, 1])
        np.testing.assert_allclose(rigid_params(m, centre), params, atol=1e-12)


def test_registration_kernel_uses_the_same_rotation():
    """The numba update step of the registration writes R out by hand: it must be the
    convention's (its inverse map, x -> R^T (x - c - t) + c)."""
    rng = np.random.default_rng(4)
    for _ in range(10):
        delta = np.r_[rng.uniform(-3, 3, 3), rng.uniform(-0.4, 0.4, 3)]
        centre = rng.uniform(-30, 30, 3)
        out = np.zeros((4, 4))
        _rigid_step_inverse(delta, centre, out)
        np.testing.assert_allclose(out[:3], np.linalg.inv(rigid_matrix(delta, centre))[:3],
                                   atol=1e-12)


def test_framewise_displacement_is_powers():
    rng = np.random.default_rng(3)
    params = np.c_[rng.normal(0, 0.5, (40, 3)), rng.normal(0, 0.01, (40, 3))]
    np.testing.assert_allclose(framewise_displacement_series(params), power_fd(params),
                               rtol=1e-13)
    np.testing.assert_allclose(framewise_displacement_series(params, 80.0),
                               power_fd(params, 80.0), rtol=1e-13)
    for t in range(1, 40):
        assert framewise_displacement(params[t - 1], params[t]) == \
            pytest.approx(power_fd(params[t - 1:t + 1])[1], rel=1e-13)
    with pytest.raises(ValueError):
        framewise_displacement_series(np.zeros((4, 5)))


def test_simulator_moves_the_head_as_its_truth_says():
    """The simulator's images put the head where its motion parameters say, under the
    convention as scipy states it (not through the shared functions)."""
    grid = Grid((24, 28, 20), (8.0, 8.0, 8.0))
    plan = plan_run(grid, 4, 2.0, seed=5, noise_sigma=0.0, activation_pct=0.0,
                    psf_samples=1, motion_kwargs=dict(max_trans_mm=4.0, max_rot_deg=4.0,
                                                      n_jumps=3, jump_mm=3.0))
    assert np.abs(plan.motion[1:]).max() > 0.01
    y = grid.ras_coordinates()
    c = grid.center_ras()
    for volume in iter_volumes(plan):
        p = plan.motion[volume.index]
        # the intensity at y of the current volume is the reference head's at R^-1 (y - c - t) + c
        head = scipy_rotation(p[3:]).inv().apply(y - c - p[:3]) + c
        expected = plan.phantom.sample(head)[0] * (1.0 + plan.drift[volume.index])
        np.testing.assert_allclose(volume.data.reshape(-1), expected, rtol=1e-6, atol=1e-3)
        np.testing.assert_allclose(moved_coordinates(y, p, c), head, atol=1e-9)
        np.testing.assert_allclose(displace(head, p, c), y, atol=1e-9)


def test_simulator_truth_file_has_powers_fd(tmp_path):
    config = SimulatorConfig(shape=[16, 16, 10], voxel_size_mm=[10.0, 10.0, 10.0],
                             n_volumes=12, speed=0.0, noise_sigma=5.0, max_trans_mm=2.0,
                             max_rot_deg=2.0, n_jumps=3)
    result = run_simulation(config, out_dir=tmp_path)
    lines = (result.truth_dir / "motion.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y",
                                    "rot_z", "framewise_displacement"]
    table = np.array([[float(v) for v in line.split("\t")] for line in lines[1:]])
    assert table.shape == (12, 7) and table[:, :6].any()
    np.testing.assert_allclose(table[:, 6], power_fd(table[:, :6]), rtol=1e-7, atol=1e-9)
