"""A full disk (issue 16, item 7): the archive refuses, the outputs stay readable and agree.

The disk is a real 8 MB tmpfs mounted for the test when the machine lets us mount (root
in the sandbox and in CI); it is filled by a filler file and given back by deleting it,
so every write sees the kernel's own ENOSPC, short writes included. Where mount is not
permitted the same tests run with ENOSPC injected at ``os.pwrite``/``os.write`` for files
under the disk's folder (a short write, then ENOSPC), and say so in their id.

What must hold after ENOSPC, whatever volume it hit:

- each volume is in bold.nii, bold.nii.gz and confounds.tsv, or in none of them;
- bold.nii's header (and bold.nii.gz's) counts the volumes on disk, confounds.tsv has a
  row for each, qc.json says how many were written and which were not;
- one ``disk_full`` alert (critical) per episode, an ``info`` ``writing_resumed`` when
  volumes are written again, no traceback, no ``internal_error``;
- the archive refuses what it cannot store and leaves no ``.part`` behind.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import queue
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest

from rtsc.output import nifti as nifti_module
from rtsc.output.series_writer import SeriesWriter
from rtsc.output.session import SessionStore
from rtsc.volume import SeriesInfo, Volume
from dicom_files import mosaic_file_bytes
from test_session import FMRIPREP_COLUMNS, make_affine, make_volume

SHAPE = (32, 32, 16)  # int16: 32 KiB a volume


class Disk:
    """A small file system that can be filled up and given back."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind
        self._filler = root / ".filler"
        self.full = False

    def fill(self) -> None:
        """Take every free byte (tmpfs: a filler file written until ENOSPC)."""
        if self.kind == "tmpfs":
            fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            chunk = b"\0" * (1 << 20)
            try:
                while True:
                    while os.write(fd, chunk) == len(chunk):
                        pass
                    chunk = chunk[:len(chunk) // 2] or b"\0"
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) > 1:  # fill the last pages too, down to the byte
                    chunk = b"\0"
                    try:
                        while True:
                            os.write(fd, chunk)
                    except OSError:
                        pass
            finally:
                os.close(fd)
        self.full = True

    def free(self) -> None:
        if self.kind == "tmpfs":
            self._filler.unlink()
        self.full = False


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    if os.environ.get("RTSC_TEST_NO_MOUNT"):  # to run the injected variant on purpose
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
                            capture_output=True)
    return result.returncode == 0


def _inject_enospc(monkeypatch: pytest.MonkeyPatch, disk: Disk) -> None:
    """Writes to files under ``disk.root`` while it is full: a short write of what is
    left of a 1000-byte budget, then ENOSPC (what a real disk does)."""
    real_pwrite, real_write = os.pwrite, os.write
    budget = {"left": 0}
    prefix = str(disk.root.resolve()) + "/"

    def on_disk(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(prefix)
        except OSError:
            return False

    def limit(fd: int, data: Any) -> Any:
        if not disk.full or not on_disk(fd):
            budget["left"] = 1000
            return data
        view = memoryview(data).cast("B")
        if budget["left"] <= 0 or not len(view):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        take = min(budget["left"], len(view))
        budget["left"] -= take
        return view[:take]

    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(
        fd, limit(fd, data), offset))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, limit(fd, data)))


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """The small disk: a real tmpfs, or injected ENOSPC where mount is not permitted
    (the test's log says which)."""
    where = tmp_path / "disk"
    if _mount_tmpfs(where):
        logging.getLogger(__name__).info("disk: an 8 MB tmpfs")
        yield Disk(where, "tmpfs")
        subprocess.run(["umount", "-l", str(where)], check=False)
    else:
        logging.getLogger(__name__).warning("disk: mount not permitted; ENOSPC injected")
        d = Disk(where, "injected")
        _inject_enospc(monkeypatch, d)
        yield d


