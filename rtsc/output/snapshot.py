"""The snapshot service: late joiners get the current series so far.

:class:`SnapshotStore` keeps the frames of the messages a late joiner needs and
assembles the reply once per change; :class:`SnapshotService` answers requests on a
ROUTER socket from one thread. The protocol (request, reply, error, bounds) is
documented with the other messages in :mod:`rtsc.messages`.

Why a ROUTER and not a REP: a REP socket serves one request at a time in lockstep and
queues up to a thousand full replies (each a copy of the whole snapshot, megabytes) for
a peer that sends requests and never reads. The ROUTER sees every peer separately, so a
peer's garbage is dropped without touching the next peer's request, its replies are
bounded per peer (:data:`REPLIES_QUEUED_PER_PEER`, sent without blocking, dropped when
the peer's queue is full) and they share one copy of each frame.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from rtsc.messages import (
    SNAPSHOT_ERROR,
    SNAPSHOT_REQUEST,
    TOPIC_ALERT,
    TOPIC_MAP,
    TOPIC_SERIES_END,
    TOPIC_SERIES_START,
    TOPIC_VOLUME,
    snapshot_reply,
)

log = logging.getLogger(__name__)

#: Replies queued for one peer at most (ZMQ_SNDHWM); beyond, requests go unanswered
#: until the peer reads. Queued replies share their frames, so each costs ~100 bytes
#: per message in the snapshot, not a copy of it.
REPLIES_QUEUED_PER_PEER = 2
#: Requests waiting from one peer at most (ZMQ_RCVHWM): a flooding peer's connection is
#: not read further until the service has taken what is waiting.
REQUESTS_QUEUED_PER_PEER = 8
#: Largest inbound frame (ZMQ_MAXMSGSIZE): a request is a few bytes; a larger frame
#: disconnects its sender before it is read into memory. CURVE's handshake frames
#: (INITIATE carries the client's metadata, ~300 bytes) pass under it.
MAX_FRAME_BYTES = 4096
#: Messages taken per wake-up before looking at the stop signal again.
_BATCH = 64

_ERROR_REPLY = [SNAPSHOT_ERROR, b"unknown request; send the one frame b'snapshot'"]


class SnapshotStore:
    """The frames of the newest series that a late joiner needs (thread-safe).

    The publisher's worker records each message as it is published; the service thread
    asks for the reply. Frames are :class:`zmq.Frame` objects: every reply sends the
    same ones (libzmq shares their memory by reference count), and the reply list is
    assembled at most once per recorded message, on the first request after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start: list[zmq.Frame] | None = None
        self._volumes: list[list[zmq.Frame]] = []
        self._alerts: list[list[zmq.Frame]] = []
        self._maps: dict[str, list[zmq.Frame]] = {}
        self._end: list[zmq.Frame] | None = None
        self._reply: list[zmq.Frame] | None = None
        self.n_builds = 0

    def record(self, topic: str, header: dict[str, Any], frames: list[zmq.Frame]) -> None:
        """Keep ``frames`` (one published message) if a late joiner needs them.

        The caller must not send ``frames`` again afterwards: libzmq marks a frame
        shared on its first copy without a lock, so only one thread may copy it while
        it is unshared (the publisher's PUB send does, before recording).
        """
        with self._lock:
            if topic == TOPIC_SERIES_START:
                self._start, self._volumes, self._alerts, self._maps, self._end = \
                    frames, [], [], {}, None
            elif topic == TOPIC_VOLUME:
                self._volumes.append(frames)
            elif topic == TOPIC_ALERT:
                self._alerts.append(frames)
            elif topic == TOPIC_MAP:
                self._maps[str(header.get("name"))] = frames
            elif topic == TOPIC_SERIES_END:
                self._end = frames
            else:
                return
            self._reply = None

    def reply(self) -> list[zmq.Frame]:
        """The reply frames (:func:`rtsc.messages.snapshot_reply`), assembled once per change."""
        with self._lock:
            if self._reply is None:
                messages = ([self._start] if self._start else []) + self._volumes \
                    + self._alerts + list(self._maps.values()) + ([self._end] if self._end else [])
                self._reply = [f if isinstance(f, zmq.Frame) else zmq.Frame(f)
                               for f in snapshot_reply(messages)]
                self.n_builds += 1
            return self._reply


