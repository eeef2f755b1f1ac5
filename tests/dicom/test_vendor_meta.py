"""Vendor header facts (:mod:`rtsc.dicom.vendor`) against dcm2niix on every real series.

For each DICOM series of ``tests/data/realdata`` (``tests/scanner_corpus.py``): TR,
SliceTiming (within 1 ms), MultibandAccelerationFactor and PhaseEncodingDirection equal
dcm2niix's (its ``Ref/`` sidecar, or dcm2niix run now for the pyneal series, which have
none), and the announced run length equals the catalogue. rtsc and dcm2niix order and
flip voxel axes differently, so slice-time vectors and phase-encoding directions are
compared on world axes: each voxel axis is mapped to its closest RAS+ axis and sign
(nibabel's ``io_orientation``) from rtsc's affine for the series and from the reference
NIfTI's. Then the fallbacks (units: ms, s and 1/10000 s), the contradictions (None and
one warning), private elements received as raw bytes, and facade-level cases. The vendor
rules on their own: ``test_ge_headers.py``, ``test_siemens_headers.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from rtsc.config import AssemblerConfig, SeriesFilterConfig
from rtsc.dicom import siemens, vendor
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.geometry import affine_from_lps, plane_geometry
from rtsc.dicom.private import private_value
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume
from scanner_corpus import (BY_KEY, CorpusSeries, dicom_series, phase_encoding_world,
                            slice_times_world)
from test_siemens_headers import with_protocol

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
COMPARED = [s for s in dicom_series() if s.ref is not None or s.key.startswith("pyneal")]
SLICE_TOL_S = 1e-3


@dataclass(frozen=True)
class FirstVolume:
    """A series' first volume as the assembler hands it over, and rtsc's affine for it."""

    volume: Dataset | dict[int, Dataset]
    n_slices: int
    affine: np.ndarray
    second: Dataset | dict[int, Dataset]

    @property
    def header(self) -> Dataset:
        return self.volume if isinstance(self.volume, Dataset) else self.volume[0]


def _files_and_headers(series: CorpusSeries) -> list[tuple[Path, Dataset]]:
    """(file, header) of every image of the series, by InstanceNumber."""
    pairs = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in series.files()]
    return sorted(pairs, key=lambda pair: int(pair[1].InstanceNumber))


def _headers(series: CorpusSeries) -> list[Dataset]:
    return [ds for _, ds in _files_and_headers(series)]


@functools.lru_cache(maxsize=None)
def first_volume(key: str) -> FirstVolume:
    """The first volume's headers ({k: header} for single slices) and rtsc's affine."""
    series = BY_KEY[key]
    pairs = _files_and_headers(series)
    headers = [ds for _, ds in pairs]
    if series.layout != "slices":
        full = pydicom.dcmread(pairs[0][0])
        events = Assembler(AssemblerConfig(), series_filter=SeriesFilterConfig(enabled=False)
                           ).add(Incoming(full, None, time.time(), "cstore"))
        volume = next(e for e in events if isinstance(e, Volume))
        return FirstVolume(headers[0], volume.shape[2], volume.affine, headers[1])
    # GE numbers the images of a run volume after volume: the first volume is the first
    # n by InstanceNumber. k as the assembler stacks slices: by position along the normal.
    n = vendor.slices_per_volume(headers[0])
    assert n is not None
    slices = headers[:n]
    row_cos, col_cos, spacing, _ = plane_geometry(slices[0])
    normal = np.cross(row_cos, col_cos)
    ipps = [plane_geometry(ds)[3] for ds in slices]
    order = np.argsort([float(ipp @ normal) for ipp in ipps])
    assert len({round(float(ipps[i] @ normal), 3) for i in order}) == n
    step = (ipps[order[-1]] - ipps[order[0]]) / (n - 1)
    affine = affine_from_lps(row_cos, col_cos, spacing, step, ipps[order[0]])
    second = headers[n:2 * n]
    second_order = np.argsort([float(plane_geometry(ds)[3] @ normal) for ds in second])
    return FirstVolume({k: slices[i] for k, i in enumerate(order)}, n, affine,
                       {k: second[i] for k, i in enumerate(second_order)})


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """key -> (dcm2niix sidecar, dcm2niix affine): Ref/ files, or dcm2niix run now."""
    cache: dict[str, tuple[dict, np.ndarray]] = {}

    def get(series: CorpusSeries) -> tuple[dict, np.ndarray]:
        if series.key not in cache:
            if series.ref is not None:
                nifti, sidecar = series.ref_nifti, series.ref_json
            else:
                out = tmp_path_factory.mktemp(series.key)
                result = subprocess.run([str(DCM2NIIX), "-z", "n", "-b", "y", "-ba", "y",
                                         "-f", "bold", "-o", str(out), str(series.path)],
                                        capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, result.stdout + result.stderr
                nifti, sidecar = out / "bold.nii", out / "bold.json"
            cache[series.key] = (json.loads(Path(sidecar).read_text()),
                                 nib.load(nifti).affine)
        return cache[series.key]

    return get


def _facts(key: str, second: bool = False) -> vendor.AcquisitionFacts:
    fv = first_volume(key)
    return vendor.acquisition_facts(fv.volume, fv.n_slices, fv.second if second else None)


def _assert_times_equal(series: CorpusSeries, references, times: np.ndarray | None,
                        atol: float) -> None:
    sidecar, ref_affine = references(series)
    assert times is not None and "SliceTiming" in sidecar
    assert len(times) == len(sidecar["SliceTiming"]) == first_volume(series.key).n_slices
    axis, ours_world = slice_times_world(times, first_volume(series.key).affine)
    ref_axis, ref_world = slice_times_world(np.array(sidecar["SliceTiming"]), ref_affine)
    assert axis == ref_axis
    np.testing.assert_allclose(ours_world, ref_world, atol=atol)


@pytest.mark.system
@pytest.mark.parametrize("series", COMPARED, ids=lambda s: s.key)
def test_tr_and_slice_times_equal_dcm2niix(series, references):
    # Given the first two volumes, as dcm2niix sees them (see the next test).
    sidecar, _ = references(series)
    facts = _facts(series.key, second=True)
    assert facts.tr_s == pytest.approx(sidecar["RepetitionTime"], abs=1e-6)
    _assert_times_equal(series, references, facts.slice_times_s, SLICE_TOL_S)


@pytest.mark.system
@pytest.mark.parametrize("series", COMPARED, ids=lambda s: s.key)
def test_first_volume_alone_is_within_one_siemens_tick(series, references):
    # Siemens writes each volume's measured times on a 2.5 ms grid, and they move by one
    # tick between volumes; dcm2niix takes the second volume's when the two span
    # different ranges (dcm_qa_nih PA and the VB17 series here). From the first volume
    # alone the times are then 2.5 ms off; everywhere else they are dcm2niix's.
    times = _facts(series.key).slice_times_s
    jitter = {"nih-siemens-pa", "stc-siemens-b17"}
    _assert_times_equal(series, references, times,
                        2.5e-3 + 1e-6 if series.key in jitter else SLICE_TOL_S)


@pytest.mark.system
@pytest.mark.parametrize("series", COMPARED, ids=lambda s: s.key)
def test_multiband_and_phase_encoding_equal_dcm2niix(series, references):
    sidecar, ref_affine = references(series)
    facts = _facts(series.key, second=True)
    assert facts.multiband_factor == _facts(series.key).multiband_factor
    assert (facts.multiband_factor or 1) == sidecar.get("MultibandAccelerationFactor", 1)
    assert facts.phase_encoding_direction is not None
    assert phase_encoding_world(facts.phase_encoding_direction, first_volume(series.key).affine) \
        == phase_encoding_world(sidecar["PhaseEncodingDirection"], ref_affine)


@pytest.mark.parametrize("series", dicom_series(), ids=lambda s: s.key)
def test_announced_run_length_equals_the_catalogue(series):
    headers = _headers(series)
    assert {vendor.n_expected(ds) for ds in (headers[0], headers[-1])} == {series.n_expected}
    assert series.n_expected is None or series.n_expected >= series.n_volumes


def test_the_multiband_series_are_multiband():
    # dcm2niix's Refs: CMRR E11 multiband 3, XA10 SMS 2; the sequences' own
    # lMultiBandFactor entries say 1 (E11) and nothing (XA10).
    assert _facts("stc-siemens-e11-mb").multiband_factor == 3
    assert _facts("stc-siemens-xa10-mb").multiband_factor == 2
    entries = siemens.protocol(first_volume("stc-siemens-e11-mb").header)
    assert entries["sSliceAcceleration.lMultiBandFactor"] == "1"


@pytest.mark.parametrize("series", COMPARED, ids=lambda s: s.key)
def test_sidecar_has_the_facts_and_no_identifiers(series):
    fv = first_volume(series.key)
    facts = _facts(series.key)
    sidecar = vendor.bids_sidecar(fv.volume, fv.n_slices, facts=facts)
    json.dumps(sidecar)  # plain JSON types
    assert sidecar["RepetitionTime"] == pytest.approx(facts.tr_s)
    np.testing.assert_allclose(sidecar["SliceTiming"], facts.slice_times_s, atol=1e-6)
    assert sidecar["PhaseEncodingDirection"] == facts.phase_encoding_direction
    assert ("MultibandAccelerationFactor" in sidecar) == (facts.multiband_factor > 1)
    assert 0.005 < sidecar["EchoTime"] < 0.1  # s, not ms
    allowed = {"Manufacturer", "ManufacturersModelName", "SoftwareVersions",
               "MagneticFieldStrength", "EchoTime", "FlipAngle", "RepetitionTime",
               "SliceTiming", "MultibandAccelerationFactor", "PhaseEncodingDirection",
               "PhaseEncodingAxis"}
    assert set(sidecar) <= allowed
    text = json.dumps(sidecar)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                    "OperatorsName", "ReferringPhysicianName", "StudyDate", "AccessionNumber"):
        value = str(fv.header.get(keyword) or "").strip()
        if len(value) > 3:
            assert value not in text, keyword


def test_header_only_datasets_and_one_dataset_of_a_slice_series():
    fv = first_volume("nih-ge-4")
    assert "PixelData" not in fv.header
    # one GE slice alone: the header-wide facts, no slice times (k unknown)
    facts = vendor.acquisition_facts(fv.header)
    assert facts.slice_times_s is None and facts.tr_s == 5.0 and facts.n_expected == 10
    assert facts.phase_encoding_direction == "j"


# -- fallbacks and units ----------------------------------------------------------------


def _without_protocol_block(volume: dict[int, Dataset]) -> dict[int, Dataset]:
    stripped = {}
    for k, ds in volume.items():
        ds = copy.deepcopy(ds)
        for tag in [t for t in ds.keys() if int(t) >> 16 == 0x0025]:
            del ds[tag]
        stripped[k] = ds
    return stripped


@pytest.mark.parametrize("key, source", [
    ("stc-ge-triggertime", "TriggerTime, ms"),
    ("stc-ge-rtia", "RTIA timer, s (DV24)"),
    ("stc-ge-rtiaold", "RTIA timer, 1/10000 s (14.0)"),
])
def test_ge_measured_slice_times_without_protocol_block_keep_their_units(key, source):
    fv = first_volume(key)
    planned = _facts(key).slice_times_s
    measured = vendor.slice_times_s(_without_protocol_block(fv.volume), fv.n_slices)
    assert measured is not None, source
    # TriggerTime is whole ms (the slice ends, rounded down): within 1 ms. A unit taken
    # a factor 1000 or 10000 off would be seconds away.
    np.testing.assert_allclose(measured, planned, atol=SLICE_TOL_S)
    assert 0.5 * _facts(key).tr_s < measured.max() < _facts(key).tr_s


def test_ge_bogus_first_volume_rtia_gives_no_times(caplog):
    # pyneal's GE run: the RTIA timers of its first volume are mostly 0 (dcm2niix's
    # GE README warns of this), so without the protocol block nothing is reported.
    fv = first_volume("pyneal-ge")
    caplog.set_level(logging.WARNING)
    assert vendor.slice_times_s(_without_protocol_block(fv.volume), fv.n_slices) is None
    assert sum("(0021,105E)" in r.getMessage() for r in caplog.records) == 1


def test_ge_acquisition_direction_comes_from_instance_numbers():
    # Interleaved I->S numbers the images from the bottom slice, S->I from the top: with
    # the slices stacked by position (k) their times are mirror images, and numbering
    # the I->S images the other way round mirrors its times.
    up = _facts("nih-ge-4").slice_times_s
    down = _facts("nih-ge-6").slice_times_s
    np.testing.assert_allclose(up, down[::-1], atol=1e-9)
    fv = first_volume("nih-ge-4")
    renumbered = {}
    for k, ds in fv.volume.items():
        ds = copy.deepcopy(ds)
        ds.InstanceNumber = fv.n_slices - k
        renumbered[k] = ds
    np.testing.assert_allclose(vendor.slice_times_s(renumbered, fv.n_slices), up[::-1])


def test_ge_incomplete_first_volume_still_has_protocol_times():
    fv = first_volume("nih-ge-4")
    partial = {k: ds for k, ds in fv.volume.items() if k not in (0, 7)}
    np.testing.assert_allclose(vendor.slice_times_s(partial, fv.n_slices),
                               _facts("nih-ge-4").slice_times_s)


def test_tr_and_times_are_seconds():
    # RepetitionTime 3000 ms, MosaicRefAcqTimes up to 2437.5 ms: the facts are in s.
    facts = _facts("stc-siemens-b17")
    assert facts.tr_s == 3.0 and facts.slice_times_s.max() == pytest.approx(2.4375)
    assert vendor.repetition_time_s(first_volume("stc-ge-rtiaold").header) == 2.628


def test_xa_later_volume_checks_time_after_start_against_frame_times():
    series = BY_KEY["stc-siemens-xa10-mb"]
    second = next(ds for ds in _headers(series) if int(ds.InstanceNumber) == 2)
    np.testing.assert_allclose(vendor.slice_times_s(second),
                               _facts("stc-siemens-xa10-mb").slice_times_s, atol=1e-9)
    assert vendor.multiband_factor(second) == 2


# -- contradictions: None and one warning, never an exception ----------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_mosaic_times_longer_than_tr(caplog):
    ds = copy.deepcopy(first_volume("stc-siemens-b17").header)
    ds.RepetitionTime = 2000  # ms; MosaicRefAcqTimes reach 2437.5 ms
    caplog.set_level(logging.WARNING)
    facts = vendor.acquisition_facts(ds)
    assert facts.slice_times_s is None and facts.multiband_factor is None
    assert facts.tr_s == 2.0
    (message,) = _warnings(caplog)
    assert "MosaicRefAcqTimes" in message


def test_phoenix_count_that_is_not_a_number(caplog):
    ds = with_protocol("lRepetitions = abc", first_volume("stc-siemens-e11-mb").header)
    caplog.set_level(logging.WARNING)
    assert vendor.n_expected(ds) is None
    (message,) = _warnings(caplog)
    assert "lRepetitions" in message


def test_temporal_positions_contradicting_the_protocol(caplog):
    ds = copy.deepcopy(first_volume("stc-siemens-d13").header)
    ds.NumberOfTemporalPositions = 5  # the protocol says lRepetitions 5: 6 volumes
    caplog.set_level(logging.WARNING)
    assert vendor.n_expected(ds) is None
    (message,) = _warnings(caplog)
    assert "(0020,0105)" in message and "lRepetitions" in message


def test_trigger_times_contradicting_the_protocol_block(caplog):
    fv = first_volume("stc-ge-triggertime")
    sequential = {}
    for k, ds in fv.volume.items():
        ds = copy.deepcopy(ds)
        ds.TriggerTime = str(187.5 * (k + 1))
        sequential[k] = ds
    caplog.set_level(logging.WARNING)
    facts = vendor.acquisition_facts(sequential, fv.n_slices)
    assert facts.slice_times_s is None and facts.tr_s == 1.5
    (message,) = _warnings(caplog)
    assert "(0018,1060)" in message


def test_declared_multiband_contradicting_the_slice_times(caplog):
    ds = copy.deepcopy(first_volume("stc-siemens-e11-mb").header)
    assert str(ds[0x00510010].value).strip() == "SIEMENS MR HEADER"
    ds.add_new(0x00511011, "LO", "p2s4")  # the times show 3 slices at once
    caplog.set_level(logging.WARNING)
    facts = vendor.acquisition_facts(ds)
    assert facts.slice_times_s is None and facts.multiband_factor is None
    (message,) = _warnings(caplog)
    assert "(0051,1011)" in message


def test_scrambled_frame_times(caplog):
    series = BY_KEY["stc-siemens-xa10-mb"]
    second = copy.deepcopy(next(ds for ds in _headers(series) if int(ds.InstanceNumber) == 2))
    frame = second.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    frame.FrameAcquisitionDateTime = "20181022083634.999000"
    caplog.set_level(logging.WARNING)
    assert vendor.slice_times_s(second) is None
    (message,) = _warnings(caplog)
    assert "(0021,1104)" in message and "(0018,9074)" in message


def test_missing_facts_are_none_without_warnings(caplog):
    caplog.set_level(logging.WARNING)
    empty = Dataset()
    facts = vendor.acquisition_facts(empty)
    assert all(value is None for value in vars(facts).values())
    assert vendor.bids_sidecar(empty) == {}
    for key in ("stc-siemens-b17", "nih-ge-4"):
        ds = copy.deepcopy(first_volume(key).header)
        for keyword in ("RepetitionTime", "InPlanePhaseEncodingDirection",
                        "NumberOfTemporalPositions"):
            if keyword in ds:
                delattr(ds, keyword)
        for tag in [t for t in ds.keys() if int(t) >> 16 in (0x0025, 0x0029, 0x0043)]:
            del ds[tag]
        facts = vendor.acquisition_facts(ds)
        assert (facts.tr_s, facts.slice_times_s, facts.phase_encoding_direction) \
            == (None, None, None)
    assert not _warnings(caplog)


def test_philips_reports_no_slice_times():
    ds = copy.deepcopy(first_volume("stc-siemens-b17").header)
    ds.Manufacturer = "Philips Medical Systems"
    facts = vendor.acquisition_facts(ds)
    assert facts.slice_times_s is None and facts.phase_encoding_direction is None
    assert facts.phase_encoding_axis == "j" and facts.tr_s == 3.0


# -- private elements as received over C-STORE (VR unknown: raw bytes) ------------------


def _as_unknown_vr(ds: Dataset) -> Dataset:
    """A copy whose private elements hold their encoded bytes with VR UN, as pydicom
    leaves private elements it has no dictionary entry for."""
    out = copy.deepcopy(ds)
    for element in list(out):
        tag = int(element.tag)
        if not (tag >> 16) % 2 or (tag & 0xFF00) == 0 or element.VR == "SQ":
            continue
        value = element.value
        if element.VR in ("FL", "FD", "SS", "US", "SL", "UL"):
            code = {"FL": "f", "FD": "d", "SS": "h", "US": "H", "SL": "i", "UL": "I"}
            values = list(value) if element.VM > 1 else [value]
            raw = struct.pack(f"<{len(values)}{code[element.VR]}", *values)
        elif isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
        else:
            raw = "\\".join(map(str, value)).encode() if element.VM > 1 else str(value).encode()
        out.add_new(tag, "UN", raw)
    return out


@pytest.mark.parametrize("key", ["stc-ge-triggertime", "stc-ge-rtiaold", "pyneal-ge"])
def test_ge_private_elements_read_as_raw_bytes(key):
    fv = first_volume(key)
    raw = {k: _as_unknown_vr(ds) for k, ds in fv.volume.items()}
    for group, creator, offset in ((0x0021, "GEMS_RELA_01", 0x4F), (0x0021, "GEMS_RELA_01", 0x5E),
                                   (0x0019, "GEMS_ACQU_01", 0x9C), (0x0043, "GEMS_PARM_01", 0x2A)):
        assert isinstance(private_value(raw[0], group, creator, offset), bytes)
    expected, got = _facts(key), vendor.acquisition_facts(raw, fv.n_slices)
    np.testing.assert_allclose(got.slice_times_s, expected.slice_times_s)
    assert (got.tr_s, got.multiband_factor, got.phase_encoding_direction) \
        == (expected.tr_s, expected.multiband_factor, expected.phase_encoding_direction)
    assert vendor.slices_per_volume(raw[0]) == fv.n_slices
    if key != "pyneal-ge":  # its first-volume RTIA timers are bogus (see above)
        np.testing.assert_allclose(
            vendor.slice_times_s(_without_protocol_block(raw), fv.n_slices),
            expected.slice_times_s, atol=SLICE_TOL_S)


# -- facade-level cases -----------------------------------------------------------------


def test_ge_slices_per_volume_when_images_count_the_whole_run():
    header = first_volume("stc-ge-triggertime").header
    assert int(header.ImagesInAcquisition) == 128
    assert vendor.slices_per_volume(header) == 8


def test_philips_dynamic_scans_announce_the_run_length():
    ds = Dataset()
    ds.Manufacturer = "Philips Medical Systems"
    ds.add_new(0x20010010, "LO", "Philips Imaging DD 001")
    ds.add_new(0x20011081, "IS", "200")
    assert vendor.n_expected(ds) == 200
    ds.NumberOfTemporalPositions = 200
    assert vendor.n_expected(ds) == 200


def _classic(times: list[str]) -> dict[int, Dataset]:
    slices = {}
    for k, value in enumerate(times):
        ds = Dataset()
        ds.Manufacturer = "SIEMENS"
        ds.RepetitionTime = "1000"
        ds.AcquisitionTime = value
        slices[k] = ds
    return slices


def test_siemens_single_slices_take_their_acquisition_times():
    slices = _classic(["120000.500", "120000.000", "120000.750", "120000.250"])
    np.testing.assert_allclose(vendor.slice_times_s(slices), [0.5, 0.0, 0.75, 0.25])
    assert vendor.multiband_factor(slices) == 1


def test_siemens_single_slices_longer_than_the_tr(caplog):
    slices = _classic(["120000.000", "120000.500", "120001.000", "120001.500"])
    caplog.set_level(logging.WARNING)
    assert vendor.slice_times_s(slices) is None
    (message,) = _warnings(caplog)
    assert "AcquisitionTime (0008,0032)" in message
