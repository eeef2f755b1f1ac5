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
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

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
from rtsc.dicom.receiver import Incoming
from rtsc.session import SessionStore

log = logging.getLogger(__name__)

_SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


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
        handed = 0
        files = sorted(self._files(), key=natural_key)
        handed += self._scan_parrec([p for p in files if is_parrec(p)], now, final)
        for path in (p for p in files if not is_parrec(p)):
            if path in self._seen:
                continue
            signature = self._stable(path, now, final)
            if signature is None:
                continue
            failed = self._incomplete.get(path)
            unchanged = failed is not None and failed[0] == signature
            if unchanged and not final and now - failed[1] < self.config.retry_s:
                continue  # incomplete and untouched since: wait for it to change
            if not self._take(path, as_is=final or unchanged):
                self._incomplete[path] = (signature, failed[1] if unchanged else now)
                continue
            self._candidates.pop(path, None)
            self._incomplete.pop(path, None)
            self._seen.add(path)
            handed += 1
        return handed

    def _stable(self, path: Path, now: float, final: bool) -> tuple[int, float] | None:
        """(size, mtime) of a file unchanged for ``settle_s`` (at ``final``: unchanged since
        the last scan, or just found), else None."""
        try:
            stat = path.stat()
        except OSError:
            return None
        signature = (stat.st_size, stat.st_mtime)
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
                    self._take_alone(alone)
                    handed += 1
                continue
            self._alone.pop(par, None)
            self._alone.pop(rec, None)
            combined = (signatures[PAR_SUFFIX], signatures[REC_SUFFIX])
            failed = self._pairs_incomplete.get(par)
            unchanged = failed is not None and failed[0] == combined
            if unchanged and not final and now - failed[1] < self.config.retry_s:
                continue  # incomplete and untouched since: wait for it to change
            if not self._take_pair(par, rec, as_is=final or unchanged):
                self._pairs_incomplete[par] = (combined, failed[1] if unchanged else now)
                continue
            self._pairs_incomplete.pop(par, None)
            for path in (par, rec):
                self._candidates.pop(path, None)
                self._seen.add(path)
            handed += 1
        return handed

    def _take_pair(self, par: Path, rec: Path, as_is: bool) -> bool:
        """Archive a PAR/REC pair and hand it on; False (nothing done) when the PAR is not
        whole or the REC not the size it declares, and not ``as_is``."""
        t_received = time.time()
        try:
            par_bytes = par.read_bytes()
            rec_bytes = rec.read_bytes()
        except OSError as exc:
            if not as_is:
                return False
            self.out.put(ParRecDump(name=par.stem, series_key="", t_received=t_received,
                                    error=f"cannot read the PAR/REC pair ({exc})"))
            return True
        summary = par_summary(par_bytes)
        if not as_is and not (summary.complete and summary.rec_bytes == len(rec_bytes)):
            return False
        folder = par.parent.relative_to(self.root).as_posix()
        key = series_key(summary.fields, folder)
        archived = self.store.archive_set(key, {PAR_SUFFIX: par_bytes, REC_SUFFIX: rec_bytes})
        self.out.put(ParRecDump(name=par.stem, series_key=key, t_received=t_received,
                                par=par_bytes, rec=rec_bytes, par_path=archived[PAR_SUFFIX],
                                rec_path=archived[REC_SUFFIX], dump=dump_number(par.stem)))
        return True

    def _take_alone(self, path: Path) -> None:
        """Keep half of a PAR/REC pair whose other half did not come, and alert."""
        suffix = path.suffix.lower()
        missing = "REC" if suffix == PAR_SUFFIX else "PAR"
        try:
            kept = "rejected/" + self.store.quarantine(path.read_bytes(), suffix=suffix).name
        except OSError as exc:
            kept = f"nothing ({exc})"
        reason = (f"{suffix[1:].upper()} without its {missing} after "
                  f"{self.config.retry_s:g} s; kept as {kept}, not processed")
        log.warning("%s: %s", path.name, reason)
        self.out.put(ParRecDump(name=path.name, series_key="", t_received=time.time(),
                                error=reason, code="parrec_unpaired"))
        self._alone.pop(path, None)
        self._candidates.pop(path, None)
        self._seen.add(path)

    def _files(self) -> list[Path]:
        found = []
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                    continue
                found.append(Path(dirpath) / name)
        return found

    def _take(self, path: Path, as_is: bool) -> bool:
        """Hand a file on; False (nothing done) when it is not whole yet and not ``as_is``."""
        t_received = time.time()
        try:
            payload = path.read_bytes()
        except OSError as exc:
            if not as_is:
                return False
            self.out.put(Incoming(None, path, t_received, "folder", error=str(exc)))
            return True
        try:
            dataset = pydicom.dcmread(io.BytesIO(payload))
            series_uid = str(dataset.SeriesInstanceUID)
            if not as_is and not _whole(dataset):
                return False
        except Exception as exc:  # noqa: BLE001
            if not as_is:
                return False
            # Any exception, not a list: a file truncated inside an element header makes
            # pydicom raise struct.error or BytesLengthException, which used to escape and
            # kill the watcher thread (every later file ignored). A bad file is an alert.
            reason = f"not a readable DICOM file ({type(exc).__name__}: {exc})"
            log.warning("%s: %s", path.name, reason)
            self.out.put(Incoming(None, path, t_received, "folder", error=reason))
            return True
        archived = self.store.archive(series_uid, payload)
        self.out.put(Incoming(dataset, archived, t_received, "folder"))
        return True


def natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key reading digit runs as numbers: ``6_2.dcm`` before ``6_10.dcm``, as a
    scanner numbers its exports (files of one scan become ready in that order)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(path)) if part)


def _whole(ds: pydicom.Dataset) -> bool:
    """False when an image's pixel data is missing or shorter than its header says."""
    if "Rows" not in ds:
        return True  # not an image: nothing to measure
    if "PixelData" not in ds:
        return False
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return True  # encapsulated: its length says nothing about completeness
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                    * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8)
    except (TypeError, ValueError, AttributeError):
        return True  # malformed header: the assembler says what is wrong
    return len(ds.PixelData) >= expected