def _gzip_volumes(path: Path) -> tuple[int, bytes]:
    """(header volume count, voxel bytes) of a .nii.gz, read with the gzip module alone
    (a broken stream raises)."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]))
    return int(header["dim"][4]), raw[352:]


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[:len(FMRIPREP_COLUMNS)] == FMRIPREP_COLUMNS
    return [line.split("\t") for line in lines[1:]]


def _frames(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 3000, size=SHAPE).astype(np.float32) for _ in range(n)]


# ---- the series writer ------------------------------------------------------------------

def test_series_writer_writes_each_volume_whole_or_not_at_all(disk: Disk,
                                                             rng: np.random.Generator) -> None:
    series = disk.root / "series"
    series.mkdir()
    frames = _frames(rng, 30)
    volumes = [make_volume(f, i, stored_dtype=np.int16) for i, f in enumerate(frames)]
    writer = SeriesWriter(series, volumes[0])
    volume_bytes = int(np.prod(SHAPE)) * 2
    written: list[int] = []
    for vol in volumes:
        if vol.index == 10:
            disk.fill()
        if vol.index == 20:
            disk.free()
        metrics = {"global_signal": float(vol.index)}
        if disk.full:
            with pytest.raises(OSError) as err:
                writer.append(vol, metrics)
            assert err.value.errno == errno.ENOSPC
        else:
            writer.append(vol, metrics)
            written.append(vol.index)
        # after every volume, failed or not: the files agree with each other
        n = len(written)
        img = nib.load(series / "bold.nii")
        assert img.shape == (*SHAPE, n)
        assert (series / "bold.nii").stat().st_size == 352 + n * volume_bytes
        rows = _rows(series / "confounds.tsv")
        assert [float(r[FMRIPREP_COLUMNS.index("global_signal")]) for r in rows] == written
        del img
    assert writer.n_written == 20 and writer.not_written == list(range(10, 20))
    outputs = writer.finish({"n_volumes": 30, "n_volumes_written": writer.n_written,
                             "volumes_not_written": writer.not_written})
    assert outputs["bold"] == str(series / "bold.nii.gz")
    n, voxels = _gzip_volumes(series / "bold.nii.gz")
    assert n == 20
    expected = np.stack([frames[i] for i in written], axis=-1).astype(np.int16)
    assert voxels == expected.tobytes(order="F")  # the stream went on as if 10-19 never came
    assert subprocess.run(["gzip", "-t", str(series / "bold.nii.gz")]).returncode == 0
    assert len(_rows(series / "confounds.tsv")) == 20
    assert json.loads((series / "qc.json").read_text())["volumes_not_written"] == \
        list(range(10, 20))
    assert not list(disk.root.rglob("*.part"))


def test_series_still_full_at_its_end_completes_bold_nii_gz_and_says_what_failed(
        disk: Disk, rng: np.random.Generator) -> None:
    """Every volume is its own gzip member, written with the volume: closing the .gz
    only rewrites its header in place, so a disk still full at the end keeps the volumes
    that were written, compressed and whole."""
    series = disk.root / "series"
    series.mkdir()
    frames = _frames(rng, 6)
    volumes = [make_volume(f, i, stored_dtype=np.int16) for i, f in enumerate(frames)]
    writer = SeriesWriter(series, volumes[0])
    for vol in volumes[:4]:
        writer.append(vol, {})
    disk.fill()
    for vol in volumes[4:]:
        with pytest.raises(OSError):
            writer.append(vol, {})
    failures: list[str] = []
    outputs = writer.finish({"n_volumes": 6}, final_columns={"dvars": np.arange(6.0)},
                            maps={"tsnr": np.ones(SHAPE)},
                            on_error=lambda what, exc: failures.append(what))
    # nothing half-written: the maps are absent, bold.nii.gz holds the 4 whole volumes;
    # confounds.tsv keeps its rows
    assert outputs["bold"] == str(series / "bold.nii.gz")
    image = nib.load(series / "bold.nii.gz")
    np.testing.assert_array_equal(image.get_fdata(), np.stack(frames[:4], axis=-1))
    assert not (series / "bold.nii").exists()
    assert len(_rows(series / "confounds.tsv")) == 4
    assert not list((series / "maps").glob("*")) if (series / "maps").exists() else True
    assert "the maps" in failures and not any("bold" in f for f in failures)
    # qc.json is whole or absent
    if "qc" in outputs:
        assert json.loads((series / "qc.json").read_text()) == {"n_volumes": 6}
    else:
        assert not (series / "qc.json").exists() and "qc.json" in failures
    disk.free()
    assert not list(disk.root.rglob("*.part"))


def test_bold_nii_gz_that_cannot_be_completed_leaves_bold_nii(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error closing the .gz (its fsync) keeps the plain bold.nii, whole, and says so."""
    frames = _frames(rng, 3)
    volumes = [make_volume(f, i, stored_dtype=np.int16) for i, f in enumerate(frames)]
    writer = SeriesWriter(tmp_path, volumes[0])
    for vol in volumes:
        writer.append(vol, {})

    def failing_fsync(self: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(nifti_module.OutputFile, "fsync", failing_fsync)
    failures: list[str] = []
    outputs = writer.finish({"n_volumes": 3}, on_error=lambda what, exc: failures.append(what))
    assert outputs["bold"] == str(tmp_path / "bold.nii")
    np.testing.assert_array_equal(nib.load(tmp_path / "bold.nii").get_fdata(),
                                  np.stack(frames, axis=-1))
    assert "bold.nii.gz (bold.nii kept)" in failures
    assert not (tmp_path / "bold.nii.gz").exists()


def test_series_writer_created_on_a_full_disk_starts_when_space_returns(
        disk: Disk, rng: np.random.Generator) -> None:
    series = disk.root / "series"
    series.mkdir()
    frames = _frames(rng, 4)
    volumes = [make_volume(f, i, stored_dtype=np.int16) for i, f in enumerate(frames)]
    disk.fill()
    writer = SeriesWriter(series, volumes[0])  # does not raise: an observer
    with pytest.raises(OSError):
        writer.append(volumes[0], {})
    assert not list(series.iterdir())  # nothing half-created
    disk.free()
    for vol in volumes[1:]:
        writer.append(vol, {})
    outputs = writer.finish({})
    assert nib.load(outputs["bold"]).shape == (*SHAPE, 3)
    assert writer.not_written == [0]


# ---- the archive ------------------------------------------------------------------------

def test_archive_refuses_on_a_full_disk_leaves_no_part_and_reports_once(disk: Disk) -> None:
    store = SessionStore(disk.root / "sessions")
    errors: list[OSError] = []
    store.on_archive_error = errors.append
    store.archive("1.2.3", b"x" * 1000)
    disk.fill()
    for _ in range(5):
        with pytest.raises(OSError):
            store.archive("1.2.3", os.urandom(100_000))
    assert len(errors) == 1 and errors[0].errno == errno.ENOSPC  # once per run of failures
    assert not list(disk.root.rglob("*.part"))  # each failed write removed its .part
    disk.free()
    store.archive("1.2.3", b"y" * 1000)
    disk.fill()
    with pytest.raises(OSError):
        store.archive("1.2.3", os.urandom(100_000))
    assert len(errors) == 2  # a new run after a success is reported again
    disk.free()
    with pytest.raises(OSError):  # a PAR/REC pair is archived whole or not at all
        disk.fill()
        store.archive_set("1.2.3", {".par": b"p" * 10, ".rec": os.urandom(100_000)})
    disk.free()
    names = sorted(p.name for p in disk.root.rglob("dicom/*"))
    assert names == ["000001.dcm", "000007.dcm"]


@pytest.mark.slow
def test_watcher_leaves_a_file_it_cannot_archive_and_takes_it_when_space_returns(
        disk: Disk, tmp_path: Path, rng: np.random.Generator) -> None:
    from rtsc.config import WatcherConfig
    from rtsc.intake.watcher import FolderWatcher

    whole, _ = mosaic_file_bytes(tmp_path, rng)
    inbox = tmp_path / "inbox"  # not on the small disk: only the archive is full
    inbox.mkdir()
    out: queue.Queue = queue.Queue()
    watcher = FolderWatcher(WatcherConfig(dir=str(inbox), poll_s=0.01, settle_s=0.02,
                                          retry_s=0.1), SessionStore(disk.root / "s"), out)
    watcher.start()
    try:
        disk.fill()
        (inbox / "0001.dcm").write_bytes(whole)
        (inbox / "0002.dcm").write_bytes(whole)
        time.sleep(1.5)
        assert out.empty()  # refused: not taken, not handed on, retried
        assert watcher._thread is not None and watcher._thread.is_alive()
        disk.free()
        deadline = time.time() + 5
        while out.qsize() < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        watcher.close()
    items = [out.get_nowait() for _ in range(out.qsize())]
    assert [i.path.read_bytes() == whole for i in items] == [True, True]
    names = [i.path.name for i in items]
    assert names == sorted(names) and len(set(names)) == 2
    assert len(list(disk.root.rglob("*.dcm"))) == 2 and not list(disk.root.rglob("*.part"))


# ---- the service ------------------------------------------------------------------------

def _volume(index: int, info: SeriesInfo, rng: np.random.Generator) -> Volume:
    """A head-like blob (registration converges) with a little noise, stored as int16."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    blob = 1000.0 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / 0.3) + 100.0
    data = np.rint(blob + rng.normal(0, 5, SHAPE)).astype(np.float32)
    t = time.time()
    return Volume(data=np.asfortranarray(data), affine=make_affine(), index=index, info=info,
                  t_acquired=None, t_received=t, t_assembled=t, stored_dtype=np.dtype(np.int16))


def _feeder(service, collector, info: SeriesInfo, rng: np.random.Generator):
    """feed(range): put those volumes on the worker's queue and wait until each is
    published and given to the series writer."""

    def feed(indices: range) -> None:
        for i in indices:
            service.queue.put(_volume(i, info, rng))
        deadline = time.time() + 30

        def given() -> int:  # volumes given to the writer (it writes after publishing)
            active = service.series.active.get(info.series)
            if active is None:  # ended: all of them
                return indices.stop if info.series in service.series.ended else 0
            if not hasattr(active.writer, "not_written"):  # (the code before the fix)
                time.sleep(0.2)
                return len(collector.topic("volume"))
            return active.writer.n_written + len(active.writer.not_written)

        while (given() < indices.stop or len(collector.topic("volume")) < indices.stop) \
                and time.time() < deadline:
            time.sleep(0.02)
        assert len(collector.topic("volume")) == indices.stop

    return feed


def _service(service_factory, disk: Disk, n_expected: int):
    service, collector = service_factory(
        session={"dir": str(disk.root / "sessions"), "report": False},
        receiver={"enabled": False})
    info = SeriesInfo(series="0123456789ab", tr_s=1.0, n_expected=n_expected,
                      series_number=1, description="bold", source="nifti")
    return service, collector, info


def test_service_alerts_once_per_episode_and_resumes_writing(
        service_factory, disk: Disk, rng: np.random.Generator,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    service, collector, info = _service(service_factory, disk, 30)
    feed = _feeder(service, collector, info, rng)
    feed(range(0, 10))
    disk.fill()
    feed(range(10, 20))  # processed and published all the same
    disk.free()
    feed(range(20, 30))
    assert collector.ended.wait(30)

    alerts = [(m.header["level"], m.header["code"]) for m in collector.topic("alert")]
    assert alerts.count(("critical", "disk_full")) == 1
    assert alerts.count(("info", "writing_resumed")) == 1
    assert not [a for a in alerts if a[1] in ("internal_error", "write_failed")]
    (resumed,) = [m.header for m in collector.topic("alert")
                  if m.header["code"] == "writing_resumed"]
    assert resumed["index"] == 20 and "10 volume(s) of this series not written (10-19)" \
        in resumed["message"]
    assert not [r for r in caplog.records if r.exc_info], "tracebacks in the log"

    end = collector.topic("series.end")[0].header
    series_dir = Path(end["outputs"]["bold"]).parent
    n, voxels = _gzip_volumes(series_dir / "bold.nii.gz")
    qc = json.loads((series_dir / "qc.json").read_text())
    assert n == 20 == len(voxels) // (int(np.prod(SHAPE)) * 2)
    assert len(_rows(series_dir / "confounds.tsv")) == 20
    assert qc["n_volumes"] == 30 and qc["n_volumes_written"] == 20
    assert qc["volumes_not_written"] == list(range(10, 20))
    assert end["summary"]["volumes_not_written"] == list(range(10, 20))
    for path in (series_dir / "maps").glob("*.nii.gz"):
        assert nib.load(path).shape == SHAPE
    assert not list(disk.root.rglob("*.part"))


def test_series_ending_on_a_full_disk_is_still_published(
        service_factory, disk: Disk, rng: np.random.Generator,
        caplog: pytest.LogCaptureFixture) -> None:
    """The series ends while the disk is still full: series.end is published (it used to
    be lost with the exception), bold.nii stays complete, qc.json is whole or absent."""
    caplog.set_level(logging.DEBUG)
    service, collector, info = _service(service_factory, disk, 10)
    feed = _feeder(service, collector, info, rng)
    feed(range(0, 6))
    disk.fill()
    feed(range(6, 10))
    assert collector.ended.wait(30), "no series.end"
    end = collector.topic("series.end")[0].header
    alerts = [(m.header["level"], m.header["code"]) for m in collector.topic("alert")]
    assert alerts.count(("critical", "disk_full")) == 1
    assert not [a for a in alerts if a[1] == "internal_error"]
    assert not [r for r in caplog.records if r.exc_info], "tracebacks in the log"
    assert end["summary"]["n_volumes_written"] == 6
    assert end["summary"]["volumes_not_written"] == [6, 7, 8, 9]
    bold = Path(end["outputs"]["bold"])
    if bold.name == "bold.nii":  # the .gz could not be completed
        assert nib.load(bold).shape == (*SHAPE, 6)
    else:
        assert _gzip_volumes(bold)[0] == 6
    if "qc" in end["outputs"]:
        assert json.loads(Path(end["outputs"]["qc"]).read_text())["n_volumes_written"] == 6
    assert len(_rows(bold.parent / "confounds.tsv")) == 6
    disk.free()
    assert not list(disk.root.rglob("*.part"))
