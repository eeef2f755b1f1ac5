"""Property test: the assembler given malformed datasets never crashes or hangs, and
answers each with either a sound volume or a clear alert."""

from __future__ import annotations

import copy
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices
from simulator.phantom import Grid

# pydicom warns about each invalid value the fuzzer writes: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

SHAPE = (16, 16, 6)
_rng = np.random.default_rng(7)
_DATA = _rng.integers(0, 1000, size=SHAPE).astype(np.int16)
_INFO = new_series_info(3, 2.0, n_volumes=4)
_AFFINE = Grid(SHAPE, (3.0, 3.0, 4.0)).affine()
MOSAIC = volume_to_mosaic(_DATA, _AFFINE, _INFO, 0)
SLICES = volume_to_slices(_DATA, _AFFINE, _INFO, 0)

TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelData",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "SpacingBetweenSlices", "SeriesInstanceUID", "SOPClassUID", "ImageType",
        "InstanceNumber", "AcquisitionNumber", "TemporalPositionIdentifier",
        "RepetitionTime", "RescaleSlope", "RescaleIntercept", "SamplesPerPixel",
        "ImagesInAcquisition", "NumberOfTemporalPositions", "AcquisitionTime"]
NUMBERS = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")),
                    st.just(0.0), st.just(-1.0), st.just(1e308), st.just(1e-308),
                    st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.integers(-5, 70000), st.just(2**31 - 1), st.just(-2**31))
STRINGS = st.one_of(st.text(max_size=20), st.just("nan"), st.just("abc"), st.just(""),
                    st.just("1\\2\\3"), st.just("-0"))


def _numeric_string(x: float) -> str:
    return repr(x) if math.isfinite(x) else str(x)


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["delete", "int", "geometry", "pixel_repr", "truncate",
                                 "csa", "string", "dims", "raw_bytes"]))
    if kind == "delete":
        return kind, draw(st.lists(st.sampled_from(TAGS), min_size=1, max_size=4, unique=True))
    if kind == "int":
        return kind, (draw(st.sampled_from(["Rows", "Columns", "BitsAllocated",
                                            "PixelRepresentation", "SamplesPerPixel",
                                            "InstanceNumber", "AcquisitionNumber",
                                            "ImagesInAcquisition"])), draw(INTS))
    if kind == "geometry":
        keyword, n = draw(st.sampled_from([("ImageOrientationPatient", 6),
                                           ("ImagePositionPatient", 3), ("PixelSpacing", 2),
                                           ("SliceThickness", 1), ("SpacingBetweenSlices", 1),
                                           ("RescaleSlope", 1), ("RescaleIntercept", 1),
                                           ("RepetitionTime", 1)]))
        count = draw(st.sampled_from([n, n, 0, 1, n + 1]))
        return kind, (keyword, [draw(NUMBERS) for _ in range(count)])
    if kind == "pixel_repr":
        return kind, (draw(st.sampled_from([0, 1, 2, 255])), draw(st.sampled_from([1, 8, 12, 16,
                                                                                   32, 64])))
    if kind == "truncate":
        return kind, draw(st.integers(0, 2 * int(np.prod(SHAPE)) - 1))
    if kind == "csa":
        return kind, (draw(st.integers(0, 4000)), draw(st.binary(max_size=64)))
    if kind == "string":
        return kind, (draw(st.sampled_from(TAGS[5:])), draw(STRINGS))
    if kind == "dims":
        return kind, (draw(st.integers(1, 65535)), draw(st.integers(1, 65535)))
    return kind, (draw(st.integers(0, 10**6)), draw(st.binary(min_size=1, max_size=16)))


def _apply(ds, mutation):
    kind, arg = mutation
    if kind == "delete":
        for keyword in arg:
            if keyword in ds:
                delattr(ds, keyword)
    elif kind == "int":
        keyword, value = arg
        setattr(ds, keyword, value if keyword not in ("Rows", "Columns", "BitsAllocated",
                                                      "PixelRepresentation", "SamplesPerPixel")
                else value % 65536)
    elif kind == "geometry":
        keyword, values = arg
        text = [_numeric_string(v)[:16] for v in values]
        setattr(ds, keyword, text if len(text) != 1 else text[0])
    elif kind == "pixel_repr":
        ds.PixelRepresentation, ds.BitsAllocated = arg
    elif kind == "truncate":
        ds.PixelData = ds.PixelData[:arg]
    elif kind == "csa":
        cut, junk = arg
        for tag in (0x00291010, 0x00291110):
            if tag in ds:
                ds[tag].value = bytes(ds[tag].value)[:cut] + junk
    elif kind == "string":
        keyword, value = arg
        try:
            setattr(ds, keyword, value)
        except Exception:  # noqa: BLE001 - pydicom refuses some values outright
            pass
    elif kind == "dims":
        ds.Rows, ds.Columns = arg
    return ds


