"""Bridge benchmark: how much later a feedback value arrives as a text line (`rtsc bridge`
over UDP and TCP) than as the ZeroMQ message itself.

A publisher in this process sends ``--messages`` feedback messages every ``--interval``
seconds; ``rtsc bridge`` runs in its own process (this tree's code) with a UDP target
and a TCP listener; in this process a plain ZeroMQ subscriber (the anchor: what a Python
client gets), a UDP socket and a TCP client each note the arrival time of every value
(threads, one per socket; the same clock). Printed per transport: values delivered,
median / p99 / max of (line arrival - the same value's ZeroMQ arrival) and of (line
arrival - publication), ms. Issue 19's target: every value within 5 ms of the ZeroMQ
message. ``--load`` keeps one core busy with a second process.

Usage: python benchmarks/bridge.py [--messages 1000] [--interval 0.02] [--load]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtsc import messages  # noqa: E402
from rtsc.client import Subscriber  # noqa: E402
from rtsc.output.publish import Publisher  # noqa: E402

PROBE = 1_000_000  # indices of the messages sent until every receiver is connected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Arrivals:
    """Arrival time (time.time()) of each volume index on one receiver, by a thread."""

    def __init__(self, read) -> None:
        self.at: dict[int, float] = {}
        self._read = read
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for index in self._read():
            self.at.setdefault(index, time.time())

    def probed(self) -> bool:
        return any(i >= PROBE for i in self.at)


def udp_indices(sock: socket.socket):
    while True:
        try:
            data = sock.recv(4096)
        except OSError:
            return
        yield int(data.split()[0])


def tcp_indices(sock: socket.socket):
    buffer = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield int(line.split()[0])


def zmq_indices(subscriber: Subscriber):
    while True:
        message = subscriber.receive(timeout_s=1.0)
        if message is not None:
            yield int(message.header["index"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between values")
    parser.add_argument("--load", action="store_true", help="one core kept busy meanwhile")
    args = parser.parse_args()

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.load else None
    publisher = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    publisher.start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tcp_port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bridge = subprocess.Popen(
        [sys.executable, "-m", "rtsc.cli", "--log-level", "WARNING", "bridge", "--endpoint",
         publisher.endpoint, "--udp", f"127.0.0.1:{udp.getsockname()[1]}", "--tcp",
         str(tcp_port)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        bridge.stdout.readline()  # the banner: listening
        subscriber = Subscriber(publisher.endpoint, topics=[messages.TOPIC_FEEDBACK])
        client = socket.create_connection(("127.0.0.1", tcp_port))
        receivers = {"zmq": Arrivals(lambda: zmq_indices(subscriber)),
                     "udp": Arrivals(lambda: udp_indices(udp)),
                     "tcp": Arrivals(lambda: tcp_indices(client))}
        k = 0
        while not all(r.probed() for r in receivers.values()):
            publisher.publish(messages.feedback(PROBE + k, time.time(), 0.0, {}), "bench")
            k += 1
            time.sleep(0.05)
        published: dict[int, float] = {}
        next_at = time.monotonic()
        for i in range(args.messages):
            header = publisher.publish(
                messages.feedback(i, time.time(), 0.01 * i, {"roi": 0.01 * i}), "bench")
            published[i] = header["t_published"]
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(1.0)
    finally:
        bridge.terminate()
        bridge.communicate(timeout=20)
        publisher.close()
        if spinner is not None:
            spinner.kill()
    zmq_at = receivers["zmq"].at
    print(f"rtsc bridge: {args.messages} feedback values every {args.interval * 1000:g} ms"
          f"{', one core kept busy by another process' if args.load else ''}; "
          f"ms, median / p99 / max")
    print(f"{'transport':>9}  {'delivered':>9}  {'after the ZeroMQ message':>26}  "
          f"{'after publication':>22}")
    anchor = np.array([zmq_at[i] - published[i] for i in published if i in zmq_at]) * 1e3
    print(f"{'zmq':>9}  {len(anchor):>9}  {'(the anchor)':>26}  "
          f"{np.median(anchor):6.3f} / {np.percentile(anchor, 99):6.3f} / {anchor.max():6.3f}")
    for name in ("udp", "tcp"):
        at = receivers[name].at
        both = [i for i in published if i in at and i in zmq_at]
        late = np.array([at[i] - zmq_at[i] for i in both]) * 1e3
        since = np.array([at[i] - published[i] for i in both]) * 1e3
        print(f"{name:>9}  {len(both):>9}  {np.median(late):6.3f} / {np.percentile(late, 99):6.3f}"
              f" / {late.max():6.3f}    {np.median(since):6.3f} / "
              f"{np.percentile(since, 99):6.3f} / {since.max():6.3f}")
        missing = [i for i in published if i not in at]
        if missing:
            print(f"{name:>9}  missing: {len(missing)} values (first {missing[:5]})")
    print(f"target: every value within 5 ms of the ZeroMQ message; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
