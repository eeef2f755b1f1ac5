"""Message schema 1 (encode/decode, builders) and the live publisher / subscriber pair."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import zmq

from rtsc import messages as m
from rtsc.client import Subscriber, request_snapshot
from rtsc.errors import MessageError, RtscError
from rtsc.output.publish import Publisher

SERIES = "0123456789ab"
MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def _strict_json(raw: bytes) -> dict[str, Any]:
    """Parse JSON refusing NaN / Infinity (which Python's json accepts by default)."""
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {token}")
    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def _round_trip(message: m.Message) -> tuple[list[bytes], m.Message]:
    before = time.time()
    frames = m.encode(message, SERIES)
    after = time.time()
    decoded = m.decode(frames)
    header = decoded.header
    assert frames[0] == message.topic.encode("ascii")
    assert _strict_json(frames[1]) == header
    assert decoded.topic == message.topic
    assert header["schema"] == 1
    assert header["series"] == SERIES
    assert before <= header["t_published"] <= after
    assert len(header["arrays"]) == len(frames) - 2 == len(decoded.arrays)
    return frames, decoded


# ---- builders round trip -------------------------------------------------------------

def test_series_start_round_trip() -> None:
    msg = m.series_start((64, 64, 36), (3.0, 3.0, 3.5), 2.0, 120, "spinal_cord")
    frames, decoded = _round_trip(msg)
    h = decoded.header
    assert (h["shape"], h["voxel_size_mm"], h["tr_s"], h["n_expected"], h["mode"]) == \
        ([64, 64, 36], [3.0, 3.0, 3.5], 2.0, 120, "spinal_cord")
    assert h["arrays"] == [] and len(frames) == 2
    # Unknown length travels as null.
    _, decoded = _round_trip(m.series_start([8, 8, 4], [2, 2, 2], None, None, "brain"))
    assert decoded.header["n_expected"] is None and decoded.header["tr_s"] is None


def test_volume_round_trip_and_latency() -> None:
    t_received = time.time() - 0.25
    metrics = {"trans_x": np.float32(0.5), "rot_z": -0.01, "framewise_displacement": 0.7,
               "dvars": np.float64(12.5), "global_signal": 800.0, "outlier": np.bool_(True),
               "roi": {"m1": np.float32(1.5)}, "feedback": 0.25, "usable_frames": {0.2: 3},
               "stage_ms": {"register": 3.25}}
    msg = m.volume(7, t_received - 1.0, t_received, metrics, flags=("missing_slices",))
    _, decoded = _round_trip(msg)
    h = decoded.header
    assert h["index"] == 7
    assert h["t_acquired"] == t_received - 1.0 and h["t_received"] == t_received
    assert h["latency_s"] == pytest.approx(h["t_published"] - t_received, abs=1e-9)
    assert 0.25 <= h["latency_s"] < 5
    assert h["trans_x"] == 0.5 and h["rot_z"] == -0.01
    for name in ("trans_y", "trans_z", "rot_x", "rot_y", "std_dvars"):
        assert h[name] is None, name  # missing metrics are published as null
    assert h["framewise_displacement"] == 0.7 and h["dvars"] == 12.5
    assert h["global_signal"] == 800.0
    assert h["outlier"] is True
    assert h["roi"] == {"m1": 1.5} and h["feedback"] == 0.25
    assert h["usable_frames"] == {"0.2": 3}
    assert h["stage_ms"] == {"register": 3.25}
    assert h["flags"] == ["missing_slices"]


def test_volume_defaults() -> None:
    _, decoded = _round_trip(m.volume(0, None, time.time(), {}))
    h = decoded.header
    assert all(h[name] is None for name in MOTION)
    assert h["outlier"] is False and h["roi"] == {} and h["usable_frames"] == {}
    assert h["feedback"] is None and h["flags"] == [] and h["t_acquired"] is None


def test_non_finite_metrics_become_null() -> None:
    metrics = {"dvars": float("nan"), "std_dvars": np.float32(np.inf),
               "global_signal": -np.inf, "roi": {"a": np.nan, "b": 2.0},
               "slice_tsnr": np.array([1.0, np.nan, 3.0])}
    frames = m.encode(m.volume(1, None, time.time(), metrics), SERIES)
    assert b"NaN" not in frames[1] and b"Infinity" not in frames[1]
    header = _strict_json(frames[1])
    assert header["dvars"] is None and header["std_dvars"] is None
    assert header["global_signal"] is None
    assert header["roi"] == {"a": None, "b": 2.0}
    assert header["slice_tsnr"] == [1.0, None, 3.0]


def test_map_round_trip(rng: np.random.Generator) -> None:
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    data = np.asfortranarray(data)  # volumes are Fortran-ordered; the wire is C order
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.5]
    frames, decoded = _round_trip(m.map_message("t:tap - rest", affine, data, 9))
    h = decoded.header
    assert h["name"] == "t:tap - rest" and h["index"] == 9
    assert h["arrays"] == [{"dtype": "<f4", "shape": [4, 5, 6]}]
    np.testing.assert_array_equal(np.array(h["affine"]), affine)
    assert frames[2] == np.ascontiguousarray(data).tobytes()
    (out,) = decoded.arrays
    assert out.dtype == np.float32 and out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out, data)


