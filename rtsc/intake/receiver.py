"""DICOM C-STORE / C-ECHO receiver (pynetdicom SCP).

The store handler does only what the data path needs: read the SeriesInstanceUID,
put an :class:`Incoming` on the queue, write the dataset to the archive (fsync) and
answer success only then. Parsing pixels and assembling volumes happen on the
pipeline worker, overlapping the fsync; an idle worker's dataset is answered once its
volume is published (``receiver.archive_wait_ms`` at most).

C-STORE requests are read and answered on each association's own thread by
:mod:`rtsc.intake.dataphase` (:meth:`Receiver._on_store_lean`); pynetdicom negotiates,
releases, aborts and serves everything else (C-ECHO; :meth:`Receiver._on_store` for a
C-STORE it is handed). Both handlers end in :meth:`Receiver._archive`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from rtsc.config import ReceiverConfig
from rtsc.dicom.incoming import Incoming
from rtsc.errors import RtscError
from rtsc.intake.access import AccessPolicy
from rtsc.intake.connections import PeerSocket, ReceiverServer, drop_connection
from rtsc.intake.encoded import TooLarge, inflate, peek_series_uid
from rtsc.intake.part10 import encode_header
from rtsc.output.session import SessionStore

log = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
MAX_PDU_BYTES = 1 << 20
# C-STORE requests in rtsc.intake.dataphase (the association's own thread); False: in
# pynetdicom's DUL and DIMSE providers, as before (kept as the reference in the tests).
LEAN_DATA_PHASE = True
# A-ASSOCIATE-RJ (result, source, reason): transient, service provider (presentation),
# local limit exceeded, as pynetdicom answers past its own limit.
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


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

    def __init__(self, config: ReceiverConfig, store: SessionStore,
                 out: "queue.Queue[Any]") -> None:
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
        # pynetdicom's DUL costs ~70 us of Python per PDU: at its default 16 kB a 2.4 MB
        # mosaic is 150 PDUs (10.7 ms of CPU per file on its thread), at 1 MB 3 (5.8 ms).
        ae.maximum_pdu_size = MAX_PDU_BYTES
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
                                    server_class=ReceiverServer, receiver_config=self.config,
                                    store_handler=(self._on_store_lean if LEAN_DATA_PHASE
                                                   else None),
                                    max_dataset_bytes=self._max_dataset_bytes)
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
                    drop_connection(assoc)
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
        that sends part of a PDU (see :class:`PeerSocket`).
        """
        sock = event.assoc.dul.socket
        peer = getattr(sock, "socket", None)
        if isinstance(peer, PeerSocket):
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
        """Enqueue, archive (fsync), then answer; never raises into pynetdicom.

        Nothing here decodes with pydicom: the file meta is packed from the request's
        UIDs (:mod:`rtsc.intake.part10`) and the archive is that header and the bytes
        as received; the worker decodes both.
        """
        t_received = time.time()
        try:
            request = event.request
            syntax = UID(event.context.transfer_syntax)
            header = encode_header(str(request.AffectedSOPClassUID),
                                   str(request.AffectedSOPInstanceUID), syntax)
            encoded = event.encoded_dataset(include_meta=False)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status
            return self._refuse(lambda: event.encoded_dataset(include_meta=True), t_received,
                                f"no readable file meta ({exc})")
        return self._archive(syntax, header, encoded, t_received,
                             lambda: event.encoded_dataset(include_meta=True))

    def _on_store_lean(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                       encoded: bytearray | None, n_bytes: int) -> int:
        """The C-STORE handler of :mod:`rtsc.intake.dataphase`: the same as
        :meth:`_on_store`, given the request's UIDs and the dataset's bytes as received
        (None when they passed ``receiver.max_dataset_mb``: not kept)."""
        t_received = time.time()
        if encoded is None:
            return self._too_large(f"dataset of {n_bytes} bytes exceeds")
        syntax = UID(transfer_syntax)
        try:
            header = encode_header(sop_class_uid, sop_instance_uid, syntax)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status
            return self._refuse(lambda: bytes(encoded), t_received,
                                f"no readable file meta ({exc})")
        return self._archive(syntax, header, encoded, t_received,
                             lambda: header + bytes(encoded))

    def _archive(self, syntax: UID, header: bytes, encoded: bytes | bytearray,
                 t_received: float, as_file: Callable[[], bytes]) -> int:
        """Check, enqueue, archive (fsync), wait; the status to answer.

        ``as_file`` gives the Part 10 bytes kept in quarantine when refused.
        """
        if len(encoded) > self._max_dataset_bytes:
            return self._too_large(f"dataset of {len(encoded)} bytes exceeds")
        raw: bytes | bytearray = encoded
        if syntax == DeflatedExplicitVRLittleEndian:
            # Inflated here, bounded: pynetdicom's event.dataset (and pydicom) inflate
            # whatever the sender compressed, 0.4 MB into 400 MB and more.
            try:
                raw = inflate(encoded, self._max_dataset_bytes)
            except TooLarge:
                return self._too_large(f"deflated dataset of {len(encoded)} bytes inflates "
                                       f"past")
            except zlib.error as exc:
                return self._refuse(as_file, t_received, f"cannot inflate the dataset ({exc})")
        try:
            series_uid = peek_series_uid(raw, syntax)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status
            return self._refuse(as_file, t_received, f"no readable SeriesInstanceUID ({exc})")
        try:
            path = self.store.reserve(series_uid)
        except OSError as exc:
            log.error("C-STORE: cannot create the archive folder (%s); out of resources", exc)
            return STATUS_OUT_OF_RESOURCES
        # Write, hand on, make durable, answer: success only once the file is durable
        # (if that fails the sender is told so and resends; the assembler drops the
        # duplicate). The hand-on comes between the write (into the page cache, ~0.1 ms
        # for a 72 kB slice) and the fsyncs of the file and its folder (~0.6 ms, system
        # calls that release the GIL): the worker decodes while this thread waits for
        # the disk. Handed on before the write with a yield of the GIL, the worker kept
        # the GIL for its whole decode and this thread waited for it (0.5 ms of the 2.3
        # per single slice, py-spy). To an idle worker the dataset goes with an event it
        # sets once the volume is published, and the answer waits for it: the sender's
        # next dataset, received alongside the processing, took the GIL and the core
        # from it (motion correction 2.9 -> 1.9 ms at 64x64x36 when the archiving
        # waited). A busy worker is not waited for.
        waiting = self.out.qsize()
        behind = waiting >= self.config.queue_in_memory
        processed = threading.Event() if waiting == 0 and self._archive_wait_s > 0 else None
        deadline = time.monotonic() + self._archive_wait_s
        try:
            written = self.store.write(path, (header, encoded))
            if not behind:
                self.out.put(Incoming(None, path, t_received, "cstore", raw=raw,
                                      header=header, processed=processed))
            written.commit()
        except OSError as exc:
            log.error("C-STORE: cannot archive %s (%s); answering out of resources", path, exc)
            return STATUS_OUT_OF_RESOURCES
        if processed is not None and not behind:
            processed.wait(max(deadline - time.monotonic(), 0.0))
        if behind:
            # The pipeline is behind: memory stays bounded, the worker reads the archived
            # file, handed on only now that it is complete at its final path.
            self.out.put(Incoming(None, path, t_received, "cstore", from_archive=True))
        self.n_stored += 1
        return STATUS_SUCCESS

    def _too_large(self, what: str) -> int:
        self.n_refused += 1
        log.warning("C-STORE refused: %s receiver.max_dataset_mb (%g MB); nothing archived",
                    what, self.config.max_dataset_mb)
        return STATUS_OUT_OF_RESOURCES

    def _refuse(self, as_file: Callable[[], bytes], t_received: float, reason: str) -> int:
        self.n_refused += 1
        path: Path | None = None
        try:
            path = self.store.quarantine(as_file())
        except Exception:  # noqa: BLE001 - keep what we can, answer regardless
            log.exception("C-STORE: cannot keep the refused dataset")
        log.warning("C-STORE refused: %s; kept in %s", reason, path)
        self.out.put(Incoming(None, path, t_received, "cstore", error=reason))
        return STATUS_CANNOT_UNDERSTAND
