"""The first volume's mask helpers against NumPy / SciPy (exact)."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from rtsc.pipeline._mask_kernels import binary_dilation, percentile


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(12))
def test_percentile_equals_numpy(dtype, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    kind = seed % 4
    if kind == 0:  # quantised EPI-like: many ties
        data = np.round(rng.gamma(2.0, 300.0, n))
    elif kind == 1:
        data = rng.normal(0.0, 1.0, n)
    elif kind == 2:  # a few distinct values
        data = rng.integers(0, 3, n).astype(float)
    else:  # wide range, head and background
        data = np.concatenate([rng.normal(5, 2, n), rng.normal(1e4, 50, n // 3 + 1)])
    data = data.astype(dtype)
    for q in (98, 50, 2.5, 0, 100, 99.9):
        assert percentile(data, q) == float(np.percentile(data, q)), (n, q)


def test_percentile_volume_orders_and_specials():
    rng = np.random.default_rng(5)
    vol = np.asfortranarray(np.round(rng.gamma(1.5, 400.0, (17, 13, 9))).astype(np.float32))
    assert percentile(vol, 98) == float(np.percentile(vol, 98))
    assert percentile(np.ascontiguousarray(vol), 98) == float(np.percentile(vol, 98))
    assert percentile(vol[::2, :, 1:], 98) == float(np.percentile(vol[::2, :, 1:], 98))
    assert percentile(np.full((4, 4, 4), 7.0, np.float32), 98) == 7.0
    with_nan = vol.copy()
    with_nan[3, 4, 5] = np.nan
    assert np.isnan(percentile(with_nan, 98))
    with_inf = vol.copy()
    with_inf[0, 0, 0] = np.inf
    assert percentile(with_inf, 98) == float(np.percentile(with_inf, 98))
    assert percentile(np.arange(10, dtype=np.int16), 98) == float(
        np.percentile(np.arange(10, dtype=np.int16), 98))


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_binary_dilation_equals_scipy(iterations, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((20, 18, 11), dtype=bool)
    if seed == 1:  # touching the grid's faces
        mask[0, 5, 3] = mask[19, 17, 10] = mask[4, 0, 0] = True
    elif seed == 2:  # empty
        pass
    else:
        mask[5:12, 4:9, 3:7] = rng.random((7, 5, 4)) > 0.4
    for m in (mask, np.asfortranarray(mask)):
        got = binary_dilation(m, iterations)
        want = ndimage.binary_dilation(m, iterations=iterations)
        assert got.dtype == want.dtype and got.flags.c_contiguous == want.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


REALDATA = Path("/work/shared/realdata/dcm_qa_nih/Ref")


def _head_masks():
    """Head masks (5 % and 20 % of the 98th percentile) of a simulated 128x128x72 head
    and of real scanner volumes (dcm2niix's NIfTI of dcm_qa_nih), in both orders."""
    from simulator.bold import simulate_run
    from simulator.phantom import Grid
    run = simulate_run(Grid((128, 128, 72), (1.5, 1.5, 1.5)), 1, 2.0, seed=1, noise_sigma=10.0)
    volumes = [np.asarray(run.data[..., 0], dtype=np.float32)]
    try:
        import nibabel
        for path in sorted(REALDATA.glob("*.nii.gz"))[:4]:
            image = nibabel.load(path)
            volumes.append(np.asarray(image.dataobj[..., 0] if image.ndim == 4
                                      else image.dataobj, dtype=np.float32))
    except ImportError:
        pass
    for volume in volumes:
        for fraction in (0.05, 0.2):
            mask = volume > fraction * percentile(volume, 98)
            yield np.asfortranarray(mask)
            yield np.ascontiguousarray(mask)


def test_binary_dilation_of_head_masks_equals_scipy():
    n = 0
    for mask in _head_masks():
        for iterations in (1, 2, 3):
            got = binary_dilation(mask, iterations)
            want = ndimage.binary_dilation(mask, iterations=iterations)
            assert got.flags.c_contiguous == want.flags.c_contiguous
            np.testing.assert_array_equal(got, want)
        n += 1
    assert n >= 4


@pytest.mark.parametrize("iterations", [1, 2])
def test_binary_dilation_of_views_and_other_ranks_equals_scipy(rng, iterations):
    mask = rng.random((16, 13, 9)) > 0.9
    for m in (mask[::2], mask[:, 3:, ::-1], np.asfortranarray(mask)[1:-1], mask[:, :, 4],
              mask.reshape(16, 13, 9, 1)):
        np.testing.assert_array_equal(binary_dilation(m, iterations),
                                      ndimage.binary_dilation(m, iterations=iterations))
