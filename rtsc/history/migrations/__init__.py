"""Alembic migration environment of the history database (run by HistoryStore.open)."""
