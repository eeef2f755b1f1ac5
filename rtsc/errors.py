"""One error root for rtsc, with a subclass per domain.

Errors are converted at boundaries: the C-STORE handler turns them into DICOM
statuses, the pipeline worker into ``alert`` messages, the CLI into an exit code.
"""


class RtscError(Exception):
    """Root of every error rtsc raises on purpose."""


class ConfigError(RtscError):
    """The configuration is invalid; the message names the key, value and what is allowed."""


class DicomError(RtscError):
    """A dataset cannot be used: not DICOM, truncated, unsupported or inconsistent.

    Attributes
    ----------
    code : str
        Alert code published for it (``bad_dicom``, ``unsupported``, ``geometry_changed``,
        ``unplaced``, ``late_slice``...).
    index : int or None
        The volume the dataset would have belonged to, when known.
    """

    def __init__(self, message: str, code: str = "bad_dicom", index: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.index = index


class MessageError(RtscError):
    """A ZeroMQ message cannot be decoded (wrong schema, malformed header or buffers)."""


class HistoryError(RtscError):
    """The site's QC history database cannot be opened, migrated, read or written."""
