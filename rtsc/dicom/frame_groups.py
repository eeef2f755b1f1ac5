"""The per-frame functional groups of an enhanced multi-frame image, read from the
encoded sequence with a targeted walker instead of pydicom's parser.

pydicom builds a Dataset per item and per nested item and converts each value on
access: ~0.4 ms per frame, 31 ms of the 36 ms that assembling a 72-frame 128x128 file
took. :func:`per_frame_groups` walks the encoded bytes once and keeps only the
elements :mod:`rtsc.dicom.multiframe` reads, as plain dicts (keyword -> value, a
sequence -> list of dicts) that answer ``get``, ``in`` and ``[0]`` as pydicom's
datasets and sequences do. Anything it does not handle (big endian, a sequence
pydicom already decoded, a value that is not plain ASCII numbers) sends the caller
back to pydicom: the result is the same either way, only the time differs.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

_PER_FRAME = 0x52009230
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_DECIMAL = re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *\Z")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}

# tag -> (keyword, how its value is decoded); everything else is skipped.
_SEQUENCES = {
    0x00209111: "FrameContentSequence",
    0x00209113: "PlanePositionSequence",
    0x00209116: "PlaneOrientationSequence",
    0x00289110: "PixelMeasuresSequence",
    0x00289145: "PixelValueTransformationSequence",
    0x00189114: "MREchoSequence",
}
_VALUES = {
    0x00209157: ("DimensionIndexValues", "UL"),
    0x00209128: ("TemporalPositionIndex", "UL"),
    0x00189074: ("FrameAcquisitionDateTime", "DT"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00180050: ("SliceThickness", "DS"),
    0x00180088: ("SpacingBetweenSlices", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00189082: ("EffectiveEchoTime", "FD"),
}


class _Unsupported(Exception):
    """Something the walker does not decode as pydicom would: use pydicom."""


def per_frame_groups(ds: Dataset) -> list[Any] | None:
    """The items of ``ds``'s PerFrameFunctionalGroupsSequence.

    Returns
    -------
    list of dict, or pydicom Sequence, or None
        Plain dicts from the encoded bytes when the walker can read them; else
        pydicom's sequence (None if absent), as ``ds.get`` gives it.
    """
    if _PER_FRAME not in ds:
        return None
    raw = ds.get_item(_PER_FRAME)
    # Of undefined length, the value is the items without the delimiter
    # (rtsc.dicom.fastread keeps it so): read to its end all the same.
    if isinstance(raw, RawDataElement) and raw.is_little_endian and raw.value is not None:
        try:
            items, _ = _items(bytes(raw.value), 0, len(raw.value), raw.is_implicit_VR, True)
            return items
        except (_Unsupported, struct.error, UnicodeDecodeError, ValueError):
            pass
    return ds.get("PerFrameFunctionalGroupsSequence")


def sequence_end(buf: bytes, pos: int, implicit: bool) -> int | None:
    """Offset after the delimiter of the sequence of undefined length whose items start
    at ``pos``, every item and nested element followed by its header; None if the
    walker cannot follow them (then pydicom reads the sequence)."""
    try:
        _, end = _items(buf, pos, None, implicit, False)
    except (_Unsupported, struct.error, UnicodeDecodeError, ValueError):
        return None
    if buf[end - 4:end] != b"\0\0\0\0":
        return None  # a delimiter claiming a length: pydicom's
    return end


def _header(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value position) of the element at ``pos``."""
    group, element = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | element
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        return tag, None, length, pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        return tag, vr, length, pos + 12
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return tag, vr, length, pos + 8


def _items(buf: bytes, pos: int, end: int | None, implicit: bool,
           keep: bool) -> tuple[list[dict[str, Any]], int]:
    """Items of a sequence value from ``pos`` to ``end`` (``end`` None: undefined length,
    up to its delimiter); returns them (empty unless ``keep``) and the position after."""
    items: list[dict[str, Any]] = []
    while end is None or pos < end:
        tag, _vr, length, pos = _header(buf, pos, implicit)
        if tag == _SEQUENCE_END:
            return items, pos
        if tag != _ITEM:
            raise _Unsupported(f"{tag:08X} in a sequence")
        item_end = None if length == _UNDEFINED else pos + length
        item, pos = _elements(buf, pos, item_end, implicit, keep)
        items.append(item)
    if end is not None and pos != end:
        raise _Unsupported("sequence overruns its length")
    return items, pos


def _elements(buf: bytes, pos: int, end: int | None, implicit: bool,
              keep: bool) -> tuple[dict[str, Any], int]:
    """The wanted elements of one item (nothing if not ``keep``), and the position after."""
    item: dict[str, Any] = {}
    while end is None or pos < end:
        tag, vr, length, pos = _header(buf, pos, implicit)
        if tag == _ITEM_END:
            return item, pos
        sequence = _SEQUENCES.get(tag) if keep else None
        if sequence is not None or length == _UNDEFINED:
            # a wanted sequence, or one whose end only its delimiter marks
            if vr not in (None, b"SQ"):
                raise _Unsupported(f"{vr!r} where a sequence was expected")
            value_end = None if length == _UNDEFINED else pos + length
            items, pos = _items(buf, pos, value_end, implicit, sequence is not None)
            if sequence is not None:
                item[sequence] = items
            continue
        wanted = _VALUES.get(tag) if keep else None
        if wanted is not None:
            keyword, kind = wanted
            item[keyword] = _value(buf[pos:pos + length], kind, vr)
        pos += length
    if end is not None and pos != end:
        raise _Unsupported("item overruns its length")
    return item, pos


def _value(data: bytes, kind: str, vr: bytes | None) -> Any:
    """A value as pydicom gives it: one number alone, several as a list, empty None."""
    if vr is not None and vr != kind.encode():
        raise _Unsupported(f"{kind} element written as {vr!r}")
    if kind == "UL":
        if len(data) % 4:
            raise _Unsupported("UL length")
        numbers: list[Any] = list(struct.unpack(f"<{len(data) // 4}I", data))
    elif kind == "FD":
        if len(data) % 8:
            raise _Unsupported("FD length")
        numbers = list(struct.unpack(f"<{len(data) // 8}d", data))
    else:
        text = data.decode("ascii").strip(" \0")
        if kind == "DT":
            return text or None
        tokens = text.split("\\") if text else []
        if not all(_DECIMAL.match(token) for token in tokens):
            raise _Unsupported(f"DS {text!r}")  # pydicom's validation decides
        numbers = [float(token) for token in tokens]
    if not numbers:
        return None
    return numbers[0] if len(numbers) == 1 else numbers
