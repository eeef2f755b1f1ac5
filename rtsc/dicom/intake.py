"""The inputs (C-STORE receiver, folder watcher) in a process of their own.

pynetdicom runs two Python threads per association that poll at 1 kHz, and answering a
C-STORE is Python work too. In the pipeline's process those threads compete with the
worker for the GIL: receiving a mosaic cost the worker 2-3 ms of waiting at 64x64x36
(the ``received -> assembled`` time was 3-5 ms against 1.4 ms of actual work). In a
child process they run on the other core and the worker never waits for them.

The child archives every dataset (fsync before success, as before) and forwards each
:class:`~rtsc.dicom.receiver.Incoming` and every log record over a ZeroMQ PUSH socket
to the PULL socket the pipeline worker reads (``ipc://``, unbounded queue: receiving
never blocks on the pipeline). Wire frames, all private to rtsc:

- ``[b"item", header JSON, payload]``: an input; ``payload`` is the encoded dataset
  without file meta (``kind: raw``), a whole Part 10 file (``kind: part10``), or empty.
- ``[b"log", record JSON]``: a log record of the child, re-emitted in the parent.
- ``[b"end"]``: the child has stopped its inputs and sent everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import zmq
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from rtsc.config import ReceiverConfig, WatcherConfig
from rtsc.errors import RtscError
from rtsc.dicom.receiver import Incoming
from rtsc.session import SessionStore

log = logging.getLogger(__name__)

FRAME_ITEM = b"item"
FRAME_LOG = b"log"
FRAME_END = b"end"

_META_KEYS = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0


# ---- wire encoding of inputs -------------------------------------------------------------

def encode_incoming(item: Incoming, series: str | None = None) -> list[bytes]:
    """Frames for one input.

    Parameters
    ----------
    item : Incoming
        ``dataset`` must be None: a parsed dataset does not cross the process boundary;
        inputs send ``raw`` (with ``file_meta``) or ``part10`` bytes.
    series : str or None
        Opaque series id of the archive folder ``item.path`` lies in.
    """
    if item.dataset is not None:
        raise ValueError("a parsed dataset cannot be forwarded; send raw or part10 bytes")
    header: dict[str, Any] = {
        "path": str(item.path) if item.path is not None else None,
        "t_received": item.t_received, "source": item.source, "error": item.error,
        "series": series, "kind": "none", "meta": None,
    }
    payload = b""
    if item.raw is not None:
        assert item.file_meta is not None
        header["kind"] = "raw"
        header["meta"] = {k: str(item.file_meta[k].value) for k in _META_KEYS
                          if k in item.file_meta}
        payload = item.raw
    elif item.part10 is not None:
        header["kind"] = "part10"
        payload = item.part10
    return [FRAME_ITEM, json.dumps(header).encode("utf-8"), payload]


def decode_incoming(header_frame: bytes, payload: bytes) -> tuple[Incoming, str | None]:
    """The :class:`Incoming` and series id encoded by :func:`encode_incoming`."""
    header = json.loads(header_frame)
    file_meta = None
    raw = part10 = None
    if header["kind"] == "raw":
        file_meta = FileMetaDataset()
        for key, value in header["meta"].items():
            setattr(file_meta, key, UID(value))
        raw = payload
    elif header["kind"] == "part10":
        part10 = payload
    path = Path(header["path"]) if header["path"] is not None else None
    item = Incoming(None, path, float(header["t_received"]), header["source"],
                    error=header["error"], raw=raw, file_meta=file_meta, part10=part10)
    return item, header["series"]


# ---- child side ----------------------------------------------------------------------------

class _Forwarder:
    """The ``out`` queue of the receiver and watcher in the child: sends each item on."""

    def __init__(self, socket: zmq.Socket, store: SessionStore) -> None:
        self._socket = socket
        self._store = store
        self._lock = threading.Lock()  # association threads and the watcher share it

    def put(self, item: Incoming) -> None:
        series = self._store.series_of(item.path.parent.parent) if item.path is not None \
            else None
        self.send(encode_incoming(item, series))

    def send(self, frames: list[bytes]) -> None:
        with self._lock:
            self._socket.send_multipart(frames, copy=len(frames[-1]) < 65536)


class _LogForwarder(logging.Handler):
    """Sends the child's log records to the parent, which emits them as its own."""

    def __init__(self, forwarder: _Forwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            data = {"name": record.name, "levelno": record.levelno,
                    "levelname": record.levelname, "msg": text, "created": record.created,
                    "threadName": record.threadName, "processName": "rtsc-intake"}
            self._forwarder.send([FRAME_LOG, json.dumps(data).encode("utf-8")])
        except Exception:  # noqa: BLE001 - logging must never break the inputs
            self.handleError(record)


def _child_main(receiver_config: ReceiverConfig | None, watcher_config: WatcherConfig | None,
                session_dir: str, endpoint: str, control_in: IO[str], control_out: IO[str],
                log_levels: dict[str, int]) -> None:
    """Run the inputs until the parent says stop (or its end of the pipe closes)."""
    from rtsc.dicom.receiver import Receiver
    from rtsc.dicom.watcher import FolderWatcher

    def tell(status: str, value: Any) -> None:
        control_out.write(json.dumps([status, value]) + "\n")
        control_out.flush()

    # Ctrl-C reaches the whole process group: the parent decides when inputs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)  # never block or drop: the parent's queue is unbounded
    push.setsockopt(zmq.LINGER, -1)
    push.connect(endpoint)
    store = SessionStore(session_dir)
    forwarder = _Forwarder(push, store)
    root = logging.getLogger()
    root.handlers[:] = [_LogForwarder(forwarder)]
    for name, level in log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    inputs: list[Any] = []
    try:
        if receiver_config is not None:
            inputs.append(Receiver(receiver_config, store, forwarder))
        if watcher_config is not None:
            inputs.append(FolderWatcher(watcher_config, store, forwarder))
        for source in inputs:
            source.start()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        for source in inputs:
            try:
                source.close()
            except Exception:  # noqa: BLE001
                pass
        tell("error", str(exc) if isinstance(exc, RtscError) else repr(exc))
        push.close()
        context.term()
        return
    tell("ready", inputs[0].port if receiver_config is not None else None)
    try:
        for line in control_in:  # EOF: the parent died; stop taking data nobody processes
            if line.strip() == "stop":
                break
    finally:
        for source in inputs:
            source.close()
        forwarder.send([FRAME_END])
        push.close()  # LINGER -1: returns once every frame has been handed over
        context.term()
        try:
            tell("stopped", None)
        except (BrokenPipeError, OSError):
            pass


def main() -> None:
    """``python -m rtsc.dicom.intake``: one JSON line of settings on stdin, then commands."""
    settings = json.loads(sys.stdin.readline())
    receiver = ReceiverConfig(**settings["receiver"]) if settings["receiver"] else None
    watcher = WatcherConfig(**settings["watcher"]) if settings["watcher"] else None
    _child_main(receiver, watcher, settings["session_dir"], settings["endpoint"], sys.stdin,
                sys.stdout, settings["log_levels"])


# ---- parent side ---------------------------------------------------------------------------

class IntakeProcess:
    """Starts and stops the input process; the parent reads its frames from ``endpoint``.

    Parameters
    ----------
    receiver : ReceiverConfig or None
        The C-STORE receiver's settings, or None for no receiver.
    watcher : WatcherConfig or None
        The folder watcher's, or None.
    session_dir : str
        ``session.dir``: the child archives there.
    endpoint : str
        The parent's bound PULL socket (``ipc://...``).
    """

    def __init__(self, receiver: ReceiverConfig | None, watcher: WatcherConfig | None,
                 session_dir: str, endpoint: str) -> None:
        self.receiver_config = receiver
        self.watcher_config = watcher
        self.session_dir = session_dir
        self.endpoint = endpoint
        self._process: subprocess.Popen[str] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The receiver's bound TCP port (useful when the config asks for port 0)."""
        if self._port is None:
            raise RuntimeError("receiver not started")
        return self._port

    def start(self) -> None:
        """Start the child and wait until its inputs listen.

        Raises
        ------
        RtscError
            The child's own error (e.g. the port is in use), or a start-up time-out.
        """
        settings = {
            "receiver": dataclasses.asdict(self.receiver_config) if self.receiver_config else None,
            "watcher": dataclasses.asdict(self.watcher_config) if self.watcher_config else None,
            "session_dir": self.session_dir, "endpoint": self.endpoint,
            "log_levels": {name: logging.getLogger(name or None).getEffectiveLevel()
                           for name in ("", "pynetdicom")},
        }
        # A plain interpreter, not multiprocessing: nothing of the parent (its threads,
        # ZeroMQ state, or a __main__ without a main guard) is carried into the child.
        package_root = str(Path(__file__).resolve().parents[2])  # this rtsc, installed or not
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        process = subprocess.Popen([sys.executable, "-m", "rtsc.dicom.intake"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   bufsize=1, env=env)
        self._process = process
        assert process.stdin is not None
        process.stdin.write(json.dumps(settings) + "\n")
        process.stdin.flush()
        status, value = self._read_status(_START_TIMEOUT_S)
        if status == "error":
            process.wait(10)
            self._process = None
            raise RtscError(value)
        if status != "ready":
            self._kill()
            raise RtscError(f"the input process did not start ({status}: {value})")
        self._port = value

    def _read_status(self, timeout_s: float) -> tuple[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            return "timeout", f"no answer within {timeout_s:g} s"
        line = stdout.readline()
        if not line:
            return "died", f"exit code {self._process.wait(10)}"
        status, value = json.loads(line)
        return str(status), value

    def stop(self) -> None:
        """Stop the inputs; returns once the child has sent everything and exited."""
        process = self._process
        if process is None:
            return
        try:
            assert process.stdin is not None
            process.stdin.write("stop\n")
            process.stdin.flush()
            self._read_status(_STOP_TIMEOUT_S)
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the input process did not stop; terminating it")
            self._kill()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        self._process = None

    @property
    def alive(self) -> bool:
        """True while the child runs."""
        return self._process is not None and self._process.poll() is None

    def _kill(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def reemit(record_frame: bytes) -> None:
    """Emit a log record forwarded by the child through the parent's logging."""
    data = json.loads(record_frame)
    record = logging.makeLogRecord(data)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def ipc_directory() -> str:
    """A new private (0700) directory for the input socket: only this user can connect.

    Under the temporary directory unless its path is too long for a Unix socket
    (107 bytes), then under /tmp.
    """
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="rtsc-", dir=base if len(base) < 64 else "/tmp")


def ipc_endpoint(directory: str) -> str:
    """The ``ipc://`` endpoint of the input socket in ``directory``."""
    return f"ipc://{directory}/intake.sock"


if __name__ == "__main__":
    main()
