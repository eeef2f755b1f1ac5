"""Session outputs on disk: the raw archive and the per-series files.

Layout under ``session.dir``: one sub-directory per series, named from the local
date-time of its first dataset and the hashed series id (never from DICOM strings)::

    20261125-091500_3fa2b1c09d4e/
        dicom/000001.dcm ...     every received dataset, written and fsynced before success
                                 (a Philips PAR/REC dump: 000001.par + 000001.rec)
        bold.nii.gz              4D, as acquired (bold.nii while the series runs)
        confounds.tsv            one row per volume, appended as volumes arrive
        qc.json                  summary at series end

A restart never overwrites: an existing directory name gets a ``-2``, ``-3`` suffix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from rtsc.errors import RtscError
from rtsc.messages import jsonable
from rtsc.volume import Volume, series_id

log = logging.getLogger(__name__)

CONFOUND_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                    "framewise_displacement", "dvars", "std_dvars", "global_signal")


class DurableWrite:
    """A file written in two steps: :meth:`__init__` writes, :meth:`commit` makes it durable.

    The data go to ``<name>.part``; ``commit`` fsyncs it, renames it into place and
    fsyncs the directory. Between the two steps the caller can hand work on: the
    fsync is a system call that releases the GIL.
    """

    def __init__(self, path: Path, payload: bytes) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException:
            os.close(self._fd)
            raise

    def commit(self) -> Path:
        """fsync, rename into place, fsync the directory; returns the final path."""
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path


def _fsync_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    DurableWrite(path, payload).commit()


class SessionStore:
    """Maps series to their output directories; thread-safe (receiver and worker share it).

    Parameters
    ----------
    root : path
        ``session.dir``; created if missing.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dirs: dict[str, Path] = {}
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

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

    def series_dir(self, series: str) -> Path:
        """Directory of the series with opaque id ``series``, created on first use."""
        with self._lock:
            found = self._dirs.get(series)
            if found is None:
                found = self._make_dir(series)
                self._dirs[series] = found
            return found

    def _make_dir(self, series: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{series}"
        for attempt in range(1, 10000):
            candidate = self.root / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            (candidate / "dicom").mkdir()
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
        """
        sid = series_id(series_uid)
        directory = self.series_dir(sid) / "dicom"
        with self._lock:
            number = self._counters.get(sid, 0) + 1
            self._counters[sid] = number
        return directory / f"{number:06d}{suffix}"

    @staticmethod
    def write(path: Path, payload: bytes) -> DurableWrite:
        """Start writing a reserved archive file; ``.commit()`` makes it durable."""
        return DurableWrite(path, payload)

    def archive(self, series_uid: str, payload: bytes) -> Path:
        """Reserve and write one DICOM file (Part 10 bytes, preamble and meta included).

        The file is fsynced and renamed into place before this returns.
        """
        path = self.reserve(series_uid)
        _fsync_write(path, payload)
        return path

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
        """
        first = self.reserve(series_key, suffix="")
        paths = {suffix: first.with_name(first.name + suffix) for suffix in payloads}
        for suffix, payload in payloads.items():
            _fsync_write(paths[suffix], payload)
        return paths

    def quarantine(self, payload: bytes, suffix: str = ".dcm") -> Path:
        """Keep a file that cannot be attributed to a series (``rejected/``).

        ``suffix`` is the file name suffix (``.dcm``; ``.par``/``.rec`` for half of a
        Philips PAR/REC pair whose other half never came).
        """
        directory = self.root / "rejected"
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            number = self._counters.get("", 0) + 1
            self._counters[""] = number
        path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}_{number:06d}{suffix}"
        while path.exists():
            path = path.with_name(path.name[:-len(suffix)] + "_x" + suffix) if suffix \
                else path.with_name(path.name + "_x")
        _fsync_write(path, payload)
        return path


class _GzipMembers:
    """``<name>.nii.gz`` compressed volume by volume, so finishing a series takes no time.

    The file is two gzip members, which every gzip reader (zlib, Python's gzip, nibabel,
    the gzip tool) reads as one stream: first the 352-byte NIfTI header stored
    uncompressed (level 0, so its member has the same length whatever the header says
    and is rewritten in place with the final volume count), then the voxel data,
    compressed as each volume is appended. It is written as ``<name>.nii.gz.part`` and
    renamed at :meth:`close`; until then the plain ``.nii`` is the crash-safe copy.
    """

    def __init__(self, path: Path, header_block: bytes) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self._fh = open(self.part, "wb")
        self._header_length = len(self._header_member(header_block))
        self._fh.write(self._header_member(header_block))
        # wbits 31: a gzip wrapper; level 1, as the finished file used (fast, ~2x smaller)
        self._data = zlib.compressobj(1, zlib.DEFLATED, 31)

    @staticmethod
    def _header_member(header_block: bytes) -> bytes:
        stored = zlib.compressobj(0, zlib.DEFLATED, 31)
        return stored.compress(header_block) + stored.flush()

    def append(self, payload: bytes) -> None:
        self._fh.write(self._data.compress(payload))

    def close(self, header_block: bytes) -> Path:
        """Finish the data member, rewrite the header member, fsync and rename."""
        self._fh.write(self._data.flush())
        member = self._header_member(header_block)
        if len(member) != self._header_length:  # cannot happen: stored blocks, same size
            raise RtscError(f"{self.path.name}: header member changed length")
        self._fh.seek(0)
        self._fh.write(member)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.part, self.path)
        return self.path

    def abandon(self) -> None:
        self._fh.close()


