"""publish.volumes: every motion-corrected volume's in-mask voxels as a `voxels` message,
after its `volume` message, at the voxels of the series' `voxels` map; with motion
correction off, bit-identical to the volumes written to bold.nii.gz."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtsc.client import request_snapshot
from simulator.scanner import run_simulation

SIMULATOR = {"shape": [32, 32, 16], "voxel_size_mm": [6.0, 6.0, 7.0], "n_volumes": 8}


@pytest.mark.parametrize("motion", [False, True])
def test_each_volume_is_published_at_the_mask_voxels(service_factory, motion):
    service, collector = service_factory(simulator=SIMULATOR, motion={"enabled": motion},
                                         publish={"volumes": True})
    sim = run_simulation(service.config.simulator,
                         send_to=("127.0.0.1", service.receiver.port))
    assert sim.failures == 0
    assert collector.ended.wait(60)
    order = [(m.topic, m.header.get("index")) for m in collector.messages
             if m.topic in ("volume", "voxels")]
    assert order == [(topic, i) for i in range(8) for topic in ("volume", "voxels")]
    (mask_message,) = [m for m in collector.topic("map") if m.header["name"] == "voxels"]
    mask = mask_message.arrays[0]
    assert mask.shape == (32, 32, 16) and set(np.unique(mask)) == {0.0, 1.0}
    index = np.flatnonzero(mask.ravel(order="F") > 0)
    messages = collector.topic("voxels")
    for m in messages:
        assert m.header["n_voxels"] == index.size and m.arrays[0].dtype == np.float32
        assert m.arrays[0].shape == (index.size,)
    # late joiners get the mask from the snapshot, not the voxels
    snapshot = request_snapshot(service.publisher.snapshot_endpoint)
    assert [m.header["name"] for m in snapshot if m.topic == "map"].count("voxels") == 1
    assert not [m for m in snapshot if m.topic == "voxels"]
    if motion:  # NaN where a volume's sample fell outside the acquired grid
        finite = np.array([np.isfinite(m.arrays[0]) for m in messages])
        assert finite[0].all() and finite.mean() > 0.5 and not finite.all()
        return
    (bold,) = list(Path(service.config.session.dir).rglob("bold.nii.gz"))
    written = np.asarray(nib.load(bold).dataobj, dtype=np.float32)
    for t, m in enumerate(messages):
        np.testing.assert_array_equal(m.arrays[0], written[..., t].ravel(order="F")[index])
