"""A fast reader of the common case: little-endian datasets whose elements all have a
defined length, read into the same raw elements pydicom's reader makes.

pydicom's :func:`~pydicom.filereader.read_dataset` reads each element through a file
object (two ``read`` calls, a ``tell``, a generator step): ~0.5 ms of the worker's CPU
for a 128 x 128 slice's ~110 elements, and ``dcmread`` of the 200-byte Part 10 header
another ~0.4 ms. Here the same elements are cut from the bytes with ``struct`` offsets
into the same :class:`~pydicom.dataelem.RawDataElement` tuples (tag, VR, length, value
bytes, value position, encoding flags), put in a :class:`~pydicom.dataset.Dataset` as
pydicom does: values are still converted lazily by pydicom, so every value the
assembler reads is the one pydicom's own reader gives.

A sequence of undefined length is read where it is found by pydicom's own
``read_sequence``, as pydicom's reader does; except an enhanced multi-frame image's
PerFrameFunctionalGroupsSequence, kept raw for :mod:`rtsc.dicom.frame_groups` (see
:func:`_per_frame_raw`). Anything else returns None and the caller
reads with pydicom (its results and its errors unchanged): big endian; another element
of undefined length (encapsulated pixel data, UN); an unknown or non-ASCII VR (pydicom's implicit
VR switch heuristics); an item delimiter at top level; a truncated element or trailing
bytes too short for an element header; a dataset whose first element's encoding
contradicts the transfer syntax.
"""

from __future__ import annotations

import math
import warnings
from io import BytesIO
from struct import Struct

from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.filereader import read_sequence
from pydicom.valuerep import VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

# The VRs pydicom's reader knows, as the bytes found in an explicit VR element; the
# ones followed by 2 reserved bytes and a 4-byte length.
_KNOWN_VR = {vr.encode(): str(vr) for vr in
             ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT",
              "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST",
              "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV")}
_LONG_VR = {vr for vr in _KNOWN_VR.values() if vr in EXPLICIT_VR_LENGTH_32}
_EMPTY = {vr: empty_value_for_VR(vr, raw=True) for vr in _KNOWN_VR.values()}

_EXPLICIT = Struct("<HH2sH")
_IMPLICIT = Struct("<HHL")
_LENGTH32 = Struct("<L")
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
_PER_FRAME = 0x52009230  # PerFrameFunctionalGroupsSequence
# BaseTag objects by tag, shared between datasets (they are immutable ints): a BaseTag
# per element was a fifth of this reader's time. Bounded: a stream of made-up private
# tags cannot grow it past _MAX_TAGS.
_TAGS: dict[int, BaseTag] = {}
_MAX_TAGS = 8192
_ITEM_TAG_BYTES = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian


def raw_elements(buf: bytes | bytearray, implicit_vr: bool, start: int = 0,
                 stop: int | None = None,
                 group: int | None = None) -> tuple[dict[BaseTag, RawDataElement], int] | None:
    """The raw elements of a little-endian dataset, as pydicom's reader makes them.

    Parameters
    ----------
    buf : bytes or bytearray
        The encoded dataset (values are sliced out of it as ``bytes`` copies, as
        pydicom's ``read`` gives them). Each element's ``value_tell`` is its value's
        offset in ``buf``: the position pydicom's reader gives when it reads ``buf`` (a
        received dataset) or the file ``buf`` holds (an archived one).
    implicit_vr : bool
        The transfer syntax's VR encoding.
    start, stop : int
        Byte offsets of the dataset in ``buf`` (``stop``: its end by default).
    group : int or None
        Read only while the elements belong to this group (the file meta, group 2),
        stopping before the first that does not.

    Returns
    -------
    (dict, int) or None
        The elements by tag and the offset where reading stopped; None for anything
        this reader leaves to pydicom (see the module docstring).
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)  # values are bytes, as pydicom's reads give (an inflated bytearray)
    end = len(buf) if stop is None else stop
    if not _encoding_matches(buf, start, end, implicit_vr):
        return None
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | list[str] = default_encoding
    pos = start
    unpack_explicit, unpack_implicit, unpack32 = (_EXPLICIT.unpack_from,
                                                  _IMPLICIT.unpack_from,
                                                  _LENGTH32.unpack_from)
    tags_get, new = _TAGS.get, tuple.__new__
    while pos < end:
        if end - pos < 8:
            return None  # pydicom stops silently on a short tail: left to it
        if implicit_vr:
            grp, elem, length = unpack_implicit(buf, pos)
            vr = None
            header = 8
        else:
            grp, elem, vr_bytes, length = unpack_explicit(buf, pos)
            vr = _KNOWN_VR.get(vr_bytes)
            if vr is None:
                return None
            header = 8
            if vr in _LONG_VR:
                if end - pos < 12:
                    return None
                length = unpack32(buf, pos + 8)[0]
                header = 12
        if group is not None and grp != group:
            break
        if grp == 0xFFFE:
            return None  # items or delimiters at top level: pydicom's
        value_at = pos + header
        key = grp << 16 | elem
        tag = tags_get(key)
        if tag is None:
            tag = BaseTag(key)
            if len(_TAGS) < _MAX_TAGS:
                _TAGS[key] = tag
        if length == _UNDEFINED:
            # A sequence of undefined length: pydicom's reader parses it where it finds
            # it, into the same DataElement; other undefined lengths are pydicom's.
            got = _undefined_sequence(buf, tag, vr, value_at, implicit_vr, encoding)
            if got is None:
                return None
            elements[tag], pos = got
            continue
        pos = value_at + length
        if pos > end:
            return None  # truncated: pydicom's reader decides what that gives
        value = buf[value_at:pos] if length else (_EMPTY[vr] if vr is not None
                                                  else empty_value_for_VR(None, raw=True))
        if tag == _CHARSET:  # the encoding of what follows, as pydicom's reader tracks it
            encoding = convert_encodings(convert_string(value or b"", True))
        # RawDataElement(tag, vr, length, value, value_at, implicit_vr, True) without
        # the namedtuple's Python-level __new__ (is_raw True, is_buffered False).
        elements[tag] = new(RawDataElement, (tag, vr, length, value, value_at, implicit_vr,
                                             True, True, False))
    return elements, pos


def _undefined_sequence(buf: bytes | bytearray, tag: BaseTag, vr: str | None,
                        value_at: int, implicit_vr: bool,
                        encoding: str | list[str]) -> tuple[DataElement, int] | None:
    """The sequence of undefined length whose value starts at ``value_at``, read by
    pydicom's ``read_sequence`` as its reader does (the same DataElement, the same item
    positions), and the offset after its delimiter; None if it is not a sequence by
    pydicom's rules (explicit VR SQ; implicit VR: SQ in the dictionary, or a private
    element whose value starts with an item) or does not read."""
    if implicit_vr:
        try:
            vr = _dictionary_vr_fast(int(tag))
        except KeyError:
            vr = VR.SQ if buf[value_at:value_at + 4] == _ITEM_TAG_BYTES else None
    if vr != VR.SQ:
        return None  # UN (pydicom may infer SQ and switch encodings) and values: pydicom's
    if tag == _PER_FRAME:
        kept = _per_frame_raw(buf, tag, value_at, implicit_vr)
        if kept is not None:
            return kept
    fp = BytesIO(buf)  # shares the bytes (no copy)
    fp.seek(value_at)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # whatever pydicom warns about: pydicom's
            seq = read_sequence(fp, implicit_vr, True, _UNDEFINED, encoding)
    except Exception:  # noqa: BLE001 - then the whole dataset is pydicom's to read
        return None
    return DataElement(tag, VR.SQ, seq, value_at, is_undefined_length=True), fp.tell()


def _encoding_matches(buf: bytes | bytearray, start: int, end: int,
                      implicit_vr: bool) -> bool:
    """Whether the first element reads with the VR encoding assumed, by pydicom's own
    test (``filereader._is_implicit_vr``): two upper-case letters where an explicit VR
    is. A dataset that contradicts its transfer syntax is left to pydicom (it warns and
    switches)."""
    if end - start < 6:
        return True
    found_implicit = not (0x40 < buf[start + 4] < 0x5B and 0x40 < buf[start + 5] < 0x5B)
    return found_implicit == implicit_vr


def dataset_from(elements: dict[BaseTag, RawDataElement], implicit_vr: bool) -> Dataset:
    """A Dataset of ``elements`` with the original encoding pydicom's ``read_dataset``
    sets (the character set of (0008,0005) when present)."""
    ds = Dataset(elements, parent_encoding=default_encoding)
    encoding: str | list[str] = default_encoding
    if _CHARSET in elements:
        raw = elements[BaseTag(_CHARSET)]
        encoding = convert_encodings(convert_string(raw.value or b"", True))
    ds.set_original_encoding(implicit_vr, True, encoding)
    return ds


def read_file_meta(header: bytes | bytearray) -> tuple[FileMetaDataset, int] | None:
    """The file meta group of a Part 10 header (preamble and ``DICM`` included) as
    ``dcmread`` reads it, and the offset after it; None to leave it to pydicom."""
    if len(header) < 132 or header[128:132] != b"DICM":
        return None
    got = raw_elements(header, False, start=132, group=2)
    if got is None or not got[0]:
        return None
    elements, end = got
    meta = FileMetaDataset(Dataset(elements, parent_encoding=default_encoding))
    meta.set_original_encoding(False, True, default_encoding)
    return meta, end


# The transfer syntaxes read here: implicit and explicit VR little endian (the
# deflated one once inflated). Others (big endian, encapsulated) go to pydicom.
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def read_dataset_fast(raw: bytes | bytearray, syntax: str, start: int = 0) -> Dataset | None:
    """The dataset encoded in ``raw[start:]`` with transfer syntax ``syntax`` (deflated
    data already inflated), or None to leave it to pydicom."""
    if syntax == IMPLICIT_LE:
        implicit = True
    elif syntax in (EXPLICIT_LE, DEFLATED_LE):
        implicit = False
    else:
        return None
    got = raw_elements(raw, implicit, start=start)
    if got is None:
        return None
    return dataset_from(got[0], implicit)


def raw_ds_numbers(ds: Dataset, tag: int, n: int) -> list[float] | None:
    """The ``n`` finite numbers of a DS element still as received, as pydicom converts
    them (``float`` of each backslash-separated value, trailing padding stripped), or
    None: absent, already converted, another VR, not ``n`` finite numbers. The caller
    then reads the element through pydicom (its values, its errors)."""
    element = ds.get_item(tag)
    if type(element) is not RawDataElement or element.VR not in ("DS", None) \
            or not element.value or not element.is_little_endian:
        return None
    if element.VR is None and _dictionary_vr_fast(tag) != "DS":
        return None
    parts = element.value.rstrip(b" \0").split(b"\\")
    if len(parts) != n:
        return None
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        return None
    if not all(math.isfinite(x) for x in numbers):
        return None
    return numbers


def raw_us(ds: Dataset, tag: int) -> int | None:
    """The single value of a US element still as received, as pydicom converts it, or
    None (absent, already converted, another VR, not one value): then the caller reads
    it through pydicom."""
    element = ds.get_item(tag)
    if type(element) is not RawDataElement or element.VR not in ("US", None) \
            or element.length != 2 or not element.is_little_endian:
        return None
    if element.VR is None and _dictionary_vr_fast(tag) != "US":
        return None
    return int.from_bytes(element.value, "little")


def _per_frame_raw(buf: bytes, tag: BaseTag, value_at: int,
                   implicit_vr: bool) -> tuple[RawDataElement, int] | None:
    """The PerFrameFunctionalGroupsSequence of undefined length kept raw (its items'
    bytes, the delimiter left out, length still undefined), and the offset after it;
    None when the functional groups walker cannot follow its items to the delimiter.

    Enhanced multi-frame files from Siemens XA write it so: pydicom's reader parses all
    its frames' items into Datasets where it meets it (~3 ms for 60 frames), where
    :func:`rtsc.dicom.frame_groups.per_frame_groups` reads the few elements wanted from
    the bytes. Converted by pydicom (``ds.PerFrameFunctionalGroupsSequence``), the raw
    value gives the same items: pydicom's ``convert_SQ`` reads the items of the bytes, and
    the element keeps ``is_undefined_length``.
    """
    from rtsc.dicom.frame_groups import sequence_end

    end = sequence_end(buf, value_at, implicit_vr)
    if end is None:
        return None
    value = buf[value_at:end - 8]
    return tuple.__new__(RawDataElement, (tag, None if implicit_vr else "SQ", _UNDEFINED,
                                          value, value_at, implicit_vr, True, True,
                                          False)), end
