"""A tiny subscriber API for stimulus software and displays.

Three lines for a neurofeedback loop::

    from rtsc.client import Subscriber
    with Subscriber("tcp://127.0.0.1:5556") as sub:
        for msg in sub:
            if msg.topic == "volume": print(msg.header["index"], msg.header["feedback"])

With ``snapshot_endpoint`` given, iteration starts with the whole current run (from
the snapshot service) and continues live without duplicates.

A neurofeedback display loop (PsychoPy-style: draw, flip, repeat) reads the newest value
without blocking, so a frame is never late because a volume is::

    from rtsc.client import FeedbackReader
    with FeedbackReader("tcp://127.0.0.1:5556") as reader:
        while running:
            sample = reader.latest()          # None until the first value
            if sample is not None:
                draw_thermometer(sample.value)   # sample.latency_s: rtsc's own delay
            win.flip()

``python -m rtsc.client [ENDPOINT]`` runs such a loop in the terminal.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Iterator, NamedTuple, Sequence

import zmq

from rtsc.curve import CurveClient
from rtsc.messages import (
    SNAPSHOT_REQUEST,
    TOPIC_FEEDBACK,
    TOPIC_SERIES_START,
    TOPIC_VOLUME,
    Message,
    decode,
    decode_snapshot,
)

__all__ = ["FeedbackReader", "FeedbackSample", "Subscriber", "Message", "request_snapshot"]


def request_snapshot(endpoint: str, timeout_s: float = 5.0,
                     context: "zmq.Context[Any] | None" = None,
                     curve: CurveClient | None = None) -> list[Message]:
    """Ask the snapshot service for the current run (``curve``: keys, if the server uses CURVE).

    One REQ socket per call, closed afterwards: a request that timed out leaves no state
    behind, and the service (a ROUTER) answers REQ peers as the protocol in
    :mod:`rtsc.messages` describes.

    Returns
    -------
    list of Message: series.start, the volumes, alerts, newest maps, series.end if ended;
    empty before the first series.

    Raises
    ------
    TimeoutError
        If no answer comes within ``timeout_s`` seconds.
    MessageError
        If the service refuses the request or the reply does not decode.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
        sock.send(SNAPSHOT_REQUEST)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no snapshot from {endpoint} within {timeout_s} s")
        frames = sock.recv_multipart(copy=True)
    finally:
        sock.close()
    return decode_snapshot(frames)


class Subscriber:
    """Iterate over rtsc messages.

    Parameters
    ----------
    endpoint : str
        The publisher's PUB endpoint (config ``publish.endpoint``).
    topics : sequence of str
        Topic prefixes to receive; empty for all.
    snapshot_endpoint : str or None
        The snapshot service's endpoint (config ``publish.snapshot_endpoint``): when
        given, the run so far is delivered first.
    curve : CurveClient or None
        This client's key pair and the server's public key, when the publisher uses
        CURVE (config ``publish.curve_secret_key``).
    """

    def __init__(self, endpoint: str, topics: Sequence[str] = (),
                 snapshot_endpoint: str | None = None,
                 curve: CurveClient | None = None) -> None:
        self.endpoint = endpoint
        self.topics = list(topics)
        self.snapshot_endpoint = snapshot_endpoint
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100000)
        for topic in self.topics or [""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)
        self._backlog: list[Message] = []
        self._seen: set[tuple[str, str, int]] = set()
        self._started: set[str] = set()
        if snapshot_endpoint is not None:
            snapshot = request_snapshot(snapshot_endpoint, context=self._ctx, curve=curve)
            self._backlog = [m for m in snapshot
                             if not self.topics or any(m.topic.startswith(t) for t in self.topics)]
            self._seen = {self._key(m) for m in snapshot if m.topic == TOPIC_VOLUME}
            self._started = {str(m.header.get("series")) for m in snapshot
                             if m.topic == TOPIC_SERIES_START}

    @property
    def zmq_socket(self) -> "zmq.Socket[Any]":
        """The SUB socket, to wait on it in a ``zmq.Poller`` beside other sockets; read
        what it holds with :meth:`receive` (``timeout_s=0``), never from it directly."""
        return self._sock

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


class FeedbackSample(NamedTuple):
    """One neurofeedback value.

    Attributes
    ----------
    index : int, 0-based volume index
    value : float, the ``feedback`` field (percent signal change or a contrast effect)
    latency_s : float, seconds from the volume's last byte at rtsc to its publication
    age_s : float, seconds from the volume's last byte at rtsc to this reader receiving
        it (same clock when the reader runs on rtsc's host)
    series : str, the series id
    """

    index: int
    value: float
    latency_s: float
    age_s: float
    series: str


class FeedbackReader:
    """Non-blocking access to the newest ``feedback`` value, for a stimulus frame loop.

    Reads the ``feedback`` topic, which rtsc publishes as soon as the ROI stage has the
    value (before the QC and other observer stages of the same volume).

    Parameters
    ----------
    endpoint : str, the publisher's PUB endpoint (config ``publish.endpoint``)
    curve : CurveClient or None, keys when the publisher uses CURVE
    """

    def __init__(self, endpoint: str, curve: CurveClient | None = None) -> None:
        self._subscriber = Subscriber(endpoint, topics=[TOPIC_FEEDBACK], curve=curve)
        self._latest: FeedbackSample | None = None

    def poll(self) -> list[FeedbackSample]:
        """Every feedback value that arrived since the last call (oldest first); never waits."""
        samples = []
        while (message := self._subscriber.receive(timeout_s=0)) is not None:
            h = message.header
            if h.get("feedback") is None:
                continue
            samples.append(FeedbackSample(int(h["index"]), float(h["feedback"]),
                                          float(h["latency_s"]), time.time() - h["t_received"],
                                          str(h["series"])))
        if samples:
            self._latest = samples[-1]
        return samples

    def latest(self) -> FeedbackSample | None:
        """The newest value so far (after taking in what arrived), or None."""
        self.poll()
        return self._latest

    def close(self) -> None:
        self._subscriber.close()

    def __enter__(self) -> "FeedbackReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """A terminal neurofeedback display: one thermometer line per new value."""
    parser = argparse.ArgumentParser(prog="python -m rtsc.client", description=main.__doc__)
    parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556")
    parser.add_argument("--frame-s", type=float, default=1 / 60, help="frame period, seconds")
    parser.add_argument("--scale", type=float, default=4.0,
                        help="feedback value that fills the bar (percent signal change)")
    args = parser.parse_args(argv)
    with FeedbackReader(args.endpoint) as reader:
        print(f"waiting for feedback on {args.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                for s in reader.poll():
                    width = int(round(20 * max(-1.0, min(1.0, s.value / args.scale))))
                    bar = (" " * (20 + min(width, 0)) + "#" * abs(width)).ljust(40)
                    print(f"vol {s.index:4d} {s.value:+7.2f} |{bar[:20]}|{bar[20:]}| "
                          f"latency {1e3 * s.latency_s:5.1f} ms, age {1e3 * s.age_s:5.1f} ms",
                          flush=True)
                time.sleep(args.frame_s)  # stands for drawing and flipping a frame
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
