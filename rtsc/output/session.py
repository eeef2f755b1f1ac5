"""Session outputs on disk: the raw archive and the per-series files.

Layout under ``session.dir``: one sub-directory per series, named from the local
date-time of its first dataset and the hashed series id (never from DICOM strings)::

    20261125-091500_3fa2b1c09d4e/
        dicom/000001.dcm ...     every received dataset, written and fsynced before success
                                 (a Philips PAR/REC dump: 000001.par + 000001.rec)
        bold.nii.gz              4D, as acquired (bold.nii while the series runs)
        confounds.tsv            one row per volume, appended as volumes arrive
        qc.json                  summary at series end (n_volumes_written and
                                 volumes_not_written: what a full disk kept out)

A volume is in bold.nii, bold.nii.gz and confounds.tsv, or in none of them (a write
that fails is cut off again); a write that fails leaves no ``.part`` behind.

A restart never overwrites: an existing directory name gets a ``-2``, ``-3`` suffix.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import nibabel as nib
import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import RtscError
from rtsc.messages import jsonable
from rtsc.volume import Volume, series_id

log = logging.getLogger(__name__)

CONFOUND_COLUMNS = (*MOTION_NAMES, "framewise_displacement", "dvars", "std_dvars",
                    "global_signal")


class DurableWrite:
    """A file written in two steps: :meth:`__init__` writes, :meth:`commit` makes it durable.

    The data go to ``<name>.part``; ``commit`` fsyncs it, renames it into place and
    fsyncs the directory. Between the two steps the caller can hand work on: the
    fsync is a system call that releases the GIL. If either step fails (a full disk),
    the ``.part`` is removed before the error is raised: nothing half-written is left
    behind, and a reader waiting for the file sees at once that it will not come.

    Parameters
    ----------
    path : Path
        The final path.
    payload : bytes
    on_error : callable(OSError) or None
        Called with the error before it is raised (the archive reports a full disk).
    on_success : callable() or None
        Called once the file is durable in place.
    """

    def __init__(self, path: Path, payload: bytes,
                 on_error: Callable[[OSError], None] | None = None,
                 on_success: Callable[[], None] | None = None) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._on_error = on_error
        self._on_success = on_success
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self._failed(exc)
            raise
        try:
            _write_all(self._fd, payload, 0)
        except BaseException as exc:
            os.close(self._fd)
            self._discard()
            if isinstance(exc, OSError):
                self._failed(exc)
            raise

    def commit(self) -> Path:
        """fsync, rename into place, fsync the directory; returns the final path."""
        try:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._discard()
            self._failed(exc)
            raise
        try:
            _fsync_dir(self.path.parent)
        except OSError as exc:
            # In place but its directory entry maybe not durable: not a success either.
            self._failed(exc)
            raise
        if self._on_success is not None:
            self._on_success()
        return self.path

    def _discard(self) -> None:
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            log.debug("cannot remove %s", self._tmp)

    def _failed(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error(exc)


def _write_all(fd: int, payload: bytes | memoryview, offset: int) -> None:
    """Write all of ``payload`` at ``offset``; a short write (the last free blocks of a
    disk) is continued, so a full disk surfaces as the OSError (ENOSPC) of the next one."""
    view = memoryview(payload).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:  # not expected from a regular file; never loop on it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def _fsync_dir(path: Path) -> None:
    """fsync a directory: a new entry in it (file, rename, sub-directory) is durable only then."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_durable(path: Path, exist_ok: bool = False) -> bool:
    """Create ``path`` (and missing parents) and fsync the parent of each directory
    created, so that it survives a power cut; returns whether ``path`` was created."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=exist_ok)
    for created in reversed(missing):
        _fsync_dir(created.parent)
    return bool(missing)


def _fsync_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    DurableWrite(path, payload).commit()


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class SessionStore:
    """Maps series to their output directories; thread-safe (receiver and worker share it).

    Parameters
    ----------
    root : path
        ``session.dir``; created if missing.

    Attributes
    ----------
    on_archive_error : callable(OSError) or None
        Called (on the thread that archives) with the first error of each run of failed
        archive writes (a full disk): the service turns it into one alert. The next
        archive write that succeeds ends the run.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dirs: dict[str, Path] = {}
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self.on_archive_error: Callable[[OSError], None] | None = None
        self._archive_failing = False

    def unfinished(self) -> list[tuple[Path, int | None]]:
        """Series folders an earlier run left without ``qc.json`` (it stopped mid-series),
        each with the volume count of its ``bold.nii`` (None if unreadable). They are
        left as they are: earlier data are never rewritten."""
        found = []
        for directory in sorted(self.root.glob("*/dicom")):
            series = directory.parent
            if (series / "qc.json").exists():
                continue
            try:
                n: int | None = int(nib.load(series / "bold.nii").shape[3])
            except Exception:  # noqa: BLE001 - missing or cut short: report, never fail
                n = None
            found.append((series, n))
        return found

    def leftovers(self) -> list[Leftover]:
        """``*.part`` files an earlier run left when it was killed: writes it never finished.

        An archive ``dicom/*.part`` was never acknowledged (success is answered only
        once the file is renamed into place), so its sender was told nothing and sends
        it again; ``bold.nii.gz.part`` is the compressed copy cut short (``bold.nii``
        holds the volumes); ``confounds.tsv.part``, ``qc.json.part`` and the like are
        rewrites that never replaced their file. Like :meth:`unfinished` they are named,
        not removed: earlier data are never touched.
        """
        found: list[Leftover] = []
        if not self.root.is_dir():
            return found
        for part in sorted(self.root.rglob("*.part")):
            if not part.is_file():
                continue
            if part.parent.name == "dicom" or part.parent.name == "rejected":
                what = "archive write never acknowledged (its sender was not told success)"
            elif part.name == "bold.nii.gz.part":
                what = "compressed copy cut short (bold.nii holds the volumes)"
            else:
                what = f"write of {part.name[:-len('.part')]} never finished"
            found.append(Leftover(part, what))
        return found

    def series_dir(self, series: str) -> Path:
        """Directory of the series with opaque id ``series``, created on first use."""
        with self._lock:
            found = self._dirs.get(series)
            if found is None:
                found = self._make_dir(series)
                self._dirs[series] = found
            return found

    def _make_dir(self, series: str) -> Path:
        # Each new directory entry is fsynced in its parent: an archived file whose
        # folder entry is lost in a power cut is lost too, fsynced or not.
        _mkdir_durable(self.root, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{series}"
        for attempt in range(1, 10000):
            candidate = self.root / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(self.root)
            (candidate / "dicom").mkdir()
            _fsync_dir(candidate)
            log.info("series %s -> %s", series, candidate)
            return candidate
        raise RtscError(f"cannot create a new series directory under {self.root}")

    def reserve(self, series_uid: str, suffix: str = ".dcm") -> Path:
        """The archive path for the next file of a series (nothing is written yet).

        Parameters
        ----------
        series_uid : str
            SeriesInstanceUID, or another series key (hashed here; never used in a path).
        suffix : str
            File name suffix: ``.dcm``, or ``.par``/``.rec`` for Philips PAR/REC dumps.

        Raises
        ------
        OSError
            The series folder cannot be created (a full disk).
        """
        sid = series_id(series_uid)
        try:
            directory = self.series_dir(sid) / "dicom"
        except OSError as exc:
            self._archive_failed(exc)
            raise
        with self._lock:
            number = self._counters.get(sid, 0) + 1
            self._counters[sid] = number
        return directory / f"{number:06d}{suffix}"

    def write(self, path: Path, payload: bytes) -> DurableWrite:
        """Start writing a reserved archive file; ``.commit()`` makes it durable."""
        return DurableWrite(path, payload, on_error=self._archive_failed,
                            on_success=self._archive_succeeded)

    def _archive_succeeded(self) -> None:
        self._archive_failing = False  # a later failure starts a new run, reported again

    def _archive_failed(self, exc: OSError) -> None:
        """Report the first failure of a run of failed archive writes, once."""
        with self._lock:
            first, self._archive_failing = not self._archive_failing, True
        if first and self.on_archive_error is not None:
            self.on_archive_error(exc)

    def archive(self, series_uid: str, payload: bytes) -> Path:
        """Reserve and write one DICOM file (Part 10 bytes, preamble and meta included).

        The file is fsynced and renamed into place before this returns.

        Raises
        ------
        OSError
            Nothing was archived (no ``.part`` is left); the caller refuses the file.
        """
        path = self.reserve(series_uid)
        return self.write(path, payload).commit()

    def archive_set(self, series_key: str, payloads: dict[str, bytes]) -> dict[str, Path]:
        """Archive files that belong together under one number, byte for byte.

        A Philips PAR/REC pair becomes ``dicom/000007.par`` and ``dicom/000007.rec``: the
        scanner's file names are not kept (a PAR export is often named after the
        patient). Each file is fsynced and renamed into place before this returns.

        Parameters
        ----------
        series_key : str
            The series key (hashed here, as a SeriesInstanceUID is).
        payloads : dict
            Suffix (``.par``, ``.rec``) -> the file's bytes.

        Returns
        -------
        dict
            Suffix -> the archived path.

        Raises
        ------
        OSError
            Nothing of the set was archived: a file of it already in place is removed
            again (half a pair is no use, and the caller retries the whole set).
        """
        first = self.reserve(series_key, suffix="")
        paths = {suffix: first.with_name(first.name + suffix) for suffix in payloads}
        done: list[Path] = []
        try:
            for suffix, payload in payloads.items():
                done.append(self.write(paths[suffix], payload).commit())
        except OSError:
            for path in done:
                path.unlink(missing_ok=True)
            raise
        return paths

    def quarantine(self, payload: bytes, suffix: str = ".dcm") -> Path:
        """Keep a file that cannot be attributed to a series (``rejected/``).

        ``suffix`` is the file name suffix (``.dcm``; ``.par``/``.rec`` for half of a
        Philips PAR/REC pair whose other half never came).
        """
        directory = self.root / "rejected"
        _mkdir_durable(directory, exist_ok=True)
        with self._lock:
            number = self._counters.get("", 0) + 1
            self._counters[""] = number
        path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}_{number:06d}{suffix}"
        while path.exists():
            path = path.with_name(path.name[:-len(suffix)] + "_x" + suffix) if suffix \
                else path.with_name(path.name + "_x")
        return self.write(path, payload).commit()


