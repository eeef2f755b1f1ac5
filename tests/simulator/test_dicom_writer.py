"""Tests of simulator.dicom_writer against nibabel's DICOM wrappers and dcm2niix.

The known answer is the volume and affine we write: nibabel and dcm2niix must recover
them exactly (data) and to 1e-3 mm (affine), with our TR and slice timing.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import warnings
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import pytest

with warnings.catch_warnings():  # "The DICOM readers are highly experimental"
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader, dicomwrappers

from simulator.dicom_series import MR_IMAGE_STORAGE, SeriesInfo, new_series_info
from simulator.dicom_writer import mosaic_shape, volume_to_mosaic, volume_to_slices, write_dataset
from simulator.siemens_csa import encode_csa2

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SWAP_IJ = np.eye(4)[[1, 0, 2, 3]]  # nibabel's wrappers index (row j, column i, slice k)
START = 1_700_000_000.25  # epoch s of volume 0


# ------------------------------------------------------------------------ factories


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """R = Rz @ Ry @ Rx, angles in radians (right-handed, RAS)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def make_affine(shape: tuple[int, int, int], voxel_mm: tuple[float, float, float],
                rot: np.ndarray | None = None) -> np.ndarray:
    """(4, 4) voxel -> RAS+ affine with the grid centred near the origin."""
    aff = np.eye(4)
    aff[:3, :3] = (np.eye(3) if rot is None else rot) @ np.diag(voxel_mm)
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2.0) + [1.5, -12.0, 20.0]
    return aff


def interleaved_times(nz: int, tr_s: float) -> tuple[float, ...]:
    """Siemens interleaved order (odd nz: 0, 2, 4, ..., 1, 3, ...), seconds."""
    order = list(range(0, nz, 2)) + list(range(1, nz, 2))
    times = np.empty(nz)
    times[order] = np.arange(nz) * tr_s / nz
    return tuple(float(t) for t in times)


CASES = {
    "square_64x64x36": ((64, 64, 36), (3.0, 3.0, 3.0), None, False),
    "nonsquare_80x64x30": ((80, 64, 30), (2.5, 3.0, 3.5), None, False),
    "oblique_interleaved_64x56x35": (
        (64, 56, 35), (3.0, 3.2, 3.5), rotation(0.12, -0.07, 0.05), True),
}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request, rng):
    shape, vox, rot, interleaved = CASES[request.param]
    tr_s = 2.0
    info = new_series_info(
        7, tr_s, n_volumes=3, start_time=START,
        slice_times_s=interleaved_times(shape[2], tr_s) if interleaved else (),
    )
    vols = [rng.integers(-2000, 4000, size=shape, dtype=np.int16) for _ in range(3)]
    return vols, make_affine(shape, vox, rot), info


def expected_times(info: SeriesInfo, nz: int) -> np.ndarray:
    if info.slice_times_s:
        return np.asarray(info.slice_times_s)
    return np.arange(nz) * info.tr_s / nz


def dicom_epoch(ds: pydicom.Dataset) -> float:
    """AcquisitionDate/Time + TimezoneOffsetFromUTC -> epoch seconds."""
    tz = ds.TimezoneOffsetFromUTC
    offset = dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5])) * (1 if tz[0] == "+" else -1)
    local = dt.datetime.strptime(ds.AcquisitionDate + ds.AcquisitionTime, "%Y%m%d%H%M%S.%f")
    return local.replace(tzinfo=dt.timezone(offset)).timestamp()


def run_dcm2niix(in_dir: Path, out_dir: Path) -> tuple[nib.Nifti1Image, dict, str]:
    out_dir.mkdir()
    proc = subprocess.run(
        [dcm2niix.bin, "-z", "n", "-b", "y", "-f", "out", "-o", str(out_dir), str(in_dir)],
        capture_output=True, text=True, timeout=60,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    img = nib.load(out_dir / "out.nii")
    meta = json.loads((out_dir / "out.json").read_text())
    return img, meta, log


def assert_same_as_dcm2niix(img: nib.Nifti1Image, vols: list[np.ndarray], affine: np.ndarray) -> None:
    ours = nib.as_closest_canonical(nib.Nifti1Image(np.stack(vols, axis=-1), affine))
    theirs = nib.as_closest_canonical(img)
    assert theirs.shape == ours.shape
    assert theirs.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)