def snapshot_socket(ctx: "zmq.Context[Any]") -> "zmq.Socket[Any]":
    """A ROUTER socket with the service's per-peer bounds (not bound yet)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, REPLIES_QUEUED_PER_PEER)
    sock.setsockopt(zmq.RCVHWM, REQUESTS_QUEUED_PER_PEER)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    # A full queue or a vanished peer is an error on send (not a silent drop), so the
    # service can count it; with NOBLOCK it never waits for a peer.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


class SnapshotService:
    """Answers snapshot requests on ``sock`` (from :func:`snapshot_socket`, bound) in one thread.

    Parameters
    ----------
    ctx : the socket's context (for the thread's stop signal)
    sock : the ROUTER socket; the service owns it from :meth:`start` and closes it
    store : where the replies come from
    """

    def __init__(self, ctx: "zmq.Context[Any]", sock: "zmq.Socket[Any]",
                 store: SnapshotStore) -> None:
        self._ctx = ctx
        self._sock = sock
        self._store = store
        self._control: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        #: answered: snapshot replies sent; refused: error replies sent (another body in a
        #: REQ envelope); dropped: messages without a REQ envelope; undelivered: replies
        #: not sent, the peer's queue being full (it does not read) or the peer gone.
        self.counts = {"answered": 0, "refused": 0, "dropped": 0, "undelivered": 0}

    def start(self) -> None:
        """Start the thread."""
        address = f"inproc://rtsc-snapshot-{id(self)}"
        control_in = self._ctx.socket(zmq.PAIR)
        control_in.bind(address)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.connect(address)
        self._thread = threading.Thread(target=self._serve, args=(control_in,),
                                        name="rtsc-snapshot", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; it closes the socket."""
        if self._control is None:
            self._sock.close()
            return
        self._control.send(b"stop")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._control.close()
        self._control = None
        log.info("snapshot service: %s", ", ".join(f"{n} {k}" for k, n in self.counts.items()))

    def _serve(self, control: "zmq.Socket[Any]") -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    return
                for _ in range(_BATCH):
                    try:
                        peer, body, n_frames = _receive(self._sock)
                    except zmq.Again:
                        break
                    self._answer(peer, body, n_frames)
        finally:
            self._sock.close()
            control.close()

    def _answer(self, peer: bytes, body: list[bytes], n_frames: int) -> None:
        if not body or body[0] != b"":
            # Not a REQ envelope: a REQ peer cannot have sent it, nobody waits for it.
            self.counts["dropped"] += 1
            return
        valid = n_frames == 2 and body[1] == SNAPSHOT_REQUEST
        reply: list[Any] = self._store.reply() if valid else _ERROR_REPLY
        try:
            self._sock.send_multipart([peer, b"", *reply], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            # EAGAIN: the peer has its queue full (it does not read); EHOSTUNREACH: it
            # went away (a REQ client that timed out). Anything else is logged, and the
            # service goes on with the next request: it is an observer, like the stages.
            if exc.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                log.warning("snapshot reply not sent: %s", exc)
            self.counts["undelivered"] += 1
            return
        self.counts["answered" if valid else "refused"] += 1


def _receive(sock: "zmq.Socket[Any]") -> tuple[bytes, list[bytes], int]:
    """The next message: (peer, its first frames after the peer's id, how many frames).

    Raises zmq.Again when none is waiting. At most three frames are kept: a message of
    thousands of frames is read and dropped one frame at a time.
    """
    peer = sock.recv(zmq.NOBLOCK)
    body: list[bytes] = []
    n_frames = 0
    while sock.getsockopt(zmq.RCVMORE):
        # libzmq delivers whole messages: the rest of this one is already here.
        frame = sock.recv()
        n_frames += 1
        if n_frames <= 3:
            body.append(frame)
    return peer, body, n_frames
