"""A real Siemens BOLD mosaic (heudiconv's test file axasc35.dcm, TrioTim, 64x64x35).

Its volume, affine and slice times must equal dcm2niix's (voxels compared in the closest
canonical orientation, since dcm2niix flips its arrays in-plane) and nibabel's; a series
built from it (new UIDs and instance numbers, a known offset added per volume) sent by
dcmtk's storescu to a running `rtsc run` is assembled volume by volume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import Collector
from real_data import AXASC35, copies_as_series, fetch
from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume, series_id
from test_dcmtk import STORESCU, rtsc_run  # noqa: F401 - a fixture

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import dicomwrappers

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SWAP_IJ = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def axasc35() -> Path:
    return fetch(AXASC35)


def _assemble_one(ds: pydicom.Dataset) -> Volume:
    (volume,) = Assembler(AssemblerConfig()).add(Incoming(ds, None, time.time(), "cstore"))
    assert isinstance(volume, Volume), volume
    return volume


def test_real_mosaic_equals_dcm2niix_and_nibabel(axasc35, tmp_path):
    ds = pydicom.dcmread(axasc35)
    volume = _assemble_one(ds)
    assert volume.shape == (64, 64, 35) and volume.info.source == "mosaic"
    assert volume.info.tr_s == pytest.approx(3.0)
    np.testing.assert_allclose(volume.voxel_size_mm[:2], (3.25, 3.25), atol=1e-4)

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "axasc35.dcm").symlink_to(axasc35)
    result = subprocess.run([str(Path(sys.executable).parent / "dcm2niix"), "-z", "n",
                             "-f", "bold", "-o", str(tmp_path), str(tmp_path / "in")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = nib.as_closest_canonical(nib.load(tmp_path / "bold.nii"))
    ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.affine))
    np.testing.assert_array_equal(np.asarray(ours.dataobj),
                                  np.asarray(reference.dataobj).reshape(ours.shape))
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)
    sidecar = json.loads((tmp_path / "bold.json").read_text())
    assert len(sidecar["SliceTiming"]) == 35
    np.testing.assert_allclose(volume.slice_times_s, sidecar["SliceTiming"], atol=1e-4)
    assert sidecar["RepetitionTime"] == pytest.approx(volume.info.tr_s)

    wrapper = dicomwrappers.wrapper_from_data(ds)
    assert isinstance(wrapper, dicomwrappers.MosaicWrapper)
    np.testing.assert_array_equal(volume.data, wrapper.get_data().transpose(1, 0, 2))
    np.testing.assert_allclose(volume.affine, LPS @ wrapper.affine @ SWAP_IJ, atol=1e-4)


def build_series(source: Path, out: Path, n: int) -> list[Path]:
    """n copies of a mosaic as one new series: volume t has ``t`` added to its pixels."""
    def plus_t(t: int, pixels: np.ndarray) -> np.ndarray:
        assert int(pixels.max()) + n < 2**12  # stays within BitsStored
        return np.where(pixels > 0, pixels + t, pixels)  # tiles beyond the 35 slices stay 0

    return copies_as_series(source, out, n, plus_t)


@pytest.mark.slow
def test_real_mosaic_series_by_storescu_is_assembled_volume_by_volume(
        rtsc_run, axasc35, tmp_path):  # noqa: F811 - pytest fixture
    port, pub, _proc, log_path = rtsc_run
    n = 6
    files = build_series(axasc35, tmp_path / "series", n)
    expected = [_assemble_one(pydicom.dcmread(f)) for f in files]
    collector = Collector(pub)
    time.sleep(0.5)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", str(port),
                             *map(str, files)], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    try:
        assert collector.ended.wait(60), log_path.read_text()[-3000:]
    finally:
        collector.close()
    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(n))
    sid = series_id(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
    assert {m.header["series"] for m in volumes} == {sid}
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == n
    img = nib.load(end["outputs"]["bold"])
    data = np.asarray(img.dataobj)
    assert data.shape == (64, 64, 35, n)
    original = _assemble_one(pydicom.dcmread(axasc35)).data
    for t in range(n):
        np.testing.assert_array_equal(data[..., t], expected[t].data)
        np.testing.assert_array_equal(data[..., t], np.where(original > 0, original + t, 0))
    np.testing.assert_allclose(img.affine, expected[0].affine, atol=1e-4)
