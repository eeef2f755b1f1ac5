"""Configuration sections of the outputs: the ZeroMQ publisher and the session folders."""

from __future__ import annotations

from dataclasses import dataclass

from rtsc.config.fields import _spec


@dataclass(frozen=True)
class PublishConfig:
    """ZeroMQ publisher."""

    endpoint: str = _spec("tcp://127.0.0.1:5556", doc="PUB socket endpoint")
    snapshot_endpoint: str = _spec("tcp://127.0.0.1:5557",
                                   doc="snapshot service endpoint (ROUTER; clients use REQ)")
    map_every: int = _spec(10, lo=1, hi=100000, doc="publish maps every N volumes")
    curve_secret_key: str | None = _spec(None, doc="CURVE: the server's .key_secret "
                                         "certificate; null: no encryption (loopback use)")
    curve_clients_dir: str | None = _spec(None, doc="CURVE: folder of allowed clients' "
                                          "public .key certificates")
    carpet_voxels: int = _spec(
        2000, lo=0, hi=50000,
        doc="in-mask voxels sampled into each volume message for the carpet plot (0: none)")
    volumes: bool = _spec(False, doc="publish each motion-corrected volume's in-mask voxels "
                                     "(float32, topic voxels; the mask as map voxels) for "
                                     "clients that decode themselves")


@dataclass(frozen=True)
class SessionConfig:
    """Outputs on disk."""

    dir: str = _spec("./sessions", doc="root folder; one sub-directory per series")
    series_timeout_s: float = _spec(
        30.0, lo=0.5, hi=86400.0,
        doc="a series without a known length ends after this many seconds without a volume")
    report: bool = _spec(True, doc="write report.html at series end (in a separate process)")
    max_volumes: int = _spec(
        100000, lo=1, hi=10_000_000,
        doc="longest run: a header announcing more volumes (NumberOfTemporalPositions, "
            "Siemens lRepetitions, Philips dynamics) leaves the run length unknown, with an "
            "alert; an image numbered beyond it (AcquisitionNumber, "
            "TemporalPositionIdentifier, InstanceNumber) is refused with an alert")



@dataclass(frozen=True)
class HistoryConfig:
    """The site's QC history: every finished series in a database, and each QC figure as
    a percentile among the earlier series of its protocol (docs/outputs.md, "History")."""

    enabled: bool = _spec(True, doc="record every finished series and publish "
                                    "site_percentiles; a database error never stops a run "
                                    "(alert history_unavailable)")
    url: str | None = _spec(None, doc="SQLAlchemy database URL, e.g. "
                                      "postgresql+psycopg://user@host/rtsc (pip extra "
                                      "rtsc[postgresql]); null: the SQLite file "
                                      "<session.dir>/history.sqlite")
    min_series: int = _spec(5, lo=1, hi=1_000_000,
                            doc="earlier series of the same protocol fingerprint with the "
                                "figure needed before its percentile is published (else null)")
    norm_percentile: float = _spec(5.0, lo=0.0, hi=100.0,
                                   doc="below_site_norm: warn once per series when tSNR's "
                                       "percentile falls under this")
    norm_min_volumes: int = _spec(30, lo=1, hi=10_000_000,
                                  doc="below_site_norm: volumes of the series needed before "
                                      "it may warn (early tSNR is noisy)")
