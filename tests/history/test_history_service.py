"""The history inside `rtsc run`: simulated series over C-STORE, one after the other, each
recorded at its end, each volume's site_percentiles equal to a numpy recomputation over
the earlier series in the database, below_site_norm for the noisy series only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rtsc.history.percentile import FIGURES, end_figures
from rtsc.history.store import HistoryStore, default_url

from history_session import HISTORY, SERIES

pytestmark = pytest.mark.slow


def numpy_rank(values: np.ndarray, x: float | None) -> float | None:
    values = values[np.isfinite(values)]
    if x is None or values.size < HISTORY["min_series"]:
        return None
    return 100.0 * (np.sum(values < x) + 0.5 * np.sum(values == x)) / values.size


def numpy_figures(volumes: list[dict], threshold_key: str) -> dict[str, float | None]:
    """The live figures after the last of ``volumes``, from the messages alone."""
    def column(name: str) -> np.ndarray:
        return np.array([np.nan if v.get(name) is None else v[name] for v in volumes])

    def mean(a: np.ndarray) -> float | None:
        return float(np.nanmean(a)) if np.isfinite(a).any() else None

    snr = column("snr")
    usable = volumes[-1]["usable_frames"].get(threshold_key)
    return {"tsnr": volumes[-1]["tsnr"],
            "snr": float(np.nanmedian(snr)) if np.isfinite(snr).any() else None,
            "fd_mean": mean(column("framewise_displacement")),
            "usable_fraction": None if usable is None else usable / len(volumes),
            "dvars_std": mean(column("std_dvars"))}


def history_rows(session) -> list[dict]:
    with HistoryStore.open(default_url(session.config.session.dir)) as store:
        return store.rows(with_summary=True)


def qc_json(session, series: str) -> dict:
    [path] = Path(session.config.session.dir).glob(f"*_{series}/qc.json")
    return json.loads(path.read_text())


def test_every_series_is_recorded_with_its_qc_json(recorded_session):
    rows = history_rows(recorded_session)
    assert [r["series_id"] for r in rows] == recorded_session.series
    assert len({r["fingerprint"] for r in rows}) == 1  # one protocol, one scanner
    threshold = recorded_session.config.qc.criterion_threshold_mm
    for row in rows:
        qc = qc_json(recorded_session, row["series_id"])
        assert row["summary"] == qc
        assert qc["protocol_fingerprint"] == row["fingerprint"]
        assert (row["matrix_i"], row["matrix_j"], row["n_slices"]) == tuple(qc["shape"])
        assert row["sequence"] == "epfid2d1_32" and row["description"] == "ep2d_bold_sim"
        assert row["station_hash"] == hashlib.sha256(b"RTSCSIM").hexdigest()[:16]
        figures = end_figures(qc, threshold)
        assert {name: row[name] for name in FIGURES} == figures
        assert row["verdict"] == qc["verdict"] and row["n_volumes"] == qc["n_volumes"]


def test_volume_percentiles_equal_numpy_over_the_earlier_series(recorded_session):
    session = recorded_session
    rows = history_rows(session)
    key = f"{session.config.qc.criterion_threshold_mm:g}"
    n_published = 0
    for k, series in enumerate(session.series):
        earlier = {name: np.array([np.nan if r[name] is None else r[name] for r in rows[:k]],
                                  dtype=float) for name in FIGURES}
        volumes = session.of(series, "volume")
        for i in range(len(volumes)):
            expected = numpy_figures(volumes[:i + 1], key)
            got = volumes[i]["site_percentiles"]
            assert set(got) == set(FIGURES)
            for name in FIGURES:
                want = numpy_rank(earlier[name], expected[name])
                assert got[name] == pytest.approx(want, abs=1e-9), (k, i, name)
                n_published += got[name] is not None
        end = session.of(series, "series.end")[0]
        final = end_figures(end["summary"], session.config.qc.criterion_threshold_mm)
        want_end = {name: numpy_rank(earlier[name], final[name]) for name in FIGURES}
        assert end["site_percentiles"] == pytest.approx(want_end, abs=1e-9)
        assert end["summary"]["site_percentiles"] == end["site_percentiles"]
    # the first min_series series have no yardstick; the others do
    assert n_published > (len(SERIES) - HISTORY["min_series"]) * 8


def test_below_site_norm_warns_for_the_noisy_series_only(recorded_session):
    session = recorded_session
    noisy = session.series[[k for k, (_, noise) in enumerate(SERIES) if noise > 10][0]]
    alerts = [m.header for m in session.messages
              if m.topic == "alert" and m.header["code"] == "below_site_norm"]
    assert [a["series"] for a in alerts] == [noisy]
    [alert] = alerts
    assert alert["level"] == "warning"
    # the first volume that has norm_min_volumes behind it, and its tSNR percentile
    assert alert["index"] == HISTORY["norm_min_volumes"] - 1
    volume = session.of(noisy, "volume")[alert["index"]]
    assert volume["site_percentiles"]["tsnr"] < HISTORY["norm_percentile"]
    tsnr = {s: session.of(s, "series.end")[0]["summary"]["tsnr"] for s in session.series}
    assert tsnr[noisy] < 0.5 * min(v for s, v in tsnr.items() if s != noisy)
    # the normal series after it has a yardstick too, and stays above the norm
    last = session.of(session.series[-1], "volume")
    assert all(v["site_percentiles"]["tsnr"] >= HISTORY["norm_percentile"]
               for v in last[HISTORY["norm_min_volumes"] - 1:])


def test_history_alerts_and_dashboard_and_report(recorded_session):
    """No history_unavailable in a working run; the dashboard's line and the report's
    table show the series' percentiles."""
    from rtsc.display.state import DisplayState
    from rtsc.output.report import build_report

    session = recorded_session
    assert not [m for m in session.messages if m.topic == "alert"
                and m.header["code"] == "history_unavailable"]
    series = session.series[-1]
    state = DisplayState()
    for message in session.messages:
        if message.header.get("series") == series:
            state.fold(message)
    end = session.of(series, "series.end")[0]["site_percentiles"]
    line = state.site_norm_line()
    assert line.startswith("site percentile") and f"tSNR P{end['tsnr']:.0f}" in line
    [folder] = Path(session.config.session.dir).glob(f"*_{series}")
    html = build_report(folder)
    assert "<h2>Site norm</h2>" in html and f"<td>{end['tsnr']:.1f}</td>" in html
