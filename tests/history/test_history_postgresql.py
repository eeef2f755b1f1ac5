"""PostgreSQL and SQLite give the same answers: a real PostgreSQL server (Debian's
package, started here) gets the schema from the same migration, the same records, the
same figures and percentiles, and a live series against it publishes the same
site_percentiles as numpy computes over the SQLite history."""

from __future__ import annotations

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from rtsc.history.fingerprint import Protocol
from rtsc.history.models import Base
from rtsc.history.percentile import FIGURES, end_figures, site_percentiles
from rtsc.history.store import HistoryStore, default_url

from history_session import HISTORY, make_config, run_series

pytestmark = [pytest.mark.slow, pytest.mark.system]


def copy_rows(rows: list[dict], store: HistoryStore, threshold: float) -> None:
    """Record ``rows`` (from another store, with summaries) into ``store``."""
    for row in rows:
        protocol = Protocol(**{k: row[k] for k in Protocol.__dataclass_fields__})
        store.record(row["series_id"], protocol, row["summary"], threshold,
                     row["finished_at"])


def test_postgresql_and_sqlite_give_the_same_answers(recorded_session, postgres_server,
                                                     tmp_path):
    session = recorded_session
    threshold = session.config.qc.criterion_threshold_mm
    with HistoryStore.open(default_url(session.config.session.dir)) as lite:
        rows = lite.rows(with_summary=True)
        fingerprint = rows[0]["fingerprint"]
        lite_figures = lite.figures(fingerprint)
    with HistoryStore.open(postgres_server.url) as pg:
        assert pg.engine.dialect.name == "postgresql"
        assert pg.revision() == "0001"
        with pg.engine.connect() as connection:  # the migration made the models' schema
            assert compare_metadata(MigrationContext.configure(connection),
                                    Base.metadata) == []
        copy_rows(rows, pg, threshold)
        pg_rows = pg.rows(with_summary=True)
        pg_figures = pg.figures(fingerprint)
        assert pg.rows(description="BOLD_SIM") == [
            {k: v for k, v in r.items() if k != "summary"} for r in pg_rows]
        assert pg.rows(since=rows[2]["finished_at"]) == pg.rows()[2:]
    drop_ids = [{k: v for k, v in r.items() if k != "id"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "id"} for r in pg_rows] == drop_ids
    for name in FIGURES:
        np.testing.assert_array_equal(pg_figures[name], lite_figures[name])
    for row in rows:  # each series' end percentiles among all, from either database
        figures = end_figures(row["summary"], threshold)
        assert site_percentiles(pg_figures, figures, 1) == \
            site_percentiles(lite_figures, figures, 1)

    # live, with history.url the PostgreSQL server: one more series
    config = make_config(tmp_path, history=dict(HISTORY, url=postgres_server.url),
                         session={"report": False})
    [series], messages = run_series(config, tmp_path, ((7, 10.0),), first_number=7)
    volumes = [m.header for m in messages if m.topic == "volume"]
    end = [m.header for m in messages if m.topic == "series.end"][0]
    assert not [m for m in messages if m.topic == "alert"
                and m.header["code"] == "history_unavailable"]
    key = f"{threshold:g}"
    fd = np.array([np.nan if v["framewise_displacement"] is None
                   else v["framewise_displacement"] for v in volumes])
    for i, volume in enumerate(volumes):  # numpy over the SQLite history's values
        tsnr, fd_mean = volume["tsnr"], float(np.nanmean(fd[:i + 1])) \
            if np.isfinite(fd[:i + 1]).any() else None
        usable = volume["usable_frames"][key] / (i + 1)
        for name, x in (("tsnr", tsnr), ("fd_mean", fd_mean), ("usable_fraction", usable)):
            values = lite_figures[name]
            want = None if x is None else \
                100.0 * (np.sum(values < x) + 0.5 * np.sum(values == x)) / values.size
            assert volume["site_percentiles"][name] == pytest.approx(want, abs=1e-9)
    with HistoryStore.open(postgres_server.url) as pg:
        assert [r["series_id"] for r in pg.rows()][-1] == series
        assert pg.rows(with_summary=True)[-1]["summary"]["site_percentiles"] == \
            end["site_percentiles"]