def test_map_converts_to_float32() -> None:
    data = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    _, decoded = _round_trip(m.map_message("mean", np.eye(4), data, 0))
    assert decoded.arrays[0].dtype == np.float32
    np.testing.assert_array_equal(decoded.arrays[0], data)


def test_alert_round_trip() -> None:
    _, decoded = _round_trip(m.alert("critical", "motion", "FD 2.1 mm", 12))
    assert {k: decoded.header[k] for k in ("level", "code", "message", "index")} == \
        {"level": "critical", "code": "motion", "message": "FD 2.1 mm", "index": 12}
    _, decoded = _round_trip(m.alert("info", "bad_dicom", "no pixels"))
    assert decoded.header["index"] is None


def test_alert_refuses_bad_level() -> None:
    with pytest.raises(MessageError) as info:
        m.alert("fatal", "motion", "x")
    assert "fatal" in str(info.value)
    for level in ("info", "warning", "critical"):
        assert level in str(info.value)


def test_series_end_round_trip() -> None:
    summary = {"n_expected": 10, "missing_volumes": [3], "fd_mean": float("nan")}
    outputs = {"bold": "/s/bold.nii.gz", "qc": "/s/qc.json"}
    _, decoded = _round_trip(m.series_end(9, summary, outputs))
    h = decoded.header
    assert h["n_volumes"] == 9
    assert h["summary"] == {"n_expected": 10, "missing_volumes": [3], "fd_mean": None}
    assert h["outputs"] == outputs


# ---- decode refuses -------------------------------------------------------------------

def _map_frames() -> list[bytes]:
    return m.encode(m.map_message("mean", np.eye(4), np.ones((4, 5, 6), np.float32), 0), SERIES)


def test_decode_refuses_other_schema() -> None:
    frames = _map_frames()
    header = json.loads(frames[1])
    header["schema"] = 2
    with pytest.raises(MessageError, match="schema"):
        m.decode([frames[0], json.dumps(header).encode(), *frames[2:]])
    del header["schema"]
    with pytest.raises(MessageError, match="schema"):
        m.decode([frames[0], json.dumps(header).encode(), *frames[2:]])


def test_decode_refuses_non_json_header() -> None:
    with pytest.raises(MessageError):
        m.decode([b"volume", b"{schema: 1,"])
    with pytest.raises(MessageError):
        m.decode([b"volume", b"\xff\xfe"])
    with pytest.raises(MessageError, match="not a JSON object"):
        m.decode([b"volume", b"[1, 2]"])


def test_decode_refuses_wrong_buffer_size() -> None:
    frames = _map_frames()
    with pytest.raises(MessageError, match="bytes"):
        m.decode([frames[0], frames[1], frames[2][:-4]])
    with pytest.raises(MessageError, match="bytes"):
        m.decode([frames[0], frames[1], frames[2] + b"\0" * 4])


def test_decode_refuses_missing_or_extra_buffers() -> None:
    frames = _map_frames()
    with pytest.raises(MessageError, match="1 arrays but 0"):
        m.decode(frames[:2])
    with pytest.raises(MessageError, match="1 arrays but 2"):
        m.decode([*frames, frames[2]])


