"""CURVE on the publisher: the right client keys receive; wrong or no keys receive nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
import time

import pytest

from rtsc import messages
from rtsc.client import FeedbackReader, Subscriber, request_snapshot
from rtsc.config import config_from_dict
from rtsc.curve import CurveClient, CurveServer, create_pair
from rtsc.errors import RtscError
from rtsc.output.publish import Publisher


@pytest.fixture
def keys(tmp_path):
    server_pub, server_secret = create_pair(tmp_path / "server", "server")
    allowed_pub, allowed_secret = create_pair(tmp_path / "clients", "display")
    _, stranger_secret = create_pair(tmp_path / "strangers", "stranger")
    return {"server": CurveServer(str(server_secret), str(tmp_path / "clients")),
            "good": CurveClient(str(allowed_secret), str(server_pub)),
            "wrong": CurveClient(str(stranger_secret), str(server_pub)),
            "server_pub": server_pub}


@pytest.fixture
def publisher(keys):
    pub = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=keys["server"])
    pub.start()
    stop = threading.Event()

    def keep_publishing():
        n = 0
        while not stop.is_set():
            pub.publish(messages.alert("info", "tick", f"tick {n}", n), "s1")
            n += 1
            time.sleep(0.02)

    thread = threading.Thread(target=keep_publishing, daemon=True)
    thread.start()
    yield pub
    stop.set()
    thread.join()
    pub.close()


def _received(sub: Subscriber, wait_s: float) -> int:
    n, deadline = 0, time.time() + wait_s
    while time.time() < deadline:
        if sub.receive(timeout_s=0.1) is not None:
            n += 1
    return n


@pytest.mark.slow
def test_right_keys_receive_wrong_or_none_receive_nothing(publisher, keys):
    good = Subscriber(publisher.endpoint, curve=keys["good"])
    wrong = Subscriber(publisher.endpoint, curve=keys["wrong"])
    plain = Subscriber(publisher.endpoint)
    try:
        assert _received(good, 1.5) > 10
        # The two that must receive nothing listen for the same 1.5 s, side by side
        # (each socket used by its own thread only).
        with ThreadPoolExecutor(2) as pool:
            counts = list(pool.map(lambda sub: _received(sub, 1.5), (wrong, plain)))
        assert counts == [0, 0]
    finally:
        for sub in (good, wrong, plain):
            sub.close()
    snapshot = request_snapshot(publisher.snapshot_endpoint, timeout_s=5, curve=keys["good"])
    assert snapshot and all(m.topic == "alert" for m in snapshot)
    with ThreadPoolExecutor(2) as pool:
        refused = [pool.submit(request_snapshot, publisher.snapshot_endpoint, timeout_s=1.5,
                               curve=keys["wrong"]),
                   pool.submit(request_snapshot, publisher.snapshot_endpoint, timeout_s=1.5)]
        for future in refused:
            with pytest.raises(TimeoutError):
                future.result()


def test_feedback_reader_with_keys(publisher, keys):
    with FeedbackReader(publisher.endpoint, curve=keys["good"]) as reader:
        # the reader subscribes to volume messages only: none are published here, but the
        # handshake succeeds, and the subscriber below (same keys) gets the alerts
        sub = Subscriber(publisher.endpoint, curve=keys["good"])
        assert _received(sub, 1.0) > 5
        sub.close()
        assert reader.latest() is None


def test_config_both_or_neither(tmp_path, keys):
    cfg = config_from_dict({"publish": {"curve_secret_key": str(tmp_path / "x")}})
    with pytest.raises(RtscError, match="give both"):
        CurveServer.from_config(cfg.publish)
    assert CurveServer.from_config(config_from_dict({}).publish) is None
    cfg = config_from_dict({"publish": {"curve_secret_key": str(keys["server_pub"]),
                                        "curve_clients_dir": str(tmp_path / "clients")}})
    bad = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                    curve=CurveServer.from_config(cfg.publish))
    with pytest.raises(RtscError, match="no secret key"):
        bad.start()


def test_default_endpoints_are_loopback():
    publish = config_from_dict({}).publish
    assert publish.endpoint.startswith("tcp://127.0.0.1:")
    assert publish.snapshot_endpoint.startswith("tcp://127.0.0.1:")
    assert publish.curve_secret_key is None


@pytest.mark.system
@pytest.mark.slow
def test_rtsc_keys_and_display_with_curve(tmp_path, service_factory):
    """`rtsc keys` makes the pairs; `rtsc display --curve-...` sees a CURVE run, without keys not."""
    import os
    import subprocess
    import sys

    from faults_helpers import send_in_background

    def rtsc(*args, timeout=120):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
        env.pop("DISPLAY", None)
        return subprocess.run([sys.executable, "-m", "rtsc.cli", *args], capture_output=True,
                              text=True, timeout=timeout, env=env)

    assert rtsc("keys", str(tmp_path / "server"), "server").returncode == 0
    assert rtsc("keys", str(tmp_path / "clients"), "display").returncode == 0
    service = None
    from conftest import make_config
    from rtsc.service.run import RunService

    config = make_config(tmp_path, publish={
        "curve_secret_key": str(tmp_path / "server" / "server.key_secret"),
        "curve_clients_dir": str(tmp_path / "clients")}, session={"report": False})
    service = RunService(config)
    service.start()
    try:
        sent = send_in_background(service.receiver.port, 6, speed=0.0)
        assert sent.done.wait(60) and sent.error is None
        time.sleep(1.0)
        endpoints = ["--endpoint", service.publisher.endpoint, "--snapshot-endpoint",
                     service.publisher.snapshot_endpoint]
        good = rtsc("display", "--headless", "--out", str(tmp_path / "good"), *endpoints,
                    "--exit-after-end", "--curve-secret",
                    str(tmp_path / "clients" / "display.key_secret"), "--curve-server-key",
                    str(tmp_path / "server" / "server.key"))
        assert good.returncode == 0, good.stderr
        assert "display ended after 6 volumes" in good.stderr
        try:
            rtsc("display", "--headless", "--out", str(tmp_path / "none"), *endpoints,
                 "--exit-after-end", timeout=8)
            raise AssertionError("a display without keys should have seen no series end")
        except subprocess.TimeoutExpired:
            pass
        assert not list((tmp_path / "none").glob("*.png"))
    finally:
        service.stop()
