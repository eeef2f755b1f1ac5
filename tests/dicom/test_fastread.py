"""rtsc.dicom.fastread against pydicom's own reader: the same raw elements (tag, VR,
length, value bytes, value position, encoding) for the simulator's series and every
real scanner file in tests/data/realdata, None (pydicom's reader then) for anything
else, and the same assembled volumes and series facts through Incoming.load."""

from __future__ import annotations

import dataclasses
import datetime
import random
import struct
import time
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rtsc.config import AssemblerConfig, config_from_dict, merge, to_dict
from rtsc.dicom import incoming as incoming_module
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.fastread import (raw_ds_numbers, raw_us, read_dataset_fast,
                                 read_file_meta)
from rtsc.dicom.incoming import Incoming
from rtsc.errors import DicomError
from rtsc.volume import Volume
from simulator.scanner import run_simulation

REALDATA = Path(__file__).parents[1] / "data" / "realdata"


def _real_files() -> list[Path]:
    return sorted(p for p in REALDATA.rglob("*") if p.is_file()
                  and p.read_bytes()[128:132] == b"DICM")


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(Part 10 header, encoded dataset) of a file, as the receiver hands them on."""
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    return data[:meta_end], data[meta_end:]


def _pydicom(raw: bytes, syntax: str) -> Dataset:
    """The reference: pydicom's reader, as Incoming.load used it before."""
    uid = pydicom.uid.UID(syntax)
    return read_dataset(BytesIO(raw), uid.is_implicit_VR, uid.is_little_endian)


def _same_dataset(ours: Dataset, ref: Dataset) -> None:
    """Same raw elements (every field of each RawDataElement, where ``ref`` has not
    converted it already), same converted elements, same encoding."""
    assert list(ours._dict) == list(ref._dict)
    for tag, element in ref._dict.items():
        if isinstance(element, RawDataElement):
            assert ours._dict[tag] == element, tag
            assert type(ours._dict[tag].value) is type(element.value), tag
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings on damaged values
        for tag in ref._dict:
            try:
                expected = ref[tag]
            except Exception as exc:  # noqa: BLE001 - then ours fails the same way
                with pytest.raises(type(exc)):
                    ours[tag]  # noqa: B018
                continue
            assert ours[tag] == expected, tag
    assert ours.original_encoding == ref.original_encoding
    assert ours.original_character_set == ref.original_character_set
    assert ours._character_set == ref._character_set


def _simulate(tmp_path: Path, fmt: str, vendor: str = "siemens", n: int = 2) -> list[Path]:
    cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": fmt, "vendor": vendor, "shape": [32, 32, 8], "n_volumes": n,
        "speed": 0.0}}))
    return list(run_simulation(cfg.simulator, out_dir=tmp_path / f"{fmt}-{vendor}").files)


SIMULATED = [("slices", "siemens"), ("mosaic", "siemens"), ("multiframe", "siemens"),
             ("slices", "philips")]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[tuple[str, str], list[Path]]:
    root = tmp_path_factory.mktemp("fastread")
    return {case: _simulate(root, *case) for case in SIMULATED}


def _check_file(path: Path) -> bool:
    """Fast reads of ``path`` (receiver split and archived file) equal pydicom's;
    True if the fast reader took it, False if it left it to pydicom."""
    data = path.read_bytes()
    header, raw = _split(data)
    ref_file = pydicom.dcmread(path)
    meta = read_file_meta(header)
    assert meta is not None and meta[1] == len(header)
    _same_dataset(meta[0], ref_file.file_meta)
    assert isinstance(meta[0], FileMetaDataset)
    syntax = str(ref_file.file_meta.TransferSyntaxUID)
    fast = read_dataset_fast(raw, syntax)
    if fast is None:
        return False
    _same_dataset(fast, _pydicom(raw, syntax))
    archived = incoming_module._read_part10(data, path)
    _same_dataset(archived, ref_file)
    _same_dataset(archived.file_meta, ref_file.file_meta)
    assert archived.preamble == ref_file.preamble
    return True