class Leftover(NamedTuple):
    """A ``.part`` file an earlier run left (see :meth:`SessionStore.leftovers`)."""

    path: Path
    what: str


class _OutputFile:
    """An output file written through its descriptor at known offsets.

    Knowing exactly how many bytes are in place is what lets a volume that did not fit
    (a full disk) be taken back out: :meth:`truncate` to the size before it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0

    def append(self, payload: bytes | memoryview) -> None:
        """Write at the end; on an error the file may hold part of it (truncate to undo)."""
        _write_all(self.fd, payload, self.size)
        self.size += len(memoryview(payload).cast("B"))

    def write_at(self, offset: int, payload: bytes) -> None:
        """Overwrite bytes already in the file (a header field)."""
        _write_all(self.fd, payload, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Close and delete (a file that never held anything worth keeping)."""
        self.close()
        self.path.unlink(missing_ok=True)


class _GzipMembers:
    """``<name>.nii.gz`` compressed volume by volume, so finishing a series takes no time.

    The file is two gzip members, which every gzip reader (zlib, Python's gzip, nibabel,
    the gzip tool) reads as one stream: first the 352-byte NIfTI header stored
    uncompressed (level 0, so its member has the same length whatever the header says
    and is rewritten in place with the final volume count), then the voxel data,
    compressed as each volume is appended. It is written as ``<name>.nii.gz.part`` and
    renamed at :meth:`close`; until then the plain ``.nii`` is the crash-safe copy.

    A volume can be taken back out (:meth:`mark`, :meth:`rollback`): the file is cut to
    its size before the volume and the compressor restored to its state then, so the
    stream goes on as if the volume had never been given (a full disk in the middle of
    a series leaves a valid stream, not a broken one).
    """

    def __init__(self, path: Path, header_block: bytes) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self._file = _OutputFile(self.part)
        member = self._header_member(header_block)
        self._header_length = len(member)
        try:
            self._file.append(member)
        except BaseException:
            self._file.remove()
            raise
        # wbits 31: a gzip wrapper; level 1, as the finished file used (fast, ~2x smaller)
        self._data = zlib.compressobj(1, zlib.DEFLATED, 31)

    @staticmethod
    def _header_member(header_block: bytes) -> bytes:
        stored = zlib.compressobj(0, zlib.DEFLATED, 31)
        return stored.compress(header_block) + stored.flush()

    def mark(self) -> tuple[int, Any]:
        """The state before a volume: file size and a copy of the compressor (its
        window and tables; about 10 microseconds at level 1, measured)."""
        return self._file.size, self._data.copy()

    def rollback(self, mark: tuple[int, Any]) -> None:
        size, compressor = mark
        self._file.truncate(size)
        self._data = compressor

    def append(self, payload: bytes) -> None:
        self._file.append(self._data.compress(payload))

    def close(self, header_block: bytes) -> Path:
        """Finish the data member, rewrite the header member, fsync and rename."""
        self._file.append(self._data.flush())
        member = self._header_member(header_block)
        if len(member) != self._header_length:  # cannot happen: stored blocks, same size
            raise RtscError(f"{self.path.name}: header member changed length")
        self._file.write_at(0, member)
        self._file.fsync()
        self._file.close()
        os.replace(self.part, self.path)
        return self.path

    def abandon(self) -> None:
        """Close and remove the ``.part`` (the ``.nii`` keeps the volumes)."""
        self._file.remove()


