"""HistoryStore on SQLite: the Alembic migration makes the schema the models describe;
records, replacement, filters; a database that cannot be opened is a HistoryError."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from rtsc.errors import HistoryError
from rtsc.history.fingerprint import Protocol
from rtsc.history.models import COLUMNS, Base, SeriesRecord
from rtsc.history.store import HistoryStore, alembic_config
from rtsc.volume import SeriesInfo

T0 = dt.datetime(2026, 12, 1, 9, 0, 0)


def protocol(description: str = "ep2d_bold", nz: int = 36) -> Protocol:
    info = SeriesInfo("x", 2.0, 10, 1, description, "mosaic", sequence="*epfid2d1_64",
                      station_hash="0123456789abcdef")
    return Protocol.of(info, (64, 64, nz), (3.0, 3.0, 3.0), "brain")


def summary(tsnr: float | None, fd_mean: float = 0.1, n: int = 10) -> dict:
    return {"n_volumes": n, "n_expected": n, "tsnr": tsnr, "snr_background": 40.0,
            "fd_mean": fd_mean, "fd_num": 1, "fd_perc": 10.0, "dvars_std": float("nan"),
            "usable_frames": {"0.2": n - 1}, "verdict": "pass", "fd_threshold_mm": 0.2}


def check_schema(url: str) -> None:
    """The database is at the migrations' head and holds exactly what the models say."""
    engine = create_engine(url)
    with engine.connect() as connection:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert MigrationContext.configure(connection).get_current_revision() == head
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        columns = [c["name"] for c in inspect(connection).get_columns("series")]
        assert columns == [c.name for c in SeriesRecord.__table__.columns]
    engine.dispose()


def test_migration_creates_the_models_schema_on_an_empty_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'history.sqlite'}"
    with HistoryStore.open(url) as store:
        assert store.revision() == "0001"
    check_schema(url)
    with HistoryStore.open(url) as store:  # opening again: already at head, data kept
        store.record("a", protocol(), summary(50.0), 0.2, T0)
    with HistoryStore.open(url) as store:
        assert [r["series_id"] for r in store.rows()] == ["a"]


def test_compare_metadata_sees_a_difference():
    """The agreement check can fail: a table the models lack is reported."""
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_records_figures_and_filters(tmp_path):
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    bold, rest = protocol(), protocol("rest_bold", nz=30)
    with HistoryStore.open(url) as store:
        for k, tsnr in enumerate([50.0, 40.0, None, 60.0]):
            store.record(f"s{k}", bold, summary(tsnr, 0.1 * k), 0.2,
                         T0 + dt.timedelta(days=k))
        store.record("r0", rest, summary(30.0), 0.2, T0 + dt.timedelta(days=1, hours=1))
        figures = store.figures(bold.fingerprint)
        np.testing.assert_array_equal(figures["tsnr"], [40.0, 50.0, 60.0])
        np.testing.assert_array_equal(figures["fd_mean"], [0.0, 0.1, 0.2, 0.30000000000000004])
        assert figures["dvars_std"].size == 0  # NaN is stored as NULL
        np.testing.assert_array_equal(figures["usable_fraction"], [0.9] * 4)
        np.testing.assert_array_equal(
            store.figures(bold.fingerprint, before=T0 + dt.timedelta(days=2))["tsnr"],
            [40.0, 50.0])
        np.testing.assert_array_equal(
            store.figures(bold.fingerprint, exclude_series="s0")["tsnr"], [40.0, 60.0])
        # a series recorded again replaces its row
        store.record("s0", bold, summary(55.0), 0.2, T0)
        np.testing.assert_array_equal(store.figures(bold.fingerprint)["tsnr"],
                                      [40.0, 55.0, 60.0])
        rows = store.rows()
        assert [r["series_id"] for r in rows] == ["s0", "s1", "r0", "s2", "s3"]
        assert set(rows[0]) == set(COLUMNS)
        assert rows[0]["fingerprint"] == bold.fingerprint and rows[0]["n_slices"] == 36
        assert [r["series_id"] for r in store.rows(fingerprint=rest.fingerprint)] == ["r0"]
        assert [r["series_id"] for r in store.rows(description="REST")] == ["r0"]
        assert [r["series_id"] for r in store.rows(description="_")] == ["s0", "s1", "r0",
                                                                         "s2", "s3"]
        assert [r["series_id"] for r in store.rows(
            since=T0 + dt.timedelta(days=1), until=T0 + dt.timedelta(days=3))] == \
            ["s1", "r0", "s2"]
        full = store.rows(fingerprint=rest.fingerprint, with_summary=True)[0]
        assert full["summary"]["tsnr"] == 30.0 and full["summary"]["dvars_std"] is None


@pytest.mark.parametrize("url", ["sqlite:////proc/rtsc-none/history.sqlite",
                                 "nosuchdialect://host/db",
                                 "postgresql+nosuchdriver://u:secret@127.0.0.1:1/db"])
def test_a_database_that_cannot_be_opened_is_a_history_error(url):
    with pytest.raises(HistoryError) as caught:
        HistoryStore.open(url)
    assert "secret" not in str(caught.value)
    assert "cannot open" in str(caught.value)
