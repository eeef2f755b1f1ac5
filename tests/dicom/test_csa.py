"""The CSA reader's compiled walk (wanted fields only) against its Python walk (all
fields), on a real Siemens header (heudiconv's axasc35.dcm, TrioTim), simulator headers
and damaged copies of both; and against nibabel's CSA reader."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

with warnings.catch_warnings():  # "The DICOM readers are highly experimental"
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

from real_data import AXASC35, fetch
from scanner_corpus import BY_KEY
from rtsc.dicom.csa import csa_series_header, read_csa
from rtsc.errors import DicomError
from simulator.siemens_csa import encode_csa2


@pytest.fixture(scope="module")
def real_blobs() -> list[bytes]:
    ds = pydicom.dcmread(fetch(AXASC35))
    return [bytes(ds[0x00291010].value), bytes(ds[0x00291020].value)]  # image, series


def _outcome(blob: bytes, names: list[str] | None) -> dict | str:
    try:
        return read_csa(blob, names)
    except DicomError:
        return "DicomError"


def test_wanted_fields_equal_the_full_walk_on_a_real_header(real_blobs):
    image, series = real_blobs
    full = read_csa(image)
    assert len(full) > 80  # a real image header: ~100 fields
    names = ["NumberOfImagesInMosaic", "SliceNormalVector", "MosaicRefAcqTimes",
             "BandwidthPerPixelPhaseEncode", "NoSuchField"]
    wanted = read_csa(image, names)
    assert wanted == {n: full[n] for n in names if n in full}
    assert wanted["NumberOfImagesInMosaic"] == [35] and len(wanted["MosaicRefAcqTimes"]) == 35
    # every field, asked for by name, is what the full walk found (series header too)
    for blob in (image, series):
        every = read_csa(blob)
        assert read_csa(blob, list(every)) == every


def test_values_equal_nibabel(real_blobs):
    image, _ = real_blobs
    theirs = csareader.read(image)["tags"]
    ours = read_csa(image, ["MosaicRefAcqTimes", "SliceNormalVector", "NumberOfImagesInMosaic"])
    for name, values in ours.items():
        reference = [v for v in theirs[name]["items"] if v != ""]
        np.testing.assert_allclose(np.asarray(values, float), np.asarray(reference, float))


def test_a_repeated_field_keeps_the_last_as_the_full_walk():
    blob = encode_csa2([("EchoTime", "DS", ["30"]), ("Other", "IS", ["1"]),
                        ("EchoTime", "DS", ["31"])])
    assert read_csa(blob)["EchoTime"] == [31.0]
    assert read_csa(blob, ["EchoTime"]) == {"EchoTime": [31.0]}


def test_a_name_inside_an_item_value_is_not_taken_for_a_field():
    blob = encode_csa2([("Comment", "LO", ["SliceNormalVector\0"]),
                        ("SliceNormalVector", "FD", ["0", "0", "1"])])
    assert read_csa(blob, ["SliceNormalVector"]) == {"SliceNormalVector": [0.0, 0.0, 1.0]}
    only_text = encode_csa2([("Comment", "LO", ["SliceNormalVector\0"])])
    assert read_csa(only_text, ["SliceNormalVector"]) == {}


def test_damaged_headers_fail_or_read_alike(real_blobs):
    """Truncations and overwritten bytes: both walks raise DicomError, or both read the
    same values (damage inside a value the walk does not check)."""
    rng = np.random.default_rng(5)
    image, _ = real_blobs
    names = ["NumberOfImagesInMosaic", "SliceNormalVector", "MosaicRefAcqTimes"]
    cases = [image[:n] for n in (0, 4, 12, 20, 100, 1000, len(image) // 2, len(image) - 3)]
    for _ in range(60):
        damaged = bytearray(image)
        at = int(rng.integers(0, len(image) - 4))
        damaged[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        cases.append(bytes(damaged))
    failures = 0
    for blob in cases:
        full = _outcome(blob, None)
        wanted = _outcome(blob, names)
        if full == "DicomError":
            failures += 1
            assert wanted == "DicomError"
        else:
            assert wanted == {n: full[n] for n in names if n in full}
    assert failures >= 8  # the truncations at least


def test_series_header_holds_the_protocol_text():
    # VB12 names it MrProtocol, later versions MrPhoenixProtocol; both hold the ASCCONV.
    for key, name in (("stc-siemens-b12", "MrProtocol"),
                      ("stc-siemens-e11-mb", "MrPhoenixProtocol")):
        ds = pydicom.dcmread(BY_KEY[key].files()[0], stop_before_pixels=True)
        header = csa_series_header(ds, {name})
        assert list(header) == [name] and "### ASCCONV BEGIN" in header[name][0]
        assert csa_series_header(ds)[name] == header[name]
    assert csa_series_header(pydicom.Dataset()) is None