@pytest.mark.parametrize("case", SIMULATED, ids=lambda c: "-".join(c))
def test_simulated_files_read_as_pydicom_reads_them(simulated, case):
    assert all(_check_file(path) for path in simulated[case])


def test_every_real_scanner_file_reads_as_pydicom_reads_it():
    files = _real_files()
    assert len(files) > 1000
    taken = {path.relative_to(REALDATA).parts[0]: 0 for path in files}
    for path in files:
        taken[path.relative_to(REALDATA).parts[0]] += _check_file(path)
    # Each corpus (GE, Siemens mosaics and XA multi-frame, pyneal's) goes the fast way
    # at least in part: the comparison above is not only of fallbacks.
    assert all(n > 0 for n in taken.values()), taken
    assert sum(taken.values()) > 0.9 * len(files), taken


def _assemble(items: list[Incoming]) -> list:
    assembler = Assembler(AssemblerConfig())
    return [event for item in items for event in assembler.add(item)]


def _same_events(ours: list, ref: list) -> None:
    assert len(ours) == len(ref) and ours
    for a, b in zip(ours, ref):
        assert type(a) is type(b)
        if isinstance(a, Volume):
            assert a.data.dtype == b.data.dtype
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert (a.index, a.t_acquired, a.stored_dtype, a.missing_slices) == \
                (b.index, b.t_acquired, b.stored_dtype, b.missing_slices)
            np.testing.assert_equal(a.slice_times_s, b.slice_times_s)
            # Every series fact (TR, run length, slice times, multiband, phase
            # encoding, the BIDS sidecar) read by the vendor rules.
            np.testing.assert_equal(dataclasses.asdict(a.info), dataclasses.asdict(b.info))
        else:
            assert a == b


def _both_ways(files: list[Path]) -> tuple[list, list]:
    """Events of the received bytes (fast decode) and of dcmread's datasets."""
    received, read = [], []
    for path in files:
        header, raw = _split(path.read_bytes())
        received.append(Incoming(None, path, 0.0, "cstore", raw=raw, header=header))
        read.append(Incoming(pydicom.dcmread(path), path, 0.0, "cstore"))
    return _assemble(received), _assemble(read)


@pytest.mark.parametrize("case", SIMULATED, ids=lambda c: "-".join(c))
def test_simulated_series_assemble_as_with_pydicom(simulated, case):
    _same_events(*_both_ways(simulated[case]))


def _series_folders() -> list[Path]:
    return sorted({p.parent for p in _real_files()})


@pytest.mark.parametrize("folder", _series_folders(),
                         ids=lambda p: str(p.relative_to(REALDATA)))
def test_real_series_assemble_as_with_pydicom(folder):
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and p.read_bytes()[128:132] == b"DICM")
    files.sort(key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True)
                                 .get("InstanceNumber", 0) or 0))
    _same_events(*_both_ways(files))


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


BASE = (_element(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0")
        + _element(0x00100010, b"PN", b"Doe^J ")
        + _element(0x00280010, b"US", struct.pack("<H", 2)))
UNDEFINED_SQ = struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF) \
    + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) \
    + _element(0x00081150, b"UI", b"1.2\0") \
    + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
ENCAPSULATED = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) \
    + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, 4) \
    + b"\x01\x02\x03\x04" + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


