"""Session outputs: directory naming, the raw archive, the growing NIfTI, the series writer."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

import rtsc.output.session as session_mod
from rtsc.output.nifti import GrowingNifti
from rtsc.output.series_writer import SeriesWriter
from rtsc.output.session import SessionStore
from rtsc.volume import SeriesInfo, Volume, series_id

UID = "1.3.12.2.1107.5.2.43.66012.2026112509150012345678901"
FMRIPREP_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                    "framewise_displacement", "dvars", "std_dvars", "global_signal"]
DIR_NAME = re.compile(r"^(\d{8})-(\d{6})_([0-9a-f]{12})(-\d+)?$")


def make_affine() -> np.ndarray:
    """An oblique voxel -> RAS+ mm affine, 2 x 2.5 x 3 mm voxels."""
    angle = 0.2
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [-20.0, -30.5, 12.25]
    return affine


def make_volume(data: np.ndarray, index: int, *, stored_dtype: Any = np.float32,
                tr_s: float | None = 2.0, series: str = "abcdef012345") -> Volume:
    """A Volume as the assembler builds it: (nx, ny, nz) float32, Fortran-ordered."""
    info = SeriesInfo(series=series, tr_s=tr_s, n_expected=None, series_number=3,
                      description="bold", source="mosaic")
    t = time.time()
    return Volume(data=np.asfortranarray(data, dtype=np.float32), affine=make_affine(),
                  index=index, info=info, t_acquired=t - 0.5, t_received=t, t_assembled=t,
                  stored_dtype=np.dtype(stored_dtype))


class _FrozenClock:
    """Stands in for the ``time`` module in rtsc.output.session: every strftime is the same second."""

    FIXED = time.struct_time((2026, 11, 25, 9, 15, 0, 2, 329, 0))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def strftime(self, fmt: str, t: Any = None) -> str:
        return time.strftime(fmt, self.FIXED)


# ---- SessionStore ----------------------------------------------------------------------

def test_series_dir_name_is_time_and_series_id(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions")  # root need not exist yet
    before = time.localtime()
    directory = store.series_dir("0123456789ab")
    after = time.localtime()
    assert directory.parent == tmp_path / "sessions"
    match = DIR_NAME.match(directory.name)
    assert match is not None, directory.name
    assert match.group(3) == "0123456789ab" and match.group(4) is None
    stamp = time.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S")
    assert time.mktime(before) - 1 <= time.mktime(stamp) <= time.mktime(after) + 1
    assert (directory / "dicom").is_dir()
    # the same series maps to the same directory
    assert store.series_dir("0123456789ab") == directory
    assert store.series_dir("ba9876543210") != directory


def test_second_store_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "time", _FrozenClock())
    first = SessionStore(tmp_path).series_dir("0123456789ab")
    assert first.name == "20261125-091500_0123456789ab"
    (first / "qc.json").write_text("keep me")
    # A restart (new store, same root, same series, same second) gets a new directory.
    second = SessionStore(tmp_path).series_dir("0123456789ab")
    assert second.name == "20261125-091500_0123456789ab-2"
    third = SessionStore(tmp_path).series_dir("0123456789ab")
    assert third.name == "20261125-091500_0123456789ab-3"
    assert (first / "qc.json").read_text() == "keep me"
    assert sorted(p.name for p in second.iterdir()) == ["dicom"]
    assert list((second / "dicom").iterdir()) == []


def test_archive_writes_exact_bytes_in_sequence(tmp_path: Path, rng: np.random.Generator) -> None:
    store = SessionStore(tmp_path)
    payloads = [rng.bytes(n) for n in (0, 1, 4096, 100_003)]
    paths = [store.archive(UID, p) for p in payloads]
    assert [p.name for p in paths] == ["000001.dcm", "000002.dcm", "000003.dcm", "000004.dcm"]
    assert {p.parent for p in paths} == {store.series_dir(series_id(UID)) / "dicom"}
    for path, payload in zip(paths, payloads):
        assert path.read_bytes() == payload
    assert sorted(paths[0].parent.iterdir()) == sorted(paths)  # no .part left behind
    # Another series counts from 1 in its own directory.
    other = store.archive(UID + ".2", b"x")
    assert other.name == "000001.dcm" and other.parent != paths[0].parent


def test_reserve_then_write_commit(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    path = store.reserve(UID)
    assert path.name == "000001.dcm" and not path.exists()
    pending = store.write(path, b"DICM-bytes")
    assert not path.exists()
    assert pending.commit() == path
    assert path.read_bytes() == b"DICM-bytes"
    assert store.reserve(UID).name == "000002.dcm"


def test_series_dir_never_contains_the_uid(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    path = store.archive(UID, b"payload")
    expected_id = hashlib.sha256(UID.encode("ascii")).hexdigest()[:12]
    series_dir = path.parent.parent
    assert series_dir.name.endswith("_" + expected_id)
    for part in path.relative_to(tmp_path).parts:
        assert UID not in part
        assert "1.3.12" not in part
    assert series_id(UID) == expected_id


def test_quarantine(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    a = store.quarantine(b"not dicom at all")
    b = store.quarantine(b"\x00" * 10)
    assert a.parent == b.parent == tmp_path / "rejected"
    assert a != b
    assert a.read_bytes() == b"not dicom at all"
    assert b.read_bytes() == b"\x00" * 10
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == sorted([a.name, b.name])
    assert a.suffix == ".dcm"


# ---- GrowingNifti -----------------------------------------------------------------------

def _read_nifti(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()  # the file keeps growing
    return data, img


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_growing_nifti_is_valid_after_each_append(tmp_path: Path, rng: np.random.Generator,
                                                  dtype: Any) -> None:
    shape = (6, 5, 4)
    affine = make_affine()
    volumes = [rng.normal(500, 100, size=shape).astype(dtype) for _ in range(4)]
    path = tmp_path / "bold.nii"
    growing = GrowingNifti(path, shape, affine, np.dtype(dtype), tr_s=1.5)
    for n, vol in enumerate(volumes, start=1):
        growing.append(np.asfortranarray(vol))
        assert growing.n == n
        assert path.stat().st_size == 352 + n * vol.nbytes
        data, img = _read_nifti(path)
        assert img.shape == (*shape, n)
        assert img.get_data_dtype() == np.dtype(dtype)
        assert data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(data, np.stack(volumes[:n], axis=-1))
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        zooms = img.header.get_zooms()
        np.testing.assert_allclose(zooms, (2.0, 2.5, 3.0, 1.5), rtol=1e-6)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        del img
    gz = growing.finish()
    assert gz == tmp_path / "bold.nii.gz"
    assert not path.exists()
    with gzip.open(gz) as fh:
        assert fh.read(4) == (348).to_bytes(4, "little")  # a real gzip of a NIfTI-1
    img = nib.load(gz)
    assert img.shape == (*shape, 4)
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.stack(volumes, axis=-1))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)


def test_growing_nifti_gzip_is_written_as_volumes_arrive(tmp_path: Path,
                                                         rng: np.random.Generator) -> None:
    """bold.nii.gz grows with the series; at the end the gzip tool decompresses it to
    exactly the bytes of the finished bold.nii, and finishing does not compress anew."""
    shape = (64, 64, 8)
    path = tmp_path / "bold.nii"
    growing = GrowingNifti(path, shape, make_affine(), np.dtype(np.int16), tr_s=2.0)
    part = tmp_path / "bold.nii.gz.part"
    sizes = []
    for _ in range(5):
        growing.append(np.asfortranarray(rng.integers(0, 3000, size=shape, dtype=np.int16)))
        sizes.append(part.stat().st_size)
    assert sizes[-1] > sizes[0]  # compressed data went out with the volumes
    expected = path.read_bytes()  # the uncompressed file, valid at every moment
    gz = growing.finish()
    assert not part.exists() and not path.exists()
    # finish wrote only the compressor's tail, not the series again
    assert gz.stat().st_size - sizes[-1] < 0.25 * gz.stat().st_size
    result = subprocess.run(["gzip", "-dc", str(gz)], capture_output=True, check=True)
    assert result.stdout == expected
    assert subprocess.run(["gzip", "-t", str(gz)]).returncode == 0
    assert nib.load(gz).shape == (*shape, 5)


def test_growing_nifti_keeps_voxel_order(tmp_path: Path) -> None:
    """Voxel (i, j, k) of the array is voxel (i, j, k) of the file, whatever the memory order."""
    shape = (3, 4, 5)
    data = np.arange(60, dtype=np.float32).reshape(shape)  # C-ordered input
    growing = GrowingNifti(tmp_path / "v.nii", shape, np.eye(4), np.dtype(np.float32), None)
    growing.append(data)
    growing.append(np.asfortranarray(data) * 2)
    out = np.asarray(nib.load(growing.finish()).dataobj)
    np.testing.assert_array_equal(out[..., 0], data)
    np.testing.assert_array_equal(out[..., 1], data * 2)
    assert out[2, 1, 4, 0] == data[2, 1, 4]


# ---- SeriesWriter -------------------------------------------------------------------------

def _metrics(rng: np.random.Generator, index: int) -> dict[str, Any]:
    values: dict[str, Any] = {name: float(rng.normal(0, 0.5)) for name in FMRIPREP_COLUMNS}
    values["global_signal"] = 812.123456 + index
    if index == 0:  # fMRIPrep leaves the first dvars/std_dvars empty
        values["dvars"] = None
        values["std_dvars"] = None
        values["framewise_displacement"] = 0.0
    if index == 2:
        values["std_dvars"] = float("nan")
    values["outlier"] = False  # not a confounds column
    return values


def _parse_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines]
    return rows[0], rows[1:]


def test_series_writer_confounds_and_qc(tmp_path: Path, rng: np.random.Generator) -> None:
    shape = (6, 5, 4)
    frames = [rng.normal(500, 50, size=shape).astype(np.float32) for _ in range(3)]
    volumes = [make_volume(f, i, tr_s=2.0) for i, f in enumerate(frames)]
    writer = SeriesWriter(tmp_path, volumes[0])
    header, rows = _parse_tsv(tmp_path / "confounds.tsv")
    assert header == FMRIPREP_COLUMNS and rows == []
    metrics = []
    for vol in volumes:
        metrics.append(_metrics(rng, vol.index))
        writer.append(vol, metrics[-1])
        _, rows = _parse_tsv(tmp_path / "confounds.tsv")
        assert len(rows) == vol.index + 1  # appended as volumes arrive
        # bold.nii is readable while the series runs
        assert nib.load(tmp_path / "bold.nii").shape == (*shape, vol.index + 1)

    summary = {"n_volumes": 3, "fd_mean": float("nan"), "tsnr": np.float32(55.5),
               "missing_volumes": [], "per_volume": [1.0, float("inf")]}
    outputs = writer.finish(summary)

    header, rows = _parse_tsv(tmp_path / "confounds.tsv")
    assert header == FMRIPREP_COLUMNS
    assert len(rows) == 3
    for row, values in zip(rows, metrics):
        assert len(row) == len(FMRIPREP_COLUMNS)
        for cell, name in zip(row, FMRIPREP_COLUMNS):
            expected = values[name]
            if expected is None or not np.isfinite(expected):
                assert cell == "n/a", name
            else:
                assert float(cell) == pytest.approx(expected, rel=1e-5, abs=1e-9), name
    assert rows[0][FMRIPREP_COLUMNS.index("dvars")] == "n/a"
    assert rows[2][FMRIPREP_COLUMNS.index("std_dvars")] == "n/a"

    qc_text = (tmp_path / "qc.json").read_text(encoding="utf-8")
    assert "NaN" not in qc_text and "Infinity" not in qc_text
    qc = json.loads(qc_text)
    assert qc == {"n_volumes": 3, "fd_mean": None, "tsnr": 55.5, "missing_volumes": [],
                  "per_volume": [1.0, None]}

    assert outputs["bold"] == str(tmp_path / "bold.nii.gz")
    assert outputs["confounds"] == str(tmp_path / "confounds.tsv")
    assert outputs["qc"] == str(tmp_path / "qc.json")
    assert outputs["dicom"] == str(tmp_path / "dicom")
    assert not (tmp_path / "bold.nii").exists()
    img = nib.load(outputs["bold"])
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.stack(frames, axis=-1))
    np.testing.assert_allclose(img.affine, make_affine(), atol=1e-5)
    assert img.header.get_zooms()[3] == pytest.approx(2.0)


def test_series_writer_keeps_integer_stored_dtype(tmp_path: Path, rng: np.random.Generator) -> None:
    shape = (8, 7, 3)
    ints = [rng.integers(-32768, 32767, size=shape, dtype=np.int16) for _ in range(2)]
    ints[0][0, 0, 0], ints[0][1, 0, 0] = -32768, 32767  # the extremes survive
    volumes = [make_volume(a.astype(np.float32), i, stored_dtype=np.int16)
               for i, a in enumerate(ints)]
    writer = SeriesWriter(tmp_path, volumes[0])
    for vol in volumes:
        writer.append(vol, {})
    outputs = writer.finish({})
    img = nib.load(outputs["bold"])
    assert img.get_data_dtype() == np.int16
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, np.stack(ints, axis=-1))
    # an empty metrics dict is a row of n/a
    _, rows = _parse_tsv(tmp_path / "confounds.tsv")
    assert rows == [["n/a"] * len(FMRIPREP_COLUMNS)] * 2


def test_confounds_accept_numpy_scalars(tmp_path: Path) -> None:
    """Stages may hand numpy scalars: NaN is still n/a, values keep their meaning."""
    writer = SeriesWriter(tmp_path, make_volume(np.ones((4, 4, 4)), 0))
    metrics = {name: np.float32(0.25) for name in FMRIPREP_COLUMNS}
    metrics["dvars"] = np.float32("nan")
    metrics["std_dvars"] = np.float64("inf")
    metrics["global_signal"] = np.float32(1234.5)
    writer.append(make_volume(np.ones((4, 4, 4)), 0), metrics)
    writer.finish({})
    _, rows = _parse_tsv(tmp_path / "confounds.tsv")
    row = dict(zip(FMRIPREP_COLUMNS, rows[0]))
    assert row["dvars"] == "n/a" and row["std_dvars"] == "n/a"
    assert row["trans_x"] == "0.25" and row["global_signal"] == "1234.5"


def test_archive_set_numbers_files_that_belong_together_once(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    first = store.archive(UID, b"dicom")
    pair = store.archive_set(UID, {".par": b"header text", ".rec": b"\x01\x02"})
    assert first.name == "000001.dcm"
    assert [pair[".par"].name, pair[".rec"].name] == ["000002.par", "000002.rec"]
    assert pair[".par"].read_bytes() == b"header text" and pair[".rec"].read_bytes() == b"\x01\x02"
    assert pair[".par"].parent == first.parent
    assert store.archive(UID, b"next").name == "000003.dcm"
    rec = store.quarantine(b"lone", suffix=".rec")
    assert rec.parent == tmp_path / "rejected" and rec.suffix == ".rec"
    assert rec.read_bytes() == b"lone"


# ---- issue 16, item 8: leftovers of a crash named at start-up; new folders fsynced ------

def test_new_series_folder_and_dicom_are_fsynced_in_their_parents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new directory entry is durable only once its parent is fsynced: the session root
    (created here with its parent), the series folder and dicom/ before the first file."""
    import os

    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "new" / "sessions"
    path = SessionStore(root).archive(UID, b"first")
    series = path.parent.parent
    assert fsynced == [str(tmp_path), str(tmp_path / "new"), str(root), str(series),
                       str(path) + ".part", str(series / "dicom")]
    fsynced.clear()
    rejected = SessionStore(root).quarantine(b"lone")
    assert fsynced == [str(root), str(rejected) + ".part", str(root / "rejected")]


