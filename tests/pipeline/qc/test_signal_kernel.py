"""The global-signal kernel against naive numpy, including catastrophic cancellation."""

import numpy as np
import pytest

from rtsc.pipeline.motion._kernels import accumulate_masked_mean
from rtsc.pipeline.stages import signal_init, signal_step


def naive(total, data, mask):
    return total + data, float(np.mean(data[mask].astype(np.float64))) if mask.any() else np.nan


@pytest.mark.parametrize("order", ["C", "F"])
def test_equals_numpy(rng, order):
    data = np.asarray(rng.normal(600, 50, (9, 7, 5)), dtype=np.float32, order=order)
    mask = np.asarray(rng.random(data.shape) > 0.4, order=order)
    total = np.asarray(rng.normal(0, 1, data.shape), order=order)
    expected_total, expected_mean = naive(total.copy(), data, mask)
    mean = accumulate_masked_mean(total, data, mask)
    np.testing.assert_allclose(total, expected_total, rtol=1e-15)
    assert mean == pytest.approx(expected_mean, rel=1e-12)


def test_empty_mask_and_layout_errors(rng):
    data = np.ones((3, 3, 3), np.float32)
    total = np.zeros((3, 3, 3))
    assert np.isnan(accumulate_masked_mean(total, data, np.zeros((3, 3, 3), bool)))
    np.testing.assert_array_equal(total, 1.0)  # the sum still grows
    with pytest.raises(ValueError, match="memory order"):
        accumulate_masked_mean(total, np.asfortranarray(data), np.ones((3, 3, 3), bool))
    with pytest.raises(TypeError, match="float32"):
        accumulate_masked_mean(total, data.astype(np.float64), np.ones((3, 3, 3), bool))


def test_running_mean_survives_a_large_offset(rng):
    """Adding 1e8 to every value: float64 sums keep the mean map and global signal."""
    volumes = [rng.normal(0, 1, (6, 5, 4)).astype(np.float32) for _ in range(30)]
    shifted = [v.astype(np.float64) + 1e8 for v in volumes]
    state = signal_init(np.asarray(shifted[0], np.float32), 0.0)
    for v in shifted:
        signal_step(state, np.asarray(v, np.float32))
    expected = np.mean([np.asarray(v, np.float32).astype(np.float64) for v in shifted], axis=0)
    np.testing.assert_allclose(state.mean, expected, rtol=1e-12)
