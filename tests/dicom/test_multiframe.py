"""Enhanced MR multi-frame assembly: a real file from nibabel's sdist and simulator files.

Known answers: the real file's frames each hold their own 0-based frame index, so every
assembled slice says which frame landed there, and its per-frame header says where that
frame belongs; simulator files encode known volumes with their frames shuffled. The
independent readers (nibabel's MultiframeWrapper, dcm2niix) must agree after both are
brought to the closest canonical orientation.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.multiframe import first_volume_frames
from rtsc.dicom.incoming import Incoming
from rtsc.volume import Volume, series_id
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import write_dataset
from simulator.multiframe_writer import volumes_to_multiframe
from simulator.phantom import Grid
from real_data import MULTIFRAME_4D, fetch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental
    from nibabel.nicom import dicomwrappers

TR_S = 2.0
START = 1_700_000_000.0
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def real_multiframe() -> pydicom.Dataset:
    return pydicom.dcmread(fetch(MULTIFRAME_4D))


def assemble(datasets) -> list:
    assembler = Assembler(AssemblerConfig())
    events: list = []
    for ds in datasets:
        events.extend(assembler.add(Incoming(ds, None, time.time(), "cstore")))
    return events


def canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))


def dcm2niix(folder: Path, out: Path) -> list[Path]:
    out.mkdir()
    exe = Path(sys.executable).parent / "dcm2niix"
    result = subprocess.run([str(exe), "-z", "n", "-f", "%s_%r", "-o", str(out), str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out.glob("*.nii"))


# --------------------------------------------------------------- the real nibabel file


def test_real_multiframe_frames_land_in_their_volume_and_slice(real_multiframe):
    ds = real_multiframe
    events = assemble([ds])
    volumes = [e for e in events if isinstance(e, Volume)]
    assert [v.index for v in volumes] == [0, 1] and volumes[0].shape == (512, 512, 56)
    assert volumes[0].info.source == "multiframe"
    # Each frame is filled with its own 0-based index: read which frame is where.
    temporal_dim = [int(d.DimensionIndexPointer) for d in ds.DimensionIndexSequence] \
        .index(0x00209128)
    seen = set()
    for volume in volumes:
        for k in range(volume.shape[2]):
            values = np.unique(volume.data[:, :, k])
            assert values.size == 1
            frame = int(values[0])
            seen.add(frame)
            header = ds.PerFrameFunctionalGroupsSequence[frame]
            content = header.FrameContentSequence[0]
            assert int(content.DimensionIndexValues[temporal_dim]) == volume.index + 1
            ipp = np.array(header.PlanePositionSequence[0].ImagePositionPatient, float)
            lps_of_slice = (LPS @ volume.affine @ [0, 0, k, 1])[:3]
            np.testing.assert_allclose(lps_of_slice, ipp, atol=1e-3)
    assert seen == set(range(112))


@pytest.mark.system
@pytest.mark.slow
def test_real_multiframe_equals_nibabel_and_dcm2niix(real_multiframe, tmp_path):
    volumes = [e for e in assemble([real_multiframe]) if isinstance(e, Volume)]
    ours = canonical(np.stack([v.data for v in volumes], axis=-1), volumes[0].affine)
    wrapper = dicomwrappers.wrapper_from_data(real_multiframe)
    assert isinstance(wrapper, dicomwrappers.MultiframeWrapper)
    theirs = canonical(wrapper.get_data(), LPS @ wrapper.affine)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mf.dcm").symlink_to(fetch(MULTIFRAME_4D))
    (nifti,) = dcm2niix(folder, tmp_path / "out")
    reference = nib.as_closest_canonical(nib.load(nifti))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)


# ------------------------------------------------------------------ simulator files


def _series(n_volumes: int = 3, start_time: float = START):
    return new_series_info(9, TR_S, n_volumes=n_volumes, start_time=start_time,
                           slice_times_s=tuple(np.argsort([0, 2, 4, 6, 8, 1, 3, 5, 7, 9])
                                               * TR_S / 10))


def _affine(oblique: bool) -> np.ndarray:
    affine = Grid((20, 16, 10), (3.0, 2.5, 3.5)).affine()
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        turn = np.eye(4)
        turn[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
        turn[:3, :3] = turn[:3, :3] @ [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)],
                                       [0, np.sin(0.2), np.cos(0.2)]]
        turn[:3, 3] = [5.0, -3.0, 11.0]
        affine = turn @ affine
    return affine


@pytest.mark.system
@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_one_file_per_volume_shuffled_frames(rng, tmp_path, oblique):
    info = _series()
    affine = _affine(oblique)
    data = rng.integers(0, 3000, size=(20, 16, 10, 3)).astype(np.int16)
    files = []
    for t in (0, 2, 1):  # volumes out of order too
        ds = volumes_to_multiframe(data[..., t], affine, info, t,
                                   frame_order=rng.permutation(10))
        files.append(tmp_path / "in" / f"v{t}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        write_dataset(ds, files[-1])
    events = assemble(pydicom.dcmread(f) for f in files)
    volumes = [e for e in events if isinstance(e, Volume)]
    assert [v.index for v in volumes] == [0, 1, 2]  # volume 2 waited for 1: back in order
    for v in volumes:
        np.testing.assert_array_equal(v.data, data[..., v.index].astype(np.float32))
        np.testing.assert_allclose(v.affine, affine, atol=1e-4)
        np.testing.assert_allclose(v.slice_times_s, info.slice_times_s, atol=1e-4)
        assert v.t_acquired == pytest.approx(START + v.index * TR_S, abs=1e-3)
        assert v.info.tr_s == pytest.approx(TR_S) and v.info.n_expected == 3
        assert v.stored_dtype == np.int16

    by_index = {v.index: v for v in volumes}
    for t in (0, 1, 2):
        # nibabel 5.4's MultiframeWrapper takes its slice spacing from the first two
        # frames in file order (negative for some shuffles), so it reads the same volume
        # with its frames in natural order; dcm2niix below reads the shuffled files.
        wrapper = dicomwrappers.wrapper_from_data(
            volumes_to_multiframe(data[..., t], affine, info, t))
        theirs = canonical(wrapper.get_data(), LPS @ wrapper.affine)
        ours = canonical(by_index[t].data, by_index[t].affine)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    # dcm2niix 1.0.20260724 misreads the second and later enhanced files of one folder
    # (int16 pixels taken as float32): give it one file per folder.
    for f, t in zip(files, (0, 2, 1)):
        folder = tmp_path / f"one{t}"
        folder.mkdir()
        (folder / f.name).symlink_to(f)
        (nifti,) = dcm2niix(folder, tmp_path / f"out{t}")
        reference = nib.as_closest_canonical(nib.load(nifti))
        ours = canonical(by_index[t].data, by_index[t].affine)
        np.testing.assert_array_equal(np.asarray(ours.dataobj),
                                      np.asarray(reference.dataobj).reshape(ours.shape))
        np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)


def test_whole_series_in_one_file_frames_across_volumes(rng):
    info = _series(n_volumes=4)
    affine = _affine(True)
    data = rng.integers(0, 3000, size=(20, 16, 10, 4)).astype(np.uint16)
    ds = volumes_to_multiframe(data, affine, info, 0, frame_order=rng.permutation(40))
    volumes = [e for e in assemble([ds]) if isinstance(e, Volume)]
    assert [v.index for v in volumes] == [0, 1, 2, 3]
    for v in volumes:
        np.testing.assert_array_equal(v.data, data[..., v.index].astype(np.float32))
        np.testing.assert_allclose(v.affine, affine, atol=1e-4)


def test_first_volume_frames_are_the_assembled_first_volume(rng):
    info = _series(n_volumes=4)
    data = rng.integers(0, 3000, size=(20, 16, 10, 4)).astype(np.uint16)
    ds = volumes_to_multiframe(data, _affine(True), info, 0, frame_order=rng.permutation(40))
    frames = first_volume_frames(ds)
    pixels = ds.pixel_array  # (frames, rows, cols); rtsc's volumes are (cols, rows, k)
    np.testing.assert_array_equal(np.stack([pixels[f].T for f in frames], axis=-1),
                                  data[..., 0])
    header = pydicom.Dataset(ds)
    del header.PixelData
    assert first_volume_frames(header) == frames


def test_per_frame_rescale_is_applied(rng):
    info = _series()
    data = rng.integers(0, 3000, size=(20, 16, 10)).astype(np.int16)
    ds = volumes_to_multiframe(data, _affine(False), info, 0)
    slopes = np.linspace(0.5, 2.0, 10)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept = f"{slopes[f]:.4f}", "-5"
        frame.PixelValueTransformationSequence = pydicom.Sequence([item])
    (volume,) = assemble([ds])
    expected = data * np.round(slopes, 4).astype(np.float32) - 5
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6)
    assert volume.stored_dtype == np.float32


def test_duplicate_multiframe_is_ignored(rng):
    info = _series()
    data = rng.integers(0, 3000, size=(20, 16, 10)).astype(np.int16)
    ds = volumes_to_multiframe(data, _affine(False), info, 0)
    assembler = Assembler(AssemblerConfig())
    assert len(assembler.add(Incoming(ds, None, START, "cstore"))) == 1
    assert assembler.add(Incoming(ds, None, START, "cstore")) == []  # duplicate


ECHO_TIMES_S = (0.015, 0.035, 0.055)


def test_multi_echo_multiframe_gives_one_series_per_echo(rng):
    """Siemens XA multi-echo: each file holds every echo of one volume, frames shuffled.
    Echo 1 keeps the series id; echoes 2+ are series of their own (as classic multi-echo
    images are), each with its echo time, sharing one echo group."""
    info = _series()
    data = rng.integers(0, 3000, size=(20, 16, 10, 2, 3)).astype(np.int16)
    assembler = Assembler(AssemblerConfig())
    events = []
    for t in range(2):
        ds = volumes_to_multiframe(data[..., t:t + 1, :], _affine(True), info, t,
                                   frame_order=rng.permutation(30),
                                   echo_times_s=ECHO_TIMES_S)
        events += assembler.add(Incoming(ds, None, START, "cstore"))
    assert not [e for e in events if isinstance(e, AssemblyAlert)]
    uid = info.series_uid
    ids = [series_id(uid), series_id(uid + "/echo2"), series_id(uid + "/echo3")]
    by_series = {}
    for volume in events:
        by_series.setdefault(volume.info.series, []).append(volume)
    assert sorted(by_series) == sorted(ids)
    for e, sid in enumerate(ids):
        volumes = by_series[sid]
        assert [v.index for v in volumes] == [0, 1]
        for v in volumes:
            np.testing.assert_array_equal(v.data, data[..., v.index, e].astype(np.float32))
            np.testing.assert_allclose(v.affine, _affine(True), atol=1e-4)
            assert v.info.echo == e + 1
            assert v.info.echo_time_s == pytest.approx(ECHO_TIMES_S[e])
            assert v.info.echo_group == series_id(uid)
            np.testing.assert_allclose(v.slice_times_s, info.slice_times_s, atol=1e-4)


def test_multi_echo_multiframe_through_the_service_writes_a_folder_per_echo(
        service_factory, rng):
    from simulator.sender import send_series

    service, collector = service_factory(session={"report": False})
    info = _series(start_time=time.time())
    n = 3
    data = rng.integers(0, 3000, size=(20, 16, 10, n, 3)).astype(np.int16)
    files = [[volumes_to_multiframe(data[..., t:t + 1, :], _affine(False), info, t,
                                    echo_times_s=ECHO_TIMES_S)] for t in range(n)]
    assert send_series(files, "127.0.0.1", service.receiver.port, speed=0).n_failed == 0
    deadline = time.time() + 60
    while len(collector.topic("series.end")) < 3 and time.time() < deadline:
        time.sleep(0.1)
    ends = {m.header["series"]: m.header for m in collector.topic("series.end")}
    uid = info.series_uid
    ids = [series_id(uid), series_id(uid + "/echo2"), series_id(uid + "/echo3")]
    assert set(ends) == set(ids)
    folders = {Path(ends[sid]["outputs"]["bold"]).parent for sid in ids}
    assert len(folders) == 3
    for e, sid in enumerate(ids):
        img = nib.load(ends[sid]["outputs"]["bold"])
        np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., e])


# ------------------------------------------------------------------ rescale (issue 16 item 8)

@pytest.mark.parametrize("slope", ["0", "NaN", "1e308", "1e-308"])
@pytest.mark.parametrize("where", ["shared", "frame 3", "mosaic"])
def test_unusable_rescale_is_refused_in_every_layout(rng, slope, where):
    """A multi-frame slope of 0 was taken as 1, NaN and 1e308 made NaN and infinite
    volumes, 1e-308 a volume of zeros; the mosaic path took 0 as 1 and let 1e308 and
    1e-308 through too. Each is now refused with an alert naming both values."""
    from simulator.dicom_writer import volume_to_mosaic  # noqa: PLC0415
    from pydicom.dataset import Dataset  # noqa: PLC0415
    from pydicom.sequence import Sequence  # noqa: PLC0415

    info = _series(n_volumes=1)
    data = rng.integers(1, 3000, size=(20, 16, 10)).astype(np.int16)
    if where == "mosaic":
        ds = volume_to_mosaic(data, _affine(False), info, 0)
        ds.RescaleSlope = slope
    else:
        ds = volumes_to_multiframe(data, _affine(False), info, 0)
        if where == "shared":
            transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            transform.RescaleSlope = slope
        else:
            item = Dataset()
            item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, "0", "US"
            ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = \
                Sequence([item])
    (event,) = assemble([ds])
    assert isinstance(event, AssemblyAlert) and event.code == "bad_dicom"
    frame = " of frame 3" if where == "frame 3" else ""
    assert f"unusable rescale{frame}: RescaleSlope {float(slope)!r}, RescaleIntercept 0.0" \
        in event.message


def test_usable_rescales_still_apply(rng):
    info = _series(n_volumes=1)
    data = rng.integers(1, 3000, size=(20, 16, 10)).astype(np.int16)
    ds = volumes_to_multiframe(data, _affine(False), info, 0)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept = "1e30", "-5"
    (volume,) = assemble([ds])
    np.testing.assert_allclose(volume.data, data.astype(np.float32) * np.float32(1e30) - 5,
                               rtol=1e-6)
    transform.RescaleSlope = ""  # empty: the default, 1
    ds.SOPInstanceUID = "1.2.3.4"
    (volume,) = assemble([ds])
    np.testing.assert_array_equal(volume.data, data.astype(np.float32) - 5)


def test_a_rescale_that_is_not_a_number_is_an_alert_not_an_exception(rng):
    """Over the network a frame's RescaleSlope may be any bytes; 'abc' escaped the
    assembler as a ValueError (the worker's internal_error), not an alert naming it."""
    from pydicom.dataelem import RawDataElement  # noqa: PLC0415
    from pydicom.tag import Tag  # noqa: PLC0415

    ds = volumes_to_multiframe(rng.integers(1, 3000, size=(20, 16, 10)).astype(np.int16),
                               _affine(False), _series(n_volumes=1), 0)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    del transform.RescaleSlope
    tag = Tag(0x00281053)
    transform._dict[tag] = RawDataElement(tag, "DS", 3, b"abc", 0, False, True)
    (event,) = assemble([ds])
    assert isinstance(event, AssemblyAlert)
    assert "RescaleSlope is not a number ('abc')" in event.message
