"""A tiny subscriber API for stimulus software and displays.

Three lines for a neurofeedback loop::

    from rtsc.client import Subscriber
    with Subscriber("tcp://127.0.0.1:5556") as sub:
        for msg in sub:
            if msg.topic == "volume": print(msg.header["index"], msg.header["feedback"])

With ``snapshot_endpoint`` given, iteration starts with the whole current run (from
the snapshot service) and continues live without duplicates.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import zmq

from rtsc.errors import MessageError
from rtsc.messages import SCHEMA, TOPIC_SERIES_START, TOPIC_VOLUME, Message, decode

__all__ = ["Subscriber", "Message", "request_snapshot"]


def request_snapshot(endpoint: str, timeout_s: float = 5.0,
                     context: "zmq.Context[Any] | None" = None) -> list[Message]:
    """Ask the snapshot service for the current run.

    Returns
    -------
    list of Message: series.start, the volumes, alerts, newest maps, series.end if ended;
    empty before the first series.

    Raises
    ------
    TimeoutError
        If no answer comes within ``timeout_s`` seconds.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(b"snapshot")
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no snapshot from {endpoint} within {timeout_s} s")
        frames = sock.recv_multipart(copy=True)
    finally:
        sock.close()
    if len(frames) < 2 or frames[0] != b"snapshot":
        raise MessageError(f"unexpected snapshot reply {frames[:1]!r}")
    meta = json.loads(frames[1])
    if meta.get("schema") != SCHEMA:
        raise MessageError(f"unsupported snapshot schema {meta.get('schema')!r}")
    messages, pos = [], 2
    for count in meta["frames"]:
        messages.append(decode(frames[pos:pos + count]))
        pos += count
    return messages


class Subscriber:
    """Iterate over rtsc messages.

    Parameters
    ----------
    endpoint : str
        The publisher's PUB endpoint (config ``publish.endpoint``).
    topics : sequence of str
        Topic prefixes to receive; empty for all.
    snapshot_endpoint : str or None
        The snapshot REP endpoint: when given, the run so far is delivered first.
    """

    def __init__(self, endpoint: str, topics: Sequence[str] = (),
                 snapshot_endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self.topics = list(topics)
        self.snapshot_endpoint = snapshot_endpoint
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100000)
        for topic in self.topics or [""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._sock.connect(endpoint)
        self._backlog: list[Message] = []
        self._seen: set[tuple[str, str, int]] = set()
        self._started: set[str] = set()
        if snapshot_endpoint is not None:
            snapshot = request_snapshot(snapshot_endpoint, context=self._ctx)
            self._backlog = [m for m in snapshot
                             if not self.topics or any(m.topic.startswith(t) for t in self.topics)]
            self._seen = {self._key(m) for m in snapshot if m.topic == TOPIC_VOLUME}
            self._started = {str(m.header.get("series")) for m in snapshot
                             if m.topic == TOPIC_SERIES_START}

    @staticmethod
    def _key(message: Message) -> tuple[str, str, int]:
        return (message.topic, str(message.header.get("series")), int(message.header.get("index", -1)))

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """Next message, or None after ``timeout_s`` seconds (None waits forever)."""
        if self._backlog:
            return self._backlog.pop(0)
        while True:
            if timeout_s is not None and not self._sock.poll(int(timeout_s * 1000)):
                return None
            message = decode(self._sock.recv_multipart(copy=True))
            if message.topic == TOPIC_VOLUME and self._key(message) in self._seen:
                continue  # already delivered from the snapshot
            if message.topic == TOPIC_SERIES_START:
                series = str(message.header.get("series"))
                if series in self._started:
                    continue  # published while the snapshot was taken: delivered already
                self._started, self._seen = {series}, set()
            return message

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.receive()
            if message is not None:
                yield message

    def close(self) -> None:
        """Close the socket and its context."""
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