# ------------------------------------------------------------------------ CSA header


def test_csa2_encoding_is_read_back_by_nibabel():
    raw = encode_csa2([
        ("NumberOfImagesInMosaic", "US", ["36"]),
        ("SliceNormalVector", "FD", ["0.00000000", "0.10000000", "0.99498744"]),
        ("MosaicRefAcqTimes", "FD", [f"{t:.8f}" for t in np.arange(7) * 12.5]),
        ("AcquisitionMatrixText", "SH", ["64p*80"]),
    ])
    assert raw[:4] == b"SV10" and len(raw) % 4 == 0
    csa = csareader.read(raw)
    assert csa["type"] == 2 and csa["n_tags"] == 4
    assert csareader.get_n_mosaic(csa) == 36
    np.testing.assert_allclose(csareader.get_slice_normal(csa), [0.0, 0.1, 0.99498744])
    assert csa["tags"]["MosaicRefAcqTimes"]["items"] == list(np.arange(7) * 12.5)
    assert csareader.get_acq_mat_txt(csa) == "64p*80"
    # Siemens pads short tags with empty items; dcm2niix reads 3 items of some scalars
    assert csa["tags"]["NumberOfImagesInMosaic"]["n_items"] == 6


def test_csa2_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_csa2([])
    with pytest.raises(ValueError):
        encode_csa2([("x" * 64, "IS", ["1"])])


# ---------------------------------------------------------------- nibabel wrappers


def test_mosaic_read_by_nibabel(case):
    vols, affine, info = case
    nx, ny, nz = vols[0].shape
    ds = volume_to_mosaic(vols[1], affine, info, 1)
    m, rows, cols = mosaic_shape(nx, ny, nz)
    assert (ds.Rows, ds.Columns) == (rows, cols) == (m * ny, m * nx)

    wrapper = dicomwrappers.wrapper_from_data(ds)
    assert isinstance(wrapper, dicomwrappers.MosaicWrapper)
    # nibabel returns (rows, columns, slices) = (j, i, k), and an LPS affine for it
    np.testing.assert_array_equal(wrapper.get_data(), vols[1].transpose(1, 0, 2))
    np.testing.assert_allclose(LPS @ wrapper.affine @ SWAP_IJ, affine, atol=1e-6)

    csa = csareader.get_csa_header(ds, "image")
    assert csareader.get_n_mosaic(csa) == nz
    normal = np.cross(affine[:3, 0], affine[:3, 1]) * [-1, -1, 1]
    np.testing.assert_allclose(csareader.get_slice_normal(csa), normal / np.linalg.norm(normal),
                               atol=1e-7)
    times_ms = csa["tags"]["MosaicRefAcqTimes"]["items"]
    np.testing.assert_allclose(times_ms, expected_times(info, nz) * 1000.0, atol=1e-6)
    series = csareader.get_csa_header(ds, "series")
    protocol = series["tags"]["MrPhoenixProtocol"]["items"][0]
    assert "### ASCCONV BEGIN" in protocol and "### ASCCONV END ###" in protocol
    assert f"sSliceArray.lSize                        = {nz}\n" in protocol
    assert f"sKSpace.lBaseResolution                  = {nx}\n" in protocol
    assert f"sKSpace.lPhaseEncodingLines              = {ny}\n" in protocol


def test_unused_mosaic_tiles_are_zero(rng):
    data = rng.integers(1, 100, size=(8, 6, 5), dtype=np.int16)  # 3 x 3 grid, 4 unused tiles
    info = new_series_info(1, 1.0)
    ds = volume_to_mosaic(data, make_affine(data.shape, (2.0, 2.0, 2.0)), info, 0)
    pix = ds.pixel_array
    assert pix.shape == (18, 24)
    np.testing.assert_array_equal(pix[6:12, 8:16], data[:, :, 4].T)  # tile row 1, col 1
    assert not pix[6:12, 16:].any() and not pix[12:].any()