def _incoming(ds, mutation) -> Incoming:
    if mutation[0] != "raw_bytes":
        return Incoming(ds, None, time.time(), "cstore")
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    raw = bytearray(buffer.getvalue())
    offset, junk = mutation[1]
    offset %= len(raw)
    raw[offset:offset + len(junk)] = junk
    return Incoming(None, None, time.time(), "cstore", raw=bytes(raw),
                    file_meta=copy.deepcopy(ds.file_meta))


def _check(events) -> None:
    assert isinstance(events, list)
    for event in events:
        if isinstance(event, AssemblyAlert):
            assert event.level in ("info", "warning", "critical")
            assert event.code and len(event.message) > 10
        else:
            assert isinstance(event, Volume)
            assert np.all(np.isfinite(event.affine))
            assert abs(np.linalg.det(event.affine[:3, :3])) > 0
            assert event.data.ndim == 3 and event.data.size > 0


# Deterministic and bounded in the suite; RTSC_FUZZ_EXAMPLES=5000 explores more (random).
_EXTRA = int(os.environ.get("RTSC_FUZZ_EXAMPLES", "0"))


@pytest.mark.slow
@settings(max_examples=_EXTRA or 300, deadline=2000, derandomize=not _EXTRA, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutation=mutations(), which=st.sampled_from(["mosaic", "slice"]))
def test_assembler_survives_malformed_datasets(mutation, which):
    assembler = Assembler(AssemblerConfig(slice_timeout_s=0.5))
    if which == "mosaic":
        ds = _apply(copy.deepcopy(MOSAIC), mutation)
        _check(assembler.add(_incoming(ds, mutation)))
    else:
        # the first slice intact, the second mutated, the rest intact
        events = []
        for i, original in enumerate(SLICES):
            ds = copy.deepcopy(original)
            if i == 1:
                ds = _apply(ds, mutation)
            events += assembler.add(_incoming(ds, mutation if i == 1 else ("none", None)))
        events += assembler.poll(now=time.time() + 10)
        _check(events)


@pytest.mark.parametrize("mutation", [
    ("truncate", 100),
    ("delete", ["PixelData"]),
    ("geometry", ("ImageOrientationPatient", [float("nan")] * 6)),
    ("geometry", ("ImagePositionPatient", [0.0, float("inf"), 0.0])),
    ("geometry", ("PixelSpacing", [0.0, 3.0])),
    ("pixel_repr", (0, 12)),
    ("dims", (65535, 65535)),
    ("csa", (10, b"")),
    ("delete", ["Rows"]),
])
def test_broken_mosaic_gives_an_alert(mutation):
    ds = _apply(copy.deepcopy(MOSAIC), mutation)
    events = Assembler(AssemblerConfig()).add(_incoming(ds, mutation))
    assert len(events) == 1 and isinstance(events[0], AssemblyAlert), events
    assert events[0].level == "warning" and len(events[0].message) > 10


def test_intact_inputs_assemble():
    assert isinstance(Assembler(AssemblerConfig()).add(_incoming(copy.deepcopy(MOSAIC),
                                                                 ("none", None)))[0], Volume)


# ---- header fields through the receiver and the assembler (issue 16 items 3 and 8) ------
#
# Counts, numbers, rescale, geometry and pixel lengths of whole series, each dataset
# encoded and handed to the receiver's C-STORE handler (size limit, deflate, the
# SeriesInstanceUID peek), then decoded and assembled as on the worker. Per example:
# nothing escapes, no dataset takes more than 2 s, the example's allocations peak
# under 48 MB (tracemalloc: an announced count sizing a buffer shows here), every
# dataset is in a volume or answered by an alert (or refused by its C-STORE status),
# and nothing is left waiting once the assembler is told the run is over.

import queue  # noqa: E402
import tracemalloc  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import assume  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian  # noqa: E402

from rtsc.config import ReceiverConfig  # noqa: E402
from rtsc.dicom.csa import csa_image_header  # noqa: E402
from rtsc.intake.receiver import STATUS_SUCCESS, Receiver  # noqa: E402
from simulator.siemens_csa import encode_csa2  # noqa: E402
from simulator.multiframe_writer import volumes_to_multiframe  # noqa: E402

