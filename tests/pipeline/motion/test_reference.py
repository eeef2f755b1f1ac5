"""motion.reference: the forms checked at load, and series:PREVIOUS (a session reference
carried to the next series on another grid) against the simulator's known head pose."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.config import MotionConfig
from rtsc.errors import ConfigError
from rtsc.pipeline.motion.reference import ReferenceImage, carry_reference
from rtsc.pipeline.motion.stages import MotionStage
from rtsc.volume import SeriesInfo, Volume
from anatomies import simulated_head
from simulator.bold import simulate_run
from simulator.phantom import Grid

GRID_A = Grid((64, 64, 36), (3.0, 3.0, 3.0))
#: the next series: another matrix, voxel size and slab, same head
GRID_B = Grid((72, 72, 30), (2.75, 2.75, 3.5))
#: the head between the series: trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)
OFFSET = np.array([1.6, -2.2, 1.1, 0.025, -0.015, 0.02])
N_B = 6


def volume(data, index, affine, series):
    info = SeriesInfo(series, 2.0, None, 1, series, "mosaic")
    return Volume(np.asfortranarray(data, dtype=np.float32), affine, index, info, None, 0.0, 0.0)


@pytest.mark.parametrize("value", ["volume:x", "volume:-1", "series:LAST", "nowhere.nii.gz", ""])
def test_bad_references_are_refused_at_load(value):
    with pytest.raises(ConfigError, match=r"motion.reference: .*allowed: 'first', 'volume:N'"):
        MotionConfig(reference=value)


def test_carry_reference_same_grid_is_the_reference(rng):
    data = rng.normal(size=(8, 7, 6)).astype(np.float32)
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    carried, inside = carry_reference(ReferenceImage(data, affine, "a"), data.shape, affine)
    np.testing.assert_array_equal(carried, data)
    assert inside.all()


@pytest.fixture(scope="module", params=["phantom", "mni152"])
def session(request):
    """Series A unmoved on GRID_A; series B on GRID_B with the head displaced by OFFSET
    from A's pose (plus its own slow drift)."""
    grid_a, kw_a = simulated_head(request.param, GRID_A)
    grid_b, kw_b = simulated_head(request.param, GRID_B)
    a = simulate_run(grid_a, 1, 2.0, seed=4, motion=np.zeros((1, 6)), **kw_a)
    drift = np.linspace(0.0, 1.0, N_B)[:, None] * np.array([0.3, 0.0, -0.2, 0.0, 0.004, 0.0])
    b = simulate_run(grid_b, N_B, 2.0, seed=4, motion=OFFSET + drift, **kw_b)  # one phantom texture
    return a, b


@pytest.mark.slow
def test_series_previous_measures_the_head_from_the_earlier_series(session):
    """With series:PREVIOUS the parameters of series B are its head's displacement from
    series A's reference, across grids, within 0.15 mm and 0.1 degree (measured 0.05-0.07
    mm, 0.05 degree); with 'first' they start at zero (B's own first volume)."""
    a, b = session
    previous = ReferenceImage(np.asfortranarray(a.data[..., 0]), a.affine, "A")
    carried = MotionStage(MotionConfig(reference="series:PREVIOUS"), previous_reference=previous)
    own = MotionStage(MotionConfig(reference="first"))
    params, alerts = [], []
    for i in range(N_B):
        result = carried.update(volume(b.data[..., i], i, b.affine, "B"))
        alerts += result.alerts
        params.append([result.metrics[k] for k in
                       ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")])
        own_first = own.update(volume(b.data[..., i], i, b.affine, "B"))
        if i == 0:
            assert own_first.metrics["trans_x"] == 0.0
    params = np.array(params)
    error = params - b.motion
    print("max |error|: trans", np.abs(error[:, :3]).max(), "mm, rot",
          np.degrees(np.abs(error[:, 3:]).max()), "deg")
    assert np.abs(error[:, :3]).max() < 0.15
    assert np.degrees(np.abs(error[:, 3:]).max()) < 0.1
    assert [code for _, code, _ in alerts] == ["motion_reference_previous"]
    # carried on: the next series gets series A's reference, on B's grid
    assert carried.reference_image.series == "A"
    assert carried.reference_image.data.shape == GRID_B.shape


def test_series_previous_without_an_earlier_series_is_the_first_volume(session):
    _, b = session
    stage = MotionStage(MotionConfig(reference="series:PREVIOUS"))
    result = stage.update(volume(b.data[..., 0], 0, b.affine, "B"))
    assert result.metrics["trans_x"] == 0.0
    assert [code for _, code, _ in result.alerts] == ["motion_reference_first"]
    assert stage.reference_image.series == "B"


def test_series_previous_elsewhere_falls_back_with_a_warning(session):
    """An earlier reference that holds too little of this head (another station)."""
    a, b = session
    far = a.affine.copy()
    far[2, 3] += 400.0
    stage = MotionStage(MotionConfig(reference="series:PREVIOUS"),
                        previous_reference=ReferenceImage(np.asfortranarray(a.data[..., 0]),
                                                          far, "A"))
    result = stage.update(volume(b.data[..., 0], 0, b.affine, "B"))
    ((level, code, text),) = result.alerts
    assert (level, code) == ("warning", "motion_reference_first") and "0%" in text
