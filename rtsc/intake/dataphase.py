"""The receiver's data phase without pynetdicom's per-PDU machinery: P-DATA-TF PDUs
read on the association's own thread, C-STORE requests assembled and answered there.

pynetdicom reads each PDU on its DUL thread, decodes it into objects (~70 us of Python
per PDU), queues it to the association thread, which polls its queue every 1 ms; the
answer goes back through a queue the DUL thread polls every 1 ms. On 2 cores that was
~1.5 ms of CPU and ~1.5 ms of polling per 128x128 slice. Here, once the association is
established, its thread reads the socket itself: a PDU header, the PDU into one buffer,
its PDV items walked with ``struct``, the command set's few elements read from their
bytes, the dataset's fragments joined, the receiver's handler called, and the
C-STORE-RSP packed and sent, with no thread hop.

pynetdicom keeps everything else. Association negotiation happens before; any PDU
that is not P-DATA-TF (A-RELEASE-RQ, A-ABORT, garbage), the end of the connection, the
idle timeout, a local abort, are handed back to it: its DUL thread reads the socket
again from that PDU on and its reactor takes over as if it had run all along (the
state machine stays in Sta6 during the data phase; P-DATA in either direction does
not change it). A DIMSE message other than a C-STORE request with a dataset on an
accepted context with the same SOP class (C-ECHO, a C-STORE on a context of another
class, anything odd) is fed to pynetdicom's own DIMSE decoder and served by its
service classes, fragments as received.

Not triggered on this path (the receiver binds none of them): pynetdicom's
EVT_PDU_RECV/SENT, EVT_DATA_RECV/SENT, EVT_DIMSE_RECV/SENT for C-STORE messages.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from typing import Any, Callable

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
_HEADER = struct.Struct(">BxI")  # PDU type, reserved, length
_ITEM = struct.Struct(">IBB")  # PDV item length, presentation context ID, control header
_COMMAND = 0x01  # message control header: bit 0 command (1) or dataset (0)
_LAST = 0x02  # bit 1: last fragment
_NO_DATASET = 0x0101  # CommandDataSetType: no dataset follows
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
# Implicit VR little endian command elements (group 0000)
_TAG_SOP_CLASS = 0x00000002
_TAG_COMMAND_FIELD = 0x00000100
_TAG_MESSAGE_ID = 0x00000110
_TAG_DATASET_TYPE = 0x00000800
_TAG_SOP_INSTANCE = 0x00001000
# A peer's maximum PDU length of 0 means "no limit"; fragments are then capped here.
_UNLIMITED_FRAGMENT = 1 << 24

#: The handler: (SOP class UID, SOP instance UID, transfer syntax UID of the context,
#: dataset bytes as received or None if they exceeded the size limit given with it,
#: their length in bytes) -> DIMSE status.
StoreHandler = Callable[[str, str, int, "bytearray | None", int], int]


class ProtocolError(Exception):
    """A P-DATA-TF PDU whose items do not add up."""


def parse_command(command: bytes | bytearray) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set: {tag: value bytes}.

    Raises
    ------
    ProtocolError
        An element runs past the end of the command set.
    """
    elements: dict[int, bytes] = {}
    pos, end = 0, len(command)
    unpack = struct.unpack_from
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("command set cut inside an element header")
        group, element, length = unpack("<HHI", command, pos)
        pos += 8
        if pos + length > end:
            raise ProtocolError("command set element runs past its end")
        elements[(group << 16) | element] = bytes(command[pos:pos + length])
        pos += length
    return elements


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_store_response(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                          status: int) -> bytes:
    """The C-STORE-RSP command set (implicit VR little endian), as pynetdicom encodes it.

    Elements: group length, affected SOP class, command field 8001H, message ID being
    responded to, command data set type 0101H (none), status, affected SOP instance.
    """
    body = b"".join((
        _element(0x0002, _ui(sop_class_uid)),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATASET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _ui(sop_instance_uid)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_p_data(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """A command set as P-DATA-TF PDUs of at most ``peer_max_pdu`` bytes (0: no limit),
    one PDV per PDU, the last fragment marked (as pynetdicom fragments)."""
    limit = peer_max_pdu - 6 if peer_max_pdu else _UNLIMITED_FRAGMENT
    if limit < 1:
        raise ValueError(f"peer maximum PDU length {peer_max_pdu} holds no data")
    out = []
    for start in range(0, len(command), limit):
        fragment = command[start:start + limit]
        mch = _COMMAND | (_LAST if start + limit >= len(command) else 0)
        out.append(struct.pack(">BxIIBB", P_DATA_TF, len(fragment) + 6, len(fragment) + 2,
                               context_id, mch) + fragment)
    return b"".join(out)


class LeanAssociation(Association):
    """pynetdicom's acceptor association whose data phase runs in :class:`DataPhase`.

    Made by :class:`rtsc.intake.connections.ReceiverRequestHandler` (class swapped in
    after pynetdicom built it, no state of its own besides ``store_handler``).
    """

    store_handler: StoreHandler | None = None
    max_dataset_bytes: int = 1 << 62

    def _run_reactor(self) -> None:
        wrapper = self.dul.socket
        if self.store_handler is not None and getattr(wrapper, "lean", False) \
                and wrapper.socket is not None:
            wrapper.open_wake_pipe()
            try:
                DataPhase(self, wrapper).run()
            except Exception:  # noqa: BLE001 - pynetdicom's reactor still ends it cleanly
                log.exception("DICOM data phase failed; aborting the association")
                wrapper.hand_back()
                if not self._kill:
                    self.abort()
            finally:
                wrapper.hand_back()
                wrapper.close_wake_pipe()
        hand_back = getattr(wrapper, "hand_back", None)
        if hand_back is not None:
            hand_back()
        super()._run_reactor()


class DataPhase:
    """One association's data phase on its own thread (see the module docstring).

    Parameters
    ----------
    assoc : LeanAssociation
        Established; its DUL thread leaves the socket alone while ``wrapper.lean``.
    wrapper : rtsc.intake.connections.ReceiverSocket
        (not imported here: connections imports this module)
    """

    def __init__(self, assoc: LeanAssociation, wrapper: Any) -> None:
        self.assoc = assoc
        self.wrapper = wrapper
        self.sock: socket.socket = wrapper.socket
        self.handler = assoc.store_handler
        self.limit = assoc.max_dataset_bytes
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        self._header = bytearray(6)
        self._buffer = bytearray(0)  # grows to the largest PDU received, then reused
        self.wake_fd = wrapper.wake_fd
        self._poll.register(self.wake_fd, select.POLLIN)
        self._reset()

    def _reset(self) -> None:
        self.context_id = -1
        self.command = bytearray()
        self.command_done = False
        self.fields: dict[int, bytes] = {}
        self.dataset: bytearray | None = bytearray()
        self.n_dataset = 0
        self.pynetdicom = False  # this message is fed to pynetdicom's DIMSE provider

    def run(self) -> None:
        """Serve P-DATA-TF PDUs until one is not, or the association ends; returns to
        let pynetdicom's reactor take over."""
        assoc = self.assoc
        while not assoc._kill and assoc.is_established:
            if not self._wait_readable():
                return
            try:
                kind = self.sock.recv(1, socket.MSG_PEEK)
            except (OSError, ValueError):
                return
            if not kind or kind[0] != P_DATA_TF:
                return  # A-RELEASE-RQ, A-ABORT, anything else, or closed: pynetdicom's
            try:
                body = self._read_pdu()
                if body is None:
                    return
                assoc.dul._idle_timer.restart()
                self._items(body)
            except ProtocolError as exc:
                log.warning("association from %s aborted: malformed P-DATA-TF (%s)",
                            assoc.requestor.address, exc)
                self.wrapper.hand_back()
                assoc.abort()
                return

    def _wait_readable(self) -> bool:
        """Wait for data, a local request (abort), or the idle timeout (False)."""
        assoc = self.assoc
        timer = assoc.dul._idle_timer
        while True:
            # An abort from another thread (Receiver.close) queues the A-ABORT and
            # wakes us: pynetdicom's reactor sees it through.
            if assoc._kill or assoc._sent_abort or not assoc.is_established:
                return False
            remaining = timer.remaining if timer.timeout is not None else 1.0
            if remaining <= 0:
                return False  # pynetdicom's reactor aborts: "Network timeout reached"
            events = self._poll.poll(max(remaining, 0.001) * 1000.0)
            readable = False
            for fd, _mask in events:
                if fd == self.wake_fd:
                    self.wrapper.drain_wake()
                else:
                    readable = True
            if readable and not (assoc._kill or assoc._sent_abort):
                return True

    def _recv_into(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False if the peer closed or a deadline passed."""
        sock = self.sock
        quickack = self.wrapper.quickack
        got, need = 0, len(view)
        while got < need:
            if quickack is not None:
                try:  # Linux leaves quick-ACK mode on its own: re-arm before each read
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                except OSError:
                    pass
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                expire = getattr(sock, "_expire", None)
                if expire is not None:
                    expire()  # logs and shuts the socket down, as PeerSocket.recv does
                return False
            except OSError:
                return False
            if n == 0:
                return False
            got += n
        return True

    def _read_pdu(self) -> memoryview | None:
        """The next PDU's body, in a buffer reused for every PDU of the association:
        valid until the next read (every fragment taken from it is copied).

        A fresh 1 MB buffer per PDU cost ~0.4 ms of page faults per MB on this
        machine (2.4 MB mosaic: ~1 ms of the receive thread's CPU).
        """
        header = self._header
        if not self._recv_into(memoryview(header)):
            return None
        _kind, length = _HEADER.unpack(header)
        # What we announced (A-ASSOCIATE-AC): a peer may not send more; without this
        # check a 4-byte length would make us allocate up to 4 GB.
        limit = self.assoc.acceptor.maximum_length
        if limit and length > limit:
            raise ProtocolError(f"a PDU of {length} bytes, past the {limit} bytes announced")
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        if length and not self._recv_into(body):
            return None
        return body

    def _items(self, body: memoryview) -> None:
        """Walk the PDV items of one P-DATA-TF body."""
        pos, end = 0, len(body)
        view = body
        while pos < end:  # none at all: nothing to do (as pynetdicom)
            if pos + 6 > end:
                raise ProtocolError("PDV item header cut short")
            length, context_id, mch = _ITEM.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                raise ProtocolError(f"PDV item length {length} does not fit the PDU")
            self._fragment(context_id, mch, view[pos + 6:pos + 4 + length])
            pos += 4 + length
            if not self.assoc.is_established or self.assoc._kill:
                return

    def _fragment(self, context_id: int, mch: int, data: memoryview) -> None:
        if self.pynetdicom:
            self._feed(context_id, mch, data)
            return
        if mch & _COMMAND:
            if self.command_done or (self.command and context_id != self.context_id):
                self._to_pynetdicom(context_id, mch, data)  # a message out of order
                return
            self.context_id = context_id
            self.command += data
            if mch & _LAST:
                self.command_done = True
                self._command_complete()
            return
        if not self.command_done or context_id != self.context_id:
            self._to_pynetdicom(context_id, mch, data)
            return
        self.n_dataset += len(data)
        if self.dataset is not None:
            if self.n_dataset > self.limit:
                self.dataset = None  # answered as too large; the rest is only counted
            else:
                self.dataset += data
        if mch & _LAST:
            self._store()

    def _command_complete(self) -> None:
        """Keep a C-STORE request with a dataset here; anything else goes to pynetdicom."""
        try:
            fields = parse_command(self.command)
            ours = (
                _unpack_us(fields.get(_TAG_COMMAND_FIELD)) == _C_STORE_RQ
                and _unpack_us(fields.get(_TAG_DATASET_TYPE)) not in (None, _NO_DATASET)
                and _unpack_us(fields.get(_TAG_MESSAGE_ID)) is not None
                and self._context_class() == _uid(fields.get(_TAG_SOP_CLASS))
                and _uid(fields.get(_TAG_SOP_INSTANCE))
            )
        except (ProtocolError, UnicodeDecodeError):
            ours = False
        if ours:
            self.fields = fields
            return
        self.pynetdicom = True
        self._feed(self.context_id, _COMMAND | _LAST, memoryview(self.command))

    def _context_class(self) -> str | None:
        context = self.assoc._accepted_cx.get(self.context_id)
        if context is None or self.assoc._sent_release:
            return None
        return str(context.abstract_syntax)

    def _to_pynetdicom(self, context_id: int, mch: int, data: memoryview) -> None:
        """Switch the message being received to pynetdicom, with what came of it so far."""
        self.pynetdicom = True
        if self.command:
            self._feed(self.context_id, _COMMAND | (_LAST if self.command_done else 0),
                       memoryview(self.command))
        if self.command_done and self.dataset:
            self._feed(self.context_id, 0, memoryview(self.dataset))
        self._feed(context_id, mch, data)

    def _feed(self, context_id: int, mch: int, data: memoryview) -> None:
        """One fragment into pynetdicom's DIMSE provider; serve the message once whole."""
        assoc = self.assoc
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, bytes((mch,)) + bytes(data)]]
        assoc.dimse.receive_primitive(primitive)
        context, msg = assoc.dimse.get_msg(block=False)
        if msg is not None:
            self._reset()
            assoc._serve_request(msg, int(context))
            self._await_sent()
        elif assoc.dimse.message is None:
            self._reset()  # rejected by pynetdicom's decoder (it ends the association)

    def _store(self) -> None:
        assoc = self.assoc
        fields = self.fields
        sop_class = _uid(fields[_TAG_SOP_CLASS])
        sop_instance = _uid(fields[_TAG_SOP_INSTANCE])
        message_id = _unpack_us(fields[_TAG_MESSAGE_ID])
        context_id, dataset, n = self.context_id, self.dataset, self.n_dataset
        self._reset()
        try:
            syntax = str(assoc._accepted_cx[context_id].transfer_syntax[0])
            status = int(self.handler(sop_class, sop_instance, syntax, dataset, n))
        except Exception:  # noqa: BLE001 - as pynetdicom: the handler failed, 0xC211
            log.exception("Exception in the C-STORE handler")
            status = 0xC211
        del dataset
        if not assoc.is_established or assoc._kill:
            return
        response = encode_p_data(context_id, encode_store_response(
            message_id, sop_class, sop_instance, status), assoc.requestor.maximum_length or 0)
        self._await_sent()
        try:
            self.sock.sendall(response)
        except OSError as exc:
            log.warning("cannot answer the C-STORE to %s (%s)", assoc.requestor.address, exc)

    def _await_sent(self) -> None:
        """Wait (briefly) until pynetdicom's DUL has sent what it was given (a C-ECHO
        answer), so that our answers follow it on the wire."""
        queue = self.assoc.dul.to_provider_queue
        deadline = time.monotonic() + 5.0
        while queue.qsize() and time.monotonic() < deadline and self.assoc.dul.is_alive():
            time.sleep(0.0002)


def _unpack_us(value: bytes | None) -> int | None:
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def _uid(value: bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("ascii").rstrip("\0 ")


