"""The web view's subscriptions: every source's messages folded into its scanner's state.

One thread (:class:`Feed`) waits on every source's SUB socket in one ``zmq.Poller`` and
folds each message into that scanner's :class:`~rtsc.web.state.ScannerState` under one
lock; ``on_change(name)`` is called (on the feed's thread) after the messages waiting
were folded, once per changed scanner. A source with a snapshot endpoint is asked for
the current series first, so a view started mid-run shows the run so far; a source that
does not answer is followed live only (its card fills from its next series.start).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from rtsc.client import Subscriber, request_snapshot
from rtsc.config import Config
from rtsc.config.web import NAME_PATTERN
from rtsc.curve import CurveClient
from rtsc.errors import MessageError, RtscError
from rtsc.web.sessions import finished_series
from rtsc.web.state import ScannerState, local_day

log = logging.getLogger(__name__)

#: Seconds the feed waits for a snapshot reply.
SNAPSHOT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Source:
    """A resolved source: what to connect to, and how.

    Attributes
    ----------
    name : str
    endpoint : str, PUB endpoint
    snapshot_endpoint : str or None
    session_dir : str or None
    curve : CurveClient or None
    """

    name: str
    endpoint: str
    snapshot_endpoint: str | None = None
    session_dir: str | None = None
    curve: CurveClient | None = None


def _connectable(endpoint: str) -> str:
    """A bind endpoint as a client reaches it on this host (``*``/0.0.0.0 -> 127.0.0.1)."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", endpoint)


def host_name() -> str:
    """This host's name as a scanner name (``local`` when it is not one)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64]
    return name if NAME_PATTERN.match(name) else "local"


def resolve_sources(config: Config) -> list[Source]:
    """``web.sources``, or the local publisher when it is empty.

    Raises
    ------
    RtscError
        The local publisher uses CURVE (``publish.curve_secret_key``) and
        ``web.curve_secret_key`` is null, or its endpoint has no port yet (``*``).
    """
    web = config.web

    def curve(server_key: str | None) -> CurveClient | None:
        if server_key is None or web.curve_secret_key is None:  # the second: checked at load
            return None
        return CurveClient(web.curve_secret_key, server_key)

    if web.sources:
        return [Source(s.name, s.endpoint, s.snapshot_endpoint, s.session_dir,
                       curve(s.curve_server_key)) for s in web.sources]
    publish = config.publish
    if publish.curve_secret_key is not None and web.curve_secret_key is None:
        raise RtscError("web.curve_secret_key: null, but the local publisher uses CURVE "
                        "(publish.curve_secret_key); give this view a key pair whose public "
                        "key is in publish.curve_clients_dir (rtsc keys DIR NAME)")
    endpoint = _connectable(publish.endpoint)
    if endpoint.endswith(":*"):
        raise RtscError(f"publish.endpoint: {publish.endpoint!r} has no fixed port; list "
                        "the publisher under web.sources instead")
    snapshot = _connectable(publish.snapshot_endpoint)
    # The server's .key_secret certificate holds its public key too.
    return [Source(host_name(), endpoint, None if snapshot.endswith(":*") else snapshot,
                   config.session.dir, curve(publish.curve_secret_key))]


class Feed:
    """Subscribes to every source and keeps their states.

    Parameters
    ----------
    sources : list of Source
    history : int, volumes kept per trace
    on_change : callable(name) or None, called on the feed thread after a scanner changed

    Attributes
    ----------
    states : name -> ScannerState (read them under :attr:`lock`)
    lock : threading.Lock
    """

    def __init__(self, sources: list[Source], history: int = 600,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.sources = {s.name: s for s in sources}
        self.states = {s.name: ScannerState(s.name, history) for s in sources}
        self.lock = threading.Lock()
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        """Start the feed thread; returns once every source is subscribed (and asked for
        its snapshot)."""
        self._thread = threading.Thread(target=self._run, name="rtsc-web-feed", daemon=True)
        self._thread.start()
        self._ready.wait()

    def close(self) -> None:
        """Stop the thread and close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "Feed":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fold(self, name: str, messages: list[Any]) -> bool:
        """Fold ``messages`` into scanner ``name`` (on any thread); True when it changed."""
        with self.lock:
            state = self.states[name]
            changed = False
            for message in messages:
                changed = state.fold(message) or changed
        return changed

    def _load_folders(self) -> None:
        day = local_day(time.time())
        for name, source in self.sources.items():
            if source.session_dir is None:
                continue
            entries = finished_series(source.session_dir, day)
            with self.lock:
                for entry in entries:
                    if entry.series not in self.states[name].finished:
                        self.states[name].add_finished(entry)
            log.info("%s: %d series finished today in %s", name, len(entries),
                     source.session_dir)

    def _subscribe(self, source: Source) -> Subscriber:
        sub = Subscriber(source.endpoint, curve=source.curve)
        if source.snapshot_endpoint is not None:
            try:
                snapshot = request_snapshot(source.snapshot_endpoint, SNAPSHOT_TIMEOUT_S,
                                            curve=source.curve)
            except (TimeoutError, MessageError) as exc:
                log.warning("%s: no snapshot from %s (%s); following it live",
                            source.name, source.snapshot_endpoint, exc)
            else:
                self.fold(source.name, snapshot)
        log.info("%s: subscribed to %s", source.name, source.endpoint)
        return sub

    def _run(self) -> None:
        subscribers: dict[str, Subscriber] = {}
        try:
            self._load_folders()
            for name, source in self.sources.items():
                subscribers[name] = self._subscribe(source)
        except Exception:
            log.exception("rtsc web: cannot subscribe")
            for sub in subscribers.values():
                sub.close()
            self._ready.set()
            raise
        self._ready.set()
        for name in subscribers:
            self._notify(name)
        poller = zmq.Poller()
        by_socket = {}
        for name, sub in subscribers.items():
            poller.register(sub.zmq_socket, zmq.POLLIN)
            by_socket[sub.zmq_socket] = name
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(200):
                    name = by_socket[sock]
                    if self._drain(name, subscribers[name]):
                        self._notify(name)
        finally:
            for sub in subscribers.values():
                sub.close()

    def _drain(self, name: str, sub: Subscriber) -> bool:
        """Fold every message waiting on ``sub``; a message that does not decode is logged."""
        messages = []
        while len(messages) < 1000:
            try:
                message = sub.receive(timeout_s=0)
            except MessageError as exc:
                log.warning("%s: a message did not decode: %s", name, exc)
                continue
            if message is None:
                break
            messages.append(message)
        return self.fold(name, messages)

    def _notify(self, name: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(name)
            except Exception:  # an observer: log, carry on
                log.exception("rtsc web: on_change(%s) failed", name)
