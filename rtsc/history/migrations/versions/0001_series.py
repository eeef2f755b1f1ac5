"""The series table: one row per finished series.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("series_id", sa.String(64), nullable=False, unique=True),
        sa.Column("finished_at", sa.DateTime(), nullable=False),
        sa.Column("fingerprint", sa.String(16), nullable=False),
        sa.Column("matrix_i", sa.Integer(), nullable=False),
        sa.Column("matrix_j", sa.Integer(), nullable=False),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("voxel_i_mm", sa.Float(), nullable=False),
        sa.Column("voxel_j_mm", sa.Float(), nullable=False),
        sa.Column("voxel_k_mm", sa.Float(), nullable=False),
        sa.Column("tr_s", sa.Float(), nullable=True),
        sa.Column("sequence", sa.String(64), nullable=False),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("station_hash", sa.String(16), nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("n_volumes", sa.Integer(), nullable=False),
        sa.Column("n_expected", sa.Integer(), nullable=True),
        sa.Column("tsnr", sa.Float(), nullable=True),
        sa.Column("snr", sa.Float(), nullable=True),
        sa.Column("fd_mean", sa.Float(), nullable=True),
        sa.Column("usable_fraction", sa.Float(), nullable=True),
        sa.Column("dvars_std", sa.Float(), nullable=True),
        sa.Column("fd_num", sa.Integer(), nullable=True),
        sa.Column("fd_perc", sa.Float(), nullable=True),
        sa.Column("tsnr_detrended", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(8), nullable=True),
        sa.Column("rtsc_version", sa.String(32), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
    )
    op.create_index("ix_series_finished_at", "series", ["finished_at"])
    op.create_index("ix_series_fingerprint", "series", ["fingerprint"])
    op.create_index("ix_series_description", "series", ["description"])


def downgrade() -> None:
    op.drop_index("ix_series_description", table_name="series")
    op.drop_index("ix_series_fingerprint", table_name="series")
    op.drop_index("ix_series_finished_at", table_name="series")
    op.drop_table("series")