class GrowingNifti:
    """An uncompressed 4D NIfTI-1 that grows one volume at a time, and its ``.nii.gz``.

    The header's time dimension is rewritten after each appended volume, so the file
    is a valid image at every moment (a crash leaves a readable ``bold.nii``). Each
    volume is also compressed into ``bold.nii.gz.part`` as it is appended (see
    :class:`_GzipMembers`): :meth:`finish` only closes the stream and removes the
    uncompressed file, instead of compressing the whole series at once (20 s for 500
    volumes of 128x128x72, during which the next series would wait).

    A volume is in both files or in neither: if writing it fails (a full disk), what was
    written of it is cut off again and the header still counts the volumes before it.
    """

    def __init__(self, path: Path, shape: Sequence[int], affine: np.ndarray, dtype: np.dtype,
                 tr_s: float | None) -> None:
        self.path = path
        self.n = 0
        self.broken = False
        header = nib.Nifti1Header()
        header.set_data_dtype(dtype)
        header.set_data_shape((*shape, 0))
        header.set_xyzt_units("mm", "sec")
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        header.set_zooms((*zooms, tr_s or 0.0))
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        header["vox_offset"] = 352
        self._dtype = np.dtype(dtype)
        self._header = header
        self._nii = _OutputFile(path)
        try:
            self._nii.append(self._header_block())
            self._gz = _GzipMembers(path.with_name(path.name + ".gz"), self._header_block())
        except BaseException:
            self._nii.remove()
            raise

    def _header_block(self) -> bytes:
        """The 352 bytes before the voxel data: header, extension flag, padding."""
        block = self._header.binaryblock
        return block + b"\0" * (352 - len(block))

    def _write_count(self, n: int) -> None:
        dim = self._header["dim"].copy()
        dim[0], dim[4] = 4, n
        self._header["dim"] = dim
        self._nii.write_at(40, dim.astype(self._header["dim"].dtype).tobytes())  # dim[8]

    def append(self, data: np.ndarray, also: Callable[[], None] | None = None) -> None:
        """Append one (nx, ny, nz) volume (written in Fortran order, as NIfTI stores it).

        Parameters
        ----------
        data : ndarray
        also : callable or None
            Writes another file's part of the same volume (its confounds row); runs once
            the voxels are in both files and before the header counts them. If it (or
            anything here) raises, the volume is taken back out of both files and the
            error raised: the header never counts a volume that is not all there.

        Raises
        ------
        OSError
            Nothing of the volume stayed (a full disk).
        """
        if self.broken:
            raise OSError(errno.EIO, f"{self.path.name}: an earlier volume could not be "
                          "taken back out; no more volumes are written")
        payload = np.asarray(data, dtype=self._dtype).tobytes(order="F")
        nii_size, gz_mark = self._nii.size, self._gz.mark()
        counting = False
        try:
            self._nii.append(payload)
            self._gz.append(payload)
            if also is not None:
                also()
            counting = True
            self._write_count(self.n + 1)
        except BaseException:
            try:
                self._nii.truncate(nii_size)
                self._gz.rollback(gz_mark)
                if counting:  # the count may be half-written (only then: on a copy-on-
                    self._write_count(self.n)  # write file system, it can fail too)
            except OSError as undo:
                # Cannot happen on a full disk (cutting a file frees space); an I/O
                # error. The header still counts only whole volumes; the .gz is dropped.
                self.broken = True
                log.error("%s: cannot take a failed volume back out (%s)", self.path, undo)
            raise
        self.n += 1

    def finish(self) -> Path:
        """Close both files: ``<name>.gz`` is complete, the uncompressed file removed.

        Raises
        ------
        OSError
            The ``.gz`` cannot be completed (a full disk): it is removed and the ``.nii``,
            complete and valid, is kept in its place (fsynced, if the disk lets it).
        """
        try:
            if self.broken:
                raise OSError(errno.EIO, f"{self._gz.part.name} may hold a volume that "
                              "could not be taken back out; not completed")
            gz_path = self._gz.close(self._header_block())
        except BaseException:
            self._gz.abandon()
            try:
                self._nii.fsync()
            except OSError:
                log.debug("cannot fsync %s", self.path)
            self._nii.close()
            raise
        self._nii.close()
        self.path.unlink()
        return gz_path

    def discard(self) -> None:
        """Remove both files (a series none of whose volumes could be written)."""
        self._gz.abandon()
        self._nii.remove()