def test_leftover_part_files_are_named_at_start_up_and_left_alone(
        service_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a killed run left half-written is named at the next start (warnings), never
    removed or rewritten (earlier folders are not touched)."""
    import logging

    root = tmp_path / "sessions"
    earlier = root / "20261125-091500_abcdef012345"
    (earlier / "dicom").mkdir(parents=True)
    (earlier / "maps").mkdir()
    (root / "rejected").mkdir()
    left = {earlier / "dicom" / "000003.dcm.part": b"cut DICOM",
            earlier / "bold.nii.gz.part": b"\x1f\x8b cut",
            earlier / "qc.json.part": b'{"n_vol',
            earlier / "maps" / "t_task.nii.gz.part": b"\x1f\x8b",
            root / "rejected" / "20261125-091501_000001.dcm.part": b"x"}
    for path, payload in left.items():
        path.write_bytes(payload)
    found = {leftover.path: leftover.what for leftover in SessionStore(root).leftovers()}
    assert set(found) == set(left)
    assert "never acknowledged" in found[earlier / "dicom" / "000003.dcm.part"]
    assert "bold.nii holds the volumes" in found[earlier / "bold.nii.gz.part"]
    assert "write of qc.json never finished" in found[earlier / "qc.json.part"]
    caplog.set_level(logging.WARNING, logger="rtsc.service.run")
    service_factory(receiver={"enabled": False})
    named = "\n".join(r.getMessage() for r in caplog.records if r.name == "rtsc.service.run")
    for path in left:
        assert str(path.relative_to(root)) in named
    assert all(path.read_bytes() == payload for path, payload in left.items())  # untouched