_SERIES_INFO = new_series_info(5, 2.0, n_volumes=2)
_VOLUMES = [_rng.integers(0, 1000, size=SHAPE).astype(np.int16) for _ in range(2)]
LAYOUTS = {
    "mosaic": [[volume_to_mosaic(v, _AFFINE, _SERIES_INFO, t)] for t, v in enumerate(_VOLUMES)],
    "slices": [volume_to_slices(v, _AFFINE, _SERIES_INFO, t) for t, v in enumerate(_VOLUMES)],
    "multiframe": [[volumes_to_multiframe(v, _AFFINE, _SERIES_INFO, t)]
                   for t, v in enumerate(_VOLUMES)],
}
COUNTS = st.one_of(st.sampled_from([0, 1, 2, 5, 6, 7, 36, 1024, 1025, 20000, 99_999, 100_000,
                                    100_001, 3_000_000, 2**31 - 1, -1, -2**31]),
                   st.integers(-5, 70000))
SERIES_COUNTS = ["NumberOfTemporalPositions", "ImagesInAcquisition", "NumberOfFrames",
                 "mosaic_count", "ge_locations", "philips_slices"]
VOLUME_NUMBERS = ["AcquisitionNumber", "TemporalPositionIdentifier", "InstanceNumber",
                  "temporal_index"]
GEOMETRY = {"ImageOrientationPatient": 6, "ImagePositionPatient": 3, "PixelSpacing": 2,
            "SliceThickness": 1, "SpacingBetweenSlices": 1}


@st.composite
def header_fields(draw):
    """1 to 4 (field, value) changes: a count of the whole series, a number of one
    dataset of volume 1, a rescale, a geometry element, rows/columns or a pixel length."""
    fields = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["count", "number", "rescale", "geometry", "matrix",
                                     "pixels"]))
        if kind == "count":
            fields.append((kind, draw(st.sampled_from(SERIES_COUNTS)), draw(COUNTS)))
        elif kind == "number":
            fields.append((kind, draw(st.sampled_from(VOLUME_NUMBERS)), draw(COUNTS)))
        elif kind == "rescale":
            fields.append((kind, draw(st.sampled_from(["RescaleSlope", "RescaleIntercept"])),
                           draw(NUMBERS)))
        elif kind == "geometry":
            keyword = draw(st.sampled_from(sorted(GEOMETRY)))
            fields.append((kind, keyword, [draw(NUMBERS) for _ in range(GEOMETRY[keyword])]))
        elif kind == "matrix":
            fields.append((kind, draw(st.sampled_from(["Rows", "Columns"])),
                           draw(st.sampled_from([0, 1, 8, 15, 17, 32, 48, 96, 65535]))))
        else:  # cut or lengthen PixelData by this many bytes (past 1 MB: too large)
            fields.append((kind, "PixelData", draw(st.sampled_from(
                [-10**6, -1000, -1, 1, 2, 1000, 3 * 10**6]) | st.integers(-600, 600))))
    return fields


def _set(ds, keyword, value) -> None:
    try:
        setattr(ds, keyword, value)
    except Exception:  # noqa: BLE001 - pydicom refuses some values outright
        pass


def _apply_field(ds, field) -> None:
    kind, keyword, value = field
    if kind == "rescale":
        text = _numeric_string(value)[:16]
        groups = ds.get("SharedFunctionalGroupsSequence")
        if groups:  # multi-frame: the shared pixel value transformation
            _set(groups[0].PixelValueTransformationSequence[0], keyword, text)
        else:
            _set(ds, keyword, text)
    elif kind == "geometry":
        _set(ds, keyword, [_numeric_string(v)[:16] for v in value] if len(value) > 1
             else _numeric_string(value[0])[:16])
    elif kind == "matrix":
        _set(ds, keyword, value)
    elif kind == "pixels":
        raw = bytes(ds.PixelData)
        ds.PixelData = raw[:max(len(raw) + value, 0)] if value < 0 else raw + b"\x01" * value
    elif keyword == "mosaic_count":
        if 0x00291010 in ds:
            normal = (csa_image_header(ds, {"SliceNormalVector"}) or {}).get(
                "SliceNormalVector") or [0, 0, 1]
            ds[0x00291010].value = encode_csa2([
                ("NumberOfImagesInMosaic", "US", [str(value)]),
                ("SliceNormalVector", "FD", [f"{float(v):.8f}" for v in normal])])
        if 0x0019100A in ds:
            ds[0x0019100A].value = value % 65536
    elif keyword == "ge_locations":
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(
            0x4F, "SS", max(min(value, 32767), -32768))
    elif keyword == "philips_slices":
        ds.Manufacturer = "Philips Medical Systems"
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
            0x18, "SL", value)
    elif keyword == "temporal_index":
        for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
            content = frame.FrameContentSequence[0]
            content.TemporalPositionIndex = value % 2**32
            content.DimensionIndexValues = [*content.DimensionIndexValues[:2], value % 2**32]
    else:
        _set(ds, keyword, value)


