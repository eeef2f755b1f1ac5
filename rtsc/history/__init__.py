"""The site's QC history: every finished series in a database, and the live yardstick.

``fingerprint.py`` the protocol fingerprint (what makes two series comparable);
``percentile.py`` the percentile rank and the QC figures compared, live and at the end;
``models.py`` the SQLAlchemy tables; ``migrations/`` their Alembic migrations (run by
:meth:`HistoryStore.open`); ``store.py`` :class:`HistoryStore` (record, earlier figures,
queries); ``live.py`` the per-series state on the pipeline worker and the failure
policy (a database error is an alert, never a stopped run); ``export.py`` and
``commands.py`` `rtsc history list|export`. See docs/outputs.md, "History".
"""
