"""Configuration sections of the intake: receiver, watcher, assembler, series filter, echoes."""

from __future__ import annotations

from dataclasses import dataclass

from rtsc.config.fields import _spec, parse_networks
from rtsc.errors import ConfigError


@dataclass(frozen=True)
class ReceiverConfig:
    """DICOM C-STORE SCP settings."""

    ae_title: str = _spec("RTSC", doc="called AE title rtsc answers to (1-16 characters)")
    host: str = _spec("127.0.0.1", doc="address to bind; 0.0.0.0 to accept from the network")
    port: int = _spec(11112, lo=0, hi=65535, doc="TCP port (0 picks a free port)")
    enabled: bool = _spec(True, doc="start the C-STORE receiver")
    called_aets: list[str] = _spec([], doc="called AE titles accepted; empty: any")
    calling_aets: list[str] = _spec([], doc="calling (peer) AE titles accepted; empty: any")
    allowed_hosts: list[str] = _spec([], doc="peer IP addresses or CIDR networks accepted; "
                                     "empty: any")
    max_associations: int = _spec(8, lo=1, hi=1000, doc="concurrent associations; more are "
                                  "rejected (local limit exceeded). A connection counts once "
                                  "its association request has arrived")
    request_timeout_s: float = _spec(
        5.0, lo=0.1, hi=3600.0,
        doc="a connection must deliver its whole association request (A-ASSOCIATE-RQ) "
            "within this many seconds of connecting (and within acse_timeout_s), else it "
            "is closed")
    max_pending_per_host: int = _spec(
        16, lo=1, hi=1000,
        doc="connections from one peer address still to deliver their association "
            "request; more are closed at once")
    max_dataset_mb: float = _spec(512.0, lo=0.001, hi=100000.0,
                                  doc="larger datasets are refused (out of resources), "
                                  "nothing archived")
    queue_in_memory: int = _spec(32, lo=1, hi=100000,
                                 doc="datasets waiting for the pipeline held in memory; "
                                 "beyond, the pipeline reads them back from the archive")
    archive_wait_ms: float = _spec(20.0, lo=0.0, hi=1000.0,
                                   doc="a dataset handed to an idle pipeline is answered once "
                                   "its volume is published or after this long, so that the "
                                   "sender's next dataset does not slow the processing; "
                                   "success is answered only after the archive write either "
                                   "way, which runs alongside (0: at once)")
    acse_timeout_s: float = _spec(30.0, lo=0.1, hi=3600.0,
                                  doc="seconds to wait for association messages")
    dimse_timeout_s: float = _spec(30.0, lo=0.1, hi=3600.0,
                                   doc="seconds to wait for DIMSE messages")
    network_timeout_s: float = _spec(60.0, lo=0.1, hi=86400.0,
                                     doc="an idle association is closed after this long")

    def __post_init__(self) -> None:
        parse_networks(self.allowed_hosts)  # an invalid entry is refused at load


@dataclass(frozen=True)
class WatcherConfig:
    """Folder watcher, the second input."""

    dir: str | None = _spec(None, doc="folder where the scanner exports files, or null")
    poll_s: float = _spec(0.1, lo=0.01, hi=10.0, doc="seconds between folder scans")
    settle_s: float = _spec(0.2, lo=0.0, hi=60.0,
                            doc="a file must keep its size this long before it is read")
    retry_s: float = _spec(
        5.0, lo=0.0, hi=3600.0,
        doc="a file that is not yet whole DICOM (unparseable, or pixel data short), or a "
            "Philips REC shorter than its PAR declares, is retried whenever it changes; "
            "unchanged this long, it is taken as it is and alerted; half of a PAR/REC pair "
            "waits this long for the other half, then is archived and alerted")
    parrec_reorder_s: float = _spec(
        2.0, lo=0.0, hi=600.0,
        doc="a Philips PAR/REC dump waits this long for an earlier dump of its series that "
            "has not arrived (an out-of-order export) before it is processed without it")
    parrec_image_type: int | None = _spec(
        None, lo=0, hi=255,
        doc="PAR image_type_mr processed when a dump holds several (null: 0, magnitude, if "
            "present, else the lowest: XTC real-time dumps hold magnitude as 16, phase as 17)")


@dataclass(frozen=True)
class AssemblerConfig:
    """Turning slices, mosaics and multi-frame files into volumes."""

    slice_timeout_s: float = _spec(
        10.0, lo=0.1, hi=3600.0,
        doc="an incomplete volume is published, zero-filled, with missing_slices after this "
            "many seconds")
    slices_per_volume: int | None = _spec(
        None, lo=1, hi=65536,
        doc="slice count of single-slice series when the header lacks ImagesInAcquisition "
            "(at most max_slices)")
    max_slices: int = _spec(
        1024, lo=1, hi=65536,
        doc="most slices a volume may have: a header announcing more (ImagesInAcquisition, "
            "GE's or Philips' slice count, NumberOfImagesInMosaic, the frames of one "
            "multi-frame time point) is refused with an alert, not allocated")

    def __post_init__(self) -> None:
        if self.slices_per_volume is not None and self.slices_per_volume > self.max_slices:
            raise ConfigError(f"assembler.slices_per_volume: {self.slices_per_volume} is more "
                              f"than assembler.max_slices ({self.max_slices})")


@dataclass(frozen=True)
class SeriesFilterConfig:
    """Which series enter the pipeline: BOLD time series only; the rest is archived.

    Matching is case-insensitive; a series is skipped when any rule matches.
    """

    enabled: bool = _spec(True, doc="recognise and skip non-BOLD series: they are archived, "
                                    "not processed, with one info alert skipped_series")
    description_suffixes: list[str] = _spec(
        ["_SBRef", "_MoCoSeries", "_PhysioLog", "_Physio"],
        doc="SeriesDescription endings of series that are not BOLD time series")
    description_words: list[str] = _spec(
        ["localizer", "localiser", "scout"],
        doc="words anywhere in SeriesDescription marking a localizer")
    image_types: list[str] = _spec(
        ["DERIVED", "MOCO", "PHYSIO", "LOCALIZER", "SBREF"],
        doc="ImageType values (any position) of skipped series")
    sop_classes: list[str] = _spec(
        ["1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.4.2",
         "1.2.840.10008.5.1.4.1.1.7"],
        doc="SOP classes archived silently: raw data (PMU physio), MR spectroscopy, "
            "secondary capture")
    require_epi: bool = _spec(
        True, doc="skip series whose ScanningSequence (when present) does not contain EP; "
                  "Philips, which writes GR or SE for its EPI, by its own tags "
                  "(ScanningTechnique (2001,xx20) FEEPI, EPI factor; see "
                  "rtsc.dicom.recognise)")


@dataclass(frozen=True)
class MultiEchoConfig:
    """Multi-echo BOLD: every echo is its own series; optionally one more, combined."""

    combine: str = _spec("first", choices=("first", "t2star"),
                         doc="first: echo 1 is the series to watch (no extra series); "
                             "t2star: also a T2*-weighted sum of the echoes (Posse 1999), as "
                             "one more series")
    n_echoes: int = _spec(3, lo=2, hi=16, doc="echoes per volume (t2star waits for all)")
    t2star_volumes: int = _spec(5, lo=1, hi=10000,
                                doc="volumes whose echo means fit T2*; weights then frozen")

