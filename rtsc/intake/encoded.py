"""What the store handler reads of an encoded dataset before anything decodes it.

Both run on the receive thread for every dataset, so both are bounded and cheap:
:func:`inflate` inflates a deflated dataset to at most a size limit, and
:func:`peek_series_uid` finds the SeriesInstanceUID by walking the element headers
in front of it.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.uid import UID

from rtsc.errors import RtscError


class TooLarge(RtscError):
    """A deflated dataset inflates past the receiver's size limit."""


_INFLATE_CHUNK = 1 << 20


def inflate(data: bytes, limit: int) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian dataset, at most ``limit`` bytes.

    The output grows by at most a chunk per step (zlib's ``max_length``), so a stream
    that inflates past ``limit`` costs ``limit`` bytes, whatever it would inflate to.

    Raises
    ------
    TooLarge
        The inflated dataset would exceed ``limit`` bytes.
    zlib.error
        Not a complete raw deflate stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    while not inflater.eof:
        piece = inflater.decompress(pending, _INFLATE_CHUNK)
        pending = inflater.unconsumed_tail  # left when the chunk filled up
        if not piece and not pending and not inflater.eof:
            raise zlib.error("incomplete or truncated deflate stream")
        out += piece
        if len(out) > limit:
            raise TooLarge(f"inflates past {limit} bytes")
    return out


_SERIES_UID_TAG = 0x0020000E
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


def _skip_undefined(raw: bytes, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence value starting at ``pos``."""
    while True:
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError("malformed sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # item of undefined length: walk its elements to the item delimiter
            if struct.unpack_from("<HH", raw, pos) == (0xFFFE, 0xE00D):
                pos += 8
                break
            _tag, pos = _next_element(raw, pos, implicit)


def _next_element(raw: bytes, pos: int, implicit: bool) -> tuple[int, int]:
    """(tag, position after the element) for the element at ``pos`` (little endian)."""
    group, element = struct.unpack_from("<HH", raw, pos)
    tag = (group << 16) | element
    if implicit:
        (length,) = struct.unpack_from("<I", raw, pos + 4)
        pos += 8
        is_sequence = length == _UNDEFINED
    else:
        vr = bytes(raw[pos + 4:pos + 6])  # raw may be a bytearray (inflated)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            pos += 8
        is_sequence = length == _UNDEFINED
    if is_sequence:
        return tag, _skip_undefined(raw, pos, implicit)
    return tag, pos + length


def peek_series_uid(raw: bytes, syntax: UID) -> str:
    """SeriesInstanceUID of an encoded dataset, walking only the elements before it.

    A byte-level walk (0.02 ms) instead of pydicom's parser (0.5 ms), because this
    runs on the receive thread for every dataset; pydicom is the fallback.
    """
    if syntax.is_little_endian:
        try:
            pos = 0
            while pos < len(raw):
                start = pos
                tag, pos = _next_element(raw, pos, syntax.is_implicit_VR)
                if tag == _SERIES_UID_TAG:
                    # UI is a short VR: 8 header bytes, explicit or implicit
                    return raw[start + 8:pos].decode("ascii").rstrip("\0 ")
                if tag > _SERIES_UID_TAG:
                    break
        except (struct.error, UnicodeDecodeError, ValueError):
            pass
    head = read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian,
                        stop_when=lambda tag, vr, length: tag > _SERIES_UID_TAG)
    return str(head.SeriesInstanceUID)
