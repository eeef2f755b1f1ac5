"""GE's private headers and slice-time rules (:mod:`rtsc.dicom.ge`) on their own.

The rules against dcm2niix on the real GE series are in ``test_vendor_meta.py``; here the
pieces: the protocol block and polarity of the corpus files, GE's (HyperBand) slice order
worked by hand, the software release, the RTIA units, the delays added to the TR, and
the multiband sources.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from rtsc.dicom import ge
from scanner_corpus import BY_KEY


def _first_header(key: str) -> Dataset:
    return pydicom.dcmread(BY_KEY[key].files()[0], stop_before_pixels=True)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_protocol_block_of_the_corpus():
    block = ge.protocol_data_block(_first_header("stc-ge-rtia"))
    assert block["SLICEORDER"] == "1" and block["NOSLC"] == "8" and block["TR"] == "1500.0"
    assert block["IOPT"] == "SqP, EPI, FMRI"
    sequential = ge.protocol_data_block(_first_header("nih-ge-5"))
    assert sequential["SLICEORDER"] == "0" and sequential["NOSLC"] == "15"
    assert ge.protocol_data_block(Dataset()) is None


def test_phase_polarity_of_the_corpus():
    # DV26 user data (version 26.002) unflipped; DV24 and 14.0 flipped by their
    # bottom-up k-space traversal. dcm2niix's Refs say the same (PhaseEncodingPolarityGE).
    assert ge.phase_polarity_flipped(_first_header("nih-ge-4")) is False
    for key in ("stc-ge-rtia", "stc-ge-rtiaold", "pyneal-ge"):
        assert ge.phase_polarity_flipped(_first_header(key)) is True
    ds = copy.deepcopy(_first_header("nih-ge-4"))
    ds.add_new((0x0018, 0x9034), "CS", "LINEAR")  # RX27 on: the public element decides
    assert ge.phase_polarity_flipped(ds) is True
    ds[0x00189034].value = "REVERSE_LINEAR"
    assert ge.phase_polarity_flipped(ds) is False
    assert ge.phase_polarity_flipped(Dataset()) is None


def test_sequence_kinds_of_the_corpus():
    for key in ("nih-ge-4", "stc-ge-rtia", "stc-ge-rtiaold", "pyneal-ge"):
        ds = _first_header(key)
        assert ge.sequence_kind(ds, ge.protocol_data_block(ds)) == "epiRT", key
    ds = _first_header("stc-ge-triggertime")
    assert ge.sequence_kind(ds, ge.protocol_data_block(ds)) == "epi"


def test_planned_times_single_band():
    np.testing.assert_allclose(ge.planned_slice_times_s(5, 1.0, True, 1, 26.0, False),
                               [0.0, 0.6, 0.2, 0.8, 0.4])
    np.testing.assert_allclose(ge.planned_slice_times_s(4, 1.0, True, 1, 26.0, False),
                               [0.0, 0.5, 0.25, 0.75])
    np.testing.assert_allclose(ge.planned_slice_times_s(4, 1.0, False, 1, 26.0, False),
                               [0.0, 0.25, 0.5, 0.75])


def test_planned_times_hyperband():
    # 12 slices, HyperBand 3: 4 excitations. Before 27.0 R03 an even count gets a dummy
    # excitation (5 slots; slices p and p + 5 go together); from R03 on the slots of the
    # last and third-to-last excitations swap (interleaved 0, 2, 1, 3 -> 0, 3, 1, 2).
    old = ge.planned_slice_times_s(12, 1.0, True, 3, 26.0, False)
    np.testing.assert_allclose(old[:5], [0.0, 0.6, 0.2, 0.8, 0.4])
    np.testing.assert_allclose(old[5:10], old[:5])
    np.testing.assert_allclose(old[10:], old[:2])
    new = ge.planned_slice_times_s(12, 1.0, True, 3, 27.0, True)
    np.testing.assert_allclose(new[:4], [0.0, 0.75, 0.25, 0.5])
    np.testing.assert_allclose(new[4:8], new[:4])
    np.testing.assert_allclose(new[8:], new[:4])
    sequential = ge.planned_slice_times_s(6, 0.9, False, 2, 27.0, True)
    np.testing.assert_allclose(sequential, [0.0, 0.3, 0.6, 0.0, 0.3, 0.6])
    assert ge.planned_slice_times_s(12, 1.0, True, 3, 25.0, False) is None


def test_software_release():
    def release(text):
        ds = Dataset()
        ds.SoftwareVersions = text
        return ge.software_release(ds)

    assert release(r"27\LX\MR Software release:DV26.0_R01_1725.a") == (26.0, False)
    assert release(r"27\LX\MR Software release:RX27.0_R02_1831.a") == (27.0, False)
    assert release(r"27\LX\MR Software release:RX27.0_R03_1831.a") == (27.0, True)
    assert release(r"28\LX\MR29.1_EA_2039.g") == (pytest.approx(29.1), True)
    assert release(r"30\LX\SIGNA_LX1.MR30.0_R01_2236.d") == (30.0, True)
    assert release(r"14\LX\MR Software release:14.0_M4_0629.a") == (14.0, False)
    assert release("unknown") is None


def test_rtia_units():
    seconds = np.array([0.0023, 0.7523, 0.1898, 0.9398])  # DV24
    np.testing.assert_allclose(ge.rtia_slice_times_s(seconds, 1.5), seconds - 0.0023)
    tenth_ms = np.array([19.0, 3570.0, 7121.0, 10673.0])  # 14.0
    np.testing.assert_allclose(ge.rtia_slice_times_s(tenth_ms, 1.4), (tenth_ms - 19) / 1e4)
    # pyneal's bogus first volume: mostly zeros
    assert ge.rtia_slice_times_s(np.array([0.0023, 0.0, 0.0, 0.0, 0.2245, 0.7245]), 1.0) is None
    assert ge.rtia_slice_times_s(np.zeros(4), 1.0) is None


def test_multiphase_delay_adds_to_the_tr():
    ds = Dataset()
    ds.RepetitionTime = "1500"
    block = {"IOPT": "MPh, EPI", "DELACQ": "500", "DELACQNOAV": "0.5"}
    assert ge.sequence_kind(ds, block) == "epi"
    assert ge.repetition_time_ms(ds, block) == 2000.0  # DELACQNOAV is in s
    assert ge.repetition_time_ms(ds, {**block, "DELACQ": "Minimum"}) == 1500.0
    variable = {**block, "IOPT": "MPh, MPhVar, EPI"}
    assert ge.protocol_delay_ms(variable) is None
    assert ge.repetition_time_ms(ds, variable) == 1500.0


def test_epirt_group_delay_adds_to_the_tr():
    ds = Dataset()
    ds.RepetitionTime = "2000"
    ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
    ds.add_new(0x0043107C, "FL", 0.25)  # s
    assert ge.group_delay_ms(ds) == 250.0
    assert ge.sequence_kind(ds, None) == "epiRT"
    assert ge.repetition_time_ms(ds, None) == 2250.0


def _with_multiband(text: str) -> Dataset:
    ds = Dataset()
    ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
    ds.add_new(0x004310B6, "LO", text)
    return ds


def test_multiband_sources(caplog):
    assert ge.multiband_factor(_with_multiband(r"3\4\19"), {"MBACCEL": "3"}) == 3
    assert ge.multiband_factor(_with_multiband(r"3\4\19"), {}) == 3
    assert ge.multiband_factor(_with_multiband(r"0\0\0"), None) == 1
    assert ge.multiband_factor(Dataset(), {"SLICEORDER": "1"}) == 1
    assert ge.multiband_factor(Dataset(), None) is None
    caplog.set_level(logging.WARNING)
    assert ge.multiband_factor(_with_multiband(r"2\4\19"), {"MBACCEL": "3"}) is None
    (message,) = _warnings(caplog)
    assert "(0043,10B6)" in message and "MBACCEL" in message


def test_instance_order():
    def slices(numbers):
        out = {}
        for k, n in enumerate(numbers):
            ds = Dataset()
            ds.InstanceNumber = n
            out[k] = ds
        return out

    assert ge.instance_order_ascending(slices([1, 2, 3])) is True
    assert ge.instance_order_ascending(slices([18, 17, 16])) is False
    assert ge.instance_order_ascending(slices([5])) is None
    assert ge.instance_order_ascending(slices([1, 3, 2])) is None
