"""`rtsc bridge`: the ``feedback`` messages as plain text lines over UDP and TCP.

MATLAB/Psychtoolbox, E-Prime and Presentation read a UDP datagram or a TCP line with
their own sockets; they speak neither ZeroMQ nor rtsc's JSON. The bridge subscribes to
the ``feedback`` topic and sends one ASCII line per message::

    INDEX VALUE LATENCY_MS\\n

``INDEX`` is the volume's 0-based index, ``VALUE`` the ``feedback`` field (``nan`` when
the volume has none: no baseline yet, or no ROI voxel left), ``LATENCY_MS`` rtsc's
latency from the volume's last byte to the message (milliseconds). Over UDP each line
is one datagram to ``HOST:PORT``; over TCP the bridge listens on a port, any number of
clients connect, and each gets every line from its connection on. A client that stops
reading is dropped once :data:`MAX_PENDING_BYTES` wait for it; one that goes away is
forgotten; neither slows the others or the bridge.

One thread, one loop: a ``zmq.Poller`` waits on the subscription and the TCP sockets
together (no thread per client, nothing between a message's arrival and its lines but
the formatting and the system calls).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from rtsc.client import Subscriber
from rtsc.curve import CurveClient
from rtsc.errors import RtscError
from rtsc.messages import TOPIC_FEEDBACK, Message

log = logging.getLogger(__name__)

#: Bytes queued for a TCP client that does not read before it is dropped (about 30 000
#: lines: minutes of a run at any TR).
MAX_PENDING_BYTES = 1 << 20
#: Kernel send buffer of each TCP client's socket, bytes.
CLIENT_SNDBUF_BYTES = 64 * 1024
#: Longest wait in the loop before the stop flag is looked at again, ms.
POLL_MS = 100


def feedback_line(message: Message) -> bytes:
    """The text line of one ``feedback`` message: ``b"INDEX VALUE LATENCY_MS\\n"``.

    ``VALUE`` keeps 9 significant digits (a float32's exact value, and more than any
    feedback display needs); NaN, and a missing value, are ``nan``.
    """
    header = message.header
    value = header.get("feedback")
    value = float("nan") if value is None else float(value)
    text = "nan" if math.isnan(value) else f"{value:.9g}"
    latency_ms = 1000.0 * float(header.get("latency_s") or 0.0)
    return f"{int(header['index'])} {text} {latency_ms:.3f}\n".encode("ascii")


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6::addr]:PORT`` too) -> (host, port), or an RtscError naming
    ``what`` (the option) and the form expected."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RtscError(f"{what} {text!r}: expected HOST:PORT with a port in 1-65535")
    return host, int(port)


@dataclass
class _TcpClient:
    sock: socket.socket
    address: Any
    pending: bytearray = field(default_factory=bytearray)


class Bridge:
    """Forward ``feedback`` messages as text lines (see the module docstring).

    Parameters
    ----------
    endpoint : str, the publisher's PUB endpoint (``publish.endpoint``)
    udp : (host, port) or None, where each line goes as a datagram
    tcp : (host, port) or None, the address to listen on for line clients (port 0: any
        free port; :attr:`tcp_address` tells which)
    curve : CurveClient or None, keys when the publisher uses CURVE
    """

    def __init__(self, endpoint: str, udp: tuple[str, int] | None = None,
                 tcp: tuple[str, int] | None = None, curve: CurveClient | None = None) -> None:
        if udp is None and tcp is None:
            raise RtscError("rtsc bridge: give --udp HOST:PORT, --tcp PORT or both")
        self.n_messages = 0
        self.n_dropped_clients = 0
        self._udp_target = None
        self._udp: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._clients: dict[int, _TcpClient] = {}
        self._subscriber = Subscriber(endpoint, topics=[TOPIC_FEEDBACK], curve=curve)
        self._poller = zmq.Poller()
        self._poller.register(self._subscriber.zmq_socket, zmq.POLLIN)
        try:
            if udp is not None:
                family, _, _, _, address = socket.getaddrinfo(
                    udp[0], udp[1], type=socket.SOCK_DGRAM)[0]
                self._udp = socket.socket(family, socket.SOCK_DGRAM)
                self._udp_target = address
            if tcp is not None:
                self._listener = socket.create_server(tcp, reuse_port=False)
                self._listener.setblocking(False)
                self._poller.register(self._listener, zmq.POLLIN)
        except (OSError, socket.gaierror) as exc:
            self.close()
            raise RtscError(f"rtsc bridge: cannot open {udp if tcp is None else tcp}: "
                            f"{exc}") from exc

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The (host, port) the TCP listener is bound to, or None."""
        if self._listener is None:
            return None
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def n_clients(self) -> int:
        """TCP clients connected now."""
        return len(self._clients)

    def run(self, stop: Callable[[], bool] = lambda: False,
            max_messages: int | None = None) -> int:
        """Forward until ``stop()`` is true (or ``max_messages`` were forwarded); returns
        the number of messages forwarded."""
        while not stop() and (max_messages is None or self.n_messages < max_messages):
            # zmq.Poller gives the ZeroMQ socket back, and a file descriptor for the others
            for sock, event in self._poller.poll(POLL_MS):
                if sock is self._subscriber.zmq_socket:
                    self._forward_waiting(max_messages)
                elif self._listener is not None and sock == self._listener.fileno():
                    self._accept()
                else:
                    self._service_client(sock, event)
        return self.n_messages

    def _forward_waiting(self, max_messages: int | None) -> None:
        while max_messages is None or self.n_messages < max_messages:
            message = self._subscriber.receive(timeout_s=0)
            if message is None:
                return
            self.send(feedback_line(message))
            self.n_messages += 1

    def send(self, line: bytes) -> None:
        """Send one line to the UDP target and every TCP client."""
        if self._udp is not None:
            try:
                self._udp.sendto(line, self._udp_target)
            except OSError as exc:  # nobody listening yet (ICMP refused): the next goes
                log.debug("UDP send failed: %s", exc)
        for client in list(self._clients.values()):
            if client.pending:  # keep the order: behind what is already waiting
                self._queue(client, line)
            else:
                self._write(client, memoryview(line))

    def _write(self, client: _TcpClient, data: memoryview) -> None:
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop(client, f"gone ({exc.strerror or exc})")
            return
        if sent < len(data):
            self._queue(client, data[sent:])

    def _queue(self, client: _TcpClient, data: bytes | memoryview) -> None:
        if len(client.pending) + len(data) > MAX_PENDING_BYTES:
            self._drop(client, f"not reading ({len(client.pending)} bytes waiting)")
            self.n_dropped_clients += 1
            return
        if not client.pending:
            self._poller.modify(client.sock, zmq.POLLIN | zmq.POLLOUT)
        client.pending += data

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("rtsc bridge: cannot accept a client: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The kernel's share of a slow client's backlog stays small (it would grow to
            # megabytes); the rest waits in ``pending``, bounded by MAX_PENDING_BYTES.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF_BYTES)
            self._clients[sock.fileno()] = _TcpClient(sock, address)
            self._poller.register(sock, zmq.POLLIN)
            log.info("rtsc bridge: TCP client %s connected", address)

    def _service_client(self, fd: int, event: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        if event & zmq.POLLIN:  # clients send nothing: data is ignored, EOF means gone
            try:
                if not client.sock.recv(4096):
                    self._drop(client, "closed the connection")
                    return
            except BlockingIOError:
                pass
            except OSError as exc:
                self._drop(client, f"gone ({exc.strerror or exc})")
                return
        if event & zmq.POLLOUT and client.pending:
            waiting, client.pending = client.pending, bytearray()
            self._poller.modify(client.sock, zmq.POLLIN)
            self._write(client, memoryview(waiting))

    def _drop(self, client: _TcpClient, why: str) -> None:
        log.info("rtsc bridge: TCP client %s %s: dropped", client.address, why)
        self._clients.pop(client.sock.fileno(), None)
        try:
            self._poller.unregister(client.sock)
        except KeyError:
            pass
        client.sock.close()

    def close(self) -> None:
        """Close every socket."""
        for client in list(self._clients.values()):
            self._drop(client, "closed by the bridge")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._subscriber.close()

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