class _MemoryStore:
    """The receiver's archive in memory: the fuzzer is about parsing, not fsync."""

    def __init__(self) -> None:
        self.n = 0

    def reserve(self, series_uid: str, suffix: str = ".dcm") -> Path:
        self.n += 1
        return Path(f"/fuzz/{self.n:06d}{suffix}")

    def write(self, path: Path, payload: bytes):
        class Written:
            @staticmethod
            def commit() -> Path:
                return path
        return Written()

    def quarantine(self, payload: bytes, suffix: str = ".dcm") -> Path:
        return self.reserve("rejected", suffix)


class _StoreEvent:
    """What Receiver._on_store reads of a pynetdicom C-STORE event: the request's UIDs,
    the presentation context's transfer syntax, the encoded dataset."""

    def __init__(self, encoded: bytes, file_meta) -> None:
        self.file_meta, self._encoded = file_meta, encoded
        self.request = SimpleNamespace(
            AffectedSOPClassUID=file_meta.get("MediaStorageSOPClassUID", "1.2.3"),
            AffectedSOPInstanceUID=file_meta.get("MediaStorageSOPInstanceUID", "1.2.3.4"))
        self.context = SimpleNamespace(transfer_syntax=file_meta.TransferSyntaxUID)

    def encoded_dataset(self, include_meta: bool = False) -> bytes:
        return (b"DICM" if include_meta else b"") + self._encoded


def _encode(ds, deflate: bool) -> tuple[bytes, object]:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    encoded = buffer.getvalue()
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if deflate:
        packer = zlib.compressobj(wbits=-15)
        encoded = packer.compress(encoded) + packer.flush()
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return encoded, meta


@pytest.mark.slow
@settings(max_examples=_EXTRA or 100, deadline=10000, derandomize=not _EXTRA, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fields=header_fields(), layout=st.sampled_from(sorted(LAYOUTS)), deflate=st.booleans(),
       target=st.integers(0, 11))
def test_header_fields_through_receiver_and_assembler(fields, layout, deflate, target):
    series = [[copy.deepcopy(ds) for ds in volume] for volume in LAYOUTS[layout]]
    volume_1 = series[1]
    for field in fields:
        if field[0] in ("number", "pixels"):  # one dataset of volume 1
            _apply_field(volume_1[target % len(volume_1)], field)
        else:
            for volume in series:
                for ds in volume:
                    _apply_field(ds, field)
    datasets = [ds for volume in series for ds in volume]
    try:
        encoded = [_encode(ds, deflate) for ds in datasets]
    except Exception:  # noqa: BLE001 - pydicom cannot write some values: not our input
        assume(False)
    out: queue.Queue = queue.Queue()
    receiver = Receiver(ReceiverConfig(max_dataset_mb=1.0, archive_wait_ms=0.0),
                        _MemoryStore(), out)  # type: ignore[arg-type]
    assembler = Assembler(AssemblerConfig(slice_timeout_s=0.5))
    events, n_alerted, n_refused = [], 0, 0
    tracemalloc.start()
    try:
        for raw, meta in encoded:
            t0 = time.perf_counter()
            status = receiver._on_store(_StoreEvent(raw, meta))
            answered = []
            while not out.empty():
                answered += assembler.add(out.get_nowait())
            assert time.perf_counter() - t0 < 2.0, fields
            if status != STATUS_SUCCESS and not answered:
                n_refused += 1  # out of resources: the sender is told, nothing kept
            n_alerted += any(isinstance(e, AssemblyAlert) for e in answered)
            events += answered
        events += assembler.poll(now=float("inf"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _check(events)
    assert peak < 48 * 2**20, (peak, fields)
    assert assembler.next_deadline() is None  # nothing left waiting
    volumes = [e for e in events if isinstance(e, Volume)]
    placed = sum(v.shape[2] - len(v.missing_slices) for v in volumes) if layout == "slices" \
        else len(volumes)
    codes = {e.code for e in events if isinstance(e, AssemblyAlert)}
    assert "skipped_series" in codes or placed + n_alerted + n_refused >= len(datasets), \
        (fields, placed, n_alerted, n_refused, len(datasets), codes)
    for volume in volumes:
        assert np.all(np.isfinite(volume.data)), fields