@pytest.mark.parametrize("raw,why", [
    (BASE + UNDEFINED_SQ.replace(b"SQ", b"UN"), "UN of undefined length"),
    (BASE + UNDEFINED_SQ[:-8], "sequence without its delimiter"),
    (BASE + ENCAPSULATED, "encapsulated pixel data"),
    (BASE + _element(0x00100020, b"LO", b"12345678")[:-3], "truncated value"),
    (BASE + b"\x10\x00\x20", "short tail"),
    (BASE + struct.pack("<HH2sH", 0x0010, 0x0020, b"zz", 2) + b"ab", "unknown VR"),
    (struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\0", "implicit VR in explicit syntax"),
    (BASE + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + _element(0x00200011, b"IS", b"1 "),
     "item delimiter at top level"),
])
def test_unusual_encodings_are_left_to_pydicom(raw, why):
    assert read_dataset_fast(raw, ExplicitVRLittleEndian) is None, why


def test_sequences_of_undefined_length_read_as_pydicom_reads_them():
    """Explicit VR SQ, implicit VR dictionary SQ and a private one starting with an
    item: pydicom's read_sequence, the same DataElement."""
    explicit = BASE + UNDEFINED_SQ + _element(0x00200011, b"IS", b"1 ")
    _same_dataset(read_dataset_fast(explicit, ExplicitVRLittleEndian),
                  _pydicom(explicit, ExplicitVRLittleEndian))
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) \
        + struct.pack("<HHI", 0x0008, 0x1150, 4) + b"1.2\0" \
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    implicit = (struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\0"
                + struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + item
                + struct.pack("<HHI", 0x0029, 0x1010, 0xFFFFFFFF) + item
                + struct.pack("<HHI", 0x0020, 0x0011, 2) + b"1 ")
    fast = read_dataset_fast(implicit, ImplicitVRLittleEndian)
    _same_dataset(fast, _pydicom(implicit, ImplicitVRLittleEndian))
    assert fast[0x00291010].VR == "SQ" and fast.SeriesNumber == 1
    # A private element of undefined length that is not a sequence: pydicom's.
    not_items = (struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\0"
                 + struct.pack("<HHI", 0x0029, 0x1010, 0xFFFFFFFF) + b"abcd"
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    assert read_dataset_fast(not_items, ImplicitVRLittleEndian) is None


def test_an_inflated_bytearray_reads_into_bytes_values():
    """The receiver inflates a deflated dataset into a bytearray: values are bytes, as
    pydicom's reads give them (a bytearray value is unhashable in the layout caches)."""
    raw = BASE + _element(0x7FE00010, b"OW", bytes(range(8)))
    fast = read_dataset_fast(bytearray(raw), ExplicitVRLittleEndian)
    _same_dataset(fast, _pydicom(bytearray(raw), ExplicitVRLittleEndian))
    assert type(fast.get_item(0x7FE00010).value) is bytes


def test_big_endian_and_other_syntaxes_are_left_to_pydicom():
    assert read_dataset_fast(BASE, ExplicitVRBigEndian) is None
    assert read_dataset_fast(BASE, "1.2.840.10008.1.2.4.50") is None  # JPEG baseline


def test_implicit_vr_and_empty_values_read_as_pydicom_reads_them():
    implicit = (struct.pack("<HHI", 0x0008, 0x0005, 10) + b"ISO_IR 100"
                + struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\0"
                + struct.pack("<HHI", 0x0010, 0x0010, 0)
                + struct.pack("<HHI", 0x0028, 0x0010, 2) + struct.pack("<H", 64))
    _same_dataset(read_dataset_fast(implicit, ImplicitVRLittleEndian),
                  _pydicom(implicit, ImplicitVRLittleEndian))
    explicit = BASE + _element(0x00100020, b"LO", b"") + _element(0x00181310, b"US", b"") \
        + _element(0x7FE00010, b"OW", b"")
    _same_dataset(read_dataset_fast(explicit, ExplicitVRLittleEndian),
                  _pydicom(explicit, ExplicitVRLittleEndian))
    assert read_dataset_fast(b"", ExplicitVRLittleEndian) is not None
    _same_dataset(read_dataset_fast(b"", ExplicitVRLittleEndian),
                  _pydicom(b"", ExplicitVRLittleEndian))


def test_file_meta_stops_at_the_group_end_and_refuses_what_is_not_part10():
    data = _real_files()[0].read_bytes()
    header, _ = _split(data)
    meta, end = read_file_meta(data)
    assert end == len(header)
    assert read_file_meta(data[:128] + b"DICX" + data[132:]) is None
    assert read_file_meta(b"\0" * 100) is None


def test_damaged_bytes_read_as_pydicom_reads_them_or_are_left_to_it():
    """Random truncations and byte flips of a real GE slice and Siemens mosaic: the fast
    reader either gives pydicom's raw elements or leaves the bytes to pydicom."""
    rng = random.Random(18)
    files = [next(p for p in _real_files() if "GE" in str(p)),
             next(p for p in _real_files() if "Si" in str(p))]
    taken = fell_back = 0
    for path in files:
        header, raw = _split(path.read_bytes())
        syntax = str(read_file_meta(header)[0].TransferSyntaxUID)
        for _ in range(150):
            damaged = bytearray(raw[:rng.randrange(len(raw) + 1)])
            for _ in range(rng.randrange(3)):
                if damaged:
                    damaged[rng.randrange(min(len(damaged), 4000))] = rng.randrange(256)
            damaged = bytes(damaged)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # on a damaged character set, as pydicom
                fast = read_dataset_fast(damaged, syntax)
            if fast is None:
                fell_back += 1
                continue
            taken += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _same_dataset(fast, _pydicom(damaged, syntax))
    assert taken > 0 and fell_back > 0


def test_incoming_load_falls_back_to_pydicom_with_the_same_errors():
    """A dataset the fast reader leaves alone loads through pydicom as before; one that
    pydicom cannot read fails with the same DicomError as before."""
    path = _real_files()[0]
    header, raw = _split(path.read_bytes())
    syntax = str(read_file_meta(header)[0].TransferSyntaxUID)
    for unusual in (BASE + ENCAPSULATED, BASE + UNDEFINED_SQ.replace(b"SQ", b"UN")):
        assert read_dataset_fast(unusual, ExplicitVRLittleEndian) is None
        loaded = Incoming(None, path, time.time(), "cstore", raw=unusual,
                          header=header).load()
        _same_dataset(loaded, _pydicom(unusual, syntax))
    with pytest.raises(DicomError, match="cannot decode dataset"):
        Incoming(None, path, 0.0, "cstore", raw=BASE + UNDEFINED_SQ[:-8],
                 header=header).load()
    with pytest.raises(DicomError, match="no file meta information"):
        Incoming(None, path, 0.0, "cstore", raw=raw, header=b"\0" * 132).load()
    # A header whose meta group does not end where the header does: dcmread decides.
    meta = Incoming(None, path, 0.0, "cstore", raw=raw, header=header + b"\0" * 8).load()
    assert str(meta.file_meta.TransferSyntaxUID) == syntax


# DS and US elements the worker reads for every image, and some it does not, whose
# received bytes hold other shapes of value (one number, many, empty).
DS_TAGS = [(0x00200037, 6), (0x00200032, 3), (0x00280030, 2), (0x00180050, 1),
           (0x00180088, 1), (0x00281052, 1), (0x00281053, 1), (0x00200037, 3)]
US_TAGS = [0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103, 0x00280002,
           0x00280102, 0x00180091]


def _check_numbers(ds: Dataset) -> int:
    """raw_ds_numbers and raw_us on ``ds`` equal pydicom's values wherever they answer;
    the number of answers."""
    answered = 0
    for tag, n in DS_TAGS:
        got = raw_ds_numbers(ds, tag, n)
        if got is not None:
            value = ds[tag].value
            expected = [float(v) for v in (value if n > 1 else [value])]
            assert got == expected and len(got) == n, (tag, got, expected)
            answered += 1
    for tag in US_TAGS:
        got = raw_us(ds, tag)
        if got is not None:
            assert type(got) is int and got == ds[tag].value, tag
            answered += 1
    # Once pydicom converted them, the raw readers leave them to pydicom.
    assert all(raw_ds_numbers(ds, tag, n) is None for tag, n in DS_TAGS)
    assert all(raw_us(ds, tag) is None for tag in US_TAGS)
    return answered


def test_raw_numbers_equal_pydicom_values_on_every_file(simulated):
    answered = 0
    files = [p for case in SIMULATED for p in simulated[case]] + _real_files()
    for path in files:
        header, raw = _split(path.read_bytes())
        syntax = str(read_file_meta(header)[0].TransferSyntaxUID)
        ds = read_dataset_fast(raw, syntax)
        if ds is not None:
            answered += _check_numbers(ds)
    assert answered > 8 * len(files)


@pytest.mark.parametrize("value", [b"1\\0\\0\\0\\1\\0 ", b"1\\0\\0\\0\\1", b"nan\\0\\0\\0\\1\\0",
                                   b"1\\0\\\\0\\1\\0", b"1\\0\\0\\0\\1\\x\\",
                                   b"\xe91\\0\\0\\0\\1\\0",
                                   b"1e400\\0\\0\\0\\1\\0", b" 1 \\ 0\\0\\0\\1\\0\0", b""])
def test_raw_ds_numbers_answer_only_what_pydicom_reads_as_numbers(value):
    ds = read_dataset_fast(BASE + _element(0x00200037, b"DS", value + b" " * (len(value) % 2)),
                           ExplicitVRLittleEndian)
    got = raw_ds_numbers(ds, 0x00200037, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = [float(v) for v in ds.ImageOrientationPatient]
        except (TypeError, ValueError):
            expected = None
    if got is not None:
        assert got == expected
    else:
        assert expected is None or len(expected) != 6 or not all(map(np.isfinite, expected))


def test_raw_us_leaves_other_vrs_and_lengths_to_pydicom():
    for element in (_element(0x00280010, b"SS", b"\xff\xff"),
                    _element(0x00280010, b"US", b"\x40\x00\x40\x00"),
                    _element(0x00280010, b"US", b"")):
        ds = read_dataset_fast(BASE[:-10] + element, ExplicitVRLittleEndian)
        assert raw_us(ds, 0x00280010) is None
    ds = read_dataset_fast(BASE, ExplicitVRLittleEndian)
    assert raw_us(ds, 0x00280010) == 2 == ds.Rows


@pytest.mark.parametrize("date,tod", [("20261204", "101500.25"), ("20260329", "023000"),
                                      ("20261025", "023000.5"), ("19991231", "235959.999999"),
                                      ("2026120x", "101500"), ("20260230", "000000")])
def test_parse_datetime_with_the_kept_midnight_equals_mktime(date, tod):
    from rtsc.dicom.geometry import _parse_datetime
    try:
        day = datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:8]))
        whole, _, frac = tod.partition(".")
        expected = time.mktime(day.timetuple()) + int(whole[:2]) * 3600 \
            + int(whole[2:4]) * 60 + int(whole[4:6]) + (float("0." + frac) if frac else 0.0)
    except ValueError:
        expected = None
    for _ in range(2):  # computed, then kept
        assert _parse_datetime(date, tod) == expected


