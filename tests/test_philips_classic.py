"""Philips classic single-slice DICOM: the simulator's layout.

Philips writes its FFE-EPI BOLD with ScanningSequence GR (not EP): the series filter
must recognise it as echo planar by the vendor's tags (private Scanning Technique
Description FEEPI, EPI factor; public tags when an anonymiser removed the private ones),
and still skip a Philips non-EPI series (a T1 TFE). The simulator writes a Philips
classic series (``simulator.vendor: philips``): files numbered slice by slice across
time, TemporalPositionIdentifier the time point. No real Philips classic file is in the
corpus: the headers below are built for the vendor's rules as dcm2niix documents them.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtsc.config import ConfigError, config_from_dict
from simulator.dicom_writer import (
    PHILIPS,
    new_series_info,
    volume_to_philips_slices,
    write_dataset,
)
from simulator.phantom import Grid
from simulator.scanner import run_simulation

SHAPE = (16, 16, 6)
NT = 3


def _affine() -> np.ndarray:
    return Grid(SHAPE, (3.0, 3.0, 4.0)).affine()


def _philips_bold(rng, n: int = NT) -> tuple[list[list[pydicom.Dataset]], np.ndarray]:
    info = new_series_info(401, 2.0, n_volumes=n, start_time=time.time(),
                           manufacturer=PHILIPS, series_description="WIP_fMRI_FEEPI")
    data = rng.integers(50, 3000, size=(*SHAPE, n)).astype(np.int16)
    return [volume_to_philips_slices(data[..., t], _affine(), info, t) for t in range(n)], data


# ----------------------------------------------------------- the simulator's layout


def test_philips_classic_numbering_and_tags(rng):
    vols, data = _philips_bold(rng)
    nz = SHAPE[2]
    for t, vol in enumerate(vols):
        assert len(vol) == nz
        for k, ds in enumerate(vol):
            assert int(ds.InstanceNumber) == k * NT + t + 1
            assert int(ds.TemporalPositionIdentifier) == t + 1
            assert int(ds.NumberOfTemporalPositions) == NT
            assert int(ds.AcquisitionNumber) == 401  # one number for the series
            assert "ImagesInAcquisition" not in ds
            imaging = ds.private_block(0x2001, "Philips Imaging DD 001")
            assert int(imaging[0x0A].value) == k + 1 and imaging[0x18].value == nz
            np.testing.assert_array_equal(ds.pixel_array, data[:, :, k, t].T)
    # InstanceNumber 1, 2, 3 are one slice at three time points
    by_instance = {int(ds.InstanceNumber): ds for vol in vols for ds in vol}
    assert [int(by_instance[i].TemporalPositionIdentifier) for i in (1, 2, 3)] == [1, 2, 3]
    assert len({by_instance[i].ImagePositionPatient[2] for i in (1, 2, 3)}) == 1
    first = vols[0][0]
    assert (first.ScanningSequence, first.MRAcquisitionType) == ("GR", "2D")
    assert int(first.EchoTrainLength) == SHAPE[1] and "SequenceName" not in first
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    mr = first.private_block(0x2005, "Philips MR Imaging DD 001")
    assert mr[0x30].value[0] == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="n_volumes"):
        volume_to_philips_slices(data[..., 0], _affine(), new_series_info(
            1, 2.0, manufacturer=PHILIPS), 0)


def test_dcm2niix_reads_the_philips_classic_layout(rng, tmp_path):
    vols, data = _philips_bold(rng)
    src = tmp_path / "dicom"
    src.mkdir()
    for vol in vols:
        for ds in vol:  # named by InstanceNumber, as a Philips export is
            write_dataset(ds, src / f"IM_{int(ds.InstanceNumber):04d}")
    out = tmp_path / "nii"
    out.mkdir()
    proc = subprocess.run([dcm2niix.bin, "-z", "n", "-f", "out", "-o", str(out), str(src)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    img = nib.load(out / "out.nii")
    ours = nib.as_closest_canonical(nib.Nifti1Image(data, _affine()))
    theirs = nib.as_closest_canonical(img)
    assert theirs.shape == (*SHAPE, NT)
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)


def test_philips_vendor_needs_single_slices(tmp_path):
    cfg = config_from_dict({"simulator": {"vendor": "philips", "format": "mosaic",
                                          "n_volumes": 2, "shape": [8, 8, 4]}}).simulator
    with pytest.raises(ConfigError, match="vendor: philips"):
        run_simulation(cfg, out_dir=tmp_path / "scan")
