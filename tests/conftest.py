"""Shared fixtures: configs on free loopback ports, a running service, a message collector."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from rtsc.client import Subscriber  # noqa: E402
from rtsc.config import Config, config_from_dict, merge  # noqa: E402
from rtsc.messages import Message  # noqa: E402
from rtsc.service.run import RunService  # noqa: E402


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def free_port() -> int:
    """A TCP port free on loopback now (for peers that need a port number up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config with free loopback ports, outputs under ``tmp_path`` and fast timeouts.

    No report.html (``session.report`` False): its process takes ~2 s of CPU after every
    series end, and the service's stop waits for it. The tests of the report turn it on
    (recorded_run, the patient-data and Chromium tests; `rtsc run`/demo subprocesses
    keep the default, on)."""
    base: dict[str, Any] = {
        "receiver": {"port": 0, "host": "127.0.0.1"},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"},
        "session": {"dir": str(tmp_path / "sessions"), "series_timeout_s": 20.0,
                    "report": False},
        "assembler": {"slice_timeout_s": 2.0},
        "simulator": {"n_volumes": 20, "speed": 0.0, "shape": [64, 64, 36]},
    }
    return config_from_dict(merge(base, sections))


class Collector:
    """Subscribes before a run and gathers every message in a background thread."""

    def __init__(self, endpoint: str) -> None:
        self.messages: list[Message] = []
        self.ended = threading.Event()
        self._sub = Subscriber(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._sub.receive(timeout_s=0.1)
            if message is None:
                continue
            self.messages.append(message)
            if message.topic == "series.end":
                self.ended.set()

    def topic(self, name: str) -> list[Message]:
        return [m for m in self.messages if m.topic == name]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close()


@pytest.fixture
def service_factory(tmp_path: Path):
    """Start RunService instances (with a Collector subscribed) and stop them afterwards."""
    started: list[tuple[RunService, Collector]] = []

    def start(**sections: dict[str, Any]) -> tuple[RunService, Collector]:
        service = RunService(make_config(tmp_path, **sections))
        service.start()
        collector = Collector(service.publisher.endpoint)
        # PUB/SUB joins asynchronously: wait until the subscription is live.
        import time

        time.sleep(0.3)
        started.append((service, collector))
        return service, collector

    yield start
    for service, collector in started:
        collector.close()
        service.stop()


# One recorded run for the whole session, shared by the display and report tests (a
# fixture imported into two test modules is recorded twice). Imported last: it uses the
# helpers above.
from display_streams import recorded_run  # noqa: E402, F401
from history_session import postgres_server, recorded_session  # noqa: E402, F401


# ---------------------------------------------------------------- simulator memo
# Many tests simulate the same run (the default seed, grid and motion of make_config),
# and the analytic phantom's 2 x 2 x 2 voxel averaging is most of a simulated volume's
# cost (~0.2 s at 64 x 64 x 36). simulator.bold.voxel_average is a pure function of
# the phantom, the (moved) voxel centres, the affine, the motion and the sub-sample
# count: its results are kept for the session (the same arrays, copied out), so a run
# simulated again is bit-identical and costs only its noise.
import hashlib  # noqa: E402
from collections import OrderedDict  # noqa: E402

import simulator.bold as _sim_bold  # noqa: E402
from simulator import _phantom_kernels  # noqa: E402
from simulator.phantom import BrainPhantom  # noqa: E402

_VOXEL_AVERAGE = _sim_bold.voxel_average
_SAMPLE_POINTS = _phantom_kernels.sample_points
_MEMO: OrderedDict = OrderedDict()
_MEMO_BYTES = [0]
_MEMO_LIMIT = 512 << 20  # 512 MiB: some 200 volumes of 64 x 64 x 36
_MEMO_STATS = {"hits": 0, "misses": 0}
_PHANTOM_ARRAYS = ("_center", "_rot", "_semi", "_texture_waves", "_blobs", "_layers",
                   "_fissure", "_intensities", "_activation_ball")


def _memo_voxel_average(phantom, xyz_head, affine, params, samples):
    if (samples <= 1 or type(phantom) is not BrainPhantom or "sample" in vars(phantom)
            or _phantom_kernels.sample_points is not _SAMPLE_POINTS
            or _sim_bold.BrainPhantom is not BrainPhantom):
        return _VOXEL_AVERAGE(phantom, xyz_head, affine, params, samples)
    h = hashlib.blake2b(digest_size=20)
    for name in _PHANTOM_ARRAYS:
        h.update(np.ascontiguousarray(getattr(phantom, name), dtype=np.float64).tobytes())
    for array in (xyz_head, affine, params):
        array = np.ascontiguousarray(array, dtype=np.float64)
        h.update(repr(array.shape).encode())
        h.update(array.tobytes())
    key = (h.digest(), int(samples))
    hit = _MEMO.get(key)
    if hit is not None:
        _MEMO.move_to_end(key)
        _MEMO_STATS["hits"] += 1
        return hit[0].copy(), hit[1].copy()
    _MEMO_STATS["misses"] += 1
    base, act = _VOXEL_AVERAGE(phantom, xyz_head, affine, params, samples)
    _MEMO[key] = (base.copy(), act.copy())
    _MEMO_BYTES[0] += base.nbytes + act.nbytes
    while _MEMO_BYTES[0] > _MEMO_LIMIT:
        _, (b, a) = _MEMO.popitem(last=False)
        _MEMO_BYTES[0] -= b.nbytes + a.nbytes
    return base, act


_sim_bold.voxel_average = _memo_voxel_average


def pytest_terminal_summary(terminalreporter):
    if _MEMO_STATS["hits"] or _MEMO_STATS["misses"]:
        terminalreporter.write_line(
            f"simulator voxel_average memo: {_MEMO_STATS['hits']} hits, "
            f"{_MEMO_STATS['misses']} misses, {_MEMO_BYTES[0] / 2**20:.0f} MiB kept")