def test_undefined_length_per_frame_groups_are_kept_raw_and_convert_as_pydicom_reads():
    """Siemens XA writes PerFrameFunctionalGroupsSequence with undefined length: kept as
    received (no delimiter), it converts to pydicom's sequence, item for item, and the
    functional groups walker reads it."""
    from rtsc.dicom.frame_groups import per_frame_groups
    path = next(p for p in _real_files() if "XA10" in str(p))
    header, raw = _split(path.read_bytes())
    syntax = str(read_file_meta(header)[0].TransferSyntaxUID)
    fast = read_dataset_fast(raw, syntax)
    element = fast.get_item(0x52009230)
    assert isinstance(element, RawDataElement) and element.length == 0xFFFFFFFF
    assert isinstance(per_frame_groups(fast), list)
    ref = _pydicom(raw, syntax)
    assert fast[0x52009230] == ref[0x52009230]
    assert fast[0x52009230].is_undefined_length
    assert len(fast.PerFrameFunctionalGroupsSequence) > 1
    # Its delimiter gone (the file cut just before it): pydicom's reader decides.
    at = raw.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", element.value_tell + len(element.value))
    assert at == element.value_tell + len(element.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = read_dataset_fast(raw[:at], syntax)
    assert cut is None or cut.get_item(0x52009230).__class__ is not RawDataElement
