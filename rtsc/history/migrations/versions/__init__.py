"""Alembic revisions of the history database, oldest first."""
