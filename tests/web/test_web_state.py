"""The web card's state: messages (encoded and decoded as on the wire) folded into what
each card shows; the session folder read for the day's series and report paths."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from rtsc import messages
from rtsc.messages import Message, decode, encode
from rtsc.web.sessions import finished_series, report_in
from rtsc.web.state import MAX_ALERTS, ScannerState, local_day


def wire(message: Message, series: str) -> Message:
    """The message as a subscriber receives it."""
    return decode(encode(Message(message.topic, dict(message.header), list(message.arrays)),
                         series))


def start(series: str, n: int = 30) -> Message:
    return wire(messages.series_start([8, 8, 4], [3.0, 3.0, 3.0], 2.0, n, "brain",
                                      description="bold_run1", series_number=7), series)


def volume(series: str, index: int, **metrics) -> Message:
    base = {"trans_x": 0.1 * index, "trans_y": -0.2, "trans_z": 0.05 * index,
            "rot_x": 0.01, "rot_y": -0.02, "rot_z": 0.001 * index,
            "framewise_displacement": 0.01 * index, "dvars": 10.0 + index, "std_dvars": 1.5,
            "tsnr": 50.0 + index}
    base.update(metrics)
    return wire(messages.volume(index, None, time.time() - 0.012, base), series)


def test_volumes_become_traces_in_display_units() -> None:
    state = ScannerState("scan1")
    assert state.fold(start("aaaaaaaaaaaa"))
    for i in range(5):
        last = volume("aaaaaaaaaaaa", i)
        assert state.fold(last)
    card = state.card()
    assert card["series"] == "aaaaaaaaaaaa" and card["last_index"] == 4
    assert card["n_volumes"] == 5 and card["n_expected"] == 30 and not card["ended"]
    assert card["start"]["description"] == "bold_run1" and card["start"]["series_number"] == 7
    t = card["traces"]
    assert t["index"] == [0, 1, 2, 3, 4]
    assert t["trans_x"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert t["rot_z"] == pytest.approx([math.degrees(0.001 * i) for i in range(5)], rel=1e-4)
    assert t["fd"] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    assert t["dvars"] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert t["tsnr"] == [50.0, 51.0, 52.0, 53.0, 54.0]
    # latency_s is published - received (the encoder's): about 12 ms here
    assert card["last"]["latency_ms"] == pytest.approx(1000 * last.header["latency_s"], rel=1e-4)
    assert 12.0 <= card["last"]["latency_ms"] < 1000.0
    assert card["last"]["site_percentiles"] is None  # no history in these messages
    json.dumps(card, allow_nan=False)  # what the websocket sends
    # with the site's history: the volume's percentiles, as published
    state.fold(volume("aaaaaaaaaaaa", 5, site_percentiles={
        "tsnr": 42.5, "snr": None, "fd_mean": 80.0, "usable_fraction": 12.5,
        "dvars_std": 50.0}))
    assert state.card()["last"]["site_percentiles"] == {
        "tsnr": 42.5, "snr": None, "fd_mean": 80.0, "usable_fraction": 12.5, "dvars_std": 50.0}


def test_missing_values_are_null_and_traces_are_bounded() -> None:
    state = ScannerState("scan1", history=10)
    state.fold(start("aaaaaaaaaaaa", 40))
    for i in range(25):
        state.fold(volume("aaaaaaaaaaaa", i, tsnr=float("nan") if i % 2 else 60.0,
                          trans_x=None if i == 24 else 1.0))
    card = state.card()
    assert card["traces"]["index"] == list(range(15, 25))
    assert card["traces"]["tsnr"] == [60.0 if i % 2 == 0 else None for i in range(15, 25)]
    assert card["traces"]["trans_x"][-1] is None and card["n_volumes"] == 25
    json.dumps(card, allow_nan=False)


def test_snapshot_and_live_overlap_change_nothing() -> None:
    state = ScannerState("scan1")
    stream = [start("aaaaaaaaaaaa")] + [volume("aaaaaaaaaaaa", i) for i in range(3)]
    alert = wire(messages.alert("warning", "motion", "FD high", 2), "aaaaaaaaaaaa")
    for m in stream + [alert]:
        assert state.fold(m)
    version = state.version
    for m in stream + [alert]:  # the live copies of what the snapshot held
        if m.topic != "series.start":
            assert not state.fold(m)
    state.fold(stream[0])  # the same series.start again keeps the data
    assert state.n_volumes == 3 and len(state.alerts) == 1
    assert state.card()["traces"]["index"] == [0, 1, 2]
    assert state.version >= version


def test_a_new_series_starts_over_and_an_ended_one_stays_ended(tmp_path: Path) -> None:
    state = ScannerState("scan1")
    state.fold(start("aaaaaaaaaaaa"))
    state.fold(volume("aaaaaaaaaaaa", 0))
    state.fold(wire(messages.alert("warning", "motion", "FD high", 0), "aaaaaaaaaaaa"))
    report = "/data/sessions/20261204-091500_aaaaaaaaaaaa/report.html"
    end = wire(messages.series_end(1, {"verdict": "warn", "verdict_reasons": ["fd"],
                                       "n_expected": 30}, {"report": report}), "aaaaaaaaaaaa")
    assert state.fold(end)
    card = state.card()
    assert card["ended"] and card["verdict"] == "warn" and card["end"]["n_volumes"] == 1
    rows = card["day_series"]
    assert [r["series"] for r in rows] == ["aaaaaaaaaaaa"]
    assert rows[0]["n_volumes"] == 1 and rows[0]["verdict"] == "warn"
    assert rows[0]["description"] == "bold_run1"
    assert state.finished["aaaaaaaaaaaa"].report == Path(report)
    # A late duplicate of the ended series is ignored; the next series starts over.
    assert not state.fold(volume("aaaaaaaaaaaa", 1))
    assert not state.fold(end)
    state.fold(start("bbbbbbbbbbbb", 12))
    assert state.card()["traces"]["index"] == [] and state.alerts == type(state.alerts)()
    state.fold(volume("bbbbbbbbbbbb", 0))
    state.fold(wire(messages.alert("info", "x", "about the old one", 0), "aaaaaaaaaaaa"))
    card = state.card()
    assert card["series"] == "bbbbbbbbbbbb" and card["last_index"] == 0
    assert card["alerts"] == [] and not card["ended"]
    assert [r["series"] for r in card["day_series"]] == ["aaaaaaaaaaaa"]


def test_alerts_keep_the_newest() -> None:
    state = ScannerState("scan1")
    state.fold(start("aaaaaaaaaaaa"))
    for i in range(MAX_ALERTS + 5):
        state.fold(wire(messages.alert("warning", "spike", f"spike {i}", i), "aaaaaaaaaaaa"))
    alerts = state.card()["alerts"]
    assert len(alerts) == MAX_ALERTS and alerts[-1]["index"] == MAX_ALERTS + 4


def test_joining_mid_series_without_a_start_shows_the_volumes() -> None:
    state = ScannerState("scan1")
    state.fold(volume("cccccccccccc", 17))
    card = state.card()
    assert card["series"] == "cccccccccccc" and card["last_index"] == 17
    assert card["n_expected"] is None


def _series_folder(root: Path, name: str, summary: dict | None) -> Path:
    folder = root / name
    (folder / "dicom").mkdir(parents=True)
    if summary is not None:
        (folder / "qc.json").write_text(json.dumps(summary))
        (folder / "report.html").write_text("<html>report</html>")
    return folder


def test_session_folder_gives_the_days_finished_series(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    day = local_day(time.time())
    _series_folder(root, f"{day}-101500_aaaaaaaaaaaa", {"n_volumes": 40, "n_expected": 40,
                                                       "verdict": "pass"})
    _series_folder(root, f"{day}-091000_bbbbbbbbbbbb-2", {"n_volumes": 3, "verdict": "fail"})
    _series_folder(root, f"{day}-111500_cccccccccccc", None)  # still running
    _series_folder(root, "20200101-101500_dddddddddddd", {"n_volumes": 5})  # another day
    _series_folder(root, f"{day}-101500_not-a-series", {"n_volumes": 5})
    found = finished_series(root, day)
    assert [(f.series, f.time, f.n_volumes, f.verdict) for f in found] == [
        ("bbbbbbbbbbbb", "09:10:00", 3, "fail"), ("aaaaaaaaaaaa", "10:15:00", 40, "pass")]
    assert found[1].report == (root / f"{day}-101500_aaaaaaaaaaaa" / "report.html").resolve()
    assert finished_series(tmp_path / "absent", day) == []


def test_report_paths_stay_inside_the_session_folder(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    folder = _series_folder(root, "20261204-101500_aaaaaaaaaaaa", {"n_volumes": 1})
    # The publisher's path maps onto the same folder here, whatever its prefix.
    assert report_in(root, "/elsewhere/20261204-101500_aaaaaaaaaaaa/report.html") == \
        (folder / "report.html").resolve()
    for bad in ("/x/20261204-101500_aaaaaaaaaaaa/qc.json", "/x/../report.html",
                "/x/20261204-101500_aaaaaaaaaaaa/../../etc/report.html", "report.html",
                "/x/../../etc/passwd"):
        assert report_in(root, bad) is None, bad
    # A series folder that is a link out of the session folder is refused too.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.html").write_text("secret")
    (root / "20261204-111500_bbbbbbbbbbbb").symlink_to(outside)
    assert report_in(root, "/x/20261204-111500_bbbbbbbbbbbb/report.html") is None
