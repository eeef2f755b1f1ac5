"""DICOM C-STORE / C-ECHO receiver (pynetdicom SCP).

The store handler does only what the data path needs: read the SeriesInstanceUID,
write the dataset to the archive (fsync) and put an :class:`Incoming` on the queue.
Parsing pixels and assembling volumes happen on the pipeline worker.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from rtsc.config import ReceiverConfig
from rtsc.session import SessionStore

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
        Parsed lazily; None when the input could not be read as DICOM.
    path : Path or None
        Where the archived copy is.
    t_received : float
        When its last byte arrived, seconds since the epoch.
    source : str
        ``cstore`` or ``folder``.
    error : str or None
        Why the input is unusable (then ``dataset`` is None).
    """

    dataset: Dataset | None
    path: Path | None
    t_received: float
    source: str
    error: str | None = None


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges at once before each read.

    A sender that leaves Nagle's algorithm on (dcmtk's storescu by default) holds back
    the tail of each small PDU until the previous one is acknowledged; Linux delays
    that acknowledgement by up to 40 ms. Setting TCP_QUICKACK before every read (it
    does not persist) keeps single-slice series at network speed whatever the
    sender's socket options.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None:
            try:
                self.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass
        return super().recv(bufsize, flags)


class _QuickAckRequestHandler(RequestHandler):
    def handle(self) -> None:
        raw = self.request
        self.request = _QuickAckSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        super().handle()


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

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Accept every storage SOP class: what cannot be processed is still archived
        # (nothing lost) and reported by the assembler.
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, UNCOMPRESSED_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 16
        ae.network_timeout = 60
        return ae

    def start(self) -> None:
        """Bind and start serving in a background thread."""
        ae = self._make_ae()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        server = ae.make_server((self.config.host, self.config.port), evt_handlers=handlers,
                                server_class=ThreadedAssociationServer,
                                request_handler=_QuickAckRequestHandler)
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

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s (%s)", event.assoc.requestor.ae_title,
                 event.assoc.requestor.address)
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """Archive (fsync) then enqueue; never raises into pynetdicom."""
        t_received = time.time()
        try:
            payload = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - a handler must answer with a status
            log.exception("C-STORE: cannot encode the received dataset")
            return STATUS_CANNOT_UNDERSTAND
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            series_uid = str(dataset.SeriesInstanceUID)
        except Exception as exc:  # noqa: BLE001
            return self._refuse(payload, t_received, f"no readable SeriesInstanceUID ({exc})")
        try:
            path = self.store.archive(series_uid, payload)
        except OSError as exc:
            log.error("C-STORE: cannot archive (%s); answering out of resources", exc)
            return STATUS_OUT_OF_RESOURCES
        self.n_stored += 1
        self.out.put(Incoming(dataset, path, t_received, "cstore"))
        return STATUS_SUCCESS

    def _refuse(self, payload: bytes, t_received: float, reason: str) -> int:
        self.n_refused += 1
        try:
            path: Path | None = self.store.quarantine(payload)
        except OSError:
            path = None
        log.warning("C-STORE refused: %s; kept in %s", reason, path)
        self.out.put(Incoming(None, path, t_received, "cstore", error=reason))
        return STATUS_CANNOT_UNDERSTAND
