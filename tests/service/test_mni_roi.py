"""An ROI given in MNI space inside `rtsc run`: the simulator's MNI head sent over
C-STORE, the first volume registered to the template, the ROI published as a map and on
the dashboard's ROI panel, landing on the simulated activation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from simulator.real_anatomy import ACTIVATION_RADIUS_MM, MNI_ACTIVATION
from simulator.scanner import run_simulation

N_VOLUMES = 6


@pytest.mark.slow
def test_mni_sphere_over_dicom_lands_on_the_activation(service_factory, tmp_path):
    sphere = {"center_mni_mm": list(MNI_ACTIVATION), "radius_mm": ACTIVATION_RADIUS_MM}
    service, collector = service_factory(
        simulator={"anatomy": "mni152", "n_volumes": N_VOLUMES},
        glm={"roi": {"auditory": sphere}, "baseline_volumes": 2})
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0
    assert collector.ended.wait(120)
    volumes = [m.header for m in collector.topic("volume")]
    assert [h["index"] for h in volumes] == list(range(N_VOLUMES))
    registration = volumes[0]["mni_registration"]
    assert registration["eta2"] > 0.7 and registration["coverage"] > 0.8
    assert all(0.9 < s < 1.1 for s in registration["scales"])
    assert all("mni_registration" not in h for h in volumes[1:])
    codes = {m.header["code"] for m in collector.topic("alert")}
    assert "mni_registration_poor" not in codes and "roi_disabled" not in codes
    assert all(h["roi"]["auditory"] is not None for h in volumes[2:])

    (roi,) = [m for m in collector.topic("map") if m.header["name"] == "roi:auditory"]
    published = roi.arrays[0] > 0.5
    truth = np.asarray(nib.load(tmp_path / "truth" / "activation.nii.gz").dataobj) > 0.5
    assert published.shape == truth.shape
    overlap = 2.0 * np.sum(published & truth) / (published.sum() + truth.sum())
    print(f"Dice {overlap:.3f}, {published.sum()} ROI voxels, {truth.sum()} active; "
          f"registration {registration['seconds']} s")
    assert overlap >= 0.7
