"""Reader for Siemens CSA headers ((0029,xx10) image / (0029,xx20) series info).

Only the fields rtsc uses are interpreted; everything parses into
``{name: list of values}`` with numbers converted by the element's VR.
Both the "SV10" (CSA2) layout and the older CSA1 layout are read.
"""

from __future__ import annotations

import struct
from typing import Any, Collection

from pydicom.dataset import Dataset

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
        Decode only these fields (the others are walked over, not converted: a mosaic's
        header has ~100 fields and rtsc reads three); None decodes all.

    Returns
    -------
    dict name -> list of values (int, float or str), empty items dropped.

    Raises
    ------
    DicomError
        If the blob is truncated or its counts are absurd.
    """
    try:
        return _read(blob, names)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DicomError(f"malformed Siemens CSA header: {exc}") from exc


def _read(blob: bytes, names: Collection[str] | None) -> dict[str, list[Any]]:
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
        wanted = names is None or name in names
        values: list[Any] = []
        for _item in range(n_items):
            x0, x1, _x2, _x3 = struct.unpack_from("<4i", blob, pos)
            pos += 16
            item_len = x1 if csa2 else x0
            if item_len < 0 or pos + item_len > len(blob):
                raise DicomError("malformed Siemens CSA header: item runs past the end")
            if not wanted:
                pos += item_len + (-item_len % 4)
                continue
            text = blob[pos:pos + item_len].split(b"\0", 1)[0].decode("latin-1").strip()
            pos += item_len + (-item_len % 4)
            if text:
                try:
                    values.append(convert(float(text)) if convert is int else convert(text))
                except ValueError:
                    values.append(text)
        if wanted:
            out[name] = values
    return out


def csa_image_header(ds: Dataset, names: Collection[str] | None = None
                     ) -> dict[str, list[Any]] | None:
    """The CSA image header of ``ds`` (private creator "SIEMENS CSA HEADER"), or None.

    ``names``: decode only these fields (see :func:`read_csa`)."""
    return _private_csa(ds, 0x10, names)


def _private_csa(ds: Dataset, element_offset: int,
                 names: Collection[str] | None) -> dict[str, list[Any]] | None:
    # int() first: comparing pydicom's Tag objects goes through Python-level methods,
    # and a mosaic has ~100 tags (0.1 ms per dataset).
    present = [tag for tag in ds.keys() if 0x00290010 <= int(tag) <= 0x002900FF]
    for creator_tag in present:
        if str(ds[creator_tag].value).strip() == "SIEMENS CSA HEADER":
            block = (creator_tag & 0xFF) << 8
            element = ds.get(0x00290000 | block | element_offset)
            if element is None or not element.value:
                return None
            return read_csa(bytes(element.value), names)
    return None