def test_slices_read_by_nibabel(case):
    vols, affine, info = case
    nz = vols[0].shape[2]
    slices = volume_to_slices(vols[2], affine, info, 2)
    assert len(slices) == nz
    positions = []
    for k, ds in enumerate(slices):
        wrapper = dicomwrappers.wrapper_from_data(ds)
        assert not wrapper.is_mosaic
        np.testing.assert_array_equal(wrapper.get_data(), vols[2][:, :, k].T)
        slice_aff = affine.copy()
        slice_aff[:3, 3] = affine[:3, :3] @ [0, 0, k] + affine[:3, 3]
        np.testing.assert_allclose(LPS @ wrapper.affine @ SWAP_IJ, slice_aff, atol=1e-6)
        positions.append(wrapper.slice_indicator)
        csa = csareader.get_csa_header(ds, "image")
        assert csareader.get_scalar(csa, "ProtocolSliceNumber") == k
        assert csareader.get_n_mosaic(csa) is None
    np.testing.assert_allclose(np.diff(positions), np.linalg.norm(affine[:3, 2]), atol=1e-6)


# ----------------------------------------------------------------------- dcm2niix


@pytest.mark.system
def test_dcm2niix_reads_mosaics(case, tmp_path):
    vols, affine, info = case
    src = tmp_path / "dicom"
    src.mkdir()
    for n, vol in enumerate(vols):
        write_dataset(volume_to_mosaic(vol, affine, info, n), src / f"{n:04d}.dcm")
    img, meta, log = run_dcm2niix(src, tmp_path / "nii")
    assert "warning" not in log.lower() and "error" not in log.lower(), log
    assert img.shape == vols[0].shape + (3,)
    assert_same_as_dcm2niix(img, vols, affine)
    assert meta["RepetitionTime"] == info.tr_s
    np.testing.assert_allclose(meta["SliceTiming"], expected_times(info, vols[0].shape[2]),
                               rtol=1e-5, atol=1e-6)
    assert meta["Manufacturer"] == "Siemens"
    assert "MOSAIC" in meta["ImageType"]


@pytest.mark.system
def test_dcm2niix_reads_single_slices(case, tmp_path):
    vols, affine, info = case
    src = tmp_path / "dicom"
    src.mkdir()
    for n, vol in enumerate(vols):
        for k, ds in enumerate(volume_to_slices(vol, affine, info, n)):
            write_dataset(ds, src / f"{n:04d}_{k:03d}.dcm")
    img, meta, log = run_dcm2niix(src, tmp_path / "nii")
    assert "warning" not in log.lower() and "error" not in log.lower(), log
    assert img.shape == vols[0].shape + (3,)
    assert_same_as_dcm2niix(img, vols, affine)
    assert meta["RepetitionTime"] == info.tr_s
    np.testing.assert_allclose(meta["SliceTiming"], expected_times(info, vols[0].shape[2]),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- dataset content


def test_slice_dataset_attributes(rng):
    data = rng.integers(0, 4000, size=(16, 12, 5), dtype=np.uint16)
    info = new_series_info(3, 1.5, n_volumes=10, start_time=START, te_s=0.025)
    affine = make_affine(data.shape, (3.0, 3.0, 4.0))
    index = 4
    slices = volume_to_slices(data, affine, info, index)
    uids = {ds.SOPInstanceUID for ds in slices}
    assert len(uids) == 5
    for k, ds in enumerate(slices):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == MR_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "MR"
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
            info.study_uid, info.series_uid, info.frame_of_reference_uid)
        assert ds.PatientName == "SIM^PHANTOM" and ds.PatientID == "SIM0001"
        assert ds.InstanceNumber == index * 5 + k + 1
        assert ds.AcquisitionNumber == ds.TemporalPositionIdentifier == index + 1
        assert ds.NumberOfTemporalPositions == 10
        assert ds.ImagesInAcquisition == 5
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert (ds.Rows, ds.Columns) == (12, 16)
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert float(ds.RepetitionTime) == 1500.0 and float(ds.EchoTime) == 25.0
        assert [float(v) for v in ds.PixelSpacing] == [3.0, 3.0]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 4.0
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   (affine @ [0, 0, k, 1])[:3] * [-1, -1, 1], atol=1e-9)
        assert dicom_epoch(ds) == pytest.approx(START + index * 1.5 + k * 1.5 / 5, abs=1e-6)
        np.testing.assert_array_equal(ds.pixel_array, data[:, :, k].T)


