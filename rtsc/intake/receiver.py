"""DICOM C-STORE / C-ECHO receiver (pynetdicom SCP).

The store handler does only what the data path needs: read the SeriesInstanceUID,
put an :class:`Incoming` on the queue, write the dataset to the archive (fsync) and
answer success only then. Parsing pixels and assembling volumes happen on the
pipeline worker, overlapping the fsync.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from rtsc.config import ReceiverConfig
from rtsc.intake.access import AccessPolicy
from rtsc.errors import DicomError, RtscError
from rtsc.output.session import SessionStore

log = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class Incoming:
    """A dataset handed from an input (receiver or watcher) to the pipeline worker.

    Attributes
    ----------
    dataset : pydicom Dataset or None
        Already parsed, or None (then ``raw`` holds it, or the input was unusable).
    path : Path or None
        Where the archived copy is.
    t_received : float
        When its last byte arrived, seconds since the epoch.
    source : str
        ``cstore`` or ``folder``.
    error : str or None
        Why the input is unusable (then ``dataset`` and ``raw`` are None).
    raw : bytes, bytearray or None
        The encoded dataset (no file meta; inflated when its transfer syntax is
        deflated), decoded on the worker by :meth:`load`.
    file_meta : FileMetaDataset or None
        Transfer syntax and SOP identification for ``raw``.
    from_archive : bool
        Neither ``dataset`` nor ``raw`` is kept: :meth:`load` reads the archived file at
        ``path`` (used when the pipeline is behind, so a backlog costs disk, not memory).
    processed : threading.Event or None
        Set by the pipeline worker once it is done with the dataset (its volume
        published, or nothing to publish); the receiver archives after it.
    """

    dataset: Dataset | None
    path: Path | None
    t_received: float
    source: str
    error: str | None = None
    raw: bytes | bytearray | None = None
    file_meta: FileMetaDataset | None = None
    from_archive: bool = False
    processed: threading.Event | None = None

    def load(self) -> Dataset | None:
        """The dataset, decoding ``raw`` if needed (on the worker, not the receive thread).

        Raises
        ------
        DicomError
            If ``raw`` cannot be decoded.
        """
        if self.from_archive and self.path is not None:
            return _read_archived(self.path)
        if self.dataset is not None or self.raw is None:
            return self.dataset
        assert self.file_meta is not None
        syntax = self.file_meta.TransferSyntaxUID
        try:
            dataset = read_dataset(BytesIO(self.raw), syntax.is_implicit_VR,
                                   syntax.is_little_endian)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input
            raise DicomError(f"cannot decode dataset: {exc}") from exc
        dataset.file_meta = self.file_meta
        return dataset


def _read_archived(path: Path, wait_s: float = 10.0) -> Dataset:
    """Read an archived dataset, waiting for its write to be committed (renamed in place)."""
    from pydicom import dcmread

    t0 = time.monotonic()
    part = path.with_name(path.name + ".part")
    while not path.exists():
        elapsed = time.monotonic() - t0
        if elapsed > wait_s or (elapsed > 1.0 and not part.exists()):
            raise DicomError(f"{path.name}: archive write did not complete; not processed")
        time.sleep(0.005)
    try:
        return dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input
        raise DicomError(f"cannot decode archived {path.name}: {exc}") from exc


class _TooLarge(RtscError):
    """A deflated dataset inflates past the receiver's size limit."""


_INFLATE_CHUNK = 1 << 20


