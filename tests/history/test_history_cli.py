"""`rtsc history list|export` over the recorded session's database: columns, parsing,
filters by protocol, description and date; and a run whose database cannot be opened
goes on with history_unavailable."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from rtsc.cli import main
from rtsc.history.models import COLUMNS
from rtsc.history.store import HistoryStore, default_url

from history_session import HISTORY, make_config, run_series

pytestmark = pytest.mark.slow


@pytest.fixture
def config_file(recorded_session, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"session": {"dir": recorded_session.config.session.dir}}))
    return str(path)


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_list_filters(recorded_session, config_file, capsys):
    with HistoryStore.open(default_url(recorded_session.config.session.dir)) as store:
        rows = store.rows()
    assert main(["history", "list", "--config", config_file]) == 0
    out = lines(capsys)
    assert out[-1] == f"{len(rows)} series"
    assert [line.split()[2] for line in out[1:-1]] == [r["series_id"] for r in rows]
    fingerprint = rows[0]["fingerprint"]
    assert main(["history", "list", "--config", config_file, "--protocol", fingerprint]) == 0
    assert lines(capsys)[-1] == f"{len(rows)} series"
    for args, n in ((["--protocol", "0" * 16], 0), (["--description", "rest"], 0),
                    (["--description", "ep2d_BOLD"], len(rows)),
                    (["--since", rows[2]["finished_at"].isoformat()], len(rows) - 2),
                    (["--until", rows[0]["finished_at"].date().isoformat()], len(rows)),
                    (["--until", "2000-01-01"], 0)):
        assert main(["history", "list", "--config", config_file, *args]) == 0
        assert lines(capsys)[-1] == f"{n} series", args


def test_export_csv_and_mriqc_json(recorded_session, config_file, tmp_path, capsys):
    with HistoryStore.open(default_url(recorded_session.config.session.dir)) as store:
        rows = store.rows(with_summary=True)
    out = tmp_path / "history.csv"
    assert main(["history", "export", "--config", config_file, "--format", "csv",
                 "--out", str(out)]) == 0
    with out.open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == COLUMNS
    assert [r["series_id"] for r in table] == [r["series_id"] for r in rows]
    for got, row in zip(table, rows):
        assert float(got["tsnr"]) == row["tsnr"]  # repr: exact round trip
        assert got["finished_at"] == row["finished_at"].isoformat() + "Z"
        assert got["dvars_std"] == ("" if row["dvars_std"] is None else repr(row["dvars_std"]))
    out = tmp_path / "iqms.json"
    assert main(["history", "export", "--config", config_file, "--format", "mriqc-json",
                 "--out", str(out), "--description", "bold"]) == 0
    iqms = json.loads(out.read_text())
    assert len(iqms) == len(rows)
    for iqm, row in zip(iqms, rows):
        for name in ("tsnr", "fd_mean", "fd_num", "fd_perc", "dvars_std"):
            assert iqm[name] == row[name]
        assert (iqm["size_x"], iqm["size_y"], iqm["size_z"], iqm["size_t"]) == (
            row["matrix_i"], row["matrix_j"], row["n_slices"], row["n_volumes"])
        assert iqm["spacing_tr"] == row["tr_s"]
        assert iqm["provenance"]["software"] == "rtsc"
        assert iqm["provenance"]["series_id"] == row["series_id"]
        assert iqm["provenance"]["settings"]["fd_thres"] == row["summary"]["fd_threshold_mm"]
        assert iqm["rtsc"]["snr_background"] == row["snr"] and "snr" not in iqm


def test_missing_database_and_bad_date(tmp_path, capsys):
    assert main(["history", "list", "--url", f"sqlite:///{tmp_path / 'none.sqlite'}"]) == 2
    assert "no history database" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["history", "list", "--since", "yesterday"])


def test_a_database_that_cannot_be_opened_does_not_stop_the_run(tmp_path):
    config = make_config(tmp_path, session={"report": False}, history=dict(
        HISTORY, url="sqlite:////proc/rtsc-none/history.sqlite"))
    [series], messages = run_series(config, tmp_path, ((1, 10.0),))
    alerts = [m.header for m in messages if m.topic == "alert"
              and m.header["code"] == "history_unavailable"]
    assert [a["series"] for a in alerts] == [series]  # (the one at start is before joining)
    volumes = [m.header for m in messages if m.topic == "volume"]
    end = [m.header for m in messages if m.topic == "series.end"][0]
    assert len(volumes) == end["n_volumes"] == end["summary"]["n_expected"]
    assert all(set(v["site_percentiles"].values()) == {None} for v in volumes)
    assert end["site_percentiles"] is None
    assert end["summary"]["protocol_fingerprint"]
