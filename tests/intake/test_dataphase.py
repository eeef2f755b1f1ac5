"""The receiver's own C-STORE data phase (rtsc.intake.dataphase) against pynetdicom.

The references: pynetdicom's encoder and decoder of DIMSE messages and PDUs, and the
receiver's pynetdicom path (``LEAN_DATA_PHASE = False``), on hand-made PDU streams
(fragments split at every boundary, several PDVs per PDU, peers' maximum PDU sizes),
simulator datasets and real scanner files.
"""

from __future__ import annotations

import io
import queue
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation

import rtsc.intake.receiver as receiver_module
from rtsc.config import config_from_dict
from rtsc.intake.dataphase import (
    encode_p_data,
    encode_store_response,
    parse_command,
)
from rtsc.intake.part10 import encode_header
from rtsc.intake.receiver import Receiver
from rtsc.output.session import SessionStore

REALDATA = Path(__file__).resolve().parents[1] / "data" / "realdata"


# ---------------------------------------------------------------- encoders vs pynetdicom

def _pynetdicom_pdus(primitive, context_id: int, max_pdu: int) -> bytes:
    """What pynetdicom sends for a DIMSE primitive: its P-DATA-TF PDUs, encoded."""
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
        message = C_STORE_RSP()
    else:
        message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    out = b""
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xC211, 0xB000])
@pytest.mark.parametrize("max_pdu", [0, 16384, 64, 20])
def test_store_response_is_what_pynetdicom_sends(status, max_pdu):
    sop_instance = generate_uid()  # 0-padded to even length when odd
    rsp = C_STORE()
    rsp.MessageID = 7
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = MRImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    expected = _pynetdicom_pdus(rsp, 5, max_pdu)
    ours = encode_p_data(5, encode_store_response(7, MRImageStorage, sop_instance, status),
                         max_pdu)
    assert ours == expected


def _store_request_command(message_id: int, sop_class: str, sop_instance: str,
                           priority: int = 2) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = priority
    req.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    command = b""
    for p_data in message.encode_msg(1, 0):
        for _cx, data in p_data.presentation_data_value_list:
            if data[0] & 1:
                command += data[1:]
    return command


def test_parse_command_reads_pynetdicom_encoding():
    uid = generate_uid()
    fields = parse_command(_store_request_command(513, MRImageStorage, uid))
    assert struct.unpack("<H", fields[0x00000100])[0] == 0x0001
    assert struct.unpack("<H", fields[0x00000110])[0] == 513
    assert fields[0x00000002].rstrip(b"\0").decode() == MRImageStorage
    assert fields[0x00001000].rstrip(b"\0").decode() == uid
    assert struct.unpack("<H", fields[0x00000800])[0] != 0x0101


# ---------------------------------------------------------------- a raw peer

class RawPeer:
    """A hand-driven SCU: A-ASSOCIATE-RQ encoded by pynetdicom, everything after it
    written byte for byte as the test says."""

    def __init__(self, port: int, syntaxes=(ExplicitVRLittleEndian,), max_pdu: int = 16384,
                 sop_class: str = MRImageStorage) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title = "RAWPEER"
        primitive.called_ae_title = "RTSC"
        primitive.calling_presentation_address = AddressInformation("127.0.0.1", 104)
        primitive.called_presentation_address = AddressInformation("127.0.0.1", port)
        contexts = []
        for i, syntax in enumerate(syntaxes):
            cx = build_context(sop_class, [syntax])
            cx.context_id = 1 + 2 * i
            contexts.append(cx)
        echo = build_context(Verification, [ImplicitVRLittleEndian])
        echo.context_id = 1 + 2 * len(syntaxes)
        contexts.append(echo)
        primitive.presentation_context_definition_list = contexts
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
        primitive.user_information = [length, implementation]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        self.sock.sendall(rq.encode())
        kind, body = self.read_pdu()
        assert kind == 0x02, f"association not accepted (PDU type {kind:#x})"
        ac = A_ASSOCIATE_AC()
        ac.decode(bytes([kind, 0]) + struct.pack(">I", len(body)) + body)
        accepted = {cx.context_id: cx for cx in
                    ac.to_primitive().presentation_context_definition_results_list
                    if cx.result == 0}
        self.contexts = {str(syntax): 1 + 2 * i for i, syntax in enumerate(syntaxes)
                         if 1 + 2 * i in accepted}
        self.echo_context = echo.context_id

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def read_pdu(self) -> tuple[int, bytes]:
        kind, length = struct.unpack(">BxI", self.read_exact(6))
        return kind, self.read_exact(length)

    def send(self, stream: bytes, pieces: int = 1) -> None:
        """Write ``stream`` in ``pieces`` TCP sends (a PDU split across reads)."""
        if pieces == 1:
            self.sock.sendall(stream)
            return
        cuts = np.linspace(0, len(stream), pieces + 1).astype(int)
        for a, b in zip(cuts[:-1], cuts[1:]):
            self.sock.sendall(stream[a:b])
            time.sleep(0.001)

    def read_response(self):
        """The next DIMSE response, decoded by pynetdicom (and how many PDUs it took)."""
        message = DIMSEMessage()
        n = 0
        while True:
            kind, body = self.read_pdu()
            assert kind == 0x04, f"PDU type {kind:#x} instead of P-DATA-TF"
            n += 1
            pdu = P_DATA_TF()
            pdu.decode(bytes([kind, 0]) + struct.pack(">I", len(body)) + body)
            if message.decode_msg(pdu.to_primitive()):
                return message.message_to_primitive(), n

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        kind, _ = self.read_pdu()
        assert kind == 0x06  # A-RELEASE-RP
        self.sock.close()