def _inflate(data: bytes, limit: int) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian dataset, at most ``limit`` bytes.

    The output grows by at most a chunk per step (zlib's ``max_length``), so a stream
    that inflates past ``limit`` costs ``limit`` bytes, whatever it would inflate to.

    Raises
    ------
    _TooLarge
        The inflated dataset would exceed ``limit`` bytes.
    zlib.error
        Not a complete raw deflate stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    while not inflater.eof:
        piece = inflater.decompress(pending, _INFLATE_CHUNK)
        pending = inflater.unconsumed_tail  # left when the chunk filled up
        if not piece and not pending and not inflater.eof:
            raise zlib.error("incomplete or truncated deflate stream")
        out += piece
        if len(out) > limit:
            raise _TooLarge(f"inflates past {limit} bytes")
    return out


_SERIES_UID_TAG = 0x0020000E
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


def _skip_undefined(raw: bytes, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence value starting at ``pos``."""
    while True:
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError("malformed sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # item of undefined length: walk its elements to the item delimiter
            if struct.unpack_from("<HH", raw, pos) == (0xFFFE, 0xE00D):
                pos += 8
                break
            _tag, pos = _next_element(raw, pos, implicit)


def _next_element(raw: bytes, pos: int, implicit: bool) -> tuple[int, int]:
    """(tag, position after the element) for the element at ``pos`` (little endian)."""
    group, element = struct.unpack_from("<HH", raw, pos)
    tag = (group << 16) | element
    if implicit:
        (length,) = struct.unpack_from("<I", raw, pos + 4)
        pos += 8
        is_sequence = length == _UNDEFINED
    else:
        vr = bytes(raw[pos + 4:pos + 6])  # raw may be a bytearray (inflated)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            pos += 8
        is_sequence = length == _UNDEFINED
    if is_sequence:
        return tag, _skip_undefined(raw, pos, implicit)
    return tag, pos + length


def _peek_series_uid(raw: bytes, syntax: UID) -> str:
    """SeriesInstanceUID of an encoded dataset, walking only the elements before it.

    A byte-level walk (0.02 ms) instead of pydicom's parser (0.5 ms), because this
    runs on the receive thread for every dataset; pydicom is the fallback.
    """
    if syntax.is_little_endian:
        try:
            pos = 0
            while pos < len(raw):
                start = pos
                tag, pos = _next_element(raw, pos, syntax.is_implicit_VR)
                if tag == _SERIES_UID_TAG:
                    # UI is a short VR: 8 header bytes, explicit or implicit
                    return raw[start + 8:pos].decode("ascii").rstrip("\0 ")
                if tag > _SERIES_UID_TAG:
                    break
        except (struct.error, UnicodeDecodeError, ValueError):
            pass
    head = read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian,
                        stop_when=lambda tag, vr, length: tag > _SERIES_UID_TAG)
    return str(head.SeriesInstanceUID)


_PDU_HEADER = 6  # PDU type, reserved, 4-byte big-endian length
_REFUSED_LOG_EVERY_S = 10.0
# A-ASSOCIATE-RJ (result, source, reason): transient, service provider (presentation),
# local limit exceeded, as pynetdicom answers past its own limit.
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class _PendingLimit:
    """Connections per peer address that have not yet delivered their first whole PDU.

    A peer that connects and then sends nothing, or a few bytes of a PDU, costs two
    threads until its deadline; this bounds how many one address can hold.

    Parameters
    ----------
    per_host : int
        Pending connections allowed from one address.
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._lock = threading.Lock()
        self._by_host: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``; False (not counted) if it has too many."""
        with self._lock:
            n = self._by_host.get(host, 0)
            if n >= self.per_host:
                return False
            self._by_host[host] = n + 1
            return True

    def done(self, host: str) -> None:
        """A connection admitted from ``host`` delivered its first PDU or was closed."""
        with self._lock:
            n = self._by_host.get(host, 0) - 1
            if n > 0:
                self._by_host[host] = n
            else:
                self._by_host.pop(host, None)


class _PeerSocket(socket.socket):
    """A peer's TCP connection: quick ACKs, and deadlines on every read.

    pynetdicom's DUL thread reads a PDU with blocking ``recv`` calls until it has all the
    bytes the PDU header announced, and its ARTIM and idle timers are only checked
    between PDUs; a peer that sends 4 bytes of a header and stops held the connection,
    its two threads and an association slot for as long as it stayed open. Here, until
    the first PDU (the A-ASSOCIATE-RQ) is whole, reads wait at most until
    ``request_deadline`` (monotonic seconds); after that each read or write waits at
    most ``idle_s``. A read past its deadline shuts the connection down and returns
    ``b""``, which the DUL takes for the peer closing (Evt17).

    Also: a sender that leaves Nagle's algorithm on (dcmtk's storescu by default) holds
    back the tail of each small PDU until the previous one is acknowledged; Linux delays
    that acknowledgement by up to 40 ms. Setting TCP_QUICKACK before every read (it
    does not persist) keeps single-slice series at network speed whatever the sender's
    socket options.
    """

    # Until arm(): a plain socket (with quick ACKs).
    peer_host = ""
    request_deadline = math.inf
    _first_done = True
    _expired = False
    _is_pending = False

    def arm(self, host: str, request_deadline: float, idle_s: float,
            pending: _PendingLimit) -> None:
        """Set the deadlines (call once, before the socket is used)."""
        self.peer_host = host
        self.request_deadline = request_deadline
        self._request_s = request_deadline - time.monotonic()
        self._idle_s = idle_s
        self._pending = pending
        self._is_pending = False  # counted in ``pending``
        self._header = b""
        self._n_first = 0  # bytes of the first PDU read so far
        self._first_done = False
        self._expired = False
        self._lock = threading.Lock()

    def admit(self) -> bool:
        """Count this connection as pending for its host; False if the host has too many."""
        self._is_pending = self._pending.admit(self.peer_host)
        return self._is_pending

    def _not_pending(self) -> None:
        if not self._is_pending:
            return
        with self._lock:
            was, self._is_pending = self._is_pending, False
        if was:
            self._pending.done(self.peer_host)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None:
            try:
                self.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass
        if not self._first_done:
            remaining = self.request_deadline - time.monotonic()
            if remaining <= 0:
                return self._expire()
            self.settimeout(remaining)
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:
            return self._expire()
        if not self._first_done:
            if data:
                self._count_first(data)
            else:  # the peer closed: it no longer holds a pending place
                self._not_pending()
        return data

    def _count_first(self, data: bytes) -> None:
        """Follow the first PDU's bytes; once it is whole, switch to the idle timeout."""
        self._n_first += len(data)
        if len(self._header) < _PDU_HEADER:
            self._header += data[:_PDU_HEADER - len(self._header)]
        if len(self._header) == _PDU_HEADER:
            (length,) = struct.unpack(">L", self._header[2:])
            if self._n_first >= _PDU_HEADER + length:
                self._first_done = True
                self.settimeout(self._idle_s)
                self._not_pending()

    def _log_expired(self) -> None:
        if self._expired:  # the DUL reads again after the first empty read
            return
        self._expired = True
        if self._first_done:
            log.warning("connection from %s closed: nothing received for %g s in the middle "
                        "of a PDU (receiver.network_timeout_s)", self.peer_host, self._idle_s)
        else:
            log.warning("connection from %s closed: no whole association request within "
                        "%.3g s (receiver.request_timeout_s)", self.peer_host, self._request_s)

    def _expire(self) -> bytes:
        self._log_expired()
        self._not_pending()
        try:
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return b""

    def close(self) -> None:
        # A peer that sent nothing is closed by pynetdicom at the same deadline (its
        # ARTIM timer, see Receiver._on_connection), without a read here.
        if not self._first_done and time.monotonic() >= self.request_deadline - 0.05:
            self._log_expired()
        self._not_pending()
        super().close()


class _ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, handing each accepted connection over as a
    :class:`_PeerSocket` with its deadlines, and closing at once a connection from a
    peer address that already has ``max_pending_per_host`` connections pending.
    """

    def __init__(self, *args: Any, receiver_config: ReceiverConfig, **kwargs: Any) -> None:
        self._config = receiver_config
        self.pending = _PendingLimit(receiver_config.max_pending_per_host)
        self._n_refused = 0
        self._refused_logged_at = -_REFUSED_LOG_EVERY_S
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        raw, address = super().get_request()
        # The request must be whole within request_timeout_s, and within acse_timeout_s
        # (which already bounds the wait for it when nothing at all is sent).
        request_s = min(self._config.request_timeout_s, self._config.acse_timeout_s)
        sock = _PeerSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.arm(str(address[0]), time.monotonic() + request_s,
                 self._config.network_timeout_s, self.pending)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if request.admit():
            return True
        # One line per refusal would let a peer write the log at its connection rate.
        self._n_refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_EVERY_S:
            log.warning("connection from %s closed at once: %d connections from it have not "
                        "sent their association request yet (receiver.max_pending_per_host); "
                        "%d refused so far", client_address[0], self.pending.per_host,
                        self._n_refused)
            self._refused_logged_at = now
        return False


def _drop_connection(assoc: Any) -> None:
    """Close a connection that has no association (yet, or any more) and end its threads.

    An A-ABORT is only valid once the request has arrived (before, pynetdicom's state
    machine raises in its DUL thread); closing the socket ends the DUL instead.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    assoc.kill()


class Receiver:
    """C-STORE SCP that archives and enqueues; C-ECHO SCP.

    Parameters
    ----------
    config : ReceiverConfig
    store : SessionStore
        Where accepted datasets are archived before success is answered.
    out : queue.Queue of Incoming
        The pipeline worker's input.

    Notes
    -----
    Nothing binds in the constructor; call :meth:`start` and :meth:`close` (or use
    it as a context manager).
    """

    def __init__(self, config: ReceiverConfig, store: SessionStore, out: "queue.Queue[Any]") -> None:
        self.config = config
        self.store = store
        self.out = out
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.n_stored = 0
        self.n_refused = 0
        self.n_rejected_associations = 0
        # Associations whose request was accepted by _on_requested: what
        # max_associations counts (see _on_requested).
        self._admitted: set[Any] = set()
        self._admitted_lock = threading.Lock()
        self.access = AccessPolicy.from_lists(config.called_aets, config.calling_aets,
                                              config.allowed_hosts)
        self._max_dataset_bytes = int(config.max_dataset_mb * 1e6)
        self._archive_wait_s = config.archive_wait_ms / 1000.0

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Accept every storage SOP class: what cannot be processed is still archived
        # (nothing lost) and reported by the assembler.
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, UNCOMPRESSED_SYNTAXES)
        ae.add_supported_context(Verification)
        # pynetdicom counts every connection towards its limit, also those that have not
        # sent their request yet (8 peers sending nothing filled every slot): the limit
        # is ours, in _on_requested; pynetdicom's only has to stay out of its way.
        ae.maximum_associations = 1_000_000
        ae.network_timeout = self.config.network_timeout_s
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        return ae

    def start(self) -> None:
        """Bind and start serving in a background thread."""
        ae = self._make_ae()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_CONN_OPEN, self._on_connection)]
        try:
            server = ae.make_server((self.config.host, self.config.port), evt_handlers=handlers,
                                    server_class=_ReceiverServer, receiver_config=self.config)
        except OSError as exc:
            raise RtscError(f"receiver.port: cannot listen on {self.config.host}:"
                            f"{self.config.port}: {exc.strerror}") from exc
        ae._servers.append(server)  # as AE.start_server does, so shutdown() can unregister it
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="rtsc-dicom-server",
                                        daemon=True)
        self._thread.start()
        log.info("DICOM receiver %s listening on %s:%d", self.config.ae_title, self.config.host,
                 self.port)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the config asks for port 0)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.socket.getsockname()[1])

    def close(self) -> None:
        """Stop accepting; running associations are aborted."""
        if self._server is not None:
            # Abort running associations (Ctrl-C must not wait for a sender to finish);
            # a dataset being archived is still committed, but unacknowledged it is resent.
            for assoc in self._server.active_associations:
                if assoc.is_established:
                    assoc.abort()
                else:
                    _drop_connection(assoc)
            self._server.shutdown()  # also closes the listening socket
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Receiver":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connection(self, event: evt.Event) -> None:
        """Wait for the association request until the connection's deadline only.

        pynetdicom waits acse_timeout for it (its ARTIM timer and the association
        thread); a peer that sends nothing is then closed at the same deadline as one
        that sends part of a PDU (see :class:`_PeerSocket`).
        """
        sock = event.assoc.dul.socket
        peer = getattr(sock, "socket", None)
        if isinstance(peer, _PeerSocket):
            event.assoc.acse_timeout = max(peer.request_deadline - time.monotonic(), 0.01)

    def _on_requested(self, event: evt.Event) -> None:
        """Reject an A-ASSOCIATE-RQ that the allow-lists do not admit, or past the limit.

        ``max_associations`` counts associations from the moment their request arrives:
        a connection that never sends one holds no slot (it is closed at its deadline).
        """
        assoc = event.assoc
        assoc.acse_timeout = self.config.acse_timeout_s  # shortened in _on_connection
        request = assoc.requestor.primitive
        calling = request.calling_ae_title if request is not None else ""
        called = request.called_ae_title if request is not None else ""
        verdict = self.access.check(str(assoc.requestor.address), str(calling), str(called))
        if verdict is None:
            with self._admitted_lock:
                self._admitted = {a for a in self._admitted if a.is_alive() and not (
                    a.is_released or a.is_aborted or a.is_rejected)}
                if len(self._admitted) < self.config.max_associations:
                    self._admitted.add(assoc)
                    return
            verdict = _REJECT_LOCAL_LIMIT, (f"{self.config.max_associations} associations "
                                            f"are open (receiver.max_associations)")
        (result, source, reason), why = verdict
        self.n_rejected_associations += 1
        log.warning("association from %s rejected: %s", assoc.requestor.address, why)
        assoc.acse.send_reject(result, source, reason)
        assoc.kill()  # as pynetdicom's own rejections: waits until the A-ASSOCIATE-RJ is sent

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s (%s)", event.assoc.requestor.ae_title,
                 event.assoc.requestor.address)
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """Enqueue, archive (fsync), then answer; never raises into pynetdicom."""
        t_received = time.time()
        try:
            file_meta = event.file_meta
            syntax = file_meta.TransferSyntaxUID
            encoded = event.encoded_dataset(include_meta=False)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status
            return self._refuse(event, t_received, f"no readable file meta ({exc})")
        if len(encoded) > self._max_dataset_bytes:
            return self._too_large(f"dataset of {len(encoded)} bytes exceeds")
        raw = encoded
        if syntax == DeflatedExplicitVRLittleEndian:
            # Inflated here, bounded: pynetdicom's event.dataset (and pydicom) inflate
            # whatever the sender compressed, 0.4 MB into 400 MB and more.
            try:
                raw = _inflate(encoded, self._max_dataset_bytes)
            except _TooLarge:
                return self._too_large(f"deflated dataset of {len(encoded)} bytes inflates "
                                       f"past")
            except zlib.error as exc:
                return self._refuse(event, t_received, f"cannot inflate the dataset ({exc})")
        try:
            series_uid = _peek_series_uid(raw, syntax)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status
            return self._refuse(event, t_received, f"no readable SeriesInstanceUID ({exc})")
        try:
            path = self.store.reserve(series_uid)
        except OSError as exc:
            log.error("C-STORE: cannot create the archive folder (%s); out of resources", exc)
            return STATUS_OUT_OF_RESOURCES
        # Hand on first, archive after: success is still answered only once the file is
        # durable (if the write fails the sender is told so and resends; the assembler
        # drops the duplicate). To an idle worker the dataset goes with an event it sets
        # once the volume is published: encoding and writing the archive alongside the
        # processing took the GIL and the core from it (motion correction 2.9 -> 1.9 ms
        # at 64x64x36 when the write waited). A busy worker is not waited for.
        waiting = self.out.qsize()
        behind = waiting >= self.config.queue_in_memory
        processed = threading.Event() if waiting == 0 and self._archive_wait_s > 0 else None
        if not behind:
            self.out.put(Incoming(None, path, t_received, "cstore", raw=raw,
                                  file_meta=file_meta, processed=processed))
            if processed is not None:
                processed.wait(self._archive_wait_s)
            else:
                time.sleep(0)  # yield the GIL: the worker starts before our encoding
        try:
            self.store.write(path, event.encoded_dataset(include_meta=True)).commit()
        except OSError as exc:
            log.error("C-STORE: cannot archive %s (%s); answering out of resources", path, exc)
            return STATUS_OUT_OF_RESOURCES
        if behind:
            # The pipeline is behind: memory stays bounded, the worker reads the archived
            # file, handed on only now that it is complete at its final path.
            self.out.put(Incoming(None, path, t_received, "cstore", file_meta=file_meta,
                                  from_archive=True))
        self.n_stored += 1
        return STATUS_SUCCESS

    def _too_large(self, what: str) -> int:
        self.n_refused += 1
        log.warning("C-STORE refused: %s receiver.max_dataset_mb (%g MB); nothing archived",
                    what, self.config.max_dataset_mb)
        return STATUS_OUT_OF_RESOURCES

    def _refuse(self, event: evt.Event, t_received: float, reason: str) -> int:
        self.n_refused += 1
        path: Path | None = None
        try:
            path = self.store.quarantine(event.encoded_dataset(include_meta=True))
        except Exception:  # noqa: BLE001 - keep what we can, answer regardless
            log.exception("C-STORE: cannot keep the refused dataset")
        log.warning("C-STORE refused: %s; kept in %s", reason, path)
        self.out.put(Incoming(None, path, t_received, "cstore", error=reason))
        return STATUS_CANNOT_UNDERSTAND
