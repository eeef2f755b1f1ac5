"""The targeted per-frame functional group walker gives what pydicom gives, and the
multi-frame split is the same through either."""

from __future__ import annotations

import copy
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from rtsc.errors import DicomError
from rtsc.dicom.frame_groups import _SEQUENCES, _VALUES, per_frame_groups
from rtsc.dicom.multiframe import multiframe_volumes
from rtsc.dicom.pixels import stored_pixels
from simulator.dicom_series import new_series_info
from simulator.multiframe_writer import volumes_to_multiframe
from simulator.phantom import Grid

KEYWORDS = [keyword for keyword, _kind in _VALUES.values()]


def _multiframe(rng, echoes: bool = False, oblique: bool = True) -> Dataset:
    info = new_series_info(9, 2.0, n_volumes=3, start_time=1.7e9)
    affine = Grid((12, 10, 6), (3.0, 2.5, 3.5)).affine()
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        affine = np.array([[c, -s, 0, 4.0], [s, c, 0, -2.0], [0, 0, 1, 7.0], [0, 0, 0, 1]]) @ affine
    shape = (12, 10, 6, 2, 2) if echoes else (12, 10, 6, 2)
    data = rng.integers(0, 3000, size=shape).astype(np.int16)
    return volumes_to_multiframe(data, affine, info, 0, frame_order=rng.permutation(int(np.prod(shape[2:]))),
                                 echo_times_s=(0.015, 0.035) if echoes else None)


def _reread(ds: Dataset, implicit: bool) -> Dataset:
    """``ds`` encoded and read back lazily, as Incoming.load reads a received dataset."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    out = read_dataset(BytesIO(buffer.getvalue()), implicit, True)
    out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def _pydicom_view(item) -> dict:
    """The elements of one pydicom item the walker keeps, as the walker represents them."""
    out = {}
    for elem in item:
        if elem.keyword in _SEQUENCES.values():
            out[elem.keyword] = [_pydicom_view(sub) for sub in elem.value]
        elif elem.keyword in KEYWORDS:
            value = elem.value
            if isinstance(value, pydicom.multival.MultiValue):
                value = [float(v) if elem.VR == "DS" else v for v in value]
            elif elem.VR == "DS" and value is not None:
                value = float(value)
            out[elem.keyword] = value if value != "" else None
    return out


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("echoes", [False, True])
def test_walker_reads_what_pydicom_reads(rng, implicit, echoes):
    ds = _reread(_multiframe(rng, echoes), implicit)
    frames = per_frame_groups(ds)
    assert isinstance(frames, list) and all(isinstance(f, dict) for f in frames)
    theirs = ds.PerFrameFunctionalGroupsSequence  # decoded by pydicom only now
    assert frames == [_pydicom_view(item) for item in theirs]


def _split(ds: Dataset):
    pixels = stored_pixels(ds, frames=int(ds.NumberOfFrames))
    return multiframe_volumes(ds, pixels, 1)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("echoes", [False, True])
def test_split_is_the_same_through_the_walker_and_pydicom(rng, implicit, echoes):
    fast = _reread(_multiframe(rng, echoes), implicit)
    slow = copy.deepcopy(fast)
    _ = slow.PerFrameFunctionalGroupsSequence  # decoded: per_frame_groups hands it back
    assert isinstance(per_frame_groups(slow), Sequence)
    for ours, theirs in zip(_split(fast), _split(slow), strict=True):
        np.testing.assert_array_equal(ours.data, theirs.data)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        np.testing.assert_array_equal(ours.slice_times_s, theirs.slice_times_s)
        assert (ours.number, ours.echo, ours.echo_time_s, ours.t_acquired) == \
            (theirs.number, theirs.echo, theirs.echo_time_s, theirs.t_acquired)


def test_frames_with_their_own_plane_and_rescale(rng):
    """Philips writes orientation, pixel measures and rescale in every frame: equal values
    share frame 1's plane, a frame turned beyond the tolerance is still refused."""
    ds = _multiframe(rng, oblique=False)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            frame[keyword] = copy.deepcopy(shared[keyword])
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = "2.0", "-1"
        transform.RescaleType = "US"
        frame.PixelValueTransformationSequence = Sequence([transform])
    fast = _reread(ds, implicit=False)
    slow = copy.deepcopy(fast)
    _ = slow.PerFrameFunctionalGroupsSequence
    for ours, theirs in zip(_split(fast), _split(slow), strict=True):
        np.testing.assert_array_equal(ours.data, theirs.data)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
    turned = ds.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence[0]
    turned.ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.141]
    with pytest.raises(DicomError,
                       match="another orientation"):
        _split(_reread(ds, implicit=False))


def test_undefined_length_items_and_sequences_are_walked(rng):
    """Item and sequence delimiters inside the per-frame groups (as many scanners
    write them), and an unwanted nested sequence skipped to its delimiter."""
    ds = _multiframe(rng)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        anatomy = Dataset()
        anatomy.FrameLaterality = "U"
        frame.FrameAnatomySequence = Sequence([anatomy])
        for elem in frame:
            elem.is_undefined_length = True
    fast = _reread(ds, implicit=False)
    frames = per_frame_groups(fast)
    assert isinstance(frames, list) and isinstance(frames[0], dict)
    assert frames == [_pydicom_view(item) for item in fast.PerFrameFunctionalGroupsSequence]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_values_pydicom_should_judge_go_to_pydicom(rng):
    """A DS that is not a plain decimal number: pydicom's validation decides, not the walker."""
    ds = _multiframe(rng)
    position = ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    position["ImagePositionPatient"].value = ["1", "2", "nan"]
    fast = _reread(ds, implicit=False)
    assert isinstance(per_frame_groups(fast), Sequence)
