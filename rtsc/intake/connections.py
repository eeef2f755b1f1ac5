"""The receiver's TCP connections: deadlines on every read, and a bound on the
connections one peer address holds before it has sent its association request.

pynetdicom reads PDUs with blocking calls and checks its timers only between
PDUs; :class:`PeerSocket` and :class:`ReceiverServer` close the gaps that leaves.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import threading
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from rtsc.config import ReceiverConfig
from rtsc.intake.dataphase import LeanAssociation, StoreHandler

log = logging.getLogger(__name__)

_PDU_HEADER = 6  # PDU type, reserved, 4-byte big-endian length
_REFUSED_LOG_EVERY_S = 10.0


class PendingLimit:
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


class PeerSocket(socket.socket):
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
            pending: PendingLimit) -> None:
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
        # ARTIM timer, see rtsc.intake.receiver.Receiver._on_connection), without a read here.
        if not self._first_done and time.monotonic() >= self.request_deadline - 0.05:
            self._log_expired()
        self._not_pending()
        super().close()


class ReceiverSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU in as few ``recv`` calls as the
    kernel allows, and leaving the data phase to :mod:`rtsc.intake.dataphase`.

    pynetdicom reads a PDU 4096 bytes per call: 600 calls (each through
    :meth:`PeerSocket.recv`) for a 2.4 MB mosaic, 6 ms of Python per file on the
    connection's thread. Here each call asks for the rest of the PDU.

    While ``lean`` (set by :class:`ReceiverRequestHandler`) and the association is
    established (state Sta6), :attr:`ready` tells pynetdicom's DUL thread that nothing
    has arrived: the association's own thread reads the socket
    (:class:`rtsc.intake.dataphase.DataPhase`) until it calls :meth:`hand_back`. The
    DUL thread then waits on an event (set by :meth:`wake` when something is queued
    for it to send, and by :meth:`hand_back`) instead of polling every 1 ms.
    """

    lean = False
    wake_fd = -1  # read end of the data phase's wake pipe (-1: none)
    _wake_w = -1
    quickack = getattr(socket, "TCP_QUICKACK", None)

    def start_lean(self) -> None:
        """Let the association's thread take the data phase (call before it starts)."""
        self._dul_wake = threading.Event()
        self._wake_lock = threading.Lock()
        self.lean = True

    def open_wake_pipe(self) -> None:
        """The pipe :meth:`wake` writes to, polled beside the socket by the data phase."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        with self._wake_lock:
            self.wake_fd, self._wake_w = r, w

    def close_wake_pipe(self) -> None:
        # Under the lock: wake() must never write to a descriptor number reused since.
        with self._wake_lock:
            for fd in (self.wake_fd, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self.wake_fd = self._wake_w = -1

    def wake(self) -> None:
        """Something was queued for the DUL to send (an answer, an abort): wake it, and
        the data phase."""
        if not self.lean:
            return
        self._dul_wake.set()
        with self._wake_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:  # full (already woken) or closed
                    pass

    def drain_wake(self) -> bool:
        """Empty the wake pipe; True if it held anything."""
        try:
            return bool(os.read(self.wake_fd, 4096))
        except OSError:
            return False

    def hand_back(self) -> None:
        """pynetdicom's DUL thread reads the socket again from here on."""
        if self.lean:
            self.lean = False
            self._dul_wake.set()

    @property
    def ready(self) -> bool:
        if self.lean and self.assoc.dul.state_machine.current_state == "Sta6":
            # Bounded wait: the DUL loop still checks its own timers and kill flag.
            self._dul_wake.wait(0.02)
            self._dul_wake.clear()
            if self.lean:
                return False
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        received = bytearray()
        while len(received) < nr_bytes:
            data = self.socket.recv(nr_bytes - len(received))
            if not data:  # the peer closed (or a deadline passed): what came so far
                break
            received += data
        return received


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's request handler, wrapping the connection in a :class:`ReceiverSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The wrapper pynetdicom made becomes a ReceiverSocket (no state of its own): a
        # second wrapper would announce the connection to the state machine twice.
        wrapper = assoc.dul.socket
        wrapper.__class__ = ReceiverSocket
        server = self.server
        handler = getattr(server, "store_handler", None)
        if handler is not None and getattr(server, "ssl_context", None) is None:
            # The data phase on the association's thread (rtsc.intake.dataphase); the
            # class swap adds no state of pynetdicom's, only the handler.
            assoc.__class__ = LeanAssociation
            assoc.store_handler = handler
            assoc.max_dataset_bytes = server.max_dataset_bytes
            wrapper.start_lean()
            queue = assoc.dul.to_provider_queue
            put = queue.put

            def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
                put(item, block, timeout)
                wrapper.wake()

            queue.put = put_and_wake  # type: ignore[method-assign]
        return assoc


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, handing each accepted connection over as a
    :class:`PeerSocket` with its deadlines, and closing at once a connection from a
    peer address that already has ``max_pending_per_host`` connections pending.
    """

    def __init__(self, *args: Any, receiver_config: ReceiverConfig,
                 store_handler: StoreHandler | None = None, max_dataset_bytes: int = 1 << 62,
                 **kwargs: Any) -> None:
        self._config = receiver_config
        self.store_handler = store_handler
        self.max_dataset_bytes = max_dataset_bytes
        self.pending = PendingLimit(receiver_config.max_pending_per_host)
        self._n_refused = 0
        self._refused_logged_at = -_REFUSED_LOG_EVERY_S
        super().__init__(*args, request_handler=ReceiverRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        raw, address = super().get_request()
        # The request must be whole within request_timeout_s, and within acse_timeout_s
        # (which already bounds the wait for it when nothing at all is sent).
        request_s = min(self._config.request_timeout_s, self._config.acse_timeout_s)
        sock = PeerSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
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


def drop_connection(assoc: Any) -> None:
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
