"""Unit tests of rtsc.dicom.assemble.Assembler, fed the simulator's datasets.

The known answer is the volume the simulator encoded: the assembler must give back its
voxels exactly, its affine to 1e-4 mm and its slice times, whatever the arrival order,
and report every unusable input as an alert with the right code instead of raising.
Also here: the receive thread's byte-level SeriesInstanceUID peek.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from ct_image import ct_dataset
from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.incoming import Incoming
from rtsc.intake.encoded import peek_series_uid
from rtsc.volume import Volume, series_id
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices
from simulator.phantom import Grid

SHAPE = (16, 16, 8)
TR_S = 2.0
START = 1_700_000_000.0  # epoch s of volume 0
# Interleaved acquisition (even slices, then odd), seconds within the TR.
SLICE_TIMES = tuple(float(t) for t in np.argsort([0, 2, 4, 6, 1, 3, 5, 7]) * TR_S / 8)


# ------------------------------------------------------------------------ factories


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """R = Rz @ Ry @ Rx, angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def grid_affine(shape: tuple[int, int, int] = SHAPE, oblique: bool = False) -> np.ndarray:
    """The simulator's axial grid affine, optionally rotated (det > 0 either way)."""
    affine = Grid(shape, (3.0, 3.0, 3.0)).affine()
    if oblique:
        turn = np.eye(4)
        turn[:3, :3] = rotation(0.2, -0.15, 0.3)
        turn[:3, 3] = [4.0, -7.5, 12.0]
        affine = turn @ affine
    return affine


