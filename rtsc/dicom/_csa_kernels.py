"""Numba kernel walking a Siemens CSA header: where each field and each item lies.

A mosaic's CSA image header holds ~100 fields of at least 6 items each; walking them
in Python costs about 1 us per item (0.1-0.6 ms per dataset), in compiled code a few
microseconds. Decoding stays in Python (:mod:`rtsc.dicom.csa`), for the fields wanted.
"""

from __future__ import annotations

import numba
import numpy as np

#: Status codes of :func:`csa_layout`.
OK, TRUNCATED, BAD_TAG_COUNT, BAD_ITEM_COUNT, ITEM_PAST_END = 0, 1, 2, 3, 4

_TAG_BYTES = 84  # name[64], vm, vr[4], syngodt, n_items, xx (int32 each)
_ITEM_BYTES = 16  # 4 int32, the length is the first (CSA1) or second (CSA2)


@numba.njit(cache=True, nogil=True, inline="always")
def _int32(blob: np.ndarray, pos: int) -> int:
    value = (np.int64(blob[pos]) | (np.int64(blob[pos + 1]) << 8)
             | (np.int64(blob[pos + 2]) << 16) | (np.int64(blob[pos + 3]) << 24))
    return value - (np.int64(1) << 32) if value >= (np.int64(1) << 31) else value


@numba.njit(cache=True, nogil=True)
def _csa_layout(blob: np.ndarray, csa2: bool, max_tags: int, max_items: int,
                tag_pos: np.ndarray, first_item: np.ndarray, item_pos: np.ndarray,
                item_len: np.ndarray) -> tuple[int, int, int]:
    """Fill the offsets; returns (status, n_tags, n_items in all)."""
    size = blob.size
    pos = 8 if csa2 else 0
    if pos + 8 > size:
        return TRUNCATED, 0, 0
    n_tags = _int32(blob, pos) & 0xFFFFFFFF
    pos += 8
    if not (0 < n_tags <= max_tags):
        return BAD_TAG_COUNT, n_tags, 0
    total = 0
    for t in range(n_tags):
        if pos + _TAG_BYTES > size:
            return TRUNCATED, t, total
        n_items = _int32(blob, pos + 76)
        tag_pos[t] = pos
        first_item[t] = total
        pos += _TAG_BYTES
        if not (0 <= n_items <= max_items):
            return BAD_ITEM_COUNT, t, total
        for _ in range(n_items):
            if pos + _ITEM_BYTES > size:
                return TRUNCATED, t, total
            length = _int32(blob, pos + 4) if csa2 else _int32(blob, pos)
            pos += _ITEM_BYTES
            if length < 0 or pos + length > size:
                return ITEM_PAST_END, t, total
            if total >= item_pos.size:
                return BAD_ITEM_COUNT, t, total
            item_pos[total] = pos
            item_len[total] = length
            total += 1
            pos += length + (-length % 4)
    first_item[n_tags] = total
    return OK, n_tags, total


def csa_layout(blob: bytes, max_tags: int, max_items: int
               ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the fields and items of a CSA header lie.

    Returns
    -------
    status : int, :data:`OK` or the first problem met (:data:`TRUNCATED`, ...)
    tag_pos : (n_tags,) int64, byte offset of each field's 84-byte header
    first_item : (n_tags + 1,) int64, field t's items are ``first_item[t]:first_item[t+1]``
    item_pos, item_len : (n_items,) int64, byte offset and length of each item's value
    """
    data = np.frombuffer(blob, dtype=np.uint8)
    # every item takes at least 16 bytes, every field 84: the buffers can't overflow
    capacity = max(1, data.size // 16)
    tag_pos = np.empty(min(max_tags, max(1, data.size // 84)) + 1, dtype=np.int64)
    first_item = np.empty(tag_pos.size + 1, dtype=np.int64)
    item_pos = np.empty(capacity, dtype=np.int64)
    item_len = np.empty(capacity, dtype=np.int64)
    status, n_tags, n_items = _csa_layout(data, blob[:4] == b"SV10", max_tags, max_items,
                                          tag_pos, first_item, item_pos, item_len)
    if status != OK:
        return status, tag_pos[:0], first_item[:0], item_pos[:0], item_len[:0]
    return (OK, tag_pos[:n_tags], first_item[:n_tags + 1], item_pos[:n_items],
            item_len[:n_items])


def warm_up() -> None:
    """Compile (or load from numba's cache) before the first dataset."""
    csa_layout(b"SV10\4\3\2\1" + bytes(8), 1, 1)
