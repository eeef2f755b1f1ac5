"""Multiband slice timing is kept with each volume, whatever the format.

A multiband factor 3 acquisition excites three slices at once: 12 slices in 4 shots,
interleaved. Each assembled volume must carry those times (from MosaicRefAcqTimes, the
slices' AcquisitionTime, or the frames' FrameAcquisitionDateTime); for the mosaic,
dcm2niix's SliceTiming (an independent reading of the CSA header) must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices, write_dataset
from simulator.multiframe_writer import volumes_to_multiframe
from simulator.phantom import Grid

TR_S, NZ, MB = 2.0, 12, 3
SHOT = np.array([0, 2, 1, 3])  # interleaved shots; slice k belongs to shot k % 4
TIMES = tuple(float(t) for t in SHOT[np.arange(NZ) % (NZ // MB)] * TR_S / (NZ // MB))


@pytest.mark.parametrize("fmt", ["mosaic", "slices", "multiframe"])
def test_multiband_times_travel_with_every_volume(rng, fmt):
    info = new_series_info(8, TR_S, n_volumes=3, start_time=1_700_000_000.0,
                           slice_times_s=TIMES)
    affine = Grid((16, 16, NZ), (3.0, 3.0, 3.0)).affine()
    assembler = Assembler(AssemblerConfig())
    volumes = []
    for t in range(3):
        data = rng.integers(0, 2000, size=(16, 16, NZ)).astype(np.int16)
        if fmt == "mosaic":
            datasets = [volume_to_mosaic(data, affine, info, t)]
        elif fmt == "slices":
            datasets = list(reversed(volume_to_slices(data, affine, info, t)))
        else:
            datasets = [volumes_to_multiframe(data, affine, info, t,
                                              frame_order=rng.permutation(NZ))]
        for ds in datasets:
            volumes += [e for e in assembler.add(Incoming(ds, None, time.time(), "cstore"))
                        if isinstance(e, Volume)]
    assert [v.index for v in volumes] == [0, 1, 2]
    assert len(set(TIMES)) == NZ // MB  # really multiband: 3 slices share each time
    for v in volumes:
        np.testing.assert_allclose(v.slice_times_s, TIMES, atol=1e-4)


@pytest.mark.system
def test_multiband_mosaic_slice_timing_equals_dcm2niix(rng, tmp_path):
    info = new_series_info(8, TR_S, n_volumes=1, start_time=1_700_000_000.0,
                           slice_times_s=TIMES)
    affine = Grid((16, 16, NZ), (3.0, 3.0, 3.0)).affine()
    ds = volume_to_mosaic(rng.integers(0, 2000, size=(16, 16, NZ)).astype(np.int16),
                          affine, info, 0)
    (tmp_path / "in").mkdir()
    write_dataset(ds, tmp_path / "in" / "mb.dcm")
    (volume,) = Assembler(AssemblerConfig()).add(Incoming(ds, None, time.time(), "cstore"))
    result = subprocess.run([str(Path(sys.executable).parent / "dcm2niix"), "-z", "n",
                             "-f", "mb", "-o", str(tmp_path), str(tmp_path / "in")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    sidecar = json.loads((tmp_path / "mb.json").read_text())
    np.testing.assert_allclose(volume.slice_times_s, sidecar["SliceTiming"], atol=1e-3)
    assert sidecar["MultibandAccelerationFactor"] == MB  # dcm2niix infers it from the times
