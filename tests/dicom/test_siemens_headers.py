"""Siemens protocol text and timing rules (:mod:`rtsc.dicom.siemens`) on their own.

The rules against dcm2niix on the real Siemens series are in ``test_vendor_meta.py``; here
the pieces: ASCCONV parsing, the VB12/VB13 slice orders worked by hand, XA's private
elements, single-slice acquisition times.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from rtsc.dicom import siemens
from scanner_corpus import BY_KEY
from simulator.siemens_csa import encode_csa2


def with_protocol(ascconv: str, ds: Dataset | None = None) -> Dataset:
    """``ds`` (default: a new dataset) with a CSA series header whose protocol text has
    ``ascconv`` as its ASCCONV section."""
    ds = copy.deepcopy(ds) if ds is not None else Dataset()
    blob = encode_csa2([("MrPhoenixProtocol", "UN",
                         [f"### ASCCONV BEGIN ###\n{ascconv}\n### ASCCONV END ###"])])
    blocks = [int(t) & 0xFF for t in ds.keys() if 0x00290010 <= int(t) <= 0x002900FF
              and str(ds[t].value).strip() == "SIEMENS CSA HEADER"]
    if not blocks:
        ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
        blocks = [0x10]
    ds.add_new(0x00290000 | (blocks[0] << 8) | 0x20, "OB", blob)
    return ds


def _first_header(key: str) -> Dataset:
    return pydicom.dcmread(BY_KEY[key].files()[0], stop_before_pixels=True)


def test_ascconv_parsing():
    entries = siemens.parse_ascconv(
        "junk lRepetitions = 9\n### ASCCONV BEGIN object=x ###\n"
        "lRepetitions\t = \t21\nsSliceArray.ucMode = 0x4\n"
        'tProtocolName = ""rest""\nalTR[0] = 1300000\nalTR[0] = 1500000\n'
        "### ASCCONV END ###\nlRepetitions = 7")
    assert entries["lRepetitions"] == "21" and entries["tProtocolName"] == "rest"
    assert siemens.protocol_int(entries, "sSliceArray.ucMode") == 4
    assert siemens.protocol_int(entries, "lDelayTimeInTR") == 0  # default, left out
    assert entries["alTR[0]"] is None  # written twice, differently


def test_protocols_of_the_corpus():
    # VB12: MrProtocol, hexadecimal slice mode; E11: MrPhoenixProtocol, whose XProtocol
    # part outside the ASCCONV section names lRepetitions too; XA10: private, shared group.
    old = siemens.protocol(_first_header("stc-siemens-b12"))
    assert old["sSliceArray.ucMode"] == "0x1" and old["lDelayTimeInTR"] == "10000"
    assert siemens.repetitions(_first_header("stc-siemens-e11-mb")) == 22
    assert siemens.repetitions(_first_header("stc-siemens-xa10-mb")) == 450
    assert siemens.protocol(Dataset()) is None and siemens.repetitions(Dataset()) is None


def test_repetitions_not_a_number(caplog):
    caplog.set_level(logging.WARNING)
    assert siemens.repetitions(with_protocol("lRepetitions = abc")) is None
    assert siemens.repetitions(with_protocol("lTotalScanTimeSec = 5")) == 1  # 0: left out
    (message,) = [r.getMessage() for r in caplog.records]
    assert "lRepetitions" in message


@pytest.mark.parametrize("n, mode, expected", [
    (4, 1, [0, 1, 2, 3]), (4, 2, [3, 2, 1, 0]),
    (4, 4, [2, 0, 3, 1]), (5, 4, [0, 3, 1, 4, 2]),
])
def test_protocol_slice_order(n, mode, expected):
    # Siemens interleaves from the second slice when the count is even.
    ds = with_protocol(f"sSliceArray.ucMode = {mode:#x}\nlDelayTimeInTR = 200000")
    times = siemens.protocol_slice_times_s(ds, n, 1.0, 0)
    np.testing.assert_allclose(times, np.array(expected) * 0.8 / n)  # (TR - delay) / n
    np.testing.assert_allclose(siemens.protocol_slice_times_s(ds, n, 1.0, n - 1),
                               times[::-1])  # reversed slice numbering


def test_protocol_slice_order_unknown(caplog):
    caplog.set_level(logging.WARNING)
    assert siemens.protocol_slice_times_s(with_protocol("sSliceArray.ucMode = 0x8"),
                                          4, 1.0, 0) is None
    assert siemens.protocol_slice_times_s(with_protocol("sSliceArray.ucMode = 0x1"),
                                          4, 1.0, 2) is None
    assert siemens.protocol_slice_times_s(
        with_protocol("sSliceArray.ucMode = 0x1\nlDelayTimeInTR = 1000000"), 4, 1.0, 0) is None
    assert len(caplog.records) == 2  # the odd numbering and the delay filling the TR


def test_xa_private_elements():
    header = _first_header("stc-siemens-xa10-mb")
    assert siemens.phase_positive(header) is True
    assert siemens.declared_multiband(header) is None


def test_xa_frame_times_are_exact():
    # Frame date-times to the microsecond; the first volume's TimeAfterStart (0, 0.065,
    # 0.13... single-band-like) is not used.
    header = pydicom.dcmread(BY_KEY["stc-siemens-xa10-mb"].path / "6_1.dcm",
                             stop_before_pixels=True)
    times = siemens.frame_times_s(header, list(range(6)))  # file order
    np.testing.assert_allclose(times, [0.16, 0.0, 0.32, 0.16, 0.0, 0.32], atol=1e-9)


def test_declared_multiband_from_pat_text():
    ds = Dataset()
    ds.add_new(0x00510010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x00511011, "LO", "p2s4")
    assert siemens.declared_multiband(ds) == 4
    ds[0x00511011].value = "p2"
    assert siemens.declared_multiband(ds) is None


def test_simultaneous_slices():
    assert siemens.simultaneous_slices(np.array([0.4, 0.0, 0.2, 0.0004, 0.6])) == 2
    assert siemens.simultaneous_slices(np.array([0.49, 0.0, 0.54])) == 1


def _slices(times: list[str]) -> dict[int, Dataset]:
    out = {}
    for k, value in enumerate(times):
        ds = Dataset()
        ds.AcquisitionTime = value
        out[k] = ds
    return out


def test_single_slices_take_their_acquisition_times():
    slices = _slices(["120000.500", "120000.000", "120000.750", "120000.250"])
    np.testing.assert_allclose(siemens.classic_slice_times_s(slices, 4),
                               [0.5, 0.0, 0.75, 0.25])
    across_midnight = _slices(["235959.750", "000000.250", "235959.500", "000000.000"])
    np.testing.assert_allclose(siemens.classic_slice_times_s(across_midnight, 4),
                               [0.25, 0.75, 0.0, 0.5])
    assert siemens.classic_slice_times_s(dict(list(slices.items())[:3]), 4) is None


def test_times_longer_than_the_tr(caplog):
    caplog.set_level(logging.WARNING)
    times = np.array([0.0, 0.5, 1.0])
    assert siemens.checked(times, 1.0, "X (0000,0000)") is times
    assert siemens.checked(times, 0.9, "X (0000,0000)") is None
    (record,) = caplog.records
    assert "X (0000,0000)" in record.getMessage()
