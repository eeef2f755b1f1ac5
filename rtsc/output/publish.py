"""ZeroMQ publisher (PUB) with the snapshot service for late joiners.

The PUB socket is used only by the pipeline worker thread (which calls
:meth:`Publisher.publish`); the snapshot service (:mod:`rtsc.output.snapshot`, a ROUTER socket
in one small thread) answers ``snapshot`` requests from the frames of the current
series' messages, as published. The protocol is documented in :mod:`rtsc.messages`.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from rtsc.curve import CurveServer
from rtsc.errors import RtscError
from rtsc.messages import Message, encode
from rtsc.output.snapshot import SnapshotService, SnapshotStore, snapshot_socket

log = logging.getLogger(__name__)


#: Frames from this size on share the encoded bytes with libzmq (zero-copy); smaller
#: ones are copied, which costs less than zero-copy's bookkeeping (pyzmq's garbage
#: thread hears of every zero-copy frame libzmq releases).
ZERO_COPY_BYTES = 1024


def frame_of(data: bytes) -> zmq.Frame:
    """A frame for one encoded message part, sharing ``data`` from ZERO_COPY_BYTES on.

    A copied frame holds its bytes twice: pyzmq keeps the Python object (for
    ``Frame.bytes``) beside libzmq's copy. The snapshot store keeps every volume
    message of the open series, so each of them (its header and carpet: 11 kB at
    128x128x72) was kept twice; shared, once. The bytes are immutable, so sharing them
    is safe.
    """
    return zmq.Frame(data, copy=len(data) < ZERO_COPY_BYTES)


class Publisher:
    """PUB + snapshot service.

    Parameters
    ----------
    endpoint : str
        PUB endpoint, e.g. ``tcp://127.0.0.1:5556`` (``tcp://127.0.0.1:*`` picks a port).
    snapshot_endpoint : str
        The snapshot service's (ROUTER) endpoint.
    curve : CurveServer or None
        CURVE keys for both sockets (None: plain).

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
        self._service: SnapshotService | None = None
        self._snapshot = SnapshotStore()
        self._snapshot_counts: dict[str, int] = {}
        self.n_published = 0

    @property
    def snapshot_stats(self) -> dict[str, int]:
        """The snapshot service's counts so far.

        ``builds``: replies assembled (at most one per published message); ``answered``:
        snapshot replies sent; ``refused``: error replies sent (another body in a REQ
        envelope); ``dropped``: messages without the envelope; ``undelivered``: replies
        not sent because the peer's queue was full or the peer had gone.
        """
        return {"builds": self._snapshot.n_builds, **self._snapshot_counts}

    def start(self) -> None:
        """Bind both sockets and start the snapshot service."""
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
        rep = snapshot_socket(self._ctx)
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
        self._service = SnapshotService(self._ctx, rep, self._snapshot)
        self._snapshot_counts = self._service.counts  # kept after close
        self._service.start()
        log.info("publishing on %s, snapshots on %s", self.endpoint, self.snapshot_endpoint)

    def publish(self, message: Message, series: str) -> dict[str, Any]:
        """Encode and send; returns the final header (with ``t_published``, ``latency_s``)."""
        if self._pub is None:
            raise RuntimeError("publisher not started")
        # One zmq.Frame per frame, sent on PUB and then kept for the snapshot: every
        # snapshot reply shares these, none copies them. Recording comes after the send
        # (see SnapshotStore.record: only this thread may copy a frame before it is shared).
        frames = [frame_of(f) for f in encode(message, series)]
        self._pub.send_multipart(frames, copy=False)
        self._snapshot.record(message.topic, message.header, frames)
        self.n_published += 1
        return message.header

    def close(self) -> None:
        """Stop the snapshot service and close the sockets (pending messages get 1 s)."""
        if self._service is not None:
            self._service.close()
            self._service = None
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
