"""The history's tables (SQLAlchemy 2.x declarative models).

One table, ``series``: a row per finished series. The protocol fingerprint and its parts
are columns (:mod:`rtsc.history.fingerprint`), the QC figures compared as site
percentiles are columns (NULL when the series has none; a non-finite value is stored
as NULL, so SQLite and PostgreSQL hold the same), and the whole summary (qc.json) is a
JSON column. ``finished_at`` is UTC without a time zone (SQLite keeps none).
The schema is created and changed only by the Alembic migrations in
``rtsc/history/migrations/``; a test checks that they agree with these models.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the history's tables."""


class SeriesRecord(Base):
    """A finished series.

    Columns: ``series_id`` rtsc's opaque series id (unique: a series recorded again,
    e.g. replayed, replaces its row); ``finished_at`` UTC; ``fingerprint`` and its parts
    (``matrix_i``, ``matrix_j``, ``n_slices``, ``voxel_*_mm`` mm, ``tr_s`` s,
    ``sequence``, ``description``, ``station_hash``, ``mode``); ``n_volumes``,
    ``n_expected``; the figures ``tsnr``, ``snr``, ``fd_mean`` (mm), ``usable_fraction``
    (0-1), ``dvars_std``; MRIQC's ``fd_num``, ``fd_perc`` (%), ``tsnr_detrended``;
    ``verdict``; ``rtsc_version``; ``summary`` (the qc.json object).
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_id: Mapped[str] = mapped_column(String(64), unique=True)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(), index=True)
    fingerprint: Mapped[str] = mapped_column(String(16), index=True)
    matrix_i: Mapped[int] = mapped_column(Integer)
    matrix_j: Mapped[int] = mapped_column(Integer)
    n_slices: Mapped[int] = mapped_column(Integer)
    voxel_i_mm: Mapped[float] = mapped_column(Float)
    voxel_j_mm: Mapped[float] = mapped_column(Float)
    voxel_k_mm: Mapped[float] = mapped_column(Float)
    tr_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    sequence: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(64), index=True)
    station_hash: Mapped[str | None] = mapped_column(String(16), nullable=True)
    mode: Mapped[str] = mapped_column(String(16))
    n_volumes: Mapped[int] = mapped_column(Integer)
    n_expected: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tsnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    snr: Mapped[float | None] = mapped_column(Float, nullable=True)
    fd_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    usable_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    dvars_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    fd_num: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fd_perc: Mapped[float | None] = mapped_column(Float, nullable=True)
    tsnr_detrended: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(8), nullable=True)
    rtsc_version: Mapped[str] = mapped_column(String(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


#: The columns a listing or CSV export shows, in order (``summary`` excluded).
COLUMNS = tuple(c.name for c in SeriesRecord.__table__.columns if c.name != "summary")
