"""`rtsc bridge`: every feedback value as a text line over UDP and TCP, from a real
publisher to real sockets, the bridge in its own process."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from conftest import free_port
from rtsc import bridge as bridge_module
from rtsc import messages
from rtsc.bridge import Bridge, feedback_line, parse_host_port
from rtsc.cli import main
from rtsc.errors import RtscError
from rtsc.messages import Message
from rtsc.output.publish import Publisher
from rtsc_subprocess import rtsc_command

PROBE = 100000  # index of the messages sent until every receiver is connected


def test_the_line_is_index_value_latency_ms():
    def line(value, latency_s=0.0042, index=7):
        header = {"index": index, "feedback": value, "latency_s": latency_s}
        return feedback_line(Message(messages.TOPIC_FEEDBACK, header))

    assert line(1.23456789012) == b"7 1.23456789 4.200\n"
    assert line(-0.5, 0.0123456) == b"7 -0.5 12.346\n"
    assert line(None) == b"7 nan 4.200\n"
    assert line(float("nan")) == b"7 nan 4.200\n"
    assert line(2.5e-12, index=0) == b"0 2.5e-12 4.200\n"
    index, value, latency = line(0.1).split()  # what MATLAB's sscanf('%d %f %f') reads
    assert (int(index), float(value), float(latency)) == (7, 0.1, 4.2)


@pytest.mark.parametrize("text", ["localhost", "host:", ":5000", "host:0", "host:70000",
                                  "host:port"])
def test_a_bad_udp_target_names_the_option_and_the_form(text):
    with pytest.raises(RtscError, match=r"--udp .*HOST:PORT"):
        parse_host_port(text, "--udp")


def test_host_port_forms():
    assert parse_host_port("127.0.0.1:5000", "--udp") == ("127.0.0.1", 5000)
    assert parse_host_port("[::1]:5000", "--udp") == ("::1", 5000)
    assert parse_host_port("stim-pc.local:6000", "--udp") == ("stim-pc.local", 6000)


def test_bridge_without_a_target_is_a_usage_error(capsys):
    assert main(["bridge", "--endpoint", "tcp://127.0.0.1:1"]) == 2
    assert "--udp HOST:PORT, --tcp PORT" in capsys.readouterr().err
    assert main(["bridge", "--udp", "nohost", "--endpoint", "tcp://127.0.0.1:1"]) == 2
    assert "--udp 'nohost'" in capsys.readouterr().err


class _Lines:
    """Lines received on one socket, by a thread (UDP datagrams or a TCP stream)."""

    def __init__(self, sock: socket.socket, stream: bool, stop_after: int | None = None):
        self.sock, self.stream, self.stop_after = sock, stream, stop_after
        self.lines: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = b""
        self.sock.settimeout(20)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                if not self.stream:
                    self.lines.append(data)
                else:
                    buffer += data
                    *whole, buffer = buffer.split(b"\n")
                    self.lines.extend(w + b"\n" for w in whole)
                if self.stop_after is not None and len(self.real()) >= self.stop_after:
                    self.sock.close()  # a stimulus program that quits mid-run
                    return
        except OSError:
            return

    def real(self) -> list[bytes]:
        return [line for line in self.lines if int(line.split()[0]) < PROBE]

    def probed(self) -> bool:
        return any(int(line.split()[0]) >= PROBE for line in self.lines)


def _publish_until(publisher: Publisher, receivers: list[_Lines], timeout_s: float = 20):
    """Probe messages until each receiver got one (PUB/SUB joins asynchronously)."""
    deadline = time.monotonic() + timeout_s
    k = 0
    while not all(r.probed() for r in receivers):
        assert time.monotonic() < deadline, "the bridge forwarded nothing"
        publisher.publish(messages.feedback(PROBE + k, time.time(), 0.0, {}), "s")
        k += 1
        time.sleep(0.05)


def test_every_value_reaches_udp_and_every_tcp_client_in_order(tmp_path):
    """A real publisher, `rtsc bridge` in its own process, a UDP socket and three TCP
    clients, one of which quits after 10 lines: the UDP socket and the staying clients
    get every value (a missing one as nan) in order, with the message's latency."""
    publisher = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    publisher.start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp_port = free_port()
    proc = subprocess.Popen(
        [*rtsc_command(), "bridge", "--endpoint", publisher.endpoint, "--udp",
         f"127.0.0.1:{udp.getsockname()[1]}", "--tcp", str(tcp_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        banner = proc.stdout.readline()
        assert "rtsc bridge: feedback from" in banner and f":{tcp_port}" in banner, banner
        received = [_Lines(udp, stream=False)]
        for stop_after in (None, 10, None):
            client = socket.create_connection(("127.0.0.1", tcp_port), timeout=10)
            received.append(_Lines(client, stream=True, stop_after=stop_after))
        _publish_until(publisher, received)
        values = [0.25 * i - 3.0 for i in range(60)]
        values[5] = None  # no value for this volume
        sent = []
        for i, value in enumerate(values):
            header = publisher.publish(
                messages.feedback(i, time.time(), value, {"target": value}), "s")
            sent.append(feedback_line(Message(messages.TOPIC_FEEDBACK, header)))
            time.sleep(0.005)
        deadline = time.monotonic() + 20
        while any(len(r.real()) < len(values) for r in (received[0], received[1],
                                                        received[3])):
            assert time.monotonic() < deadline, [len(r.real()) for r in received]
            time.sleep(0.02)
        for r in (received[0], received[1], received[3]):
            assert r.real() == sent
        assert received[2].real() == sent[:10]
        assert sent[5].split()[:2] == [b"5", b"nan"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        publisher.close()
        udp.close()
    assert proc.returncode == 0, out
    assert "feedback values forwarded" in out


def test_a_client_that_does_not_read_is_dropped_and_the_others_go_on(monkeypatch):
    """A TCP client that never reads fills its queue (here 4 kB) and is dropped; the
    client beside it gets every line, and the bridge never waits for either."""
    monkeypatch.setattr(bridge_module, "MAX_PENDING_BYTES", 4096)
    publisher = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    publisher.start()
    stop = threading.Event()
    bridge = Bridge(publisher.endpoint, tcp=("127.0.0.1", 0))
    worker = threading.Thread(target=bridge.run, args=(stop.is_set,), daemon=True)
    worker.start()
    try:
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.connect(bridge.tcp_address)
        reader = _Lines(socket.create_connection(bridge.tcp_address), stream=True)
        deadline = time.monotonic() + 20
        while bridge.n_clients < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _publish_until(publisher, [reader])
        n = 20000  # ~0.4 MB of lines: far past what the silent client's buffers hold
        for i in range(n):
            publisher.publish(messages.feedback(i, time.time(), float(i), {}), "s")
        while len(reader.real()) < n:
            assert time.monotonic() < deadline + 40, len(reader.real())
            time.sleep(0.05)
        assert [int(line.split()[0]) for line in reader.real()] == list(range(n))
        assert bridge.n_dropped_clients == 1 and bridge.n_clients == 1
        silent.close()
    finally:
        stop.set()
        worker.join(5)
        bridge.close()
        publisher.close()
