"""Independent readers (nibabel's DICOM wrappers, dcm2niix) agree with the assembler."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental
    from nibabel.nicom import dicomwrappers

from rtsc.config import AssemblerConfig, config_from_dict, merge, to_dict
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume
from simulator.scanner import run_simulation

SWAP_IJ = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def _simulate(tmp_path: Path, fmt: str, shape: list[int], voxel: list[float], n: int = 3):
    cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": fmt, "shape": shape, "voxel_size_mm": voxel, "n_volumes": n, "speed": 0.0}}))
    return run_simulation(cfg.simulator, out_dir=tmp_path / fmt)


def _assemble(files: list[Path]) -> list[Volume]:
    assembler = Assembler(AssemblerConfig())
    volumes = []
    for path in files:
        events = assembler.add(Incoming(pydicom.dcmread(path), path, time.time(), "folder"))
        volumes.extend(e for e in events if isinstance(e, Volume))
    return volumes


def _dcm2niix() -> str:
    found = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    assert Path(found).exists(), "dcm2niix (PyPI) must be installed for the tests"
    return found


@pytest.mark.parametrize("shape,voxel", [([64, 64, 36], [3.0, 3.0, 3.0]),
                                         ([80, 64, 30], [2.5, 3.0, 3.5])])
def test_mosaic_assembly_equals_nibabel(tmp_path, shape, voxel):
    sim = _simulate(tmp_path, "mosaic", shape, voxel)
    volumes = _assemble(sim.files)
    assert [v.index for v in volumes] == [0, 1, 2]
    for path, volume in zip(sim.files, volumes):
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        assert isinstance(wrapper, dicomwrappers.MosaicWrapper)
        # nibabel's array is (rows, columns, slices) with an LPS affine; ours is
        # (columns, rows, slices) in RAS.
        np.testing.assert_array_equal(volume.data, wrapper.get_data().transpose(1, 0, 2))
        nib_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ wrapper.affine @ SWAP_IJ
        np.testing.assert_allclose(volume.affine, nib_affine, atol=1e-5)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mosaic", "slices"])
def test_assembly_equals_dcm2niix(tmp_path, fmt):
    sim = _simulate(tmp_path, fmt, [64, 64, 36], [3.0, 3.0, 3.0])
    volumes = _assemble(sim.files)
    out = tmp_path / "dcm2niix"
    out.mkdir()
    result = subprocess.run([_dcm2niix(), "-z", "n", "-b", "n", "-f", "bold", "-o", str(out),
                             str(sim.dicom_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = nib.as_closest_canonical(nib.load(out / "bold.nii"))
    ours = nib.as_closest_canonical(nib.Nifti1Image(
        np.stack([v.data for v in volumes], axis=-1), volumes[0].affine))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)
