"""The receiver's Part 10 header is pynetdicom's, byte for byte, and the worker reads it."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from rtsc.dicom.incoming import Incoming
from rtsc.errors import DicomError
from rtsc.intake.part10 import PREAMBLE, encode_header
from rtsc.output.durable import DurableWrite


@pytest.mark.parametrize("instance", ["1.2.3", "1.2.3.4", "1.2.826.0.1.3680043.8.498." + "9" * 36])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_is_what_pynetdicom_writes(instance, syntax):
    """Odd and even UID lengths (padding), both syntaxes."""
    expected = PREAMBLE + encode_file_meta(create_file_meta(
        sop_class_uid=MRImageStorage, sop_instance_uid=instance, transfer_syntax=syntax))
    assert encode_header(MRImageStorage, instance, syntax) == expected


def _slice(rng) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.Rows, ds.Columns, ds.BitsAllocated = 4, 3, 16
    ds.PixelData = rng.integers(0, 100, (4, 3), dtype=np.uint16).tobytes()
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_archive_of_header_and_raw_bytes_reads_back(tmp_path, rng, syntax):
    """What the receiver archives (its header, then the dataset as received) is a Part
    10 file; the worker decodes the same two parts without a FileMetaDataset."""
    ds = _slice(rng)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    header = encode_header(ds.SOPClassUID, ds.SOPInstanceUID, syntax)
    path = DurableWrite(tmp_path / "000001.dcm", (header, raw)).commit()
    assert path.read_bytes() == header + raw
    archived = pydicom.dcmread(path)
    assert archived.file_meta.TransferSyntaxUID == syntax
    assert archived.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    loaded = Incoming(None, path, 0.0, "cstore", raw=raw, header=header).load()
    assert loaded is not None
    assert loaded.file_meta.TransferSyntaxUID == syntax
    assert loaded.SeriesInstanceUID == ds.SeriesInstanceUID
    assert loaded.PixelData == ds.PixelData


def test_missing_header_is_a_decoding_error():
    with pytest.raises(DicomError):
        Incoming(None, None, 0.0, "cstore", raw=b"\x08\x00", header=b"x" * 140).load()
