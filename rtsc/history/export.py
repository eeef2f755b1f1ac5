"""The history's rows as CSV and as MRIQC-style JSON.

CSV: one row per series, the columns of :data:`rtsc.history.models.COLUMNS` (no summary;
``finished_at`` ISO 8601 UTC with ``Z``; empty cells for nulls).

MRIQC-style JSON: a list with one object per series, as MRIQC writes a functional run's
image quality metrics: MRIQC's names where rtsc computes the same metric (``tsnr``,
``fd_mean``, ``fd_num``, ``fd_perc``, ``dvars_std``, ``size_x`` ... ``size_t``,
``spacing_x`` ... ``spacing_tr``), a ``bids_meta`` object (RepetitionTime,
SeriesDescription) and a ``provenance`` object (software, version, settings, series id,
time, fingerprint). What MRIQC does not define is under ``rtsc``: rtsc's SNR is head
mean over air noise SD (MRIQC's functional ``snr`` is the in-mask mean over SD of the
mean image, another quantity, so it is not given that name), the usable fraction,
detrended tSNR, the verdict and the fingerprint's parts.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any, Iterable

from rtsc.history.models import COLUMNS


def iso_utc(when: dt.datetime) -> str:
    """A naive UTC time as ISO 8601 with ``Z`` (microseconds kept)."""
    return when.replace(tzinfo=None).isoformat() + "Z"


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return iso_utc(value)
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def to_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as CSV text, a header line first (see the module notes)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in COLUMNS])
    return out.getvalue()


def mriqc_object(row: dict[str, Any]) -> dict[str, Any]:
    """One series as an MRIQC-style IQM object (see the module notes)."""
    summary = row.get("summary") or {}
    return {
        "tsnr": row["tsnr"], "fd_mean": row["fd_mean"], "fd_num": row["fd_num"],
        "fd_perc": row["fd_perc"], "dvars_std": row["dvars_std"],
        "size_x": row["matrix_i"], "size_y": row["matrix_j"], "size_z": row["n_slices"],
        "size_t": row["n_volumes"], "spacing_x": row["voxel_i_mm"],
        "spacing_y": row["voxel_j_mm"], "spacing_z": row["voxel_k_mm"],
        "spacing_tr": row["tr_s"],
        "bids_meta": {"RepetitionTime": row["tr_s"],
                      "SeriesDescription": row["description"],
                      "modality": "bold"},
        "provenance": {"software": "rtsc", "version": row["rtsc_version"],
                       "settings": {"fd_thres": summary.get("fd_threshold_mm")},
                       "series_id": row["series_id"],
                       "finished_at": iso_utc(row["finished_at"]),
                       "protocol_fingerprint": row["fingerprint"]},
        "rtsc": {"snr_background": row["snr"], "usable_fraction": row["usable_fraction"],
                 "tsnr_detrended": row["tsnr_detrended"], "verdict": row["verdict"],
                 "verdict_reasons": summary.get("verdict_reasons"),
                 "n_expected": row["n_expected"], "sequence": row["sequence"],
                 "station_hash": row["station_hash"], "mode": row["mode"]},
    }


def to_mriqc_json(rows: Iterable[dict[str, Any]]) -> str:
    """The rows (with their ``summary``) as an MRIQC-style JSON list."""
    return json.dumps([mriqc_object(row) for row in rows], indent=1, allow_nan=False) + "\n"
