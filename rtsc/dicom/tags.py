"""Reading vendor tags: the manufacturer, and private elements by their creator.

A private element's number depends on the block its creator was given in that file
((gggg,0010) to (gggg,00FF)), so it is looked up by creator name, never by a fixed
number. Values may still be raw bytes when a dataset was read with implicit VR and no
private dictionary; :func:`text` and :func:`integer` decode them.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.dataset import Dataset

#: Private creators and element offsets rtsc reads.
GE_RELA = "GEMS_RELA_01"
GE_LOCATIONS_IN_ACQUISITION = 0x4F  # (0021,xx4F): slices per volume, multiband included
PHILIPS_IMAGING = "Philips Imaging DD 001"
PHILIPS_NUMBER_OF_SLICES = 0x18  # (2001,xx18)
PHILIPS_EPI_FACTOR = 0x13  # (2001,xx13)
PHILIPS_SCANNING_TECHNIQUE = 0x20  # (2001,xx20)


def vendor(ds: Dataset) -> str:
    """``GE``, ``Siemens``, ``Philips`` or ``other``, from Manufacturer (0008,0070)."""
    maker = str(ds.get("Manufacturer", "") or "").upper()
    if maker.startswith("GE") or "GENERAL ELECTRIC" in maker:
        return "GE"
    if "SIEMENS" in maker:
        return "Siemens"
    if "PHILIPS" in maker:
        return "Philips"
    return "other"


def private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """Value of a private element by its creator and element offset, or None.

    The creator is looked up in the dataset itself (not pydicom's block cache, which a
    copied dataset shares with its original).
    """
    for element in range(0x10, 0x100):
        found = ds.get((group, element))
        if found is not None and text(found.value) == creator:
            item = ds.get((group, (element << 8) | offset))
            return None if item is None else item.value
    return None


def text(value: Any) -> str:
    """A string value, stripped; raw bytes (implicit VR) decoded as Latin-1."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    return str(value).strip(" \x00")


def integer(value: Any) -> int | None:
    """An IS/SL/SS/US value as int, None when absent or not a number; raw little-endian
    bytes (implicit VR) of 2 or 4 bytes are read as signed integers, others as text."""
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 4:
            return int(struct.unpack("<i", bytes(value))[0])
        if len(value) == 2:
            return int(struct.unpack("<h", bytes(value))[0])
        value = bytes(value).decode("latin-1").strip(" \x00")
    try:
        return int(float(str(value).split("\\")[0]))
    except (TypeError, ValueError):
        return None
