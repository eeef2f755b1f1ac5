"""Shared fixtures of the history tests (tests/history/; imported by the test modules,
not a conftest: a second conftest module would shadow tests/conftest.py's helpers): a recorded session of simulated series through a
real RunService (C-STORE in, messages out, the history in SQLite), and a real PostgreSQL
server from Debian's packages."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rtsc.config import Config, config_from_dict, merge, to_dict
from rtsc.messages import Message
from rtsc.service.run import RunService
from conftest import Collector, free_port, make_config  # noqa: F401 (re-exported)
from simulator.scanner import run_simulation

#: The simulated series of the session, in order: (seed, noise SD). The fifth is noisy
#: (tSNR far below the four before it); the last is normal again.
SERIES = ((1, 10.0), (2, 10.0), (3, 10.0), (4, 10.0), (5, 40.0), (6, 10.0))
N_VOLUMES = 16
HISTORY = {"min_series": 3, "norm_percentile": 10.0, "norm_min_volumes": 8}
SIMULATOR = dict(n_volumes=N_VOLUMES, shape=[32, 32, 12], voxel_size_mm=[6.0, 6.0, 8.0],
                 max_trans_mm=0.5, max_rot_deg=0.5, n_jumps=1, activation_pct=0.0,
                 speed=0.0)


@dataclass
class RecordedSession:
    """Series run one after the other through one RunService.

    Attributes
    ----------
    config : Config of the service (its history in session.dir)
    series : list of str, the series ids in run order
    messages : list of Message, everything published
    tmp : Path, the session's folder
    """

    config: Config
    series: list[str]
    messages: list[Message]
    tmp: Path

    def of(self, series: str, topic: str) -> list[dict[str, Any]]:
        return [m.header for m in self.messages
                if m.topic == topic and m.header["series"] == series]


def run_series(config: Config, tmp: Path, plan: tuple[tuple[int, float], ...],
               first_number: int = 1) -> tuple[list[str], list[Message]]:
    """Send each (seed, noise) series of ``plan`` over C-STORE to a fresh RunService on
    ``config``; wait for each series.end; return the series ids and the messages."""
    service = RunService(config)
    service.start()
    collector = Collector(service.publisher.endpoint)
    time.sleep(0.3)  # PUB/SUB joins asynchronously
    try:
        for k, (seed, noise) in enumerate(plan):
            sim = config_from_dict(merge(to_dict(config), {"simulator": dict(
                SIMULATOR, seed=seed, noise_sigma=noise)})).simulator
            result = run_simulation(sim, send_to=("127.0.0.1", service.receiver.port),
                                    truth_dir=tmp / f"truth{first_number + k}",
                                    series_number=first_number + k)
            assert result.failures == 0
            assert collector.ended.wait(60)
            collector.ended.clear()
    finally:
        collector.close()
        service.stop()
    ends = [m.header["series"] for m in collector.messages if m.topic == "series.end"]
    assert len(ends) == len(plan)
    return ends, list(collector.messages)


@pytest.fixture(scope="session")
def recorded_session(tmp_path_factory) -> RecordedSession:
    """The SERIES through one RunService with the default SQLite history (about 15 s)."""
    tmp = tmp_path_factory.mktemp("history_session")
    config = make_config(tmp, history=HISTORY, session={"report": False})
    series, messages = run_series(config, tmp, SERIES)
    return RecordedSession(config, series, messages, tmp)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL server: its own cluster in a temporary folder, listening
    only on a unix socket there."""

    bin: Path
    root: Path
    port: int
    user: str

    @property
    def url(self) -> str:
        return (f"postgresql+psycopg://rtsc@/postgres?host={self.root}&port={self.port}")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=60,
                              check=False)


@pytest.fixture(scope="session")
def postgres_server():
    """Start PostgreSQL (Debian's postgresql package: initdb and pg_ctl) on a unix socket
    in a temporary folder, as the unprivileged user ``nobody`` when the tests run as
    root; stop it and remove the folder afterwards."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL server binaries missing: run scripts/system-deps.sh "
                    "(Debian package postgresql)")
    root = Path(tempfile.mkdtemp(prefix="rtsc-pg-"))
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        shutil.chown(root, user=user)
    server = PostgresServer(bin_dir, root, free_port(), user)
    done = server.run("initdb", "-D", str(root / "data"), "-U", "rtsc", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
    assert done.returncode == 0, done.stderr
    done = server.run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                      "-o", f"-k {root} -p {server.port} -c listen_addresses='' -c fsync=off",
                      "start")
    assert done.returncode == 0, done.stderr + (root / "log").read_text()
    try:
        yield server
    finally:
        server.run("pg_ctl", "-D", str(root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
