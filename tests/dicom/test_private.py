"""Private elements found by their creator, and their values decoded from raw bytes (as
pydicom leaves elements whose VR it does not know)."""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtsc.dicom.private import number, private_item, private_value, text


def _two_blocks() -> Dataset:
    ds = Dataset()
    ds.add_new(0x00430010, "LO", "OTHER_VENDOR")
    ds.add_new(0x0043107C, "FL", 9.0)
    ds.add_new(0x00430011, "LO", "GEMS_PARM_01 ")
    ds.add_new(0x0043117C, "UN", struct.pack("<f", 0.25))
    return ds


def test_the_block_is_found_by_its_creator():
    ds = _two_blocks()
    assert private_value(ds, 0x0043, "gems_parm_01", 0x7C) == struct.pack("<f", 0.25)
    assert private_value(ds, 0x0043, "OTHER_VENDOR", 0x7C) == 9.0
    assert private_value(ds, 0x0043, "GEMS_PARM_01", 0x7D) is None
    assert private_value(ds, 0x0043, "GEMS_ACQU_01", 0x7C) is None
    assert private_value(None, 0x0043, "GEMS_PARM_01", 0x7C) is None


def test_numbers_from_raw_bytes_and_text():
    assert number(struct.pack("<f", 0.25), binary="f") == 0.25
    assert number(struct.pack("<h", -3), binary="h") == -3.0
    assert number(b"4.314800 ") == 4.3148  # a DS as received, padded
    assert number(b"2\\4\\19") == 2.0  # first value of a multi-valued LO
    assert number(["7", "8"]) == 7.0
    assert number("nan") is None and number("x") is None and number(None) is None
    assert number(struct.pack("<f", 0.25)) is None  # binary bytes are not text


def test_text_of_any_value():
    assert text(b"GEMS_PARM_01\0") == "GEMS_PARM_01"
    assert text(["27", "LX", "MR Software release:DV26.0"]) == r"27\LX\MR Software release:DV26.0"
    assert text(None) == ""


def test_first_item_of_a_private_sequence():
    ds = Dataset()
    inner = Dataset()
    inner.add_new(0x00211104, "DS", "4.58")
    ds.add_new(0x00210011, "LO", "SIEMENS MR SDI 02")
    ds.add_new(0x002111FE, "SQ", Sequence([inner]))
    assert private_item(ds, 0x0021, "SIEMENS MR SDI 02", 0xFE) is inner
    ds.add_new(0x002111FD, "UN", b"\x01\x02")
    assert private_item(ds, 0x0021, "SIEMENS MR SDI 02", 0xFD) is None