def test_decode_refuses_too_few_frames() -> None:
    with pytest.raises(MessageError):
        m.decode([b"volume"])
    with pytest.raises(MessageError):
        m.decode([])


@pytest.mark.parametrize("spec", [{"dtype": "nonsense", "shape": [2]}, {"dtype": "<f4"},
                                  {"dtype": "|O", "shape": [1]}, {"dtype": "<f4", "shape": [-1, -2]},
                                  "f4"])
def test_decode_refuses_malformed_array_spec(spec: Any) -> None:
    header = json.dumps({"schema": 1, "series": SERIES, "t_published": 0.0, "arrays": [spec]})
    with pytest.raises(MessageError):
        m.decode([b"map", header.encode(), b"\0" * 8])


def test_encode_refuses_unknown_topic() -> None:
    with pytest.raises(MessageError, match="topic"):
        m.encode(m.Message("volumes", {}), SERIES)


# ---- live: Publisher, Subscriber, snapshots ----------------------------------------------

@pytest.fixture
def publisher():
    pub = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    pub.start()
    try:
        yield pub
    finally:
        pub.close()


def _join(pub: Publisher, sub: Subscriber, timeout_s: float = 5.0) -> None:
    """Wait until the SUB socket receives from the PUB socket (publishing probe alerts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.publish(m.alert("info", "probe", "join"), "probe")
        got = sub.receive(timeout_s=0.05)
        if got is not None and got.topic == "alert" and got.header["code"] == "probe":
            _drain(sub)
            return
    raise AssertionError("subscriber never joined")


def _drain(sub: Subscriber, timeout_s: float = 0.2) -> list[m.Message]:
    """Everything that arrives until ``timeout_s`` passes in silence (probes dropped)."""
    out = []
    while (msg := sub.receive(timeout_s=timeout_s)) is not None:
        if not (msg.topic == "alert" and msg.header.get("code") == "probe"):
            out.append(msg)
    return out


def _publish_run(pub: Publisher, n: int, series: str = SERIES, first: int = 0) -> None:
    for i in range(first, first + n):
        pub.publish(m.volume(i, None, time.time(), {"global_signal": 100.0 + i}), series)


def test_publisher_binds_nothing_before_start() -> None:
    probe = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    probe.start()
    endpoint, snapshot = probe.endpoint, probe.snapshot_endpoint
    a = Publisher(endpoint, snapshot)  # the address is taken: constructing must not bind
    b = Publisher(endpoint, snapshot)
    assert a.endpoint == endpoint and b.n_published == 0
    with pytest.raises(RuntimeError, match="not started"):
        a.publish(m.alert("info", "x", "y"), SERIES)
    with pytest.raises(RtscError) as info:
        a.start()  # now it binds, and the address is in use
    assert "publish.endpoint" in str(info.value) and endpoint in str(info.value)
    a.close()  # harmless after a failed start
    probe.close()
    b.start()  # the address is free again; b had not bound anything earlier
    try:
        assert b.endpoint == endpoint and b.snapshot_endpoint == snapshot
    finally:
        b.close()


def test_publisher_busy_snapshot_endpoint_releases_the_pub_port() -> None:
    probe = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    probe.start()
    free = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    free.start()
    pub_endpoint = free.endpoint
    free.close()
    try:
        clash = Publisher(pub_endpoint, probe.snapshot_endpoint)
        with pytest.raises(RtscError) as info:
            clash.start()
        assert "publish.snapshot_endpoint" in str(info.value)
        assert probe.snapshot_endpoint in str(info.value)
        # the PUB socket it had bound was released: the same address binds again
        again = Publisher(pub_endpoint, "tcp://127.0.0.1:*")
        again.start()
        assert again.endpoint == pub_endpoint
        again.close()
    finally:
        probe.close()


def test_publisher_endpoints_resolved_after_start(publisher: Publisher) -> None:
    for endpoint in (publisher.endpoint, publisher.snapshot_endpoint):
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert int(endpoint.rsplit(":", 1)[1]) > 0


def test_subscriber_receives_live_messages(publisher: Publisher) -> None:
    with Subscriber(publisher.endpoint) as sub:
        _join(publisher, sub)
        data = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
        publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 1.5, 2, "brain"), SERIES)
        _publish_run(publisher, 2)
        publisher.publish(m.map_message("mean", np.eye(4), data, 1), SERIES)
        publisher.publish(m.series_end(2, {"n_expected": 2}, {}), SERIES)
        got = _drain(sub)
    assert [g.topic for g in got] == ["series.start", "volume", "volume", "map", "series.end"]
    assert all(g.header["series"] == SERIES for g in got)
    assert [g.header["index"] for g in got if g.topic == "volume"] == [0, 1]
    assert [g.header["global_signal"] for g in got if g.topic == "volume"] == [100.0, 101.0]
    assert got[0].header["tr_s"] == 1.5
    np.testing.assert_array_equal(got[3].arrays[0], data)
    assert got[4].header["n_volumes"] == 2


def test_subscriber_topic_filter(publisher: Publisher) -> None:
    with Subscriber(publisher.endpoint, topics=["volume"]) as sub, \
            Subscriber(publisher.endpoint) as everything:
        _join(publisher, everything)
        time.sleep(0.3)  # the filtered subscriber cannot see probes: give it time to join
        publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 1.5, 2, "brain"), SERIES)
        _publish_run(publisher, 3)
        publisher.publish(m.alert("warning", "motion", "moved", 2), SERIES)
        got = _drain(sub)
    assert [g.topic for g in got] == ["volume"] * 3
    assert [g.header["index"] for g in got] == [0, 1, 2]


def test_snapshot_holds_the_run_in_order(publisher: Publisher) -> None:
    assert request_snapshot(publisher.snapshot_endpoint) == []
    publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 2.0, 3, "brain"), SERIES)
    _publish_run(publisher, 2)
    publisher.publish(m.map_message("mean", np.eye(4), np.zeros((4, 5, 6)), 1), SERIES)
    publisher.publish(m.map_message("tsnr", np.eye(4), np.full((4, 5, 6), 7.0), 1), SERIES)
    _publish_run(publisher, 1, first=2)
    newest_mean = np.full((4, 5, 6), 3.0, np.float32)
    publisher.publish(m.map_message("mean", np.eye(4), newest_mean, 2), SERIES)
    publisher.publish(m.series_end(3, {"n_expected": 3}, {"bold": "b.nii.gz"}), SERIES)

    snap = request_snapshot(publisher.snapshot_endpoint)
    topics = [s.topic for s in snap]
    assert topics == ["series.start", "volume", "volume", "volume", "map", "map", "series.end"]
    assert [s.header["index"] for s in snap if s.topic == "volume"] == [0, 1, 2]
    maps = {s.header["name"]: s for s in snap if s.topic == "map"}
    assert set(maps) == {"mean", "tsnr"}
    assert maps["mean"].header["index"] == 2  # the newest map of that name only
    np.testing.assert_array_equal(maps["mean"].arrays[0], newest_mean)
    np.testing.assert_array_equal(maps["tsnr"].arrays[0], np.full((4, 5, 6), 7.0))
    assert snap[-1].header["outputs"] == {"bold": "b.nii.gz"}
    assert all(s.header["series"] == SERIES for s in snap)

    # A new series starts from scratch.
    publisher.publish(m.series_start([8, 8, 8], [1, 1, 1], 1.0, None, "spinal_cord"), "second")
    snap = request_snapshot(publisher.snapshot_endpoint)
    assert [s.topic for s in snap] == ["series.start"]
    assert snap[0].header["series"] == "second" and snap[0].header["shape"] == [8, 8, 8]
    _publish_run(publisher, 1, series="second")
    assert [s.topic for s in request_snapshot(publisher.snapshot_endpoint)] == \
        ["series.start", "volume"]


def test_snapshot_service_answers_unknown_request(publisher: Publisher) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(publisher.snapshot_endpoint)
        sock.send(b"hello")
        assert sock.poll(5000)
        assert sock.recv_multipart()[0] == b"error"
    finally:
        sock.close()
    # and still serves snapshots afterwards
    assert request_snapshot(publisher.snapshot_endpoint) == []


def test_snapshot_service_envelopes(publisher: Publisher) -> None:
    """A DEALER sending the REQ envelope is answered as a REQ is; a wrong frame count is
    refused, not answered with a snapshot; a message without the envelope is dropped."""
    publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 2.0, 3, "brain"), SERIES)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(publisher.snapshot_endpoint)
        dealer.send_multipart([b"snapshot"])                    # no envelope: dropped
        dealer.send_multipart([b"", b"snapshot", b"more"])      # wrong frame count
        dealer.send_multipart([b"", b"snapshot"])
        replies = []
        for _ in range(2):
            assert dealer.poll(5000)
            replies.append(dealer.recv_multipart())
        assert not dealer.poll(300)
    finally:
        dealer.close()
    assert replies[0][:2] == [b"", b"error"]
    assert replies[1][0] == b""
    assert [s.topic for s in m.decode_snapshot(replies[1][1:])] == ["series.start"]
    assert publisher.snapshot_stats["dropped"] == 1
    assert publisher.snapshot_stats["refused"] == 1


def test_decode_snapshot_refuses_bad_replies() -> None:
    frames = m.snapshot_reply([m.encode(m.alert("info", "a", "b"), SERIES),
                               m.encode(m.volume(0, None, time.time(), {}), SERIES)])
    assert [x.topic for x in m.decode_snapshot(frames)] == ["alert", "volume"]
    assert m.decode_snapshot(m.snapshot_reply([])) == []
    bad = {
        "frames missing": frames[:-1],
        "error reply": [b"error", b"unknown request"],
        "not a snapshot": [b"volume", frames[1]],
        "header not JSON": [b"snapshot", b"{"],
        "another schema": [b"snapshot", json.dumps({"schema": 2, "frames": [2, 2]}).encode(),
                           *frames[2:]],
        "counts not a list": [b"snapshot", json.dumps({"schema": 1, "frames": 4}).encode(),
                              *frames[2:]],
    }
    for name, reply in bad.items():
        with pytest.raises(MessageError):
            m.decode_snapshot(reply)
            raise AssertionError(name)


def test_request_snapshot_times_out() -> None:
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)  # a peer that never answers
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            request_snapshot(f"tcp://127.0.0.1:{port}", timeout_s=0.2)
        assert time.monotonic() - t0 < 2
    finally:
        rep.close()
        ctx.term()


def test_subscriber_with_snapshot_delivers_backlog_then_live_without_duplicates(
        publisher: Publisher) -> None:
    publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 2.0, 6, "brain"), SERIES)
    _publish_run(publisher, 3)
    publisher.publish(m.map_message("mean", np.eye(4), np.ones((4, 5, 6)), 2), SERIES)

    with Subscriber(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint) as sub:
        backlog = []
        while (msg := sub.receive(timeout_s=0)) is not None:
            backlog.append(msg)
        assert [b.topic for b in backlog] == ["series.start", "volume", "volume", "volume", "map"]
        assert [b.header["index"] for b in backlog if b.topic == "volume"] == [0, 1, 2]

        _join(publisher, sub)
        # Volume 2 again (as if published while the snapshot was taken), then new ones.
        _publish_run(publisher, 3, first=2)
        publisher.publish(m.series_end(5, {}, {}), SERIES)
        live = _drain(sub)
    assert [(x.topic, x.header.get("index")) for x in live] == \
        [("volume", 3), ("volume", 4), ("series.end", None)]


def test_subscriber_after_new_series_delivers_all_its_volumes(publisher: Publisher) -> None:
    publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 2.0, None, "brain"), SERIES)
    _publish_run(publisher, 2)
    with Subscriber(publisher.endpoint, snapshot_endpoint=publisher.snapshot_endpoint) as sub:
        backlog = [sub.receive(timeout_s=0) for _ in range(3)]
        assert [b.header.get("index") for b in backlog] == [None, 0, 1]
        _join(publisher, sub)
        # Same index numbers in a new series are new volumes, not duplicates.
        publisher.publish(m.series_start([4, 5, 6], [2, 2, 2], 2.0, None, "brain"), "second")
        _publish_run(publisher, 2, series="second")
        live = _drain(sub)
    assert [(x.topic, x.header["series"], x.header.get("index")) for x in live] == \
        [("series.start", "second", None), ("volume", "second", 0), ("volume", "second", 1)]
