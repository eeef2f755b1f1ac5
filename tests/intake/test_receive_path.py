"""The receiver's fast path: large PDUs read in few calls, the archive written from the
bytes as received with the receiver's own Part 10 header."""

from __future__ import annotations

import queue
import socket
import threading
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from rtsc.config import config_from_dict
from rtsc.intake.connections import ReceiverSocket
from rtsc.intake.receiver import MAX_PDU_BYTES, Receiver
from rtsc.output.session import SessionStore


class _CountingSocket(socket.socket):
    """A socket counting its recv calls."""

    calls = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.calls += 1
        return super().recv(bufsize, flags)


def _wrapped(raw: socket.socket) -> tuple[ReceiverSocket, _CountingSocket]:
    counted = _CountingSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    wrapper = ReceiverSocket.__new__(ReceiverSocket)  # no association: recv only
    wrapper.socket = counted
    return wrapper, counted


def test_a_pdu_is_read_in_as_few_calls_as_the_kernel_allows():
    """pynetdicom reads 4096 bytes per call; the whole rest is asked for at once."""
    ours, theirs = socket.socketpair()
    wrapper, counted = _wrapped(ours)
    payload = bytes(range(256)) * 1024  # 256 kB
    sender = threading.Thread(target=theirs.sendall, args=(payload,))
    sender.start()
    assert wrapper.recv(len(payload)) == payload
    sender.join()
    assert counted.calls < len(payload) // 4096 // 4
    theirs.sendall(b"abc")
    theirs.close()  # the peer closes mid-PDU: what came, as pynetdicom's own recv
    assert wrapper.recv(10) == b"abc"
    counted.close()


def _mr_dataset(n_pixels: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = n_pixels // 500, 500
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(n_pixels, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_large_dataset_in_large_pdus_is_archived_byte_for_byte(tmp_path: Path):
    """A 400 kB dataset goes in PDUs of up to MAX_PDU_BYTES; the archive is the
    receiver's header and the dataset as sent, and the worker reads the same."""
    config = config_from_dict({"receiver": {"port": 0, "host": "127.0.0.1",
                                            "archive_wait_ms": 0.0}})
    out: queue.Queue = queue.Queue()
    receiver = Receiver(config.receiver, SessionStore(tmp_path / "sessions"), out)
    receiver.start()
    try:
        ds = _mr_dataset(200_000)  # 400 kB of pixels
        ae = AE(ae_title="SCU")
        ae.maximum_pdu_size = 0  # unlimited on our side: the receiver's maximum counts
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="RTSC")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == MAX_PDU_BYTES
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    finally:
        receiver.close()
    item = out.get_nowait()
    archived = pydicom.dcmread(item.path)
    assert archived.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert archived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert archived.PixelData == ds.PixelData
    assert item.path.read_bytes().endswith(item.raw)
    loaded = item.load()
    assert loaded.SOPInstanceUID == ds.SOPInstanceUID and loaded.PixelData == ds.PixelData
