"""Session outputs on disk: the session folder, the raw archive and the series folders.

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

import logging
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import nibabel as nib

from rtsc.errors import RtscError
from rtsc.output.durable import DurableWrite, fsync_dir, mkdir_durable
from rtsc.volume import series_id

log = logging.getLogger(__name__)


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
        mkdir_durable(self.root, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{series}"
        for attempt in range(1, 10000):
            candidate = self.root / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            fsync_dir(self.root)
            (candidate / "dicom").mkdir()
            fsync_dir(candidate)
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

    def write(self, path: Path, payload: bytes | tuple[bytes, ...]) -> DurableWrite:
        """Start writing a reserved archive file; ``.commit()`` makes it durable.

        ``payload`` is the file's bytes or a tuple of parts written one after another.
        """
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
        mkdir_durable(directory, exist_ok=True)
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
