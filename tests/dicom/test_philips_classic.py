"""Philips classic single-slice DICOM: series recognition and the simulator's layout.

Philips writes its FFE-EPI BOLD with ScanningSequence GR (not EP): the series filter
must recognise it as echo planar by the vendor's tags (private Scanning Technique
Description FEEPI, EPI factor; public tags when an anonymiser removed the private ones),
and still skip a Philips non-EPI series (a T1 TFE). The simulator writes a Philips
classic series (``simulator.vendor: philips``): files numbered slice by slice across
time, TemporalPositionIdentifier the time point. No real Philips classic file is in the
corpus: the headers below are built for the vendor's rules as dcm2niix documents them.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from io import BytesIO
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset as write_raw_dataset

from rtsc.config import ConfigError, SeriesFilterConfig, config_from_dict, merge, to_dict
from rtsc.dicom.recognise import philips_echo_planar, skip_reason
from rtsc.volume import series_id
from simulator.dicom_series import PHILIPS, new_series_info
from simulator.dicom_writer import volume_to_philips_slices, volume_to_slices, write_dataset
from simulator.phantom import Grid
from simulator.scanner import run_simulation

SHAPE = (16, 16, 6)
NT = 3
RULES = SeriesFilterConfig()


def _affine() -> np.ndarray:
    return Grid(SHAPE, (3.0, 3.0, 4.0)).affine()


def _philips_bold(rng, n: int = NT) -> tuple[list[list[pydicom.Dataset]], np.ndarray]:
    info = new_series_info(401, 2.0, n_volumes=n, start_time=time.time(),
                           manufacturer=PHILIPS, series_description="WIP_fMRI_FEEPI")
    data = rng.integers(50, 3000, size=(*SHAPE, n)).astype(np.int16)
    return [volume_to_philips_slices(data[..., t], _affine(), info, t) for t in range(n)], data


def _t1_tfe(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A Philips 3D T1 TFE image's header, from a Philips BOLD one."""
    ds = copy.deepcopy(ds)
    ds.SeriesDescription = ds.ProtocolName = "T1W_3D_TFE"
    ds.MRAcquisitionType = "3D"
    ds.EchoTrainLength = "180"  # the TFE factor
    ds.NumberOfTemporalPositions = "1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    ds[0x2001, 0x1020].value = "T1TFE"  # the simulator puts the block at (2001,10xx)
    ds[0x2001, 0x1013].value = 1
    return ds


def _implicit_round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` encoded in Implicit VR Little Endian and decoded as the receiver does."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_raw_dataset(buffer, ds)
    return read_dataset(BytesIO(buffer.getvalue()), True, True)


# ------------------------------------------------------------------- recognition


def test_philips_bold_is_echo_planar_by_its_private_tags(rng):
    vols, _ = _philips_bold(rng)
    ds = vols[0][0]
    assert ds.ScanningSequence == "GR" and ds.Manufacturer == PHILIPS
    assert skip_reason(ds, RULES) is None
    assert philips_echo_planar(ds) == (True, "Philips ScanningTechnique FEEPI")
    # as decoded on the worker from an implicit-VR C-STORE (private values may be raw)
    assert skip_reason(_implicit_round_trip(ds), RULES) is None


def test_philips_t1_tfe_is_still_skipped(rng):
    vols, _ = _philips_bold(rng)
    t1 = _t1_tfe(vols[0][0])
    reason = skip_reason(t1, RULES)
    assert reason == "ScanningSequence GR is not echo planar (Philips ScanningTechnique T1TFE)"
    assert skip_reason(_implicit_round_trip(t1), RULES) == reason
    # Only the EPI factor left: it decides
    del t1[0x2001, 0x1020]
    assert skip_reason(t1, RULES).endswith("(Philips EPI factor 1)")


def test_philips_without_private_tags_falls_back_to_the_public_ones(rng):
    vols, _ = _philips_bold(rng)
    bold = copy.deepcopy(vols[0][0])
    bold.remove_private_tags()  # as an anonymiser or a PACS may
    assert skip_reason(bold, RULES) is None  # 2D GR, echo train 16, 3 time points
    t1 = _t1_tfe(vols[0][0])
    t1.remove_private_tags()
    assert "MRAcquisitionType 3D" in skip_reason(t1, RULES)
    single = copy.deepcopy(bold)
    single.NumberOfTemporalPositions = "1"  # a single-phase 2D gradient echo
    assert "NumberOfTemporalPositions 1" in skip_reason(single, RULES)
    enhanced_flag = copy.deepcopy(t1)
    enhanced_flag.EchoPlanarPulseSequence = "YES"
    assert skip_reason(enhanced_flag, RULES) is None


def test_other_vendors_still_need_ep(rng):
    info = new_series_info(2, 2.0, n_volumes=NT, start_time=time.time())
    data = rng.integers(50, 3000, size=SHAPE).astype(np.int16)
    ds = volume_to_slices(data, _affine(), info, 0)[0]
    ds.ScanningSequence = "GR"  # a Siemens gradient echo with a FEEPI-looking name is not EPI
    ds.SeriesDescription = "FEEPI"
    assert skip_reason(ds, RULES) == "ScanningSequence GR is not echo planar"
    ds.Manufacturer = "Philips"
    assert skip_reason(ds, RULES) is not None  # Philips, but no Philips tag says EPI
    relaxed = SeriesFilterConfig(require_epi=False)
    assert skip_reason(_t1_tfe(_philips_bold(rng)[0][0][0]), relaxed) is None


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


@pytest.mark.system
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


# --------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_philips_classic_series_over_cstore_end_to_end(service_factory, tmp_path):
    """Every volume of a Philips classic series sent over C-STORE is published, with the
    simulator's voxels. Needs the assembler to number single slices by
    TemporalPositionIdentifier and to take the slice count from Philips' Number of Slices
    MR (2001,xx18): Philips writes no ImagesInAcquisition."""
    service, collector = service_factory()
    n = 6
    cfg = config_from_dict(merge(to_dict(service.config), {"simulator": {
        "vendor": "philips", "format": "slices", "n_volumes": n, "shape": [32, 32, 12],
        "voxel_size_mm": [6.0, 6.0, 9.0]}})).simulator
    sim = run_simulation(cfg, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == n * 12
    assert collector.ended.wait(15), "no series.end; alerts: " + "; ".join(
        f"{a.header['code']}: {a.header['message']}" for a in collector.topic("alert")[:3])
    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(n))
    assert {m.header["series"] for m in volumes} == {series_id(sim.series_uid)}
    (start,) = collector.topic("series.start")
    assert start.header["n_expected"] == n and start.header["tr_s"] == pytest.approx(cfg.tr_s)
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == n and end["summary"]["missing_volumes"] == []
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj),
                                  np.load(sim.truth_dir / "bold_quantised.npy"))
    truth = np.array(json.loads((sim.truth_dir / "truth.json").read_text())["affine_ras"])
    np.testing.assert_allclose(img.affine, truth, atol=1e-4)
    assert not [a for a in collector.topic("alert") if a.header["code"] == "skipped_series"]
