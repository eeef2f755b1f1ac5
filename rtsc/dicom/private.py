"""Private (vendor) data elements, found by their private creator and decoded by hand.

A private element's number is only meaningful with its block's creator: (0043,xx2A) is
GE's user data only in the block whose creator (0043,00xx) reads ``GEMS_PARM_01``. Over
C-STORE (implicit VR) pydicom may not know a private element's VR and hands its value
over as raw bytes, so the readers here decode text and binary numbers themselves.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence


def private_value(ds: Dataset | None, group: int, creator: str, offset: int) -> Any:
    """Value of the private element ``(group, xx<offset>)`` in the block of ``creator``.

    Parameters
    ----------
    ds : pydicom Dataset (or a sequence item), None allowed
    group : odd group number, e.g. 0x0043
    creator : private creator text, compared case-insensitively without padding
    offset : element number inside the block, 0x00-0xFF

    Returns
    -------
    The element's value as pydicom holds it (bytes when the VR was unknown), or None
    when the dataset has no such block or element.
    """
    if ds is None:
        return None
    wanted = creator.strip().upper()
    first, last = (group << 16) | 0x10, (group << 16) | 0xFF
    for tag in [int(t) for t in ds.keys() if first <= int(t) <= last]:
        if text(ds.get_item(tag).value).upper() != wanted:
            continue
        found = (group << 16) | ((tag & 0xFF) << 8) | offset
        if found not in ds:
            return None
        try:
            return ds[found].value  # decoded: a sequence becomes a Sequence
        except (ValueError, TypeError):
            return ds.get_item(found).value  # undecodable by its VR: the raw bytes
    return None


def private_item(ds: Dataset | None, group: int, creator: str, offset: int) -> Dataset | None:
    """First item of the private sequence ``(group, xx<offset>)`` of ``creator``, or None
    (also when pydicom could not read it as a sequence)."""
    value = private_value(ds, group, creator, offset)
    if isinstance(value, Sequence) and len(value) > 0:
        return value[0]
    return None


def text(value: Any) -> str:
    """A string or bytes value as text: NUL padding and surrounding spaces removed;
    multi-valued elements joined with backslashes, as DICOM encodes them."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").replace("\0", " ").strip()
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def number(value: Any, binary: str | None = None) -> float | None:
    """A private element's (first) value as a finite float, or None.

    Parameters
    ----------
    value : the element value (str, number, list, or raw bytes)
    binary : struct code of the element's binary VR (``"f"`` for FL, ``"d"`` for FD,
        ``"h"`` for SS, ``"H"`` for US, ``"i"`` for SL) used when the value is raw bytes
        of exactly that size; raw bytes are otherwise read as text (DS, IS, LO).
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        if binary is not None and len(raw) == struct.calcsize("<" + binary):
            result = float(struct.unpack("<" + binary, raw)[0])
            return result if math.isfinite(result) else None
        value = text(raw)
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    elif not isinstance(value, (int, float)):
        try:
            value = list(value)[0]
        except (TypeError, IndexError):
            return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None