def _rewrite_columns(path: Path, columns: dict[str, np.ndarray]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    for name, values in columns.items():
        if name not in header or len(values) != len(rows):
            continue
        col = header.index(name)
        for row, value in zip(rows, values):
            row[col] = _tsv_value(float(value))
    _fsync_write(path, ("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
                 .encode("utf-8"))


def _column_value(metrics: dict[str, Any], column: str) -> Any:
    """``metrics[column]``, or item k of the list ``metrics[<field>]`` for a column
    named ``<field>_<k>``."""
    if column in metrics:
        return metrics[column]
    name, _, k = column.rpartition("_")
    values = metrics.get(name)
    if k.isdigit() and isinstance(values, (list, tuple)) and int(k) < len(values):
        return values[int(k)]
    return None


def _tsv_value(value: Any) -> str:
    # np.floating too: np.float32 is not a float subclass, and its NaN printed as "nan"
    # instead of the BIDS "n/a" (and its values at full repr precision).
    if isinstance(value, np.floating):
        value = float(value)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class SeriesWriter:
    """Writes one series' outputs as volumes arrive (runs on the pipeline worker).

    A volume goes into bold.nii, bold.nii.gz.part and confounds.tsv all together or not
    at all: if one write fails (a full disk), what was written of the volume is cut off
    again, the volume is listed in :attr:`not_written` and the error raised; the next
    volume is tried as usual, so writing resumes by itself once there is space. The
    outputs are then readable and agree with each other at every moment: bold.nii's
    header counts :attr:`n_written` volumes and confounds.tsv has as many rows.

    Parameters
    ----------
    directory : Path
        The series directory from :class:`SessionStore`.
    first : Volume
        The first volume: fixes matrix, affine and stored dtype.
    extra_columns : sequence of str
        confounds.tsv columns after the common ones. A name ``<field>_<k>`` whose
        ``<field>`` is a list in the metrics takes its k-th item (per-slice values).

    Attributes
    ----------
    n_written : int
        Volumes in bold.nii (and rows in confounds.tsv).
    not_written : list of int
        Indices of the volumes that could not be written.
    """

    def __init__(self, directory: Path, first: Volume,
                 extra_columns: Sequence[str] = ()) -> None:
        self.directory = directory
        self._first = first
        self._affine = first.affine
        dtype = first.stored_dtype if first.stored_dtype.kind in "iu" else np.dtype(np.float32)
        self._exact_dtype = dtype
        self._columns = (*CONFOUND_COLUMNS, *extra_columns)
        self._bold: GrowingNifti | None = None
        self._confounds: _OutputFile | None = None
        self.outputs: dict[str, str] = {"dicom": str(directory / "dicom")}
        self._sidecar: dict[str, Any] | None = None
        self.n_written = 0
        self.not_written: list[int] = []
        self._written_mask: list[bool] = []  # per volume given, in order: written or not
        try:
            self._open()
        except OSError as exc:  # the first append tries again and reports the error
            log.debug("cannot create the outputs of %s yet (%s)", directory, exc)

    def _open(self) -> None:
        """Create bold.nii (+ .gz.part) and confounds.tsv with its header line."""
        bold = GrowingNifti(self.directory / "bold.nii", self._first.shape, self._affine,
                            self._exact_dtype, self._first.info.tr_s)
        try:
            confounds = _OutputFile(self.directory / "confounds.tsv")
            try:
                confounds.append(("\t".join(self._columns) + "\n").encode("utf-8"))
            except BaseException:
                confounds.remove()
                raise
        except BaseException:
            bold.discard()
            raise
        self._bold, self._confounds = bold, confounds

    def append(self, volume: Volume, metrics: dict[str, Any]) -> None:
        """Add the volume to bold.nii and its confounds row to confounds.tsv; (re)write
        bold.json when the volume brings a new sidecar (the first volume's, then the one
        the second volume's headers refined).

        Raises
        ------
        OSError
            The volume was not written (it is in none of the files); listed in
            :attr:`not_written`.
        """
        try:
            self._append(volume, metrics)
        except OSError:
            self.not_written.append(volume.index)
            self._written_mask.append(False)
            raise
        self.n_written += 1
        self._written_mask.append(True)

    def _append(self, volume: Volume, metrics: dict[str, Any]) -> None:
        if self._bold is None:
            self._open()
        assert self._bold is not None and self._confounds is not None
        sidecar = volume.info.sidecar
        if sidecar is not None and sidecar is not self._sidecar:
            _fsync_write(self.directory / "bold.json",
                         (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
            self._sidecar = sidecar  # only once written: a failed write is tried again
            self.outputs["sidecar"] = str(self.directory / "bold.json")
        data = volume.data
        if self._exact_dtype.kind in "iu":
            # Stored integers came through float32 exactly; cast back without loss.
            data = np.rint(data)
        row = ("\t".join(_tsv_value(_column_value(metrics, c)) for c in self._columns)
               + "\n").encode("utf-8")
        confounds = self._confounds
        rows_size = confounds.size
        try:
            # The row is written between the voxels and the header's new count: a failure
            # anywhere takes the voxels back out (GrowingNifti) and the row (here).
            self._bold.append(data, also=lambda: confounds.append(row))
        except BaseException:
            try:
                confounds.truncate(rows_size)
            except OSError as undo:
                log.error("%s: cannot take a failed row back out (%s)", confounds.path, undo)
            raise

    def _rewrite_confounds(self, columns: dict[str, np.ndarray]) -> None:
        _rewrite_columns(self.directory / "confounds.tsv", columns)

    def write_maps(self, maps: dict[str, np.ndarray]) -> None:
        """``maps/<name>.nii.gz`` for each (nx, ny, nz) map, in the first volume's grid.

        Map names come from rtsc's stages and the config (``t:<contrast>``); characters
        other than letters, digits, ``-`` and ``_`` become ``_`` in the file name. Each is
        written whole or not at all (``.part``, then renamed).

        Raises
        ------
        OSError
            From the first map that cannot be written; the maps before it are in place.
        """
        if not maps:
            return
        folder = self.directory / "maps"
        _mkdir_durable(folder, exist_ok=True)
        for name, data in maps.items():
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "map"
            path = folder / f"{safe}.nii.gz"
            image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), self._affine)
            image.header.set_xyzt_units("mm")
            # nib.save(image, path) wrote in place: a full disk left a cut .nii.gz.
            _fsync_write(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
            self.outputs[f"map:{name}"] = str(path)

    def finish(self, summary: dict[str, Any],
               final_columns: dict[str, np.ndarray] | None = None,
               maps: dict[str, np.ndarray] | None = None,
               on_error: Callable[[str, OSError], None] | None = None) -> dict[str, str]:
        """Close everything, write the maps and qc.json; returns the output paths.

        ``final_columns`` (name -> one value per volume given to :meth:`append`) replace
        those confounds columns with values that are exact only for the whole series
        (e.g. std_dvars); the values of volumes not written are left out.

        Each output is tried even if one before it failed. An output that cannot be
        written (a full disk) is left out of the returned paths and reported to
        ``on_error(what, error)`` (default: a log line): the maps not written are
        absent, confounds.tsv keeps its per-volume values, bold.nii stays instead of
        bold.nii.gz (complete, and counting the volumes written), qc.json is absent.
        """
        def failed(what: str, exc: OSError) -> None:
            if on_error is not None:
                on_error(what, exc)
            else:
                log.error("%s: cannot write %s (%s)", self.directory, what, exc)

        try:
            self.write_maps(maps or {})
        except OSError as exc:
            failed("the maps", exc)
        if self._confounds is not None:
            self._confounds.close()
            if final_columns:
                keep = np.asarray(self._written_mask, dtype=bool)
                columns = {name: np.asarray(values)[keep] if len(values) == keep.size
                           else values for name, values in final_columns.items()}
                try:
                    self._rewrite_confounds(columns)
                except OSError as exc:
                    failed("confounds.tsv (final columns)", exc)
            self.outputs["confounds"] = str(self.directory / "confounds.tsv")
        if self._bold is not None:
            try:
                self.outputs["bold"] = str(self._bold.finish())
            except OSError as exc:
                self.outputs["bold"] = str(self._bold.path)
                failed("bold.nii.gz (bold.nii kept)", exc)
        qc_path = self.directory / "qc.json"
        try:
            _fsync_write(qc_path, json.dumps(jsonable(summary), indent=2).encode("utf-8"))
            self.outputs["qc"] = str(qc_path)
        except OSError as exc:
            failed("qc.json", exc)
        return dict(self.outputs)
