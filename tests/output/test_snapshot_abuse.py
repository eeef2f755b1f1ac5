"""The snapshot service under abuse (issue 16 item 5): garbage on the port, peers that
send requests and never read, and the cost of one request.

The publisher runs in its own process (tests/snapshot_server.py: 300 volume messages
and two 64x64x36 maps, a ~3.5 MB snapshot), so its memory can be measured and the
abusers below share no interpreter with it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zmq

from rtsc.client import request_snapshot
from rtsc.output.publish import Publisher

TESTS = Path(__file__).resolve().parents[1]
N_VOLUMES = 300
#: Each legitimate request must be answered within this (seconds): a quiet request takes
#: ~0.05 s (most of it decoding 300 headers on the client), so 3 s leaves room for the
#: shared two-core test machine without hiding a request that waited for garbage.
ANSWER_BOUND_S = 3.0
#: The publisher's memory growth allowed while a peer holds 300 unread requests, or while
#: the garbage flood goes on. One snapshot reply is ~3.5 MB: unbounded, 300 queued copies
#: were ~1 GB; with every reply sharing one copy, but a thousand of them queued per peer
#: (libzmq's default), 17 MB.
RSS_GROWTH_BOUND_MB = 10.0


@dataclass
class Server:
    """A snapshot_server.py subprocess."""

    proc: subprocess.Popen
    endpoint: str
    snapshot_endpoint: str
    pid: int

    def rss_mb(self) -> float:
        """Resident memory of the publisher process, MB (from /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def publish_volume(self) -> None:
        """Make the publisher publish one more volume (and wait until it has)."""
        assert self._ask("volume") == "ok"

    def stats(self) -> dict[str, int]:
        """The publisher's :attr:`~rtsc.output.publish.Publisher.snapshot_stats`."""
        return json.loads(self._ask("stats"))

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return _readline(self.proc, 30)


class PeakRss:
    """The highest resident memory of a process, sampled every 20 ms until :meth:`close`."""

    def __init__(self, server: Server) -> None:
        self.peak_mb = server.rss_mb()
        self._server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._server.rss_mb())

    def close(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "snapshot_server.py said nothing"
    return proc.stdout.readline().strip()


@pytest.fixture
def server():
    if not Path("/proc/self/status").exists():
        pytest.skip("measures memory through /proc")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(TESTS / "snapshot_server.py"), str(N_VOLUMES)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(_readline(proc, 120))
        yield Server(proc, info["endpoint"], info["snapshot_endpoint"], info["pid"])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _timed_requests(endpoint: str, n: int, gap_s: float = 0.0) -> list[float | None]:
    """``n`` requests, ``gap_s`` apart: each one's time to answer, None if unanswered."""
    times: list[float | None] = []
    for _ in range(n):
        time.sleep(gap_s)
        t0 = time.monotonic()
        try:
            snapshot = request_snapshot(endpoint, timeout_s=ANSWER_BOUND_S)
        except TimeoutError:
            times.append(None)
            continue
        assert [s.topic for s in snapshot[:2]] == ["series.start", "volume"]
        assert sum(s.topic == "volume" for s in snapshot) >= N_VOLUMES
        times.append(time.monotonic() - t0)
    return times


def _non_reading_dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """A DEALER that will never read: its side buffers as little as possible, so what it
    is sent stays queued at the publisher (the worst case for the publisher)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.connect(endpoint)
    return sock


class Flood:
    """Garbage senders, each in a thread, until :meth:`close`."""

    def __init__(self, endpoint: str) -> None:
        self.host, port = endpoint.rsplit("//", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.endpoint = endpoint
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.stop = threading.Event()
        self.sent = {"raw": 0, "envelopes": 0, "huge": 0, "many_frames": 0}
        self.threads = [threading.Thread(target=self._loop, args=(f,), daemon=True)
                        for f in (self._raw, self._envelopes, self._huge, self._many_frames)]

    def start(self) -> "Flood":
        for thread in self.threads:
            thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        self.ctx.destroy(linger=0)

    def _loop(self, step: Callable[[np.random.Generator], None]) -> None:
        rng = np.random.default_rng(abs(hash(step.__name__)) % 2**32)
        while not self.stop.is_set():
            step(rng)

    def _raw(self, rng: np.random.Generator) -> None:
        """Random bytes straight onto the TCP port (no ZMTP greeting)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(rng.bytes(int(rng.integers(1, 65536))))
        except OSError:
            pass
        self.sent["raw"] += 1
        time.sleep(0.002)

    def _envelopes(self, rng: np.random.Generator) -> None:
        """Malformed requests from a DEALER that never reads its (error) replies."""
        sock = _non_reading_dealer(self.ctx, self.endpoint)
        bad = [[b"snapshot"], [b"", b"snapshot", b"extra"], [b"", b"bogus"], [b"", b""],
               [b"", b"", b"snapshot"], [b"x", b"", b"snapshot"], [b"snapshot", b""]]
        try:
            for _ in range(200):
                if self.stop.is_set():
                    break
                choice = int(rng.integers(0, len(bad) + 1))
                frames = bad[choice] if choice < len(bad) else \
                    [rng.bytes(int(rng.integers(0, 3000))) for _ in range(int(rng.integers(1, 5)))]
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    self.sent["envelopes"] += 1
                except zmq.Again:
                    time.sleep(0.01)
                time.sleep(0.0005)
        finally:
            sock.close()

    def _huge(self, rng: np.random.Generator) -> None:
        """16 MB frames."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        payload = rng.bytes(16 * 2**20)
        try:
            for _ in range(10):
                if self.stop.is_set():
                    break
                try:
                    sock.send_multipart([b"", payload], flags=zmq.NOBLOCK, copy=False)
                    self.sent["huge"] += 1
                except zmq.Again:
                    pass
                time.sleep(0.05)
        finally:
            sock.close()

    def _many_frames(self, rng: np.random.Generator) -> None:
        """A request word followed by 2000 small frames."""
        sock = _non_reading_dealer(self.ctx, self.endpoint)
        try:
            for _ in range(5):
                try:
                    sock.send_multipart([b"", b"snapshot"] + [b"y" * 100] * 2000,
                                        flags=zmq.NOBLOCK)
                    self.sent["many_frames"] += 1
                except zmq.Again:
                    pass
                time.sleep(0.02)
        finally:
            sock.close()


@pytest.mark.system
@pytest.mark.slow
def test_garbage_flood_does_not_cost_legitimate_requests(server):
    quiet = _timed_requests(server.snapshot_endpoint, 3)
    before_mb = server.rss_mb()
    peak = PeakRss(server)
    flood = Flood(server.snapshot_endpoint).start()
    try:
        time.sleep(0.5)  # the flood is under way before the first request
        times = _timed_requests(server.snapshot_endpoint, 30, gap_s=0.1)
    finally:
        flood.close()
        peak_mb = peak.close()
    stats = server.stats()
    answered = [t for t in times if t is not None]
    print(f"\nquiet: {[round(t, 3) for t in quiet if t]} s; under flood {len(answered)}/30 "
          f"answered, median {np.median(answered) if answered else float('nan'):.3f} s, "
          f"max {max(answered, default=float('nan')):.3f} s; garbage sent {flood.sent}; "
          f"publisher RSS {before_mb:.0f} MB, peak {peak_mb:.0f} MB; its counts {stats}")
    assert min(flood.sent.values()) > 0, flood.sent
    assert len(answered) == 30, f"{30 - len(answered)} of 30 requests unanswered"
    assert max(answered) < ANSWER_BOUND_S
    # The garbage reached the service (and was turned away there, or by libzmq).
    assert stats["dropped"] > 0 and stats["refused"] > 0
    assert peak_mb - before_mb < RSS_GROWTH_BOUND_MB
    # and the publisher still answers once the flood has stopped
    assert None not in _timed_requests(server.snapshot_endpoint, 2)


@pytest.mark.system
@pytest.mark.slow
def test_peer_that_never_reads_does_not_grow_the_publisher(server):
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        assert None not in _timed_requests(server.snapshot_endpoint, 2)  # built and served
        before = server.rss_mb()
        dealer = _non_reading_dealer(ctx, server.snapshot_endpoint)
        for _ in range(300):
            dealer.send_multipart([b"", b"snapshot"])
        time.sleep(3.0)  # what the publisher can send or queue, it has by now
        after_flood = server.rss_mb()
        # another client, asking while the 300 requests are unread, is served
        times = _timed_requests(server.snapshot_endpoint, 5)
        # and the next volume still reaches a new snapshot
        server.publish_volume()
        snapshot = request_snapshot(server.snapshot_endpoint, timeout_s=ANSWER_BOUND_S)
        after = server.rss_mb()
        stats = server.stats()
        dealer.close()
    finally:
        ctx.destroy(linger=0)
    print(f"\npublisher RSS before {before:.0f} MB, 300 unread requests later "
          f"{after_flood:.0f} MB, after 5 more requests and a volume {after:.0f} MB; "
          f"requests meanwhile {[round(t, 3) if t else None for t in times]} s; "
          f"its counts {stats}")
    assert None not in times
    assert sum(s.topic == "volume" for s in snapshot) == N_VOLUMES + 1
    assert after_flood - before < RSS_GROWTH_BOUND_MB
    assert after - before < RSS_GROWTH_BOUND_MB
    assert stats["undelivered"] > 250  # the DEALER's: beyond its queue, not even attempted


def test_snapshot_is_assembled_once_per_change():
    from snapshot_server import publish_run, volume_message

    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as pub:
        publish_run(pub, 50)
        assert pub.snapshot_stats["builds"] == 0  # nothing is assembled until someone asks
        t0 = time.monotonic()
        for _ in range(20):
            request_snapshot(pub.snapshot_endpoint)
        per_request = (time.monotonic() - t0) / 20
        assert pub.snapshot_stats["builds"] == 1
        pub.publish(volume_message(50, np.random.default_rng(0)), "abuse0123456")
        snapshots = [request_snapshot(pub.snapshot_endpoint) for _ in range(5)]
        assert pub.snapshot_stats["builds"] == 2
        assert all(sum(s.topic == "volume" for s in snap) == 51 for snap in snapshots)
    print(f"\n{per_request * 1e3:.1f} ms per request (50 volumes, two maps, client decode included)")
