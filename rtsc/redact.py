"""Keeping the values of received datasets out of log lines and stderr.

pydicom reports a non-conformant value with the value itself ("Invalid value for VR UI:
'1.2.3.x'") on its logger, and again as a UserWarning printed on stderr; pynetdicom does
the same for the UIDs of a request ("Non-conformant 'Affected SOP Instance UID' value
'...'"). A received UID, name, ID or date is patient data: it belongs in the archive only.

:class:`LogRedaction` rewrites such records, installed by the CLI on its log handlers
(every record, warnings included) and by :class:`~rtsc.service.run.RunService` on the DICOM
libraries' loggers (so that library users are protected whatever their logging set-up),
and removed again when they stop.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from typing import Iterable

import pydicom  # noqa: F401 - imported for its loggers, which the filters are put on
import pynetdicom  # noqa: F401

REDACTED = "<redacted>"
# Loggers of the libraries that quote received values in their messages; "py.warnings"
# carries their warnings once logging.captureWarnings is on.
_QUOTING_LOGGERS = ("pydicom", "pynetdicom", "py.warnings")
# Quoted text, but not the file names of traceback lines (File "/path/x.py", line 7).
_QUOTED = re.compile(r"""(?<!File )(?:b?'[^'\n]*'|b?"[^"\n]*")""")
# A UID of an instance, study, series or frame of reference (or anything shaped like one:
# a root arc, then at least four more components, letters allowed as senders write them
# non-conformant). An IPv4 address has four components in all; the standard's own UIDs
# (SOP classes, transfer syntaxes: 1.2.840.10008...) are not patient data and stay.
_UID = re.compile(r"(?<![\w.])(?!1\.2\.840\.10008\.)[0-2](?:\.\w+){4,}(?![\w.])")


@functools.lru_cache(maxsize=1)
def _element_names() -> frozenset[str]:
    """Names and keywords of DICOM elements: quoted in messages as labels, not values."""
    from pydicom.datadict import DicomDictionary

    return frozenset(name for entry in DicomDictionary.values() for name in entry[2::2]
                     if name)


def redact(text: str, quoted: bool = True) -> str:
    """``text`` with UIDs, and (``quoted``) every quoted value, replaced by ``<redacted>``.

    Quoted DICOM element names ('Affected SOP Instance UID') are labels and stay.

    Parameters
    ----------
    text : str
    quoted : bool
        Also replace quoted strings (what pydicom and pynetdicom quote are values).

    Returns
    -------
    str
    """
    if quoted:
        names = _element_names()
        text = _QUOTED.sub(lambda m: m.group() if m.group().lstrip("b")[1:-1] in names
                           else REDACTED, text)
    return _UID.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites records with received values redacted.

    Records of pydicom, pynetdicom and captured warnings lose their quoted values and
    UIDs; any other record (rtsc's own) its UIDs only (rtsc quotes file names and config
    values, which stay readable). Exception text is redacted in full. Nothing is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        quoted = record.name.split(".", 1)[0] in _QUOTING_LOGGERS
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report
            return True
        clean = redact(message, quoted)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class LogRedaction:
    """Install :class:`RedactingFilter` (and silence pydicom's duplicate warnings) until
    :meth:`remove`.

    Parameters
    ----------
    targets : iterable of logging.Handler or logging.Logger
        Where the filter goes. On a handler it sees every record the handler writes; on a
        logger, only the records created on that very logger (not its children's).
    pydicom_warnings : bool
        Ignore UserWarnings raised from pydicom's modules while installed: pydicom sends
        each (non-conformant values among them) to its logger too, where it is redacted;
        the stderr copy would print the value in clear.
    """

    def __init__(self, targets: Iterable[logging.Handler | logging.Logger],
                 pydicom_warnings: bool = True) -> None:
        self.filter = RedactingFilter()
        self._targets = list(targets)
        self._pydicom_warnings = pydicom_warnings
        self._warning_entry: tuple[object, ...] | None = None

    @classmethod
    def for_dicom_libraries(cls) -> "LogRedaction":
        """Filters on every logger of pydicom and pynetdicom (their loggers exist once
        they are imported, which this module does)."""
        manager = logging.Logger.manager
        names = [name for name in list(manager.loggerDict)
                 if name.split(".", 1)[0] in ("pydicom", "pynetdicom")]
        return cls([logging.getLogger(name) for name in sorted(names)])

    def install(self) -> "LogRedaction":
        """Add the filter to every target, and the warnings filter; returns self."""
        for target in self._targets:
            target.addFilter(self.filter)
        if self._pydicom_warnings and self._warning_entry is None:
            # Each instance adds its own entry (the regex comment makes it distinct), so
            # that removing one leaves another instance's in place.
            warnings.filterwarnings("ignore", message=f"(?#rtsc-{id(self)})",
                                    category=UserWarning, module=r"pydicom(\.|$)")
            self._warning_entry = warnings.filters[0]
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (idempotent)."""
        for target in self._targets:
            target.removeFilter(self.filter)
        if self._warning_entry is not None:
            try:
                warnings.filters.remove(self._warning_entry)  # type: ignore[arg-type]
            except ValueError:
                pass  # warnings.resetwarnings() removed it already
            self._warning_entry = None
