"""Slice-wise motion correction: kernels against naive numpy/scipy references, recovery of
known per-slice shifts of synthetic cord slices, regularisation and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cord_images import VOXEL, cord_slices
from rtsc.pipeline.motion._slicewise_kernels import shift_slices, slice_gauss_newton
from rtsc.pipeline.cord.mask import cylinder_mask, find_cord_centres
from rtsc.config import CordMocoConfig
from rtsc.pipeline.motion.slicewise import (
    prepare_slice_reference,
    regularise_along_z,
    slice_moco_init,
    slice_moco_step,
)

AFFINE = np.diag([-1.0, -1.0, 5.0, 1.0])  # i runs R->L, j A->P (as axial DICOM does)


SHAPE = (64, 64, 12)
CENTRE = np.tile([[32.0, 32.0]], (SHAPE[2], 1))


@pytest.fixture
def reference(rng):
    return cord_slices(SHAPE, CENTRE, rng)


def state_for(reference):
    mask = cylinder_mask(SHAPE, find_cord_centres(reference, VOXEL), 15.0, VOXEL)
    return slice_moco_init(reference, AFFINE, mask)


# ---- kernels vs naive references ---------------------------------------------------------

def naive_gauss_newton_slice(current: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                             init: np.ndarray, iterations: int) -> np.ndarray:
    """Plain numpy/scipy inverse-compositional Gauss-Newton for one 2D slice."""
    gi, gj = np.gradient(reference.astype(np.float64))
    interior = np.zeros(mask.shape, bool)
    interior[1:-1, 1:-1] = True
    ii, jj = np.nonzero(mask & interior)
    jac = np.stack([gi[ii, jj], gj[ii, jj]], axis=1)
    hinv = np.linalg.inv(jac.T @ jac)
    t = np.array(init, dtype=np.float64)
    for _ in range(iterations):
        sampled = ndimage.map_coordinates(current.astype(np.float64),
                                          [ii + t[0], jj + t[1]], order=1, mode="nearest")
        r = sampled - reference[ii, jj]
        t = t - hinv @ (jac.T @ r)
    return t


def test_gauss_newton_kernel_equals_naive_reference(rng, reference):
    current = cord_slices(SHAPE, CENTRE + rng.uniform(-1, 1, (SHAPE[2], 2)), rng)
    mask = cylinder_mask(SHAPE, CENTRE, 12.0, VOXEL)
    ref = prepare_slice_reference(reference, mask)
    init = rng.uniform(-0.3, 0.3, (SHAPE[2], 2))
    for iterations in (1, 4):
        t, done, _, used, _ = slice_gauss_newton(current, ref.points, ref.bounds, ref.values,
                                                 ref.jacobian, ref.hessian_inv, init,
                                                 iterations, 0.0)
        assert np.all(done == iterations) and np.all(used == ref.n_points)
        for k in (0, 5, 11):
            expected = naive_gauss_newton_slice(current[:, :, k], reference[:, :, k],
                                                mask[:, :, k], init[k], iterations)
            np.testing.assert_allclose(t[k], expected, atol=2e-5)


def test_shift_slices_equals_map_coordinates(rng):
    volume = np.asfortranarray(rng.normal(100, 20, SHAPE).astype(np.float32))
    shifts = rng.uniform(-2, 2, (SHAPE[2], 2))
    out = shift_slices(volume, shifts)
    for k in range(SHAPE[2]):
        ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
        x, y = ii + shifts[k, 0], jj + shifts[k, 1]
        inside = (x >= 0) & (y >= 0) & (x <= SHAPE[0] - 1) & (y <= SHAPE[1] - 1)
        expected = ndimage.map_coordinates(volume[:, :, k].astype(np.float64), [x, y], order=1)
        np.testing.assert_allclose(out[:, :, k][inside], expected[inside], rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(out[:, :, k][~inside], volume[:, :, k][~inside])


def test_regularise_along_z_is_a_least_squares_polynomial(rng):
    t = rng.normal(0, 1, (24, 2))
    good = rng.random(24) > 0.2
    fitted = regularise_along_z(t, good, 2)
    z = np.arange(24)
    for axis in range(2):
        coef = np.polyfit(z[good], t[good, axis], 2)
        np.testing.assert_allclose(fitted[:, axis], np.polyval(coef, z), atol=1e-9)
    assert regularise_along_z(t, np.zeros(24, bool) | (z < 2), 2) is None


# ---- recovery of known shifts ----------------------------------------------------------------

def test_centres_found_automatically(reference):
    centres = find_cord_centres(reference, VOXEL)
    np.testing.assert_allclose(centres, CENTRE, atol=1.0)


@pytest.mark.parametrize("degree, output", [(-1, "estimated"), (2, "estimated")])
def test_arbitrary_slice_shifts_recovered(rng, reference, degree, output):
    state = state_for(reference)
    params = CordMocoConfig(poly_degree=degree, output=output)
    errors = []
    for _ in range(4):
        truth = rng.uniform(-1.5, 1.5, (SHAPE[2], 2))  # voxels = mm here
        result = slice_moco_step(state, cord_slices(SHAPE, CENTRE + truth, rng), params)
        assert result.failed == []
        errors.append(result.shifts_vox - truth)
    rms = float(np.sqrt(np.mean(np.square(errors))))
    assert rms < 0.05, rms


def test_smooth_shifts_regularised_and_in_ras_mm(rng, reference):
    state = state_for(reference)
    z = np.linspace(-1, 1, SHAPE[2])
    truth = np.stack([0.4 + 0.3 * z, -0.8 + 0.5 * z ** 2], axis=1)
    result = slice_moco_step(state, cord_slices(SHAPE, CENTRE + truth, rng),
                             CordMocoConfig(poly_degree=2, output="regularised"))
    assert float(np.sqrt(np.mean((result.shifts_vox - truth) ** 2))) < 0.03
    # affine diag(-1, -1): +1 voxel along i is 1 mm to the right (RAS x -1) etc.
    np.testing.assert_allclose(result.trans_mm, -result.shifts_vox, atol=1e-12)


def test_dropout_slice_falls_back_to_the_polynomial(rng, reference):
    state = state_for(reference)
    params = CordMocoConfig(poly_degree=2, output="estimated")
    z = np.linspace(-1, 1, SHAPE[2])
    truth = np.stack([0.5 * z, 0.3 + 0.2 * z], axis=1)
    for _ in range(4):  # a residual history for every slice
        slice_moco_step(state, cord_slices(SHAPE, CENTRE + truth, rng), params)
    volume = cord_slices(SHAPE, CENTRE + truth, rng)
    volume[:, :, 6] = rng.normal(30, 30, SHAPE[:2])  # signal dropout in slice 6
    result = slice_moco_step(state, volume, params)
    assert result.failed == [6]
    assert np.abs(result.shifts_vox[6] - truth[6]).max() < 0.05
    # without neighbours to fit (degree 2 needs 3 good slices), the previous estimate
    previous = result.shifts_vox.copy()
    volume = np.asfortranarray(rng.normal(30, 30, SHAPE).astype(np.float32))
    result = slice_moco_step(state, volume, params)
    assert len(result.failed) == SHAPE[2]
    np.testing.assert_allclose(result.shifts_vox, previous)


def test_temporal_median_removes_a_one_volume_jump(rng, reference):
    state = state_for(reference)
    params = CordMocoConfig(poly_degree=2, output="estimated", median_window=3)
    steady = np.tile([[0.3, -0.2]], (SHAPE[2], 1))
    published = []
    for shift in (steady, steady, steady + [0.0, 2.0], steady, steady):
        published.append(slice_moco_step(state, cord_slices(SHAPE, CENTRE + shift, rng),
                                          params).shifts_vox)
    assert np.abs(np.asarray(published) - steady).max() < 0.05