def pdv(context_id: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, mch) + data


def pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BxI", 0x04, len(body)) + body


def _dataset(n_pixels: int = 64, syntax=ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = 1, n_pixels
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(n_pixels, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _encoded(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    syntax = pydicom.uid.UID(syntax)
    return encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)


def _started(tmp_path, monkeypatch, lean: bool):
    monkeypatch.setattr(receiver_module, "LEAN_DATA_PHASE", lean)
    config = config_from_dict({"receiver": {"port": 0, "host": "127.0.0.1",
                                            "archive_wait_ms": 0.0}})
    out: queue.Queue = queue.Queue()
    rec = Receiver(config.receiver, SessionStore(tmp_path / "sessions"), out)
    rec.start()
    return rec, out


@pytest.fixture(params=[True, False], ids=["dataphase", "pynetdicom"])
def receiver(request, tmp_path, monkeypatch):
    """A receiver on either data path: the raw-peer tests hold for both (pynetdicom's
    is the reference)."""
    rec, out = _started(tmp_path, monkeypatch, request.param)
    yield rec, out
    rec.close()


@pytest.fixture
def lean_receiver(tmp_path, monkeypatch):
    rec, out = _started(tmp_path, monkeypatch, True)
    yield rec, out
    rec.close()


def _archived(out: queue.Queue) -> bytes:
    item = out.get(timeout=10)
    assert item.error is None
    return item.path.read_bytes()


def _status(response) -> int:
    assert response.MessageIDBeingRespondedTo is not None
    return int(response.Status)


def test_fragments_split_at_every_boundary(receiver):
    """The command and the dataset each split into two PDVs at every byte, in
    separate PDUs and in one; each PDU also arrives in three TCP pieces."""
    rec, out = receiver
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    ds = _dataset(8)
    data = _encoded(ds)
    header = encode_header(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    command = _store_request_command(1, MRImageStorage, ds.SOPInstanceUID)
    cases = [(c, len(data)) for c in range(1, len(command))] \
        + [(len(command), d) for d in range(1, len(data))]
    for message_id, (c, d) in enumerate(cases, start=1):
        command = _store_request_command(message_id, MRImageStorage, ds.SOPInstanceUID)
        items = [pdv(cx, 0x01, command[:c]), pdv(cx, 0x03, command[c:]) if c < len(command)
                 else None, pdv(cx, 0x00, data[:d]) if d < len(data) else None,
                 pdv(cx, 0x02, data[d:])]
        if c == len(command):
            items[0] = pdv(cx, 0x03, command)
        if d == len(data):
            items[3] = pdv(cx, 0x02, data)
        items = [i for i in items if i is not None]
        if message_id % 2:
            stream = b"".join(pdu(i) for i in items)  # one PDV per PDU
        else:
            stream = pdu(*items)  # every PDV in one PDU
        peer.send(stream, pieces=3)
        response, _ = peer.read_response()
        assert _status(response) == 0
        assert response.MessageIDBeingRespondedTo == message_id
        assert response.AffectedSOPInstanceUID == ds.SOPInstanceUID
        assert _archived(out) == header + data
    peer.release()


@pytest.mark.parametrize("max_pdu", [0, 16384, 40])
def test_answer_fits_the_peers_maximum_pdu(receiver, max_pdu):
    rec, out = receiver
    peer = RawPeer(rec.port, max_pdu=max_pdu)
    cx = peer.contexts[ExplicitVRLittleEndian]
    ds = _dataset(32)
    command = _store_request_command(3, MRImageStorage, ds.SOPInstanceUID)
    peer.send(pdu(pdv(cx, 0x03, command), pdv(cx, 0x02, _encoded(ds))))
    response, n_pdus = peer.read_response()
    assert _status(response) == 0
    if max_pdu:
        assert n_pdus == -(-len(encode_store_response(3, MRImageStorage, ds.SOPInstanceUID,
                                                      0)) // (max_pdu - 6))
    else:
        assert n_pdus == 1
    _archived(out)
    peer.release()


def test_echo_between_stores_goes_to_pynetdicom(receiver):
    """C-ECHO (not ours) is served by pynetdicom on the same association, in order."""
    rec, out = receiver
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    echo_pdus = b""
    for p_data in message.encode_msg(peer.echo_context, 16384):
        one = P_DATA_TF()
        one.from_primitive(p_data)
        echo_pdus += one.encode()
    for i in range(3):
        peer.send(echo_pdus)
        response, _ = peer.read_response()
        assert isinstance(response, C_ECHO) and response.Status == 0
        ds = _dataset(16)
        command = _store_request_command(10 + i, MRImageStorage, ds.SOPInstanceUID)
        peer.send(pdu(pdv(cx, 0x03, command), pdv(cx, 0x02, _encoded(ds))))
        response, _ = peer.read_response()
        assert _status(response) == 0 and response.MessageIDBeingRespondedTo == 10 + i
        _archived(out)
    peer.release()


def test_malformed_pdv_aborts_the_association(receiver):
    rec, out = receiver
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    bad = struct.pack(">BxI", 0x04, 10) + struct.pack(">IBB", 200, cx, 0x03) + b"\0" * 4
    peer.send(bad)
    kind, _ = peer.read_pdu()
    assert kind == 0x07  # A-ABORT
    assert out.empty()
    assert RawPeer(rec.port).contexts  # the receiver still accepts associations


def test_peer_abort_mid_dataset_archives_nothing(receiver):
    rec, out = receiver
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    ds = _dataset(64)
    data = _encoded(ds)
    command = _store_request_command(1, MRImageStorage, ds.SOPInstanceUID)
    peer.send(pdu(pdv(cx, 0x03, command), pdv(cx, 0x00, data[:50])))
    peer.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    time.sleep(0.3)
    assert out.empty()
    assert not list((Path(rec.store.root)).rglob("*.dcm"))
    peer.sock.close()
    # the receiver is still serving
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    peer.send(pdu(pdv(cx, 0x03, command), pdv(cx, 0x02, data)))
    assert _status(peer.read_response()[0]) == 0
    peer.release()


def test_oversized_dataset_is_refused_without_being_kept(tmp_path):
    config = config_from_dict({"receiver": {"port": 0, "host": "127.0.0.1",
                                            "max_dataset_mb": 0.001}})
    out: queue.Queue = queue.Queue()
    rec = Receiver(config.receiver, SessionStore(tmp_path / "s"), out)
    rec.start()
    try:
        peer = RawPeer(rec.port)
        cx = peer.contexts[ExplicitVRLittleEndian]
        ds = _dataset(2000)  # 4 kB of pixels > 1 kB
        data = _encoded(ds)
        command = _store_request_command(1, MRImageStorage, ds.SOPInstanceUID)
        peer.send(pdu(pdv(cx, 0x03, command)) + b"".join(
            pdu(pdv(cx, 0x02 if i + 500 >= len(data) else 0x00, data[i:i + 500]))
            for i in range(0, len(data), 500)))
        assert _status(peer.read_response()[0]) == 0xA700
        assert rec.n_refused == 1 and out.empty()
        peer.release()
    finally:
        rec.close()


# ------------------------------------------------- the same files, lean and pynetdicom

def _send_with_pynetdicom(port: int, paths: list[Path] | list[Dataset],
                          syntax: str | None = None) -> list[int]:
    """C-STORE each file (or dataset) over one association; a given ``syntax`` is the
    only one proposed (the datasets are then sent in it)."""
    ae = AE(ae_title="SCU")
    syntaxes = [syntax] if syntax else [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                         ExplicitVRBigEndian]
    datasets = [p if isinstance(p, Dataset) else pydicom.dcmread(p) for p in paths]
    for ds in datasets:
        if ds.SOPClassUID not in [cx.abstract_syntax for cx in ae.requested_contexts]:
            ae.add_requested_context(ds.SOPClassUID, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSC", max_pdu=16384)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _archives(tmp: Path, paths: list[Path] | list[Dataset], lean: bool, monkeypatch,
              syntax: str | None = None) -> list[bytes]:
    monkeypatch.setattr(receiver_module, "LEAN_DATA_PHASE", lean)
    calls = []
    original = Receiver._on_store_lean

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(Receiver, "_on_store_lean", counted)
    config = config_from_dict({"receiver": {"port": 0, "host": "127.0.0.1",
                                            "archive_wait_ms": 0.0}})
    out: queue.Queue = queue.Queue()
    rec = Receiver(config.receiver, SessionStore(tmp), out)
    rec.start()
    try:
        assert _send_with_pynetdicom(rec.port, paths, syntax) == [0] * len(paths)
        items = [out.get(timeout=10) for _ in paths]
        assert all(item.error is None for item in items)
        assert len(calls) == (len(paths) if lean else 0)  # the path under test was taken
        return [item.path.read_bytes() for item in items]
    finally:
        rec.close()
        monkeypatch.setattr(Receiver, "_on_store_lean", original)


def _real_files() -> list[Path]:
    found = sorted(REALDATA.rglob("*.dcm"))
    if not found:
        pytest.skip("no real scanner files in tests/data/realdata")
    by_folder: dict[Path, Path] = {}
    for path in found:
        by_folder.setdefault(path.parent, path)
    return list(by_folder.values())[:8]


def _simulated_files(tmp: Path, fmt: str) -> list[Path]:
    from rtsc.config import config_from_dict as cfd, merge, to_dict
    from simulator.scanner import run_simulation

    cfg = cfd(merge(to_dict(cfd({})), {"simulator": {
        "format": fmt, "shape": [16, 16, 4], "n_volumes": 1, "speed": 0.0}})).simulator
    return [Path(f) for f in run_simulation(cfg, out_dir=tmp).files]


@pytest.mark.parametrize("source", ["real", "slices", "mosaic", "multiframe"])
def test_archives_equal_pynetdicom_path(tmp_path, monkeypatch, source):
    """The same files through both data paths: byte-identical archives, which pydicom
    reads back as the files sent (pixel data and every element but group lengths)."""
    paths = _real_files() if source == "real" else \
        _simulated_files(tmp_path / "sim", source)
    lean = _archives(tmp_path / "lean", paths, True, monkeypatch)
    reference = _archives(tmp_path / "pynetdicom", paths, False, monkeypatch)
    assert lean == reference
    for path, archived in zip(paths, lean):
        sent, got = pydicom.dcmread(path), pydicom.dcmread(io.BytesIO(archived))
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        for element in sent:
            if element.tag.element == 0:  # group lengths: pydicom drops them on sending
                continue
            assert got[element.tag].value == element.value, element.tag


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
                                    ImplicitVRLittleEndian])
def test_other_transfer_syntaxes_equal_pynetdicom_path(tmp_path, monkeypatch, syntax):
    datasets = [_dataset(300, syntax) for _ in range(3)]
    lean = _archives(tmp_path / "lean", datasets, True, monkeypatch, syntax)
    reference = _archives(tmp_path / "pynetdicom", datasets, False, monkeypatch, syntax)
    assert lean == reference
    for ds, archived in zip(datasets, lean):
        got = pydicom.dcmread(io.BytesIO(archived))
        assert got.file_meta.TransferSyntaxUID == syntax
        assert got.PixelData == ds.PixelData and got.SOPInstanceUID == ds.SOPInstanceUID


def test_pdu_longer_than_announced_aborts(lean_receiver):
    """A PDU past the maximum length the receiver announced is a protocol error (and
    never allocated; pynetdicom reads whatever length comes)."""
    rec, out = lean_receiver
    peer = RawPeer(rec.port)
    peer.send(struct.pack(">BxI", 0x04, receiver_module.MAX_PDU_BYTES + 1) + b"\0" * 64)
    kind, _ = peer.read_pdu()
    assert kind == 0x07  # A-ABORT
    assert out.empty()


def test_empty_p_data_tf_is_ignored_as_pynetdicom_does(receiver):
    rec, out = receiver
    peer = RawPeer(rec.port)
    cx = peer.contexts[ExplicitVRLittleEndian]
    ds = _dataset(16)
    command = _store_request_command(1, MRImageStorage, ds.SOPInstanceUID)
    peer.send(pdu() + pdu(pdv(cx, 0x03, command)) + pdu() + pdu(pdv(cx, 0x02, _encoded(ds))))
    assert _status(peer.read_response()[0]) == 0
    _archived(out)
    peer.release()
