"""HistoryStore: the history database through SQLAlchemy, its schema kept by Alembic.

:meth:`HistoryStore.open` connects and runs ``alembic upgrade head`` with the
migrations shipped in ``rtsc/history/migrations/`` (an empty database gets the schema;
one made by an older rtsc is brought up to date; one made by a newer rtsc, whose head
revision this one does not know, is refused with a :class:`~rtsc.errors.HistoryError`).
Every database error leaves as a HistoryError naming the URL without its password.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from sqlalchemy import create_engine, delete, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

import rtsc
from rtsc.errors import HistoryError
from rtsc.history.fingerprint import Protocol
from rtsc.history.models import COLUMNS, SeriesRecord
from rtsc.history.percentile import FIGURES, end_figures, finite
from rtsc.messages import jsonable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Seconds a connection attempt or a locked SQLite file may take before an error.
CONNECT_TIMEOUT_S = 5


def default_url(session_dir: str | Path) -> str:
    """The SQLite URL of ``<session_dir>/history.sqlite`` (an absolute path)."""
    return f"sqlite:///{(Path(session_dir).resolve() / 'history.sqlite').as_posix()}"


def history_url(url: str | None, session_dir: str | Path) -> str:
    """``history.url``, or the default SQLite file when it is null."""
    return url if url else default_url(session_dir)


def shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def alembic_config(connection: Any = None) -> Any:
    """An Alembic Config for the shipped migrations, optionally bound to a connection."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _utc(when: dt.datetime | None) -> dt.datetime:
    """``when`` as naive UTC (the database's convention); now when None."""
    if when is None:
        return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if when.tzinfo is not None:
        return when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when


