"""ZeroMQ publisher (PUB) with a snapshot service (REP) for late joiners.

The PUB socket is used only by the pipeline worker thread (which calls
:meth:`Publisher.publish`); the REP socket lives in one small thread that answers
``snapshot`` requests from a lock-protected copy of the current series' messages.

The snapshot protocol is documented in :mod:`rtsc.messages`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from rtsc.curve import CurveServer
from rtsc.errors import RtscError
from rtsc.messages import (
    SNAPSHOT_ERROR,
    SNAPSHOT_REQUEST,
    TOPIC_ALERT,
    TOPIC_MAP,
    TOPIC_SERIES_END,
    TOPIC_SERIES_START,
    TOPIC_VOLUME,
    Message,
    encode,
    snapshot_reply,
)

log = logging.getLogger(__name__)


class _Snapshot:
    """The frames a late joiner needs, for the newest series."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start: list[bytes] | None = None
        self.volumes: list[list[bytes]] = []
        self.alerts: list[list[bytes]] = []
        self.maps: dict[str, list[bytes]] = {}
        self.end: list[bytes] | None = None

    def record(self, topic: str, header: dict[str, Any], frames: list[bytes]) -> None:
        with self.lock:
            if topic == TOPIC_SERIES_START:
                self.start, self.volumes, self.alerts, self.maps, self.end = frames, [], [], {}, None
            elif topic == TOPIC_VOLUME:
                self.volumes.append(frames)
            elif topic == TOPIC_ALERT:
                self.alerts.append(frames)
            elif topic == TOPIC_MAP:
                self.maps[str(header.get("name"))] = frames
            elif topic == TOPIC_SERIES_END:
                self.end = frames

    def reply(self) -> list[bytes]:
        with self.lock:
            messages = ([self.start] if self.start else []) + self.volumes + self.alerts \
                + list(self.maps.values()) + ([self.end] if self.end else [])
        return snapshot_reply(messages)


class Publisher:
    """PUB + snapshot REP.

    Parameters
    ----------
    endpoint : str
        PUB endpoint, e.g. ``tcp://127.0.0.1:5556`` (``tcp://127.0.0.1:*`` picks a port).
    snapshot_endpoint : str
        REP endpoint.

    Notes
    -----
    Nothing binds before :meth:`start`. After it, :attr:`endpoint` and
    :attr:`snapshot_endpoint` hold the bound addresses. :meth:`start` raises
    :class:`~rtsc.errors.RtscError` naming the config key when an endpoint cannot be bound.
    """

    def __init__(self, endpoint: str, snapshot_endpoint: str,
                 curve: CurveServer | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self._auth: Any = None
        self.snapshot_endpoint = snapshot_endpoint
        self._ctx: zmq.Context[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._control: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._snapshot = _Snapshot()
        self.n_published = 0

    def start(self) -> None:
        """Bind both sockets and start the snapshot thread."""
        self._ctx = zmq.Context()
        if self.curve is not None:
            try:
                self._auth = self.curve.start(self._ctx)
            except BaseException:
                self.close()
                raise
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 1000)
        self._pub.setsockopt(zmq.SNDHWM, 100000)
        rep = self._ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(self._pub)
            self.curve.apply(rep)
        # A busy or malformed endpoint (typically a second `rtsc run`) is a user error:
        # convert it at this boundary into an RtscError naming the config key, and
        # release the sockets, instead of a ZMQError traceback out of the CLI.
        for sock, key, endpoint in ((self._pub, "publish.endpoint", self.endpoint),
                                    (rep, "publish.snapshot_endpoint", self.snapshot_endpoint)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                rep.close()
                self.close()
                raise RtscError(f"{key}: cannot bind {endpoint!r}: {exc.strerror}") from exc
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.snapshot_endpoint = rep.getsockopt_string(zmq.LAST_ENDPOINT)
        control_address = f"inproc://rtsc-snapshot-{id(self)}"
        control_in = self._ctx.socket(zmq.PAIR)
        control_in.bind(control_address)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.connect(control_address)
        self._thread = threading.Thread(target=self._serve, args=(rep, control_in),
                                        name="rtsc-snapshot", daemon=True)
        self._thread.start()
        log.info("publishing on %s, snapshots on %s", self.endpoint, self.snapshot_endpoint)

    def _serve(self, rep: "zmq.Socket[Any]", control: "zmq.Socket[Any]") -> None:
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    return
                if rep in ready:
                    request = rep.recv_multipart()
                    if request and request[0] == SNAPSHOT_REQUEST:
                        rep.send_multipart(self._snapshot.reply())
                    else:
                        rep.send_multipart([SNAPSHOT_ERROR, b"unknown request; send b'snapshot'"])
        finally:
            rep.close()
            control.close()

    def publish(self, message: Message, series: str) -> dict[str, Any]:
        """Encode and send; returns the final header (with ``t_published``, ``latency_s``)."""
        if self._pub is None:
            raise RuntimeError("publisher not started")
        frames = encode(message, series)
        self._pub.send_multipart(frames, copy=False)
        self._snapshot.record(message.topic, message.header, frames)
        self.n_published += 1
        return message.header

    def close(self) -> None:
        """Stop the snapshot thread and close the sockets (pending messages get 1 s)."""
        if self._control is not None:
            self._control.send(b"stop")
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._control.close()
            self._control = None
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> "Publisher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
