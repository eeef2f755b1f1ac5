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


@pytest.mark.parametrize("order", ["C", "F"])
def test_halves_equal_the_fused_kernel_bit_for_bit(rng, order):
    """masked_mean and accumulate (the signal stage's two halves, either side of the
    volume message) give the fused kernel's mean and running sum exactly."""
    from rtsc.pipeline.motion._kernels import accumulate, masked_mean
    data = np.asarray(rng.normal(600, 50, (9, 7, 5)), dtype=np.float32, order=order)
    mask = np.asarray(rng.random(data.shape) > 0.4, order=order)
    total = np.asarray(rng.normal(0, 1, data.shape), order=order)
    fused_total = total.copy(order="K")
    fused_mean = accumulate_masked_mean(fused_total, data, mask)
    assert masked_mean(data, mask) == fused_mean
    accumulate(total, data)
    np.testing.assert_array_equal(total, fused_total)
    expected_total, expected_mean = naive(total - data, data, mask)  # numpy reference
    assert masked_mean(data, mask) == pytest.approx(expected_mean, rel=1e-12)
    assert np.isnan(masked_mean(data, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="memory order"):
        masked_mean(data, np.zeros((2, 2, 2), bool))
    with pytest.raises(TypeError, match="float32"):
        accumulate(total, data.astype(np.float64))


def test_signal_stage_equals_signal_step(rng):
    """The stage (global signal before the message, running sum after it, through
    SeriesPipeline.run_later or not at all) against signal_step's fused pass."""
    from rtsc.pipeline.series import SeriesPipeline
    from rtsc.pipeline.stages import SignalStage
    from rtsc.volume import SeriesInfo, Volume
    info = SeriesInfo("s", 2.0, 6, 1, "test", "mosaic")
    volumes = [np.asfortranarray(rng.normal(600, 50, (8, 6, 5)), dtype=np.float32)
               for _ in range(6)]
    reference = signal_init(volumes[0], 0.2)
    stage, direct = SignalStage(0.2), SignalStage(0.2)
    pipeline = SeriesPipeline([stage])
    for i, data in enumerate(volumes):
        volume = Volume(data, np.eye(4), i, info, None, 0.0, 0.0)
        expected = signal_step(reference, data)
        assert pipeline.process(volume).metrics["global_signal"] == expected
        if i % 2:
            assert pipeline.run_later() == []
        assert direct.update(volume).metrics["global_signal"] == expected  # never run_later
        for maps in (pipeline.maps(), direct.maps()):
            np.testing.assert_array_equal(maps["mean"], reference.mean.astype(np.float32))