def random_volume(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return rng.integers(-2000, 2000, size=shape, dtype=np.int16)


def series(n_volumes: int = 4, **kw):
    return new_series_info(7, TR_S, n_volumes=n_volumes, start_time=START, **kw)


def incoming(ds: Dataset, t_received: float = START) -> Incoming:
    return Incoming(ds, None, t_received, "cstore")


def volumes_of(events: list) -> list[Volume]:
    return [e for e in events if isinstance(e, Volume)]


def alerts_of(events: list) -> list[AssemblyAlert]:
    return [e for e in events if isinstance(e, AssemblyAlert)]


def feed(assembler: Assembler, datasets) -> list:
    events: list = []
    for ds in datasets:
        events.extend(assembler.add(incoming(ds)))
    return events


def assert_volume(volume: Volume, data: np.ndarray, affine: np.ndarray, index: int) -> None:
    assert volume.index == index
    assert volume.data.dtype == np.float32 and volume.data.flags.f_contiguous
    assert volume.shape == data.shape
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------ mosaics


@pytest.mark.parametrize("shape, oblique", [((16, 16, 8), False), ((16, 12, 7), True)],
                         ids=["axial-square", "oblique-nonsquare"])
def test_mosaic_gives_the_source_volume(rng, shape, oblique):
    affine = grid_affine(shape, oblique)
    times = SLICE_TIMES[:shape[2]] if shape[2] == 8 else tuple(np.arange(shape[2]) * 0.25)
    info = series(slice_times_s=times)
    assembler = Assembler(AssemblerConfig())
    for index in range(3):
        data = random_volume(rng, shape)
        events = assembler.add(incoming(volume_to_mosaic(data, affine, info, index)))
        assert len(events) == 1 and isinstance(events[0], Volume)
        volume = events[0]
        assert_volume(volume, data, affine, index)
        np.testing.assert_allclose(volume.slice_times_s, times, atol=1e-6)
        assert volume.stored_dtype == np.int16
        assert volume.missing_slices == ()
        assert volume.info.series == series_id(info.series_uid)
        assert volume.info.tr_s == pytest.approx(TR_S) and volume.info.n_expected == 4
        assert volume.info.source == "mosaic"
        assert volume.t_acquired == pytest.approx(START + index * TR_S, abs=1e-3)


def test_duplicate_mosaic_is_ignored(rng):
    info = series()
    ds = volume_to_mosaic(random_volume(rng), grid_affine(), info, 0)
    assembler = Assembler(AssemblerConfig())
    assert len(volumes_of(assembler.add(incoming(ds)))) == 1
    assert assembler.add(incoming(copy.deepcopy(ds))) == []


def _layout_images(rng, layout: str, index: int, info) -> list[Dataset]:
    """The images of volume ``index`` in one layout (a fresh random volume)."""
    from simulator.multiframe_writer import volumes_to_multiframe  # noqa: PLC0415

    data = random_volume(rng)
    if layout == "mosaic":
        return [volume_to_mosaic(data, grid_affine(), info, index)]
    if layout == "multiframe":
        return [volumes_to_multiframe(data, grid_affine(), info, index)]
    return volume_to_slices(data, grid_affine(), info, index)


@pytest.mark.parametrize("layout", ["mosaic", "multiframe", "slices"])
def test_a_second_image_for_a_volume_is_named_in_an_alert(rng, layout):
    """Issue 16 item 8: another image (another SOPInstanceUID, other pixels) for a volume
    already received is archived and alerted in every layout, never silently merged."""
    info = series()
    assembler = Assembler(AssemblerConfig())
    first = _layout_images(rng, layout, 0, info)
    assert len(volumes_of(feed(assembler, first))) == 1
    other = _layout_images(rng, layout, 0, info)  # same volume number, new UIDs
    events = feed(assembler, other[:1])
    assert volumes_of(events) == []
    (alert,) = alerts_of(events)
    assert alert.code == ("late_slice" if layout == "slices" else "unplaced")
    assert alert.index == 0 and "archived" in alert.message
    if layout == "slices":  # and while its volume is still being collected
        assembler = Assembler(AssemblerConfig())
        assert feed(assembler, first[:-1]) == []
        (alert,) = feed(assembler, other[:1])
        assert alert.code == "unplaced" and "already has another image" in alert.message


@pytest.mark.parametrize("layout", ["mosaic", "multiframe", "slices"])
def test_same_sop_instance_with_other_pixels_is_not_dropped_as_a_resend(rng, layout):
    """Issue 16 item 8: a dataset under a SOPInstanceUID already taken was dropped
    silently as a resend, whatever its pixels; a copy with other pixel bytes is now an
    alert, an identical one still the one silent case."""
    info = series()
    assembler = Assembler(AssemblerConfig())
    images = _layout_images(rng, layout, 0, info)
    assert len(volumes_of(feed(assembler, images))) == 1
    resent = copy.deepcopy(images[0])
    assert assembler.add(incoming(resent)) == []
    changed = copy.deepcopy(images[0])
    pixels = bytearray(changed.PixelData)
    pixels[0] ^= 0xFF
    changed.PixelData = bytes(pixels)
    (alert,) = assembler.add(incoming(changed))
    assert isinstance(alert, AssemblyAlert) and alert.code == "unplaced"
    assert "SOPInstanceUID seen before with other pixel data" in alert.message
    assert info.series_uid not in alert.message  # no UID in clear
    # identical again: still the silent, counted resend
    assert assembler.add(incoming(copy.deepcopy(images[0]))) == []


# ------------------------------------------------------------------ single slices


def test_slices_in_random_order_with_duplicates(rng):
    affine = grid_affine(oblique=True)
    info = series(slice_times_s=SLICE_TIMES)
    volumes = [random_volume(rng) for _ in range(3)]
    assembler = Assembler(AssemblerConfig())
    out: list[Volume] = []
    for index, data in enumerate(volumes):
        slices = volume_to_slices(data, affine, info, index)
        order = list(rng.permutation(len(slices)))
        # Two slices sent twice (a resent C-STORE), interleaved with the rest.
        order.insert(3, order[0])
        order.insert(6, order[5])
        events = feed(assembler, [slices[k] for k in order])
        assert alerts_of(events) == []
        out.extend(volumes_of(events))
        # A slice of a volume already released is dropped silently.
        assert assembler.add(incoming(slices[2])) == []
    assert [v.index for v in out] == [0, 1, 2]
    for volume, data in zip(out, volumes):
        assert_volume(volume, data, affine, volume.index)
        assert volume.missing_slices == ()
        assert volume.info.source == "slices"
        np.testing.assert_allclose(volume.slice_times_s, SLICE_TIMES, atol=1e-5)


def test_volumes_released_in_index_order(rng):
    """Volume 1 completes while volume 0 still waits for slices: 1 is held back."""
    affine = grid_affine()
    info = series()
    data = [random_volume(rng) for _ in range(3)]
    slices = [volume_to_slices(d, affine, info, i) for i, d in enumerate(data)]
    assembler = Assembler(AssemblerConfig())
    assert feed(assembler, slices[0][:3]) == []
    assert feed(assembler, slices[1][::-1]) == []  # complete, but 0 is pending
    assert feed(assembler, slices[2][:5]) == []
    events = feed(assembler, slices[0][3:])
    assert [v.index for v in volumes_of(events)] == [0, 1]
    events = feed(assembler, slices[2][5:])
    assert [v.index for v in volumes_of(events)] == [2]
    assert assembler.next_deadline() is None


# ------------------------------------------------------------------ missing slices


def test_missing_slice_published_zero_filled_after_timeout(rng):
    clock = FakeClock()
    # Timeout shorter than the TR, so the slice timeout (not the later-volume rule) fires.
    assembler = Assembler(AssemblerConfig(slice_timeout_s=1.0), clock=clock)
    affine = grid_affine()
    info = series()
    data = [random_volume(rng) for _ in range(4)]
    slices = [volume_to_slices(d, affine, info, i) for i, d in enumerate(data)]
    lost = 5
    assert [v.index for v in volumes_of(feed(assembler, slices[0]))] == [0]
    assert feed(assembler, [s for k, s in enumerate(slices[1]) if k != lost]) == []
    clock.now += 0.2
    assert feed(assembler, slices[2]) == []  # complete, held behind volume 1
    assert feed(assembler, slices[3]) == []
    assert assembler.next_deadline() == pytest.approx(START + 1.0)

    clock.now = START + 0.9
    assert assembler.poll() == []
    clock.now = START + 1.0
    events = assembler.poll()
    alerts = alerts_of(events)
    assert len(alerts) == 1 and alerts[0].code == "missing_slices"
    assert alerts[0].index == 1 and alerts[0].series == series_id(info.series_uid)
    assert str(lost) in alerts[0].message
    assert isinstance(events[0], AssemblyAlert)  # the alert comes before the volume
    released = volumes_of(events)
    assert [v.index for v in released] == [1, 2, 3]
    expected = data[1].copy()
    expected[:, :, lost] = 0
    assert_volume(released[0], expected, affine, 1)
    assert released[0].missing_slices == (lost,)
    assert released[0].slice_times_s is None  # unknown for a slice that never came
    assert_volume(released[1], data[2], affine, 2)
    assert_volume(released[2], data[3], affine, 3)
    assert released[1].missing_slices == () and released[2].missing_slices == ()
    assert assembler.poll() == [] and assembler.next_deadline() is None
    # The lost slice turning up late cannot join its published volume: archived and named.
    late = assembler.add(incoming(slices[1][lost]))
    assert [(a.code, a.index, a.series) for a in late] == [("late_slice", 1, series_id(info.series_uid))]
    assert "already published" in late[0].message
    # Sent once more (the same SOPInstanceUID), it is a duplicate: the one silent case.
    assert assembler.add(incoming(slices[1][lost])) == []


def test_missing_slice_given_up_one_tr_after_a_later_volume_completes(rng):
    clock = FakeClock()
    assembler = Assembler(AssemblerConfig(slice_timeout_s=30.0), clock=clock)
    affine = grid_affine()
    info = series()
    data = [random_volume(rng) for _ in range(2)]
    slices = [volume_to_slices(d, affine, info, i) for i, d in enumerate(data)]
    assert feed(assembler, slices[0][1:]) == []  # slice 0 of volume 0 is lost
    assert feed(assembler, slices[1]) == []
    clock.now = START + TR_S - 0.01
    assert assembler.poll() == []
    clock.now = START + TR_S
    events = assembler.poll()
    assert [a.code for a in alerts_of(events)] == ["missing_slices"]
    volumes = volumes_of(events)
    assert [v.index for v in volumes] == [0, 1]
    assert volumes[0].missing_slices == (0,)
    expected = data[0].copy()
    expected[:, :, 0] = 0
    # Volume 0 lacks its first slice: its grid must still start at slice 0's position.
    assert_volume(volumes[0], expected, affine, 0)
    assert_volume(volumes[1], data[1], affine, 1)


# ----------------------------------------------------------------------- rescale


def _rescaled(ds: Dataset) -> Dataset:
    ds.RescaleSlope = "2"
    ds.RescaleIntercept = "-10"
    return ds


def test_rescale_applied_to_mosaics_and_slices(rng):
    affine = grid_affine()
    data = random_volume(rng)
    expected = data.astype(np.float64) * 2 - 10

    mosaic = _rescaled(volume_to_mosaic(data, affine, series(), 0))
    (volume,) = Assembler(AssemblerConfig()).add(incoming(mosaic))
    assert isinstance(volume, Volume)
    np.testing.assert_array_equal(volume.data, expected.astype(np.float32))
    assert volume.stored_dtype == np.float32

    slices = [_rescaled(ds) for ds in volume_to_slices(data, affine, series(), 0)]
    (volume,) = volumes_of(feed(Assembler(AssemblerConfig()), slices))
    np.testing.assert_array_equal(volume.data, expected.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.stored_dtype == np.float32


# -------------------------------------------------------------- geometry changes


def test_mosaic_matrix_change_is_reported_and_the_series_goes_on(rng):
    affine = grid_affine()
    info = series(n_volumes=4)
    data = [random_volume(rng) for _ in range(4)]
    odd = random_volume(rng, (20, 20, 8))
    assembler = Assembler(AssemblerConfig())
    assert [v.index for v in volumes_of(assembler.add(
        incoming(volume_to_mosaic(data[0], affine, info, 0))))] == [0]
    events = assembler.add(incoming(volume_to_mosaic(odd, grid_affine((20, 20, 8)), info, 1)))
    assert len(events) == 1 and isinstance(events[0], AssemblyAlert)
    assert events[0].code == "geometry_changed"
    assert "(20, 20, 8)" in events[0].message
    for index in (2, 3):
        (volume,) = assembler.add(incoming(volume_to_mosaic(data[index], affine, info, index)))
        assert isinstance(volume, Volume)
        assert_volume(volume, data[index], affine, index)


def _encoded(ds: Dataset) -> Incoming:
    """As the receiver hands a C-STORE on: the encoded dataset, decoded on the worker."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return Incoming(None, None, START, "cstore", raw=fp.getvalue(), file_meta=ds.file_meta)


@pytest.mark.parametrize("encoded", [True, False], ids=["raw", "decoded"])
def test_mosaic_layout_is_reused_and_a_moved_slab_is_still_seen(rng, encoded):
    """Mosaics of one series share their decoded layout (one read-only affine), and a
    header that differs (a 2 mm shift of ImagePositionPatient, a rescale) is decoded
    afresh: the shift is a geometry change, the rescale is applied."""
    make = _encoded if encoded else incoming
    affine = grid_affine()
    info = series(n_volumes=5)
    data = [random_volume(rng) for _ in range(5)]
    assembler = Assembler(AssemblerConfig())
    first, second = (assembler.add(make(volume_to_mosaic(data[i], affine, info, i)))[0]
                     for i in (0, 1))
    assert second.affine is first.affine and not first.affine.flags.writeable
    assert_volume(second, data[1], affine, 1)
    moved = affine.copy()
    moved[2, 3] += 2.0
    (alert,) = assembler.add(make(volume_to_mosaic(data[2], moved, info, 2)))
    assert isinstance(alert, AssemblyAlert) and alert.code == "geometry_changed"
    rescaled = _rescaled(volume_to_mosaic(data[3], affine, info, 3))
    (volume,) = assembler.add(make(rescaled))
    np.testing.assert_array_equal(volume.data, (data[3].astype(np.float64) * 2 - 10)
                                  .astype(np.float32))
    assert volume.stored_dtype == np.float32 and volume.affine is not first.affine
    (volume,) = assembler.add(make(volume_to_mosaic(data[4], affine, info, 4)))
    assert volume.affine is first.affine
    assert_volume(volume, data[4], affine, 4)


def test_slice_spacing_change_is_reported_and_the_series_goes_on(rng):
    affine = grid_affine()
    info = series(n_volumes=3)
    data = [random_volume(rng) for _ in range(3)]
    slices = [volume_to_slices(d, affine, info, i) for i, d in enumerate(data)]
    assembler = Assembler(AssemblerConfig(slice_timeout_s=1.0), clock=FakeClock())
    out = feed(assembler, slices[0])
    odd = copy.deepcopy(slices[1][4])
    odd.PixelSpacing = ["2.5", "2.5"]
    odd.SOPInstanceUID = generate_uid()  # another image: a dataset sent again is skipped
    events = assembler.add(incoming(odd))
    assert len(events) == 1 and events[0].code == "geometry_changed"
    # A slice with another matrix (same spacing) is refused too.
    small = volume_to_slices(random_volume(rng, (12, 12, 8)), grid_affine((12, 12, 8)), info, 1)
    events = assembler.add(incoming(small[4]))
    assert len(events) == 1 and events[0].code == "geometry_changed"
    out += feed(assembler, slices[1]) + feed(assembler, slices[2])
    assert alerts_of(out) == []
    volumes = volumes_of(out)
    assert [v.index for v in volumes] == [0, 1, 2]
    for volume, expected in zip(volumes, data):
        assert_volume(volume, expected, affine, volume.index)
        assert volume.missing_slices == ()


# ----------------------------------------------------------------- unusable input


def _normal_volume_still_works(assembler: Assembler, rng: np.random.Generator) -> None:
    data = random_volume(rng)
    (volume,) = assembler.add(incoming(volume_to_mosaic(data, grid_affine(), series(), 0)))
    assert isinstance(volume, Volume)
    assert_volume(volume, data, grid_affine(), 0)


def test_ct_image_is_unsupported(rng):
    assembler = Assembler(AssemblerConfig())
    (alert,) = assembler.add(incoming(ct_dataset(rng)))
    assert isinstance(alert, AssemblyAlert)
    assert alert.code == "unsupported" and "CT Image Storage" in alert.message
    _normal_volume_still_works(assembler, rng)


def test_enhanced_mr_without_functional_groups_is_bad_dicom(rng):
    ds = volume_to_mosaic(random_volume(rng), grid_affine(), series(), 0)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = "1"
    assembler = Assembler(AssemblerConfig())
    (alert,) = assembler.add(incoming(ds))
    assert isinstance(alert, AssemblyAlert) and alert.code == "bad_dicom"
    assert "functional groups" in alert.message
    _normal_volume_still_works(assembler, rng)


@pytest.mark.parametrize("fmt", ["mosaic", "slice"])
def test_truncated_pixel_data_is_bad_dicom(rng, fmt):
    data = random_volume(rng)
    ds = (volume_to_mosaic(data, grid_affine(), series(), 0) if fmt == "mosaic"
          else volume_to_slices(data, grid_affine(), series(), 0)[0])
    ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
    assembler = Assembler(AssemblerConfig())
    (alert,) = assembler.add(incoming(ds))
    assert isinstance(alert, AssemblyAlert)
    assert alert.code == "bad_dicom" and "truncated" in alert.message
    _normal_volume_still_works(assembler, rng)


def test_truncated_encoded_dataset_is_bad_dicom(rng):
    """The C-STORE path: raw bytes cut in the middle of the pixel data."""
    ds = volume_to_mosaic(random_volume(rng), grid_affine(), series(), 0)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    raw = fp.getvalue()
    cut = raw[:len(raw) - len(ds.PixelData) // 2]
    item = Incoming(None, None, START, "cstore", raw=cut, file_meta=ds.file_meta)
    events = Assembler(AssemblerConfig()).add(item)
    assert len(events) == 1 and isinstance(events[0], AssemblyAlert)
    assert events[0].code == "bad_dicom" and "truncated" in events[0].message.lower()


def test_missing_orientation_is_bad_dicom(rng):
    assembler = Assembler(AssemblerConfig())
    mosaic = volume_to_mosaic(random_volume(rng), grid_affine(), series(), 0)
    del mosaic.ImageOrientationPatient
    single = volume_to_slices(random_volume(rng), grid_affine(), series(), 0)[0]
    del single.ImageOrientationPatient
    for ds in (mosaic, single):
        (alert,) = assembler.add(incoming(ds))
        assert isinstance(alert, AssemblyAlert) and alert.code == "bad_dicom"
        assert "ImageOrientationPatient" in alert.message
    _normal_volume_still_works(assembler, rng)


def test_input_error_from_an_input_is_bad_dicom():
    item = Incoming(None, None, START, "folder", error="not a readable DICOM file")
    (alert,) = Assembler(AssemblerConfig()).add(item)
    assert alert.code == "bad_dicom" and "not a readable DICOM file" in alert.message


# ------------------------------------------------------------ SeriesInstanceUID peek


def _encode(ds: Dataset, implicit: bool, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _dataset_with_undefined_length_sequence(rng) -> Dataset:
    ds = volume_to_slices(random_volume(rng, (4, 4, 2)), grid_affine((4, 4, 2)), series(), 0)[0]
    items = []
    for _ in range(2):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        item.ReferencedSOPInstanceUID = generate_uid()
        # A nested undefined-length sequence inside an undefined-length item.
        inner = Dataset()
        inner.CodeValue = "T1"
        inner.is_undefined_length_sequence_item = True
        item.PurposeOfReferenceCodeSequence = Sequence([inner])
        item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        items.append(item)
    ds.ReferencedImageSequence = Sequence(items)  # (0008,1140): before (0020,000E)
    ds["ReferencedImageSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["plain", "undefined-length-seq"])
def test_peek_series_uid(rng, monkeypatch, syntax, undefined):
    ds = _dataset_with_undefined_length_sequence(rng) if undefined else \
        volume_to_mosaic(random_volume(rng), grid_affine(), series(), 0)
    raw = _encode(ds, syntax.is_implicit_VR)
    sequence_delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    item_delimiter = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    if undefined:
        assert sequence_delimiter in raw and item_delimiter in raw
        assert raw.index(sequence_delimiter) < raw.index(ds.SeriesInstanceUID.encode())
    # The byte walk must find it by itself, without pydicom's parser as the fallback.
    monkeypatch.setattr("rtsc.intake.encoded.read_dataset", _no_fallback)
    assert peek_series_uid(raw, syntax) == ds.SeriesInstanceUID


def _no_fallback(*args, **kwargs):
    raise AssertionError("the byte-level walk fell back to pydicom")


def test_peek_series_uid_falls_back_to_pydicom_for_big_endian(rng):
    ds = _dataset_with_undefined_length_sequence(rng)
    raw = _encode(ds, implicit=False, little=False)
    assert peek_series_uid(raw, ExplicitVRBigEndian) == ds.SeriesInstanceUID


def test_peek_series_uid_without_the_element_raises(rng):
    ds = volume_to_mosaic(random_volume(rng), grid_affine(), series(), 0)
    del ds.SeriesInstanceUID
    with pytest.raises(AttributeError):
        peek_series_uid(_encode(ds, implicit=False), ExplicitVRLittleEndian)


def test_acquisition_time_reads_dicom_dates_and_refuses_broken_ones():
    import datetime as dt
    import time as time_module

    from rtsc.dicom.geometry import acquisition_time

    ds = Dataset()
    ds.AcquisitionDate, ds.AcquisitionTime = "20261201", "101530.25"
    expected = time_module.mktime(dt.datetime(2026, 12, 1, 10, 15, 30).timetuple()) + 0.25
    assert acquisition_time(ds) == pytest.approx(expected, abs=1e-6)
    for broken in ("20261301", "20260230", "2026120", "2026-12-01", "2026120x"):
        ds.AcquisitionDate = broken
        assert acquisition_time(ds) is None, broken


# ------------------------------------------------------------- arrival order


def test_volumes_out_of_order_are_put_back_in_order_and_a_lost_one_is_given_up(rng):
    """Mosaics 0, 2, 1 (a watched folder read in name order) come out 0, 1, 2. Volume 4
    never comes: 5 waits one TR for it, then goes on; 4 turning up after that is late."""
    clock = FakeClock()
    assembler = Assembler(AssemblerConfig(slice_timeout_s=10.0), clock=clock)
    affine = grid_affine()
    info = series(n_volumes=6)
    data = [random_volume(rng) for _ in range(6)]
    mosaic = [volume_to_mosaic(d, affine, info, i) for i, d in enumerate(data)]
    out = volumes_of(assembler.add(incoming(mosaic[0])))
    assert volumes_of(assembler.add(incoming(mosaic[2]))) == []  # waits for 1
    assert assembler.next_deadline() == pytest.approx(START + TR_S)
    out += volumes_of(assembler.add(incoming(mosaic[1])))
    out += volumes_of(assembler.add(incoming(mosaic[3])))
    assert [v.index for v in out] == [0, 1, 2, 3]
    assert assembler.add(incoming(mosaic[5])) == []
    clock.now += TR_S - 0.01
    assert assembler.poll() == []
    clock.now += 0.02
    (five,) = assembler.poll()
    assert_volume(five, data[5], affine, 5)
    (late,) = assembler.add(incoming(mosaic[4]))
    assert (late.code, late.index, late.series) == ("late_volume", 4, series_id(info.series_uid))
