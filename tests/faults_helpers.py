"""Helpers for the fault-injection tests: a paced sender that counts acknowledgements,
and `rtsc run` / `rtsc display` as subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rtsc.config import config_from_dict
from simulator.dicom_series import new_series_info
from simulator.scanner import datasets, make_plan
from simulator.sender import SendError, send_series


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sent:
    """What a background send got acknowledged."""

    series_uid: str
    acked_volumes: list[int] = field(default_factory=list)
    n_acked_files: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def send_in_background(port: int, n_volumes: int, tr_s: float = 2.0, speed: float = 0.0,
                       shape=(32, 32, 12), fmt: str = "mosaic", series_number: int = 1,
                       info=None, pregenerate: bool = False) -> Sent:
    """Send a simulated series in a thread; ``acked_volumes`` grows as volumes are acknowledged.

    ``info`` (a simulator SeriesInfo) resends a series with the same UIDs."""
    sim = config_from_dict({"simulator": {"shape": list(shape), "voxel_size_mm": [6.0, 6.0, 9.0],
                                          "n_volumes": n_volumes, "tr_s": tr_s,
                                          "format": fmt}}).simulator
    plan = make_plan(sim)
    if info is None:
        info = new_series_info(series_number, tr_s, n_volumes=n_volumes, start_time=time.time())
    sent = Sent(info.series_uid)
    sent.info = info  # type: ignore[attr-defined]
    files_per_volume = 1 if fmt == "mosaic" else shape[2]

    def on_sent(index: int) -> None:
        sent.acked_volumes.append(index)

    stream = list(datasets(plan, info, fmt)) if pregenerate else datasets(plan, info, fmt)

    def run() -> None:
        try:
            report = send_series(stream, "127.0.0.1", port, tr_s=tr_s,
                                 speed=speed, on_sent=on_sent)
            sent.n_acked_files = report.n_sent
        except SendError as exc:
            sent.error = str(exc)
            sent.n_acked_files = exc.report.n_sent if exc.report else \
                len(sent.acked_volumes) * files_per_volume
        finally:
            sent.done.set()

    threading.Thread(target=run, daemon=True).start()
    return sent


@dataclass
class RunProcess:
    proc: subprocess.Popen
    port: int
    pub: str
    snapshot: str
    log_path: Path
    config_path: Path
    session_dir: Path


def start_rtsc_run(tmp_path: Path, name: str = "run", session_dir: Path | None = None,
                   port: int | None = None, **sections) -> RunProcess:
    """`rtsc run` on free ports, waiting until it listens."""
    port = port or free_port()
    pub, snap = free_port(), free_port()
    session_dir = session_dir or tmp_path / "sessions"
    cfg = {"receiver": {"port": port},
           "publish": {"endpoint": f"tcp://127.0.0.1:{pub}",
                       "snapshot_endpoint": f"tcp://127.0.0.1:{snap}"},
           "session": {"dir": str(session_dir), "report": False, "series_timeout_s": 30.0},
           **sections}
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / f"{name}.log"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rtsc.cli", "run", "--config",
                                 str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while "Ctrl-C to stop" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()
        assert time.time() < deadline, "rtsc run did not start"
        time.sleep(0.1)
    return RunProcess(proc, port, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{snap}", log_path,
                      cfg_path, session_dir)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
