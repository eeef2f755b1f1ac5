"""C-STORE sender of the simulated scanner: pushes a series to a storage SCP at scan pace.

One association carries the whole series. Volume n starts being sent at
``t0 + n * tr_s / speed`` (``t0`` = when the association was established); a volume
that is late (the previous one took longer than its slot) is sent at once and the
schedule is kept, as a scanner's acquisition clock does not wait for the network.
``speed`` 0 or ``math.inf`` means no pacing: as fast as the peer accepts.

Volumes are consumed lazily from the iterable, just before their slot, so a caller can
generate each volume on the fly with acquisition times that match the send time.

The sender sets TCP_NODELAY on its socket: a C-STORE is several small PDUs followed by
a wait for the response, which Nagle's algorithm and delayed ACKs would hold back by
~40 ms per instance.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association

logger = logging.getLogger(__name__)

_SUCCESS = 0x0000
_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
_MAX_CONTEXTS = 128


class SendError(Exception):
    """The association could not be established, or was lost while sending.

    Attributes
    ----------
    report : SendReport or None
        What had been sent before the failure, if anything.
    """

    def __init__(self, message: str, report: SendReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class SendFailure:
    """One C-STORE that did not end in Success.

    Attributes
    ----------
    volume : int
        0-based volume index.
    instance : str
        SOPInstanceUID of the dataset, or the file path for `send_files`.
    status : int or None
        DICOM status returned by the peer (warnings count as failures too); None if
        no valid response came back (the send then stops with `SendError`) or if the
        instance could not be sent at all (no accepted presentation context,
        unreadable file).
    message : str
        Human-readable cause.
    """

    volume: int
    instance: str
    status: int | None
    message: str


@dataclass
class SendReport:
    """Outcome of a send.

    Attributes
    ----------
    n_sent : int
        Instances stored with status Success (0x0000).
    n_failed : int
        Instances that got any other status, no response, or could not be sent.
    volume_send_times : list of (float, float)
        Per volume, epoch seconds (``time.time()``) when its first C-STORE request
        started and when its last response arrived.
    failures : list of SendFailure
        One entry per failed instance.
    """

    n_sent: int = 0
    n_failed: int = 0
    volume_send_times: list[tuple[float, float]] = field(default_factory=list)
    failures: list[SendFailure] = field(default_factory=list)

    @property
    def n_volumes(self) -> int:
        """Number of volumes whose sending was attempted."""
        return len(self.volume_send_times)


_Instance = Dataset | str | os.PathLike[str]


def send_series(
    volumes: Iterable[list[Dataset] | Dataset],
    host: str,
    port: int,
    called_ae: str = "RTSC",
    calling_ae: str = "RTSC_SIM",
    tr_s: float = 2.0,
    speed: float = 1.0,
    on_sent: Callable[[int], None] | None = None,
    delays_s: Mapping[int, float] | None = None,
    drop: Collection[int] = (),
) -> SendReport:
    """Send a series of MR image datasets over one association, paced like a scanner.

    Parameters
    ----------
    volumes : iterable of list of pydicom.Dataset
        Per volume, its datasets (nz single slices or one mosaic; a bare Dataset is
        taken as a one-item list). Each must be (Enhanced) MR Image Storage with a file_meta
        TransferSyntaxUID of Explicit or Implicit VR Little Endian (pynetdicom converts
        between the two if the peer accepted only one). Consumed lazily.
    host : str
        Storage SCP host.
    port : int
        Storage SCP TCP port.
    called_ae, calling_ae : str
        AE titles of the peer and of this sender.
    tr_s : float
        Repetition time, seconds (>= 0): volume n starts at ``t0 + n * tr_s / speed``.
    speed : float
        Pace multiplier (> 1 faster than real time). 0 or ``math.inf``: no pacing.
    on_sent : callable(int), optional
        Called with the volume index after each volume's last response.
    delays_s : mapping volume index -> seconds, optional
        Hold these volumes back by that much after their slot (or after the previous
        volume, when the sender is behind): a network or reconstruction stall. The
        schedule of the others is kept.
    drop : collection of volume indices, optional
        Volumes never sent (lost on the way).

    Returns
    -------
    SendReport

    Raises
    ------
    SendError
        The association was refused, rejected or aborted, or lost while sending
        (``.report`` then holds what was sent).
    ValueError
        Negative ``tr_s`` or ``speed``.
    """
    contexts = [(str(MRImageStorage), _UNCOMPRESSED), (str(EnhancedMRImageStorage), _UNCOMPRESSED)]
    return _send(_as_lists(volumes), contexts, host, port, called_ae, calling_ae,
                 tr_s, speed, on_sent, delays_s or {}, set(drop))


def send_files(
    paths: Iterable[str | os.PathLike[str]],
    host: str,
    port: int,
    called_ae: str = "RTSC",
    calling_ae: str = "RTSC_SIM",
    tr_s: float = 2.0,
    speed: float = 0.0,
    on_sent: Callable[[int], None] | None = None,
) -> SendReport:
    """Send DICOM Part 10 files over one association, in the given order.

    Consecutive files with the same (SeriesInstanceUID, AcquisitionNumber) form one
    volume for pacing and for ``on_sent``; files without AcquisitionNumber are a volume
    each. Presentation contexts are proposed for every SOP class found, with each
    file's own transfer syntax plus Explicit and Implicit VR Little Endian.

    Parameters
    ----------
    paths : iterable of path-like
        Files to send. Their headers are read once up front (to propose contexts);
        pixel data is read when each file is sent.
    host, port, called_ae, calling_ae, tr_s, on_sent
        As for `send_series`.
    speed : float
        As for `send_series`, but defaults to 0: as fast as possible.

    Returns
    -------
    SendReport

    Raises
    ------
    SendError
        As for `send_series`.
    ValueError
        Negative ``tr_s`` or ``speed``, or more SOP class / transfer syntax
        combinations than an association can propose.
    """
    headers = []
    for path in paths:
        hdr = pydicom.dcmread(path, stop_before_pixels=True)
        headers.append((Path(path), hdr))
    syntaxes: dict[str, list[str]] = {}
    for _, hdr in headers:
        wanted = syntaxes.setdefault(str(hdr.SOPClassUID), list(_UNCOMPRESSED))
        ts = hdr.file_meta.get("TransferSyntaxUID")
        if ts is not None and str(ts) not in wanted:
            wanted.insert(0, str(ts))
    if len(syntaxes) > _MAX_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes: at most {_MAX_CONTEXTS} per association")
    return _send(_group_files(headers), list(syntaxes.items()), host, port, called_ae,
                 calling_ae, tr_s, speed, on_sent)


# ------------------------------------------------------------------------- internals


def _as_lists(volumes: Iterable[list[Dataset] | Dataset]) -> Iterator[Sequence[_Instance]]:
    for vol in volumes:
        yield [vol] if isinstance(vol, Dataset) else vol


def _group_files(headers: list[tuple[Path, Dataset]]) -> Iterator[list[_Instance]]:
    group: list[_Instance] = []
    key: object = None
    for path, hdr in headers:
        acq = hdr.get("AcquisitionNumber")
        this = (hdr.get("SeriesInstanceUID"), acq) if acq not in (None, "") else object()
        if group and this != key:
            yield group
            group = []
        key = this
        group.append(path)
    if group:
        yield group


def _associate(contexts: list[tuple[str, list[str]]], host: str, port: int,
               called_ae: str, calling_ae: str) -> Association:
    ae = AE(ae_title=calling_ae)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    peer = f"{called_ae}@{host}:{port}"
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        # C-STORE writes several small PDUs and waits for the reply: without
        # TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms per instance.
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected.append(True)

    try:
        assoc = ae.associate(host, port, ae_title=called_ae,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    except (OSError, ValueError) as exc:
        raise SendError(f"cannot associate with {peer}: {exc}") from exc
    if assoc.is_established:
        logger.info("association established with %s", peer)
        _keep_responses_for_the_sender(assoc)
        return assoc
    if not connected:
        why = "could not be reached (connection refused or timed out)"
    elif assoc.is_rejected:
        why = "rejected the association (AE title not accepted?)"
    elif assoc.is_aborted:
        why = "aborted the association request"
    else:
        why = "did not answer the association request in time"
    raise SendError(f"{peer} {why}")


def _keep_responses_for_the_sender(assoc: Association) -> None:
    """Give a response the association's reactor took back to the DIMSE queue.

    pynetdicom's requestor reactor can take a C-STORE response off the queue before
    ``send_c_store`` waits for it (its pause flag is read between the reactor's wait
    and its reset: pynetdicom issue #875); it logs "Received unexpected C-STORE
    service message" and drops it, and the sender waits out the DIMSE timeout. Seen 1
    in 5 runs on a loaded 2-core machine. A requestor here serves no requests.
    """
    serve = assoc._serve_request

    def serve_or_requeue(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_requeue  # type: ignore[method-assign]


def _wait_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def _store(assoc: Association, item: _Instance, msg_id: int, volume: int,
           report: SendReport) -> None:
    """Send one instance and record its outcome; raise SendError if the link is lost."""
    uid = item.get("SOPInstanceUID", "") if isinstance(item, Dataset) else os.fspath(item)
    try:
        status = assoc.send_c_store(item if isinstance(item, Dataset) else Path(item),
                                    msg_id=msg_id)
    except RuntimeError as exc:  # pynetdicom: the association is no longer established
        raise SendError(f"association lost before volume {volume} was sent: {exc}",
                        report) from exc
    except (ValueError, AttributeError, OSError) as exc:  # no context, bad dataset
        report.n_failed += 1
        report.failures.append(SendFailure(volume, str(uid), None, f"not sent: {exc}"))
        logger.warning("volume %d instance %s not sent: %s", volume, uid, exc)
        return
    code = status.get("Status") if status else None
    if code == _SUCCESS:
        report.n_sent += 1
        return
    report.n_failed += 1
    msg = "no valid response" if code is None else f"status 0x{code:04X}"
    report.failures.append(SendFailure(volume, str(uid), code, msg))
    logger.warning("volume %d instance %s: %s", volume, uid, msg)
    if code is None or not assoc.is_established:
        # pynetdicom answers an empty status on abort, DIMSE timeout or a malformed
        # reply: the association cannot be trusted any more.
        raise SendError(f"association lost while sending volume {volume} ({msg})", report)


def _send(volumes: Iterable[Sequence[_Instance]], contexts: list[tuple[str, list[str]]],
          host: str, port: int, called_ae: str, calling_ae: str, tr_s: float,
          speed: float, on_sent: Callable[[int], None] | None,
          delays_s: Mapping[int, float] | None = None, drop: Collection[int] = ()
          ) -> SendReport:
    if tr_s < 0 or speed < 0 or math.isnan(speed) or math.isnan(tr_s):
        raise ValueError(f"tr_s and speed must be >= 0, got tr_s={tr_s}, speed={speed}")
    interval = 0.0 if speed == 0 or math.isinf(speed) else tr_s / speed
    report = SendReport()
    assoc = _associate(contexts, host, port, called_ae, calling_ae)
    ok = False
    try:
        t0 = time.monotonic()
        msg_id = 0
        delays_s = delays_s or {}
        for n, volume in enumerate(volumes):
            if n in drop:
                continue
            _wait_until(t0 + n * interval)
            if delays_s.get(n):  # held back after its slot, even when already behind
                time.sleep(delays_s[n])
            start = time.time()
            for item in volume:
                msg_id = msg_id % 65535 + 1
                _store(assoc, item, msg_id, n, report)
            report.volume_send_times.append((start, time.time()))
            logger.debug("volume %d sent in %.3f s", n, time.time() - start)
            if on_sent is not None:
                on_sent(n)
        ok = True
    finally:
        if ok and assoc.is_established:
            assoc.release()
        elif assoc.is_established:
            assoc.abort()
    logger.info("sent %d instances (%d failed) in %d volumes", report.n_sent,
                report.n_failed, report.n_volumes)
    return report
