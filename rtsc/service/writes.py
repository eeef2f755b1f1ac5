"""Failed writes (a full disk): one alert per episode, not one per volume.

An episode runs from the first write that fails to the first volume written again;
one critical alert opens it, one info alert closes it (listing what was not
written), and the failures in between are only counted and logged at debug level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rtsc.intake.watcher import InputAlert
from rtsc.output.durable import is_disk_full

log = logging.getLogger(__name__)

# (series or None, level, code, text, volume index or None)
AlertFn = Callable[[str | None, str, str, str, int | None], None]


@dataclass
class _WriteTrouble:
    """An episode of failed writes (a full disk): from the first failure to the first
    volume written again. One alert opens it, one closes it."""

    code: str
    not_written: list[tuple[str, int]] = field(default_factory=list)  # (series, index)


def failure_code(exc: OSError) -> str:
    """``disk_full`` when the error says the disk is full, else ``write_failed``."""
    return "disk_full" if is_disk_full(exc) else "write_failed"


def archive_failure_alert(exc: OSError, session_dir: Path | str) -> InputAlert:
    """The alert for a file the store could not archive (first failure of a run of them).

    The archiving thread (receiver or watcher) hands it to the worker through the
    queue, the only thing shared safely from there.
    """
    return InputAlert("critical", failure_code(exc), (
        f"cannot archive in {session_dir} ({exc.strerror or exc}): C-STORE "
        "is answered out of resources (nothing acknowledged is lost; the sender keeps "
        "the images) and watched files stay in their folder until they can be archived; "
        "volumes received are still processed and published"))


class WriteFailures:
    """The episodes of failed writes of a run, on the worker.

    Parameters
    ----------
    session_dir : Path or str
        The session folder, named in the alert texts.
    alert : callable(series, level, code, text, index)
        Sends one alert.
    """

    def __init__(self, session_dir: Path | str, alert: AlertFn) -> None:
        self.session_dir = session_dir
        self._alert = alert
        self._trouble: _WriteTrouble | None = None

    def text(self, what: str, exc: OSError) -> str:
        """The alert text for ``what`` (e.g. "volume 12") not written because of ``exc``."""
        return (f"cannot write {what} in {self.session_dir} ({exc.strerror or exc}): "
                "volumes are still processed and published, each written to bold.nii, "
                "bold.nii.gz and confounds.tsv whole or not at all; writing resumes by itself "
                "when space returns (the volumes not written are listed in qc.json)")

    def failed(self, series: str | None, code: str, text: str, index: int | None,
               where: tuple[str, int] | None = None) -> None:
        """One critical alert per episode of failed writes, not one per volume (or a
        traceback each): the rest of the episode is counted and logged at debug level."""
        trouble = self._trouble
        if trouble is None:
            trouble = self._trouble = _WriteTrouble(code)
            self._alert(series, "critical", code, text, index)
        else:
            log.debug("still failing: %s", text)
        if where is not None:
            trouble.not_written.append(where)

    def resumed(self, series: str, index: int) -> None:
        """A volume was written: an episode of failed writes, if any, is over."""
        trouble, self._trouble = self._trouble, None
        if trouble is None:
            return
        lost = [i for s, i in trouble.not_written if s == series]
        others = len(trouble.not_written) - len(lost)
        text = f"outputs are written again from volume {index}"
        if lost:
            text += (f"; {len(lost)} volume(s) of this series not written "
                     f"({min(lost)}-{max(lost)}), listed in qc.json (volumes_not_written)")
        if others:
            text += f"; {others} volume(s) of other series not written"
        self._alert(series, "info", "writing_resumed", text, index)
