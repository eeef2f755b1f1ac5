"""Reader for Siemens CSA headers ((0029,xx10) image / (0029,xx20) series info).

Only the fields rtsc uses are interpreted; everything parses into
``{name: list of values}`` with numbers converted by the element's VR.
Both the "SV10" (CSA2) layout and the older CSA1 layout are read.
"""

from __future__ import annotations

import struct
from typing import Any, Collection

from pydicom.dataset import Dataset

from rtsc.dicom._csa_kernels import (BAD_ITEM_COUNT, BAD_TAG_COUNT, ITEM_PAST_END, OK,
                                    TRUNCATED, csa_layout)
from rtsc.errors import DicomError

_MAX_TAGS = 1000
_MAX_ITEMS = 1000
_NUMERIC = {"IS": int, "SL": int, "UL": int, "SS": int, "US": int,
            "DS": float, "FD": float, "FL": float}


def read_csa(blob: bytes, names: Collection[str] | None = None) -> dict[str, list[Any]]:
    """Parse one CSA header blob.

    Parameters
    ----------
    blob : bytes
        The element value of (0029,xx10) or (0029,xx20).
    names : collection of str or None
        Decode only these fields: a compiled walk (:mod:`rtsc.dicom._csa_kernels`)
        finds where every field lies and only the wanted ones are decoded (a mosaic's
        header has ~100 fields and rtsc reads three). None decodes all, in Python.

    Returns
    -------
    dict name -> list of values (int, float or str), empty items dropped.

    Raises
    ------
    DicomError
        If the blob is truncated or its counts are absurd.
    """
    try:
        return _read_all(blob) if names is None else _read_wanted(blob, names)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DicomError(f"malformed Siemens CSA header: {exc}") from exc


_PROBLEMS = {TRUNCATED: "truncated", BAD_TAG_COUNT: "absurd number of fields",
             BAD_ITEM_COUNT: "absurd number of items", ITEM_PAST_END: "item runs past the end"}


def _read_wanted(blob: bytes, names: Collection[str]) -> dict[str, list[Any]]:
    status, tag_pos, first_item, item_pos, item_len = csa_layout(blob, _MAX_TAGS, _MAX_ITEMS)
    if status != OK:
        raise DicomError(f"malformed Siemens CSA header: {_PROBLEMS[status]}")
    index = {int(p): t for t, p in enumerate(tag_pos.tolist())}
    out: dict[str, list[Any]] = {}
    for name in names:
        # A field's 64-byte name is NUL-terminated: the last field of that name, as
        # the full walk would keep (a later field overwrites an earlier one).
        key = name.encode("latin-1") + b"\0"
        at = blob.rfind(key)
        while at != -1 and at not in index:
            at = blob.rfind(key, 0, at + len(key) - 1)
        if at == -1:
            continue
        t = index[at]
        convert = _NUMERIC.get(blob[at + 68:at + 72].split(b"\0", 1)[0].decode("latin-1"), str)
        values: list[Any] = []
        for n in range(int(first_item[t]), int(first_item[t + 1])):
            start = int(item_pos[n])
            _append_item(values, blob[start:start + int(item_len[n])], convert)
        out[name] = values
    return out


def _append_item(values: list[Any], raw: bytes, convert: Any) -> None:
    """An item's text up to its NUL, converted by the field's VR (kept as text when it
    is not a number); empty items are dropped."""
    text = raw.split(b"\0", 1)[0].decode("latin-1").strip()
    if text:
        try:
            values.append(convert(float(text)) if convert is int else convert(text))
        except ValueError:
            values.append(text)


def _read_all(blob: bytes) -> dict[str, list[Any]]:
    csa2 = blob[:4] == b"SV10"
    pos = 8 if csa2 else 0
    n_tags, _check = struct.unpack_from("<2I", blob, pos)
    pos += 8
    if not 0 < n_tags <= _MAX_TAGS:
        raise DicomError(f"malformed Siemens CSA header: {n_tags} tags")
    out: dict[str, list[Any]] = {}
    for _ in range(n_tags):
        raw_name, _vm, raw_vr, _syngodt, n_items, _xx = struct.unpack_from("<64si4s3i", blob, pos)
        pos += 84
        if not 0 <= n_items <= _MAX_ITEMS:
            raise DicomError(f"malformed Siemens CSA header: {n_items} items")
        name = raw_name.split(b"\0", 1)[0].decode("latin-1")
        vr = raw_vr.split(b"\0", 1)[0].decode("latin-1")
        convert = _NUMERIC.get(vr, str)
        values: list[Any] = []
        for _item in range(n_items):
            x0, x1, _x2, _x3 = struct.unpack_from("<4i", blob, pos)
            pos += 16
            item_len = x1 if csa2 else x0
            if item_len < 0 or pos + item_len > len(blob):
                raise DicomError("malformed Siemens CSA header: item runs past the end")
            _append_item(values, blob[pos:pos + item_len], convert)
            pos += item_len + (-item_len % 4)
        out[name] = values
    return out


def csa_image_header(ds: Dataset, names: Collection[str] | None = None
                     ) -> dict[str, list[Any]] | None:
    """The CSA image header of ``ds`` (private creator "SIEMENS CSA HEADER"), or None.

    ``names``: decode only these fields (see :func:`read_csa`)."""
    return _private_csa(ds, 0x10, names)


def csa_series_header(ds: Dataset, names: Collection[str] | None = None
                      ) -> dict[str, list[Any]] | None:
    """The CSA series header of ``ds`` ((0029,xx20): the protocol text, MrPhoenixProtocol
    or, before VB13, MrProtocol), or None.

    ``names``: decode only these fields (see :func:`read_csa`)."""
    return _private_csa(ds, 0x20, names)


def _private_csa(ds: Dataset, element_offset: int,
                 names: Collection[str] | None) -> dict[str, list[Any]] | None:
    # int() first: comparing pydicom's Tag objects goes through Python-level methods,
    # and a mosaic has ~100 tags (0.1 ms per dataset). Values are read as the raw bytes
    # received where pydicom has not decoded them yet: no decoding needed for either.
    present = [tag for tag in ds.keys() if 0x00290010 <= int(tag) <= 0x002900FF]
    for creator_tag in present:
        if _text(_value(ds, creator_tag)) == "SIEMENS CSA HEADER":
            block = (creator_tag & 0xFF) << 8
            blob = _value(ds, 0x00290000 | block | element_offset)
            if not blob:
                return None
            return read_csa(bytes(blob) if not isinstance(blob, bytes) else blob, names)
    return None


def _value(ds: Dataset, tag: int) -> Any:
    element = ds.get_item(tag)
    return None if element is None else element.value


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1").replace("\0", " ").strip()
    return str(value).strip() if value is not None else ""
