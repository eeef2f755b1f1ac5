"""`rtsc history list|export`: the recorded series by protocol and date.

The database is ``history.url`` of the configuration (default the SQLite file
``<session.dir>/history.sqlite``), or ``--url``. Dates are UTC: ``--since 2026-12-01``
from that day's start, ``--until 2026-12-04`` to that day's end (a full ISO time,
``2026-12-04T13:00``, is taken as given).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from rtsc.config import Config
from rtsc.errors import HistoryError


def _date(text: str, end: bool) -> dt.datetime:
    try:
        if len(text) == 10:  # a day: its start, or the next day's start for --until
            day = dt.datetime.fromisoformat(text)
            return day + dt.timedelta(days=1) if end else day
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO "
                                         f"time (YYYY-MM-DDTHH:MM)") from None
    return when


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``list`` and ``export`` sub-commands of ``rtsc history``."""
    sub = parser.add_subparsers(dest="history_command", required=True)
    for name, text in (("list", "one line per recorded series, oldest first"),
                       ("export", "write the recorded series to a file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                       help="config YAML (also accepted before the sub-command)")
        p.add_argument("--url", default=None,
                       help="database URL (default: history.url, else "
                            "<session.dir>/history.sqlite)")
        p.add_argument("--protocol", default=None, metavar="FINGERPRINT",
                       help="only this protocol fingerprint (16 hex digits)")
        p.add_argument("--description", default=None, metavar="TEXT",
                       help="only series whose description contains TEXT (any case)")
        p.add_argument("--since", type=lambda t: _date(t, end=False), default=None,
                       metavar="DATE", help="finished on or after DATE (UTC)")
        p.add_argument("--until", type=lambda t: _date(t, end=True), default=None,
                       metavar="DATE", help="finished on or before DATE (UTC)")
        if name == "export":
            p.add_argument("--format", choices=("csv", "mriqc-json"), required=True)
            p.add_argument("--out", type=Path, required=True, help="the file written")


def _line(row: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return "-" if row[key] is None else format(row[key], fmt)

    return (f"{row['finished_at']:%Y-%m-%d %H:%M:%S}  {row['series_id']:<12}  "
            f"{row['fingerprint']}  {row['description'][:24]:<24}  "
            f"{row['matrix_i']}x{row['matrix_j']}x{row['n_slices']}  "
            f"TR {num('tr_s', '.3g'):>5}  {row['n_volumes']:>5}  {num('tsnr', '.1f'):>6}  "
            f"{num('snr', '.1f'):>6}  {num('fd_mean', '.3f'):>6}  "
            f"{num('usable_fraction', '.2f'):>5}  {num('dvars_std', '.2f'):>6}  "
            f"{row['verdict'] or '-'}")


HEADER = ("finished (UTC)       series        fingerprint       description               "
          "matrix     TR      vols    tSNR     SNR  FD mean  usable  DVARS  verdict")


def run(args: argparse.Namespace, config: Config) -> int:
    """Run ``rtsc history list`` or ``export``; print to stdout."""
    from rtsc.history.export import to_csv, to_mriqc_json
    from rtsc.history.store import HistoryStore, history_url

    url = args.url or history_url(config.history.url, config.session.dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise HistoryError(f"no history database at {url[len('sqlite:///'):]} (history.url, "
                           f"--url, or session.dir of --config)")
    with HistoryStore.open(url) as store:
        rows = store.rows(args.protocol, args.description, args.since, args.until,
                          with_summary=args.history_command == "export")
    if args.history_command == "list":
        print(HEADER)
        for row in rows:
            print(_line(row))
        print(f"{len(rows)} series")
        return 0
    text = to_csv(rows) if args.format == "csv" else to_mriqc_json(rows)
    args.out.write_text(text, encoding="utf-8")
    print(f"{len(rows)} series -> {args.out}")
    return 0
