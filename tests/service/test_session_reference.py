"""motion.reference: series:PREVIOUS inside `rtsc run`: two series of one session over
C-STORE, the second on another slab, its motion measured from the first one's reference."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.config import config_from_dict, merge, to_dict
from rtsc.conventions import MOTION_NAMES
from simulator.scanner import run_simulation


def simulator_config(service, **changes):
    return config_from_dict(merge(to_dict(service.config), {"simulator": changes})).simulator


@pytest.mark.slow
def test_second_series_is_registered_to_the_first_ones_reference(service_factory, tmp_path):
    service, collector = service_factory(motion={"reference": "series:PREVIOUS"})
    common = dict(n_volumes=6, voxel_size_mm=[6.0, 6.0, 7.0], max_trans_mm=0.6,
                  max_rot_deg=0.6, n_jumps=0, seed=7)  # one seed: one head
    for number, slices in ((1, 16), (2, 13)):
        sim = run_simulation(simulator_config(service, shape=[32, 32, slices], **common),
                             send_to=("127.0.0.1", service.receiver.port),
                             truth_dir=tmp_path / f"t{number}", series_number=number)
        assert sim.failures == 0
        assert collector.ended.wait(60)
        collector.ended.clear()
    first, second = (e.header["series"] for e in collector.topic("series.end"))
    alerts = {(m.header["series"], m.header["code"]): m.header["message"]
              for m in collector.topic("alert") if m.header["code"].startswith("motion_ref")}
    assert set(alerts) == {(first, "motion_reference_first"),
                           (second, "motion_reference_previous")}
    assert first in alerts[(second, "motion_reference_previous")]
    # both series start from the same head pose (the simulator's volume 0 is unmoved), so
    # the second series' parameters are its own truth, volume 0 included, and not zeros
    # by construction as with reference 'first'
    volumes = [m.header for m in collector.topic("volume") if m.header["series"] == second]
    measured = np.array([[h[k] for k in MOTION_NAMES] for h in volumes])
    truth = np.loadtxt(tmp_path / "t2" / "motion.tsv", skiprows=1)[:, :6]
    assert np.any(measured[0] != 0.0)
    np.testing.assert_allclose(measured[:, :3], truth[:, :3], atol=0.2)
    np.testing.assert_allclose(np.degrees(measured[:, 3:]), np.degrees(truth[:, 3:]), atol=0.2)