class GrowingNifti:
    """An uncompressed 4D NIfTI-1 that grows one volume at a time, and its ``.nii.gz``.

    The header's time dimension is rewritten after each appended volume, so the file
    is a valid image at every moment (a crash leaves a readable ``bold.nii``). Each
    volume is also compressed into ``bold.nii.gz.part`` as it is appended (see
    :class:`_GzipMembers`): :meth:`finish` only closes the stream and removes the
    uncompressed file, instead of compressing the whole series at once (20 s for 500
    volumes of 128x128x72, during which the next series would wait).
    """

    def __init__(self, path: Path, shape: Sequence[int], affine: np.ndarray, dtype: np.dtype,
                 tr_s: float | None) -> None:
        self.path = path
        self.n = 0
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
        self._fh = open(path, "wb+")
        self._fh.write(self._header_block())
        self._gz = _GzipMembers(path.with_name(path.name + ".gz"), self._header_block())

    def _header_block(self) -> bytes:
        """The 352 bytes before the voxel data: header, extension flag, padding."""
        block = self._header.binaryblock
        return block + b"\0" * (352 - len(block))

    def append(self, data: np.ndarray) -> None:
        """Append one (nx, ny, nz) volume (written in Fortran order, as NIfTI stores it)."""
        payload = np.asarray(data, dtype=self._dtype).tobytes(order="F")
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(payload)
        self.n += 1
        dim = self._header["dim"].copy()
        dim[0], dim[4] = 4, self.n
        self._header["dim"] = dim
        self._fh.seek(40)  # offset of dim[8] in the NIfTI-1 header
        self._fh.write(dim.astype(self._header["dim"].dtype).tobytes())
        self._fh.flush()
        self._gz.append(payload)

    def finish(self) -> Path:
        """Close both files: ``<name>.gz`` is complete, the uncompressed file removed."""
        self._fh.close()
        gz_path = self._gz.close(self._header_block())
        self.path.unlink()
        return gz_path


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

    Parameters
    ----------
    directory : Path
        The series directory from :class:`SessionStore`.
    first : Volume
        The first volume: fixes matrix, affine and stored dtype.
    extra_columns : sequence of str
        confounds.tsv columns after the common ones. A name ``<field>_<k>`` whose
        ``<field>`` is a list in the metrics takes its k-th item (per-slice values).
    """

    def __init__(self, directory: Path, first: Volume,
                 extra_columns: Sequence[str] = ()) -> None:
        self.directory = directory
        self._affine = first.affine
        dtype = first.stored_dtype if first.stored_dtype.kind in "iu" else np.dtype(np.float32)
        self._exact_dtype = dtype
        self._bold = GrowingNifti(directory / "bold.nii", first.shape, first.affine, dtype,
                                  first.info.tr_s)
        self._confounds = open(directory / "confounds.tsv", "w", encoding="utf-8")
        self._columns = (*CONFOUND_COLUMNS, *extra_columns)
        self._confounds.write("\t".join(self._columns) + "\n")
        self._confounds.flush()
        self.outputs: dict[str, str] = {"dicom": str(directory / "dicom")}
        self._sidecar: dict[str, Any] | None = None

    def append(self, volume: Volume, metrics: dict[str, Any]) -> None:
        """Add the volume to bold.nii and its confounds row to confounds.tsv; (re)write
        bold.json when the volume brings a new sidecar (the first volume's, then the one
        the second volume's headers refined)."""
        sidecar = volume.info.sidecar
        if sidecar is not None and sidecar is not self._sidecar:
            self._sidecar = sidecar
            _fsync_write(self.directory / "bold.json",
                         (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
            self.outputs["sidecar"] = str(self.directory / "bold.json")
        data = volume.data
        if self._exact_dtype.kind in "iu":
            # Stored integers came through float32 exactly; cast back without loss.
            data = np.rint(data)
        self._bold.append(data)
        row = "\t".join(_tsv_value(_column_value(metrics, c)) for c in self._columns)
        self._confounds.write(row + "\n")
        self._confounds.flush()

    def _rewrite_confounds(self, columns: dict[str, np.ndarray]) -> None:
        _rewrite_columns(self.directory / "confounds.tsv", columns)

    def write_maps(self, maps: dict[str, np.ndarray]) -> None:
        """``maps/<name>.nii.gz`` for each (nx, ny, nz) map, in the first volume's grid.

        Map names come from rtsc's stages and the config (``t:<contrast>``); characters
        other than letters, digits, ``-`` and ``_`` become ``_`` in the file name.
        """
        if not maps:
            return
        folder = self.directory / "maps"
        folder.mkdir(exist_ok=True)
        for name, data in maps.items():
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "map"
            path = folder / f"{safe}.nii.gz"
            image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), self._affine)
            image.header.set_xyzt_units("mm")
            nib.save(image, path)
            self.outputs[f"map:{name}"] = str(path)

    def finish(self, summary: dict[str, Any],
               final_columns: dict[str, np.ndarray] | None = None,
               maps: dict[str, np.ndarray] | None = None) -> dict[str, str]:
        """Close everything, write the maps and qc.json; returns the output paths.

        ``final_columns`` (name -> one value per row) replace those confounds columns
        with values that are exact only for the whole series (e.g. std_dvars).
        """
        try:
            self.write_maps(maps or {})
        except OSError:
            log.exception("cannot write the maps of %s", self.directory)
        self._confounds.close()
        if final_columns:
            self._rewrite_confounds(final_columns)
        self.outputs["confounds"] = str(self.directory / "confounds.tsv")
        self.outputs["bold"] = str(self._bold.finish())
        qc_path = self.directory / "qc.json"
        _fsync_write(qc_path, json.dumps(jsonable(summary), indent=2).encode("utf-8"))
        self.outputs["qc"] = str(qc_path)
        return dict(self.outputs)
