"""Property test: the assembler given malformed datasets never crashes or hangs, and
answers each with either a sound volume or a clear alert."""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.receiver import Incoming
from rtsc.volume import Volume
from simulator.dicom_writer import new_series_info, volume_to_mosaic, volume_to_slices
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