def test_mosaic_dataset_attributes(rng):
    data = rng.integers(-100, 100, size=(10, 10, 7), dtype=np.int16)
    info = new_series_info(4, 2.5, start_time=START, manufacturer="ACME")
    ds = volume_to_mosaic(data, make_affine(data.shape, (2.0, 2.0, 2.0)), info, 3)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    assert ds.Manufacturer == "SIEMENS"
    assert ds.InstanceNumber == ds.AcquisitionNumber == ds.TemporalPositionIdentifier == 4
    assert "NumberOfTemporalPositions" not in ds
    assert ds.PixelRepresentation == 1
    assert dicom_epoch(ds) == pytest.approx(START + 3 * 2.5, abs=1e-6)
    mr = ds.private_block(0x0019, "SIEMENS MR HEADER")
    assert mr[0x0A].value == 7
    assert float(mr[0x0B].value) == pytest.approx(2500.0 / 7)
    np.testing.assert_allclose(mr[0x29].value, np.arange(7) * 2500.0 / 7)
    assert ds.private_block(0x0051, "SIEMENS MR HEADER")[0x0B].value == "10p*10"


def test_non_siemens_slices_have_no_private_tags(rng):
    data = rng.integers(0, 10, size=(4, 4, 3), dtype=np.int16)
    info = new_series_info(1, 2.0, manufacturer="GE MEDICAL SYSTEMS")
    for ds in volume_to_slices(data, make_affine(data.shape, (1.0, 1.0, 1.0)), info, 0):
        assert not any(elem.tag.is_private for elem in ds)


@pytest.mark.system
def test_write_dataset_is_part10(tmp_path, rng):
    data = rng.integers(0, 10, size=(6, 5, 4), dtype=np.int16)
    ds = volume_to_mosaic(data, make_affine(data.shape, (2.0, 2.0, 2.0)),
                          new_series_info(1, 2.0), 0)
    path = tmp_path / "x.dcm"
    write_dataset(ds, path)
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]
    back = pydicom.dcmread(path)  # force=False: needs a preamble and file meta
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back == ds
    subprocess.run(["/usr/bin/dcmdump", "-q", "-E", str(path)], check=True,
                   capture_output=True, timeout=20)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d, a, i: (d.astype(np.float32), a, i), "int16 or uint16"),
        (lambda d, a, i: (d.astype(np.int32), a, i), "int16 or uint16"),
        (lambda d, a, i: (d[:, :, 0], a, i), "shape"),
        (lambda d, a, i: (d, a @ np.diag([1.0, 1.0, -1.0, 1.0]), i), "k axis"),
        (lambda d, a, i: (d, a @ np.diag([-1.0, 1.0, 1.0, 1.0]), i), "k axis"),
        (lambda d, a, i: (d, _tilted(a), i), "k axis"),
        (lambda d, a, i: (d, _sheared(a), i), "orthogonal"),
        (lambda d, a, i: (d, a, SeriesInfo(**{**vars(i), "slice_times_s": (0.0, 0.1)})),
         "slice_times_s"),
        (lambda d, a, i: (d, a, SeriesInfo(**{**vars(i), "slice_times_s": (0.0, 0.5, 2.0)})),
         "slice_times_s"),
    ],
)
def test_invalid_input_raises(change, match, rng):
    data = rng.integers(0, 10, size=(4, 4, 3), dtype=np.int16)
    args = change(data, make_affine(data.shape, (2.0, 2.0, 2.0)), new_series_info(1, 2.0))
    with pytest.raises(ValueError, match=match):
        volume_to_slices(*args, 0)
    with pytest.raises(ValueError, match=match):
        volume_to_mosaic(*args, 0)


def _tilted(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[:3, 2] = rotation(0.05) @ out[:3, 2]  # slices no longer stacked along the normal
    return out


def _sheared(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[:3, 1] += 0.2 * out[:3, 0]
    return out


def test_index_beyond_n_volumes_raises(rng):
    data = rng.integers(0, 10, size=(4, 4, 3), dtype=np.int16)
    with pytest.raises(ValueError, match="n_volumes"):
        volume_to_mosaic(data, make_affine(data.shape, (1.0, 1.0, 1.0)),
                         new_series_info(1, 2.0, n_volumes=2), 2)