class HistoryStore:
    """The site's QC history database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://user@host/db``).

    Use :meth:`open` (connect and migrate), or ``with HistoryStore.open(url) as store``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None

    @classmethod
    def open(cls, url: str) -> "HistoryStore":
        """Connect to ``url`` and upgrade its schema to the newest revision.

        Raises
        ------
        HistoryError
            The URL is malformed, its driver is missing, the server or file cannot be
            reached, or the migration fails.
        """
        store = cls(url)
        try:
            parsed = make_url(url)
            connect_args: dict[str, Any] = {}
            if parsed.get_backend_name() == "sqlite":
                connect_args["timeout"] = CONNECT_TIMEOUT_S
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            elif parsed.get_backend_name() == "postgresql":
                connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
            store._engine = create_engine(parsed, pool_pre_ping=True,
                                          connect_args=connect_args)
            store.upgrade()
        except HistoryError:
            store.close()
            raise
        except (SQLAlchemyError, ArgumentError, ImportError, OSError, ValueError) as exc:
            store.close()
            raise HistoryError(f"history.url {shown(url)}: cannot open the database: "
                               f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        return store

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise HistoryError("the history database is closed")
        return self._engine

    def upgrade(self) -> None:
        """``alembic upgrade head`` on this database (the shipped migrations)."""
        from alembic import command
        from alembic.util.exc import CommandError

        try:
            with self.engine.begin() as connection:
                command.upgrade(alembic_config(connection), "head")
        except CommandError as exc:
            raise HistoryError(f"history.url {shown(self.url)}: cannot migrate the schema "
                               f"(made by a newer rtsc?): {exc}") from exc

    def revision(self) -> str | None:
        """The database's Alembic revision (None before the first migration)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def close(self) -> None:
        """Release the connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> "HistoryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --

    def record(self, series_id: str, protocol: Protocol, summary: Mapping[str, Any],
               threshold_mm: float, finished_at: dt.datetime | None = None) -> int:
        """Record a finished series (replacing an earlier row of the same series id).

        Parameters
        ----------
        series_id : rtsc's opaque series id
        protocol : its Protocol (the fingerprint and its parts)
        summary : the summary (qc.json fields)
        threshold_mm : ``qc.criterion_threshold_mm`` (the usable fraction's threshold)
        finished_at : when it ended (default now); stored as UTC

        Returns
        -------
        int, the row's id
        """
        figures = end_figures(summary, threshold_mm)
        fd_num = summary.get("fd_num")
        row = SeriesRecord(
            series_id=series_id, finished_at=_utc(finished_at),
            fingerprint=protocol.fingerprint, **protocol.parts(),
            n_volumes=int(summary.get("n_volumes") or 0),
            n_expected=summary.get("n_expected"), **figures,
            fd_num=None if fd_num is None else int(fd_num),
            fd_perc=finite(summary.get("fd_perc")),
            tsnr_detrended=finite(summary.get("tsnr_detrended")),
            verdict=summary.get("verdict"), rtsc_version=rtsc.__version__,
            summary=jsonable(dict(summary)))
        try:
            with Session(self.engine) as session, session.begin():
                session.execute(delete(SeriesRecord).where(SeriesRecord.series_id == series_id))
                session.add(row)
                session.flush()
                return int(row.id)
        except SQLAlchemyError as exc:
            raise HistoryError(f"history {shown(self.url)}: cannot record series "
                               f"{series_id}: {type(exc).__name__}: {exc}".splitlines()[0]
                               ) from exc

    # -- reading --

    def figures(self, fingerprint: str, before: dt.datetime | None = None,
                exclude_series: str | None = None) -> dict[str, np.ndarray]:
        """The earlier series' QC figures of a protocol fingerprint.

        Parameters
        ----------
        fingerprint : the protocol fingerprint
        before : only series finished before this time (default: every recorded one)
        exclude_series : leave out this series id (a series replayed is not compared
            with its own earlier record)

        Returns
        -------
        dict figure -> (n,) float64, ascending, the non-null values
        """
        columns = [getattr(SeriesRecord, name) for name in FIGURES]
        query = select(*columns).where(SeriesRecord.fingerprint == fingerprint)
        if before is not None:
            query = query.where(SeriesRecord.finished_at < _utc(before))
        if exclude_series is not None:
            query = query.where(SeriesRecord.series_id != exclude_series)
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
        except SQLAlchemyError as exc:
            raise HistoryError(f"history {shown(self.url)}: cannot read the figures: "
                               f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        out = {}
        for k, name in enumerate(FIGURES):
            values = [float(r[k]) for r in rows if r[k] is not None]
            out[name] = np.sort(np.asarray(values, dtype=np.float64))
        return out

    def rows(self, fingerprint: str | None = None, description: str | None = None,
             since: dt.datetime | None = None, until: dt.datetime | None = None,
             with_summary: bool = False) -> list[dict[str, Any]]:
        """Recorded series, oldest first, as column -> value mappings.

        Parameters
        ----------
        fingerprint : only this protocol fingerprint
        description : only series whose description contains this text (case-insensitive)
        since, until : only series finished at or after ``since`` and before ``until``
            (UTC when naive)
        with_summary : include the ``summary`` column (the qc.json object)
        """
        return list(self.iter_rows(fingerprint, description, since, until, with_summary))

    def iter_rows(self, fingerprint: str | None = None, description: str | None = None,
                  since: dt.datetime | None = None, until: dt.datetime | None = None,
                  with_summary: bool = False) -> Iterator[dict[str, Any]]:
        """:meth:`rows`, one at a time."""
        names = COLUMNS + (("summary",) if with_summary else ())
        query = select(*(getattr(SeriesRecord, n) for n in names))
        if fingerprint:
            query = query.where(SeriesRecord.fingerprint == fingerprint)
        if description:
            query = query.where(SeriesRecord.description.icontains(description, autoescape=True))
        if since is not None:
            query = query.where(SeriesRecord.finished_at >= _utc(since))
        if until is not None:
            query = query.where(SeriesRecord.finished_at < _utc(until))
        query = query.order_by(SeriesRecord.finished_at, SeriesRecord.id)
        try:
            with self.engine.connect() as connection:
                for row in connection.execute(query):
                    yield dict(zip(names, row))
        except SQLAlchemyError as exc:
            raise HistoryError(f"history {shown(self.url)}: cannot list the series: "
                               f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
