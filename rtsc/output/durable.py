"""Durable writes: a file is whole at its final path, or not there at all.

Each write goes to ``<name>.part``, is fsynced, renamed into place and its folder
fsynced; a write that fails removes its ``.part`` again. A short write with no error
(what a full disk can give) is reported as ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


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
    payload : bytes, or a tuple of them
        The file's bytes; a tuple's parts are written one after the other (the
        receiver's Part 10 header and the dataset as received, never joined in memory).
    on_error : callable(OSError) or None
        Called with the error before it is raised (the archive reports a full disk).
    on_success : callable() or None
        Called once the file is durable in place.
    """

    def __init__(self, path: Path, payload: bytes | tuple[bytes, ...],
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
            offset = 0
            for part in payload if isinstance(payload, tuple) else (payload,):
                write_all(self._fd, part, offset)
                offset += len(part)
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
            fsync_dir(self.path.parent)
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


def write_all(fd: int, payload: bytes | memoryview, offset: int) -> None:
    """Write all of ``payload`` at ``offset``; a short write (the last free blocks of a
    disk) is continued, so a full disk surfaces as the OSError (ENOSPC) of the next one."""
    view = memoryview(payload).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:  # not expected from a regular file; never loop on it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def fsync_dir(path: Path) -> None:
    """fsync a directory: a new entry in it (file, rename, sub-directory) is durable only then."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(path: Path, exist_ok: bool = False) -> bool:
    """Create ``path`` (and missing parents) and fsync the parent of each directory
    created, so that it survives a power cut; returns whether ``path`` was created."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=exist_ok)
    for created in reversed(missing):
        fsync_dir(created.parent)
    return bool(missing)


def fsync_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    DurableWrite(path, payload).commit()


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
