"""Folder watcher: the second input, for scanners that export files to a folder.

A file is read once its size and modification time have stayed the same for
``settle_s`` seconds. A writer may still pause longer than that (a network share, a slow
export): a file that does not parse, or whose pixel data is shorter than its header
says, is not taken but retried whenever it changes, so it is never read half and never
lost. Only once it has stayed unchanged for ``retry_s`` is it taken as it is: a file that
is not DICOM yields an :class:`Incoming` with an error (an alert), a short one is
archived and the assembler reports it; the watcher goes on.

Philips PAR/REC dumps (``.par`` + ``.rec``, any case, same name) are taken as a pair
(:mod:`rtsc.dicom.parrec`): once both have stopped changing, the PAR is whole and the REC
holds the bytes the PAR declares. A pair that stays incomplete is taken as it is after
``retry_s`` (the worker reports it); half a pair whose other half has not come after
``retry_s`` is kept in ``rejected/`` and alerted. The pair is archived byte for byte and
handed on as one :class:`~rtsc.dicom.parrec.ParRecDump`; the worker reads it.

A DICOM file is whole when its pixel data is: an image (its SOP class says so: MR,
enhanced MR, CT... image storage) must have Rows, Columns and pixel data as long as they
declare; only a non-image SOP class (raw data, spectroscopy, a report) is whole without
pixels. A file taken as it was (not whole after ``retry_s``) is still watched: if it
changes, it is taken again once whole (archived again; the assembler gets the complete
one). The same holds for a PAR/REC pair taken incomplete.

Anything that is not a regular file (a FIFO, socket or device, a symlink to one or to
a directory, a broken symlink) is never opened (reading a FIFO blocks for ever): it is
skipped with one ``not_regular_file`` alert per path. A file that cannot be archived
(a full disk) is not taken: it stays in the folder and is retried, in order, every
``ARCHIVE_RETRY_S``.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from rtsc.config import WatcherConfig
from rtsc.dicom.parrec import (
    PAR_SUFFIX,
    REC_SUFFIX,
    ParRecDump,
    dump_number,
    is_parrec,
    par_summary,
    series_key,
)
from rtsc.dicom.incoming import Incoming
from rtsc.output.session import SessionStore

log = logging.getLogger(__name__)

_SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
# After an archive write failed (a full disk), the next try waits this long: every try
# writes the file until the disk refuses it again.
ARCHIVE_RETRY_S = 1.0
# Storage SOP classes whose instances carry pixel data though pydicom's name for them
# does not say "Image Storage".
_PIXEL_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage (float pixel data)
})
_PIXEL_KEYWORDS = (("PixelData", None), ("FloatPixelData", 4), ("DoubleFloatPixelData", 8))


@dataclass(frozen=True)
class InputAlert:
    """An alert from an input, handed to the pipeline worker on its queue (the worker
    publishes it: inputs run on their own threads)."""

    level: str
    code: str
    message: str


class _NotRegular(OSError):
    """The path is not a regular file (found when opening it: it changed since the scan)."""


# What _take made of a file.
_TAKEN, _TAKEN_AS_IS, _NOT_WHOLE = "taken", "as_is", "not_whole"
_NOT_ARCHIVED, _NOT_REGULAR = "not_archived", "not_regular"


class FolderWatcher:
    """Scan a folder tree for new files and hand them to the pipeline worker.

    Parameters
    ----------
    config : WatcherConfig
        ``dir`` must be set.
    store : SessionStore
        Each DICOM file (and PAR/REC pair) is copied into its series' archive.
    out : queue.Queue of Incoming and ParRecDump
    """

    def __init__(self, config: WatcherConfig, store: SessionStore, out: "queue.Queue[Any]") -> None:
        if config.dir is None:
            raise ValueError("watcher.dir is not set")
        self.root = Path(config.dir)
        self.config = config
        self.store = store
        self.out = out
        self._seen: set[Path] = set()
        self._candidates: dict[Path, tuple[int, float, float]] = {}
        # path -> ((size, mtime) when it was last found incomplete, when first so)
        self._incomplete: dict[Path, tuple[tuple[int, float], float]] = {}
        # PAR path -> (signatures of both files when found incomplete, when first so)
        self._pairs_incomplete: dict[Path, tuple[Any, float]] = {}
        # half of a PAR/REC pair -> when it was first found stable and alone
        self._alone: dict[Path, float] = {}
        # taken as it was, not whole -> (size, mtime) then; a change makes it new again.
        # A PAR/REC pair: both halves, each naming the other in _partner.
        self._as_is: dict[Path, tuple[int, float]] = {}
        self._partner: dict[Path, Path] = {}
        self._irregular: set[Path] = set()  # alerted once each
        self._archive_retry_at = 0.0  # no archive try before (after a failed one)
        self._archive_failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (files already present are taken too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="rtsc-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s", self.root)

    def close(self) -> None:
        """Stop after one last scan."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            self.scan()
        self.scan(final=True)

    def scan(self, final: bool = False) -> int:
        """One pass over the folder; returns the number of items handed on (a file, or a
        PAR/REC pair).

        Parameters
        ----------
        final : bool
            Take files that are stable now without waiting for ``settle_s`` (at stop).
        """
        now = time.time()
        if now < self._archive_retry_at and not final:
            return 0  # the disk refused the last archive write: give it time
        handed = 0
        self._recheck_as_is()
        files = sorted(self._files(), key=natural_key)
        handed += self._scan_parrec([p for p in files if is_parrec(p)], now, final)
        for path in (p for p in files if not is_parrec(p)):
            if path in self._seen or now < self._archive_retry_at:
                continue
            signature = self._stable(path, now, final)
            if signature is None:
                continue
            failed = self._incomplete.get(path)
            unchanged = failed is not None and failed[0] == signature
            if unchanged and not final and now - failed[1] < self.config.retry_s:
                continue  # incomplete and untouched since: wait for it to change
            result = self._take(path, as_is=final or unchanged)
            if result == _NOT_ARCHIVED:
                break  # later files wait too: they are handed on in order
            if result == _NOT_WHOLE:
                self._incomplete[path] = (signature, failed[1] if unchanged else now)
                continue
            self._candidates.pop(path, None)
            self._incomplete.pop(path, None)
            self._seen.add(path)
            if result == _TAKEN_AS_IS:
                self._as_is[path] = signature
            handed += result != _NOT_REGULAR
        return handed

    def _recheck_as_is(self) -> None:
        """A file (or pair) taken as it was that has changed since is taken anew: the
        writer was slower than ``retry_s``, and its complete version replaces the part."""
        for path, signature in list(self._as_is.items()):
            try:
                st = path.stat()
                now_signature = (st.st_size, st.st_mtime)
            except OSError:
                now_signature = None
            if now_signature == signature:
                continue
            partner = self._partner.pop(path, None)
            for changed in (path, partner):
                if changed is not None:
                    self._as_is.pop(changed, None)
                    self._partner.pop(changed, None)
                    self._seen.discard(changed)
            if now_signature is not None:
                log.info("%s changed after it was taken incomplete: taken again once whole",
                         path.name)

    def _stable(self, path: Path, now: float, final: bool) -> tuple[int, float] | None:
        """(size, mtime) of a file unchanged for ``settle_s`` (at ``final``: unchanged since
        the last scan, or just found), else None."""
        try:
            stat_ = path.stat()
        except OSError:
            return None
        signature = (stat_.st_size, stat_.st_mtime)
        previous = self._candidates.get(path)
        if previous is None or previous[:2] != signature:
            self._candidates[path] = (*signature, now)
            return signature if final else None
        if not final and now - previous[2] < self.config.settle_s:
            return None
        return signature

    def _scan_parrec(self, paths: list[Path], now: float, final: bool) -> int:
        """Hand on the PAR/REC pairs that are whole (or overdue); returns how many items."""
        groups: dict[tuple[Path, str], dict[str, Path]] = {}
        for path in paths:
            if path not in self._seen:
                groups.setdefault((path.parent, path.stem), {})[path.suffix.lower()] = path
        handed = 0
        for _key, group in sorted(groups.items()):
            if now < self._archive_retry_at:
                break  # the disk refused an archive write: later pairs wait, in order
            signatures = {suffix: self._stable(path, now, final)
                          for suffix, path in group.items()}
            if any(signature is None for signature in signatures.values()):
                continue  # still being written
            par, rec = group.get(PAR_SUFFIX), group.get(REC_SUFFIX)
            if par is None or rec is None:
                alone = par or rec
                assert alone is not None
                since = self._alone.setdefault(alone, now)
                if final or now - since >= self.config.retry_s:
                    handed += self._take_alone(alone)
                continue
            self._alone.pop(par, None)
            self._alone.pop(rec, None)
            combined = (signatures[PAR_SUFFIX], signatures[REC_SUFFIX])
            failed = self._pairs_incomplete.get(par)
            unchanged = failed is not None and failed[0] == combined
            if unchanged and not final and now - failed[1] < self.config.retry_s:
                continue  # incomplete and untouched since: wait for it to change
            result = self._take_pair(par, rec, as_is=final or unchanged)
            if result == _NOT_ARCHIVED:
                break
            if result == _NOT_WHOLE:
                self._pairs_incomplete[par] = (combined, failed[1] if unchanged else now)
                continue
            self._pairs_incomplete.pop(par, None)
            for path in (par, rec):
                self._candidates.pop(path, None)
                self._seen.add(path)
            if result == _TAKEN_AS_IS:
                self._as_is[par], self._as_is[rec] = combined
                self._partner[par], self._partner[rec] = rec, par
            handed += result != _NOT_REGULAR
        return handed

    def _take_pair(self, par: Path, rec: Path, as_is: bool) -> str:
        """Archive a PAR/REC pair and hand it on. Returns what was done (_TAKEN, or
        _TAKEN_AS_IS when it was not whole); _NOT_WHOLE (nothing done) when the PAR is
        not whole or the REC not the size it declares, and not ``as_is``."""
        t_received = time.time()
        reading = par
        try:
            par_bytes = _read_regular(par)
            reading = rec
            rec_bytes = _read_regular(rec)
        except _NotRegular as exc:  # replaced since the scan: the pair is skipped
            self._not_regular(reading, str(exc))
            self._seen.update((par, rec))
            return _NOT_REGULAR
        except OSError as exc:
            if not as_is:
                return _NOT_WHOLE
            self.out.put(ParRecDump(name=par.stem, series_key="", t_received=t_received,
                                    error=f"cannot read the PAR/REC pair ({exc})"))
            return _TAKEN_AS_IS
        summary = par_summary(par_bytes)
        whole = summary.complete and summary.rec_bytes == len(rec_bytes)
        if not as_is and not whole:
            return _NOT_WHOLE
        folder = par.parent.relative_to(self.root).as_posix()
        key = series_key(summary.fields, folder)
        try:
            archived = self.store.archive_set(key, {PAR_SUFFIX: par_bytes, REC_SUFFIX: rec_bytes})
        except OSError as exc:
            self._archive_failed(par, exc)
            return _NOT_ARCHIVED
        self._archive_succeeded()
        self.out.put(ParRecDump(name=par.stem, series_key=key, t_received=t_received,
                                par=par_bytes, rec=rec_bytes, par_path=archived[PAR_SUFFIX],
                                rec_path=archived[REC_SUFFIX], dump=dump_number(par.stem)))
        return _TAKEN if whole else _TAKEN_AS_IS

    def _take_alone(self, path: Path) -> int:
        """Keep half of a PAR/REC pair whose other half did not come, and alert; returns
        the number of items handed on (0 if it could not be kept: retried later)."""
        suffix = path.suffix.lower()
        missing = "REC" if suffix == PAR_SUFFIX else "PAR"
        try:
            kept = "rejected/" + self.store.quarantine(_read_regular(path), suffix=suffix).name
        except _NotRegular as exc:
            self._not_regular(path, str(exc))
            self._seen.add(path)
            return 0
        except OSError as exc:
            self._archive_failed(path, exc)
            return 0  # tried again later, as a file to archive is
        self._archive_succeeded()
        reason = (f"{suffix[1:].upper()} without its {missing} after "
                  f"{self.config.retry_s:g} s; kept as {kept}, not processed")
        log.warning("%s: %s", path.name, reason)
        self.out.put(ParRecDump(name=path.name, series_key="", t_received=time.time(),
                                error=reason, code="parrec_unpaired"))
        self._alone.pop(path, None)
        self._candidates.pop(path, None)
        self._seen.add(path)
        return 1

    def _files(self) -> list[Path]:
        """Regular files under the folder (hidden and temporary names left out); anything
        else found is alerted once (:meth:`_not_regular`) and never opened."""
        found = []
        folders = [self.root]
        while folders:
            folder = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue  # removed meanwhile, or unreadable
            for entry in entries:
                path = Path(entry.path)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(path)
                        continue
                    if entry.name.startswith("."):
                        continue
                    # d_type from the directory listing: no stat, except for a symlink
                    regular = entry.is_file()
                except OSError:
                    regular = False
                if not regular:
                    self._not_regular(path, _kind(path))
                elif not entry.name.endswith(_SKIP_SUFFIXES):
                    found.append(path)
        return found

    def _not_regular(self, path: Path, kind: str) -> None:
        """Alert once per path: something that is not a regular file is in the folder."""
        if path in self._irregular:
            return
        self._irregular.add(path)
        where = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) \
            else path.name
        text = f"{where}: {kind}, not a regular file; skipped, never opened"
        log.warning("watched folder: %s", text)
        self.out.put(InputAlert("warning", "not_regular_file", text))

    def _archive_failed(self, path: Path, exc: OSError) -> None:
        """An archive write failed (the store alerts the service): the file is not
        taken; it stays in the folder and is tried again in ``ARCHIVE_RETRY_S``."""
        self._archive_retry_at = time.time() + ARCHIVE_RETRY_S
        if not self._archive_failing:
            self._archive_failing = True
            log.error("watched folder: cannot archive %s (%s); it and the files after it "
                      "stay in the folder and are tried again every %g s", path.name, exc,
                      ARCHIVE_RETRY_S)

    def _archive_succeeded(self) -> None:
        if self._archive_failing:
            self._archive_failing = False
            log.info("watched folder: archiving again")

    def _take(self, path: Path, as_is: bool) -> str:
        """Hand a file on. Returns _TAKEN, _TAKEN_AS_IS (not whole, taken as it is),
        _NOT_WHOLE (nothing done: not whole yet and not ``as_is``), _NOT_ARCHIVED
        (nothing done: the archive write failed) or _NOT_REGULAR."""
        t_received = time.time()
        try:
            payload = _read_regular(path)
        except _NotRegular as exc:
            self._not_regular(path, str(exc))
            return _NOT_REGULAR
        except OSError as exc:
            if not as_is:
                return _NOT_WHOLE
            self.out.put(Incoming(None, path, t_received, "folder", error=str(exc)))
            return _TAKEN_AS_IS
        try:
            dataset = pydicom.dcmread(io.BytesIO(payload))
            series_uid = str(dataset.SeriesInstanceUID)
            whole = _whole(dataset)
            if not as_is and not whole:
                return _NOT_WHOLE
        except Exception as exc:  # noqa: BLE001
            if not as_is:
                return _NOT_WHOLE
            # Any exception, not a list: a file truncated inside an element header makes
            # pydicom raise struct.error or BytesLengthException, which used to escape and
            # kill the watcher thread (every later file ignored). A bad file is an alert.
            reason = f"not a readable DICOM file ({type(exc).__name__}: {exc})"
            log.warning("%s: %s", path.name, reason)
            self.out.put(Incoming(None, path, t_received, "folder", error=reason))
            return _TAKEN_AS_IS
        try:
            archived = self.store.archive(series_uid, payload)
        except OSError as exc:
            # The data path succeeds or refuses: the file is not taken, nothing is lost.
            self._archive_failed(path, exc)
            return _NOT_ARCHIVED
        self._archive_succeeded()
        self.out.put(Incoming(dataset, archived, t_received, "folder"))
        return _TAKEN if whole else _TAKEN_AS_IS


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; raises :class:`_NotRegular` for anything else.

    Opened without blocking and checked on the open descriptor: a FIFO put in place of
    a file after the scan would block ``open`` (and the watcher) for ever.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegular(_mode_kind(mode))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def _mode_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, for the alert."""
    try:
        kind = _mode_kind(path.stat().st_mode)
    except OSError:
        return "a broken symlink" if path.is_symlink() else "unreadable"
    return f"a symlink to {kind.removeprefix('a ')}" if path.is_symlink() else kind


def natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key reading digit runs as numbers: ``6_2.dcm`` before ``6_10.dcm``, as a
    scanner numbers its exports (files of one scan become ready in that order)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(path)) if part)


def _sop_class(ds: pydicom.Dataset) -> str | None:
    """The SOP class: the dataset's, else the file meta's (written first, so known even
    when the file is cut right after it)."""
    sop = ds.get("SOPClassUID")
    if sop is None:
        meta = getattr(ds, "file_meta", None)
        sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(sop) if sop else None


def _needs_pixels(sop: str) -> bool:
    """Whether instances of a storage SOP class carry pixel data (MR, enhanced MR, CT...
    image storage; not raw data, spectroscopy, reports, presentation states)."""
    return sop in _PIXEL_SOP_CLASSES or "Image Storage" in UID(sop).name


def _whole(ds: pydicom.Dataset) -> bool:
    """Whether a parsed file is whole: its pixel data is.

    An image, by its SOP class (or any dataset that has Rows, Columns or pixel data),
    is whole only with Rows, Columns and pixel data as long as they declare: a file cut
    at an element boundary before its pixels parses without error, and "no Rows" used
    to read as "not an image". A non-image SOP class is whole once it parses; without
    any SOP class the file is cut before it and not whole.
    """
    sop = _sop_class(ds)
    has_image_part = any(k in ds for k in ("Rows", "Columns")) or any(
        keyword in ds for keyword, _ in _PIXEL_KEYWORDS)
    if not has_image_part:
        return sop is not None and not _needs_pixels(sop)
    if "Rows" not in ds or "Columns" not in ds:
        return False
    found = next(((keyword, size) for keyword, size in _PIXEL_KEYWORDS if keyword in ds), None)
    if found is None:
        return False
    keyword, item_bytes = found
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if keyword == "PixelData" and syntax is not None and getattr(syntax, "is_compressed", False):
        return True  # encapsulated: pydicom parsed it up to its delimiter
    try:
        if item_bytes is None:
            item_bytes = int(ds.BitsAllocated) * int(ds.get("SamplesPerPixel", 1) or 1) / 8
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                    * item_bytes)
    except (TypeError, ValueError, AttributeError):
        return True  # malformed header: the assembler says what is wrong
    return len(ds[keyword].value) >= expected
