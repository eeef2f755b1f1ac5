"""Typed configuration, validated once at load.

The YAML file maps onto frozen dataclasses. Every field declares its type and, where
it matters, its allowed range or choices; :func:`load_config` refuses an unknown key,
a wrong type or an out-of-range value with a :class:`~rtsc.errors.ConfigError` that
names the key path, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from rtsc.errors import ConfigError


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[Any, ...] | None = None, length: int | None = None,
          doc: str = "") -> Any:
    """A dataclass field with validation metadata (inclusive range, choices, list length)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "length": length, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
                                   doc="a dataset handed to an idle pipeline is archived once "
                                   "its volume is published or after this long, so that the "
                                   "archive write does not slow the processing; success is "
                                   "answered only after the write either way (0: at once)")
    acse_timeout_s: float = _spec(30.0, lo=0.1, hi=3600.0,
                                  doc="seconds to wait for association messages")
    dimse_timeout_s: float = _spec(30.0, lo=0.1, hi=3600.0,
                                   doc="seconds to wait for DIMSE messages")
    network_timeout_s: float = _spec(60.0, lo=0.1, hi=86400.0,
                                     doc="an idle association is closed after this long")

    def __post_init__(self) -> None:
        from rtsc.intake.access import parse_networks  # validates at load

        parse_networks(self.allowed_hosts)


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
            "unchanged this long, it is taken as it is; half of a PAR/REC pair waits this "
            "long for the other half, then is archived and alerted")
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
        doc="an incomplete volume is published with missing_slices after this many seconds")
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

    enabled: bool = _spec(True, doc="recognise and skip non-BOLD series")
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
                  "Philips, which writes GR or SE for its EPI, by its own tags (ScanningTechnique "
                  "FEEPI, EPI factor; see rtsc.dicom.recognise)")


@dataclass(frozen=True)
class MultiEchoConfig:
    """Multi-echo BOLD: every echo is its own series; optionally one more, combined."""

    combine: str = _spec("first", choices=("first", "t2star"),
                         doc="first: echo 1 is the series to watch (no extra series); "
                             "t2star: also a T2*-weighted sum of the echoes (Posse 1999)")
    n_echoes: int = _spec(3, lo=2, hi=16, doc="echoes per volume (t2star waits for all)")
    t2star_volumes: int = _spec(5, lo=1, hi=10000,
                                doc="volumes whose echo means fit T2*; weights then frozen")


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
class PipelineConfig:
    """The processing stages."""

    mode: str = _spec("brain", choices=("brain", "spinal_cord"))
    fd_radius_mm: float = _spec(50.0, lo=1.0, hi=500.0, doc="sphere radius turning rotations into mm")
    fd_thresholds_mm: list[float] = _spec([0.2, 0.3, 0.4], lo=0.0, hi=100.0,
                                          doc="FD thresholds counted as usable frames")
    mask_fraction: float = _spec(
        0.2, lo=0.0, hi=1.0,
        doc="automatic mask: voxels above this fraction of the 98th percentile of the first volume")
    dvars_outlier: float = _spec(1.5, lo=0.0, hi=100.0, doc="std_dvars above this flags an outlier")
    series_memory_mb: float = _spec(
        128.0, lo=1.0, hi=1e6,
        doc="masked series held in memory for the exact DVARS at series end, MB; later "
            "volumes go to a temporary file, so memory does not grow with the series")
    backlog: str = _spec("catch_up", choices=("catch_up", "newest"),
                         doc="volumes waiting: process each (catch_up), or run the live "
                         "stages on the newest only (every volume is still archived and "
                         "in bold.nii.gz)")
    threads: int = _spec(1, lo=1, hi=256,
                         doc="numba threads for the pipeline's kernels; 1 keeps latency steady "
                             "when the receiver's threads share the cores")


@dataclass(frozen=True)
class MotionConfig:
    """Online rigid registration (motion stage)."""

    enabled: bool = _spec(True, doc="register every volume to the reference")
    reference: str = _spec("first", doc="'first', 'volume:N' (0-based) or a NIfTI path "
                                        "in the acquired grid")
    smooth_vox: float = _spec(1.2, lo=0.0, hi=5.0,
                              doc="Gaussian sigma (voxels) applied to both images before the fit")
    max_points: int = _spec(8000, lo=1000, hi=10_000_000, doc="mask voxels used per iteration")
    reslice: str = _spec("head", choices=("head", "full"),
                         doc="interpolate the head (registration mask + 3 voxels) and keep the "
                             "acquired background, or interpolate every voxel")
    max_iterations: int = _spec(30, lo=1, hi=500)
    tolerance_mm: float = _spec(0.01, lo=1e-6, hi=1.0,
                                doc="stop when an update moves points by less than this")
    max_jump_mm: float = _spec(10.0, lo=0.1, hi=1000.0,
                               doc="a volume whose head moved more than this from the previous "
                                   "one is flagged as not registered")
    fail_rms_factor: float = _spec(3.0, lo=1.0, hi=1000.0,
                                   doc="residual above this multiple of the median of the "
                                       "last 5 volumes: registration failed")


@dataclass(frozen=True)
class CordMocoConfig:
    """Slice-wise motion correction of spinal cord mode (rtsc.pipeline.motion.slicewise)."""

    reference_volumes: int = _spec(5, lo=1, hi=10000,
                                   doc="the reference is the mean of the first N volumes")
    reference: str | None = _spec(None, doc="reference NIfTI in the acquired grid instead, "
                                            "or null")
    mask_radius_mm: float = _spec(15.0, lo=1.0, hi=200.0,
                                  doc="radius of the cylindrical mask around the cord")
    poly_degree: int = _spec(2, lo=-1, hi=10, doc="polynomial along z regularising Tx and "
                                                  "Ty (two passes); -1: none")
    output: str = _spec("estimated", choices=("estimated", "regularised"),
                        doc="publish each good slice's own estimate (the polynomial starts "
                            "the second pass and replaces failed slices), or the "
                            "polynomial itself (SCT)")
    median_window: int = _spec(0, lo=0, hi=1000,
                               doc="causal temporal median of the translations over this "
                                   "many volumes (0: off)")
    smooth_vox: float = _spec(0.0, lo=0.0, hi=5.0, doc="in-plane Gaussian sigma (voxels) "
                                                       "applied to both images")
    max_iterations: int = _spec(30, lo=1, hi=500)
    tolerance_vox: float = _spec(0.002, lo=1e-6, hi=1.0,
                                 doc="stop when an update is shorter than this (voxels)")
    max_shift_mm: float = _spec(5.0, lo=0.1, hi=100.0,
                                doc="a slice shifted more than this fails (falls back)")
    fail_rms_factor: float = _spec(3.0, lo=1.0, hi=1000.0,
                                   doc="a slice residual above this x its own recent median "
                                       "fails (falls back)")
    reslice: str = _spec("fourier", choices=("fourier", "linear"),
                         doc="corrected volume by a per-slice Fourier (phase) shift, which "
                             "keeps the noise and so the tSNR, or by bilinear interpolation")


@dataclass(frozen=True)
class CordQcConfig:
    """Cord QC of spinal cord mode (rtsc.pipeline.cord.qc)."""

    dvars_outlier: float = _spec(1.5, lo=0.0, hi=100.0,
                                 doc="cord-mask std_dvars above this flags an outlier")
    dropout_fraction: float = _spec(0.3, lo=0.01, hi=1.0,
                                    doc="a slice's cord signal this fraction below its own "
                                        "baseline is a dropout")
    dropout_window: int = _spec(10, lo=1, hi=10000, doc="volumes in each slice's baseline")
    dropout_min_history: int = _spec(3, lo=1, hi=10000,
                                     doc="volumes a slice needs before it is judged")
    resp_window: int = _spec(32, lo=8, hi=10000,
                             doc="volumes pooled for the respiratory share of the "
                                 "phase-encoding shift")
    resp_band_hz: list[float] = _spec([0.15, 0.45], lo=0.0, hi=100.0, length=2,
                                      doc="respiratory band, Hz")


@dataclass(frozen=True)
class SpinalCordConfig:
    """Spinal cord mode."""

    mask: str | None = _spec(None, doc="cord mask NIfTI in the acquired grid, or null")
    moco: CordMocoConfig = field(default_factory=CordMocoConfig,
                                 metadata={"doc": "slice-wise motion correction"})
    qc: CordQcConfig = field(default_factory=CordQcConfig, metadata={"doc": "cord QC"})


@dataclass(frozen=True)
class PhysioConfig:
    """Physiological recordings and RETROICOR regressors in a slice-wise GLM."""

    file: str | None = _spec(None, doc="BIDS *_physio.tsv[.gz] (a .tsv may grow during the "
                                       "run) or Siemens .puls/.resp; null: no RETROICOR")
    format: str = _spec("auto", choices=("auto", "bids", "siemens"))
    preset: str = _spec("tapas", choices=("tapas", "spinal"),
                        doc="tapas: cardiac 3 / respiratory 4 / interaction 1x1 (18 columns); "
                            "spinal: 4 / 4 / 2x2 + CSF (33)")
    cardiac_order: int | None = _spec(None, lo=0, hi=10, doc="null: the preset's")
    respiratory_order: int | None = _spec(None, lo=0, hi=10, doc="null: the preset's")
    interaction_order: list[int] | None = _spec(None, lo=0, hi=10, length=2,
                                                doc="[cardiac, respiratory]; null: the preset's")
    csf: bool | None = _spec(None, doc="CSF regressor (slice mean in csf_mask); null: the "
                                       "preset's")
    csf_mask: str | None = _spec(None, doc="CSF mask NIfTI in the acquired grid")
    lag_s: float = _spec(3.0, lo=0.5, hi=60.0,
                         doc="physiology needed after a volume's last slice before its "
                             "regressors are made (confirms the next heartbeat)")
    replay_after_run: bool = _spec(True, doc="keep volumes whose physiology has not come "
                                             "and fit them at series end (a log written "
                                             "after the run)")

    def __post_init__(self) -> None:
        csf = self.csf if self.csf is not None else self.preset == "spinal"
        if self.file is not None and csf and self.csf_mask is None:
            raise ConfigError("physio.csf_mask: null, but the CSF regressor is on (physio.csf "
                              f"{self.csf!r}, preset {self.preset!r}); give a CSF mask NIfTI "
                              "or set physio.csf: false")


@dataclass(frozen=True)
class GlmConfig:
    """General linear model (issue: glm)."""

    events: str | None = _spec(None, doc="BIDS events.tsv path; null (and no conditions): "
                                         "no GLM")
    conditions: dict[str, Any] = _spec({}, doc="inline paradigm: trial_type -> {onsets_s: "
                                               "[...], durations_s: s or [...]}")
    contrasts: dict[str, str] = _spec({}, doc="name -> expression over trial types; "
                                              "empty: one contrast per trial type")
    hrf: str = _spec("spm", choices=("spm", "spm_derivative", "delayed"))
    high_pass_s: float = _spec(128.0, lo=1.0, hi=10000.0)
    drift: str = _spec("cosine", choices=("cosine", "polynomial", "none"))
    drift_order: int = _spec(2, lo=1, hi=10, doc="polynomial drift order")
    motion_confounds: int = _spec(24, choices=(0, 6, 12, 24),
                                  doc="motion columns: 6 parameters, + derivatives (12), "
                                      "+ squares of both (24, Friston's: with motion that "
                                      "follows the task on a real brain, 6 let 3x the "
                                      "nominal false positives through at its edges; a run "
                                      "shorter than twice the design's columns gets 6); "
                                      "needs motion.enabled")
    n_volumes: int | None = _spec(None, lo=2, hi=100000,
                                  doc="run length for the design when the DICOM header "
                                      "does not give it (NumberOfTemporalPositions)")
    forgetting: float = _spec(1.0, lo=0.5, hi=1.0,
                              doc="exponential forgetting per volume; 1 = exact OLS")
    p_value: float = _spec(0.001, lo=1e-12, hi=0.5, doc="one-sided threshold for the summary")
    roi: Any = _spec(None, doc="mask NIfTI path, {center_ras_mm: [x,y,z], radius_mm: r}, "
                               "{contrast: name, top_k: k, within: ..., freeze_after: n}, "
                               "or a mapping of ROI names to these")
    feedback: str = _spec("psc", choices=("psc", "contrast"),
                          doc="the `feedback` value: percent signal change of feedback_roi, "
                              "or the GLM contrast effect averaged over it")
    feedback_roi: str | None = _spec(None, doc="ROI name; null: the first ROI")
    feedback_contrast: str | None = _spec(None, doc="contrast name for feedback: contrast; "
                                                    "null: the ROI's or the first contrast")
    baseline_volumes: int | None = _spec(None, lo=1, hi=100000,
                                         doc="PSC baseline: the first N volumes; null: the "
                                             "design's rest volumes (the first 10 without "
                                             "events)")
    detrend: str = _spec("linear", choices=("linear", "none"),
                         doc="ROI time course: remove a line fitted with the task columns")


@dataclass(frozen=True)
class AlertRuleConfig:
    """One alert rule: ``metric op value`` in ``count`` of the last ``window`` volumes.

    It fires once when the count is reached and fires again only after it has cleared
    (the count fell to ``clear_count`` or below): hysteresis, so one condition is never
    announced every volume.
    """

    code: str = _spec("motion", doc="alert code published")
    level: str = _spec("warning", choices=("info", "warning", "critical"))
    metric: str = _spec("framewise_displacement",
                        doc="a numeric field of the volume message (framewise_displacement, "
                            "tsnr, snr, latency_s, std_dvars, ...) or flag:<name> (1 when "
                            "the volume has that flag)")
    op: str = _spec(">", choices=(">", "<", ">=", "<="))
    value: float = _spec(0.5, doc="threshold, in the metric's units (x TR for unit: tr)")
    unit: str = _spec("value", choices=("value", "tr"),
                      doc="tr: the threshold is value x the series' TR (seconds)")
    count: int = _spec(3, lo=1, hi=100000, doc="hits needed in the window to fire")
    window: int = _spec(10, lo=1, hi=100000, doc="volumes looked at")
    clear_count: int = _spec(0, lo=0, hi=100000,
                             doc="the rule re-arms when the hits in the window fall to this")
    after_volumes: int = _spec(0, lo=0, hi=100000, doc="not evaluated before this volume index")
    notify_clear: bool = _spec(False, doc="publish an info alert when the condition clears")


def _default_rules() -> list[AlertRuleConfig]:
    return [
        AlertRuleConfig(code="motion", level="warning", metric="framewise_displacement",
                        op=">", value=0.5, count=3, window=10),
        AlertRuleConfig(code="processing_lag", level="warning", metric="latency_s", op=">",
                        value=1.0, unit="tr", count=1, window=3),
        AlertRuleConfig(code="low_tsnr", level="warning", metric="tsnr", op="<", value=30.0,
                        count=5, window=5, after_volumes=20),
        AlertRuleConfig(code="spike", level="warning", metric="flag:spike", op=">=",
                        value=1.0, count=1, window=1),
        AlertRuleConfig(code="late_volume", level="info", metric="flag:late_volume",
                        op=">=", value=1.0, count=1, window=1),
    ]


@dataclass(frozen=True)
class ProtocolConfig:
    """The protocol a series must match (null: not checked)."""

    shape: list[int] | None = _spec(None, lo=1, hi=4096, length=3, doc="matrix nx, ny, nz")
    tr_s: float | None = _spec(None, lo=0.01, hi=100.0, doc="repetition time, seconds")
    voxel_size_mm: list[float] | None = _spec(None, lo=0.01, hi=100.0, length=3)
    tolerance: float = _spec(0.01, lo=0.0, hi=1.0,
                             doc="relative tolerance on TR and voxel size")


@dataclass(frozen=True)
class VerdictConfig:
    """Pass / warn / fail criteria of a series (null: not checked)."""

    fd_mean_warn_mm: float | None = _spec(0.2, lo=0.0, hi=100.0)
    fd_mean_fail_mm: float | None = _spec(0.5, lo=0.0, hi=100.0)
    usable_warn_fraction: float | None = _spec(
        0.8, lo=0.0, hi=1.0, doc="usable frames under qc.criterion_threshold_mm / volumes")
    usable_fail_fraction: float | None = _spec(0.5, lo=0.0, hi=1.0)
    tsnr_warn: float | None = _spec(30.0, lo=0.0, hi=10000.0, doc="median tSNR in the mask")
    tsnr_fail: float | None = _spec(15.0, lo=0.0, hi=10000.0)
    spike_warn_volumes: int | None = _spec(1, lo=0, hi=100000)
    spike_fail_fraction: float | None = _spec(0.05, lo=0.0, hi=1.0)
    missing_warn_volumes: int | None = _spec(1, lo=0, hi=100000)
    missing_fail_fraction: float | None = _spec(0.1, lo=0.0, hi=1.0)
    registration_fail_fraction: float | None = _spec(0.1, lo=0.0, hi=1.0)
    incomplete: str = _spec("fail", choices=("pass", "warn", "fail"),
                            doc="a series that stopped before its announced end")


@dataclass(frozen=True)
class QcConfig:
    """Quality control: tSNR, spikes, SNR, usable frames, timing, alerts, verdict."""

    enabled: bool = _spec(True)
    spike_threshold: float = _spec(6.0, lo=1.0, hi=1000.0,
                                   doc="|robust z| of a slice's background mean against its "
                                       "own history that flags a spike")
    spike_window: int = _spec(30, lo=3, hi=10000, doc="history kept per slice, volumes")
    spike_min_history: int = _spec(8, lo=3, hi=10000,
                                   doc="volumes a slice needs before it is tested")
    background_dilate_vox: int = _spec(3, lo=0, hi=50,
                                       doc="air = outside the head dilated by this")
    min_run_frames: int = _spec(0, lo=0, hi=10000,
                                doc="FIRMM: runs of usable frames shorter than this are "
                                    "discarded (0: keep all)")
    criterion_threshold_mm: float = _spec(0.2, lo=0.0, hi=100.0,
                                          doc="FD threshold of the session criterion")
    criterion_minutes: float = _spec(12.5, lo=0.0, hi=10000.0,
                                     doc="clean minutes wanted over the session")
    respiration_filter: bool = _spec(False, doc="band-stop the motion parameters at the "
                                                "breathing rate before FD (fast TRs)")
    breaths_per_min: float = _spec(18.0, lo=1.0, hi=120.0)
    respiration_bandwidth_bpm: float = _spec(6.0, lo=0.1, hi=120.0,
                                             doc="width of the stop band")
    late_factor: float = _spec(1.5, lo=1.0, hi=100.0,
                               doc="a volume arriving more than this x TR after the "
                                   "previous one is late")
    no_volume_tr: float = _spec(2.0, lo=0.0, hi=100000.0,
                                doc="alert when no volume came for this many TRs (0: off)")
    fd_jump_mm: float | None = _spec(
        1.0, lo=0.01, hi=1000.0,
        doc="a single volume whose framewise displacement exceeds this alerts at once "
            "(code motion_jump), besides the motion rule's run of small moves (null: off)")
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    alerts: list[AlertRuleConfig] = field(default_factory=_default_rules,
                                          metadata={"doc": "alert rules"})
    verdict: VerdictConfig = field(default_factory=VerdictConfig)


@dataclass(frozen=True)
class CordSimConfig:
    """The simulator's spinal cord run (``simulator.anatomy: spinal_cord``)."""

    shape: list[int] = _spec([128, 128, 24], lo=4, hi=512, length=3, doc="matrix nx, ny, nz")
    voxel_size_mm: list[float] = _spec([1.0, 1.0, 5.0], lo=0.1, hi=20.0, length=3)
    tr_s: float = _spec(2.3, lo=0.05, hi=60.0)
    slice_order: str = _spec("interleaved", choices=("interleaved", "ascending", "descending"))
    noise_sigma: float = _spec(20.0, lo=0.0, hi=10000.0, doc="thermal noise SD, intensity "
                                                              "units (cord about 1000)")
    activation_pct: float = _spec(4.0, lo=0.0, hi=100.0,
                                  doc="BOLD amplitude in the left dorsal horn, percent")
    hrf: str = _spec("spm", choices=("spm", "delayed"),
                     doc="response shape: canonical (peak ~5 s) or delayed (peak ~9 s)")
    block_s: float = _spec(20.0, lo=1.0, hi=1000.0, doc="task and rest block length, s")
    resp_shift_mm: float = _spec(0.8, lo=0.0, hi=20.0,
                                 doc="peak-to-peak A-P shift locked to breathing, mm")
    cardiac_shift_mm: float = _spec(0.15, lo=0.0, hi=20.0,
                                    doc="peak-to-peak A-P shift locked to the heartbeat, mm")
    lr_fraction: float = _spec(0.25, lo=0.0, hi=2.0, doc="R-L motion / A-P motion")
    n_swallows: int = _spec(2, lo=0, hi=1000, doc="swallowing jumps (1-2 volumes each)")
    swallow_shift_mm: float = _spec(2.5, lo=0.0, hi=50.0, doc="A-P size of a swallow, mm")
    heart_bpm: float = _spec(66.0, lo=20.0, hi=250.0)
    breaths_per_min: float = _spec(15.0, lo=2.0, hi=60.0)
    cardiac_csf: float = _spec(0.08, lo=0.0, hi=1.0, doc="CSF pulsation, fraction of signal")
    cardiac_cord: float = _spec(0.03, lo=0.0, hi=1.0, doc="cardiac signal in the cord, fraction")
    respiratory: float = _spec(0.025, lo=0.0, hi=1.0, doc="respiratory signal, fraction")
    interaction: float = _spec(0.02, lo=0.0, hi=1.0,
                               doc="cardiac x respiratory term in CSF, fraction")
    physio_hz: float = _spec(100.0, lo=10.0, hi=2000.0, doc="physiology sampling rate, Hz")
    physio_progressive: bool = _spec(True, doc="append the BIDS physio .tsv while the run "
                                               "is produced (the .tsv.gz comes at the end)")
    psf_samples: int = _spec(4, lo=1, hi=8, doc="in-plane sub-samples per axis per voxel")
    bandwidth_per_pixel_phase_hz: float = _spec(17.0, lo=1.0, hi=1000.0,
                                                doc="BandwidthPerPixelPhaseEncode written, Hz")


@dataclass(frozen=True)
class SimulatorConfig:
    """The scanner simulator."""

    anatomy: str = _spec("brain", choices=("brain", "epi_image", "mni152", "spinal_cord"),
                         doc="brain: the analytic phantom (wholly inside the field of view); "
                             "epi_image: a measured EPI volume (simulator.base_image) cut by "
                             "the field of view, its matrix and voxel size replacing shape and "
                             "voxel_size_mm; mni152: nilearn's MNI152 template with EPI "
                             "contrast on shape x voxel_size_mm, vertex and inferior "
                             "cerebellum cut (simulator/real_anatomy.py); spinal_cord: the "
                             "cervical cord run of simulator.cord (its shape, voxel size and "
                             "TR replace those above)")
    base_image: str | None = _spec(None, doc="anatomy epi_image: one EPI volume, a NIfTI or "
                                             "a whole-volume DICOM file (e.g. a Siemens "
                                             "mosaic such as heudiconv's axasc35.dcm)")
    cord: CordSimConfig = field(default_factory=CordSimConfig)
    shape: list[int] = _spec([64, 64, 36], lo=4, hi=512, length=3, doc="matrix nx, ny, nz")
    voxel_size_mm: list[float] = _spec([3.0, 3.0, 3.0], lo=0.1, hi=20.0, length=3)
    tr_s: float = _spec(2.0, lo=0.05, hi=60.0)
    n_volumes: int = _spec(60, lo=1, hi=100000)
    format: str = _spec("mosaic", choices=("mosaic", "slices", "multiframe"))
    vendor: str = _spec("siemens", choices=("siemens", "philips"),
                        doc="philips: classic single-slice DICOM as a Philips scanner writes "
                            "it (format slices; files numbered slice by slice across time, "
                            "ScanningSequence GR with the FEEPI private tags)")
    seed: int = _spec(0, lo=0, hi=2**31 - 1)
    noise_sigma: float = _spec(10.0, lo=0.0, hi=10000.0, doc="thermal noise SD, intensity units")
    activation_pct: float = _spec(3.0, lo=0.0, hi=100.0, doc="BOLD amplitude, percent")
    max_trans_mm: float = _spec(1.0, lo=0.0, hi=50.0)
    max_rot_deg: float = _spec(1.0, lo=0.0, hi=45.0)
    n_jumps: int = _spec(3, lo=0, hi=1000, doc="abrupt moves in the run")
    psf_samples: int = _spec(2, lo=1, hi=8, doc="sub-samples per axis averaged into each voxel "
                                                "(partial volume); 1 samples voxel centres; "
                                                "analytic phantom only (a real base is "
                                                "already voxel averages)")
    speed: float = _spec(1.0, lo=0.0, hi=1e6, doc="send speed factor; 0 means as fast as possible")
    calling_ae: str = _spec("RTSC_SIM")
    spikes: list[list[int]] = _spec([], lo=0, hi=100000,
                                    doc="k-space spikes to inject: [volume, slice] pairs")
    spike_amplitude: float = _spec(20.0, lo=0.0, hi=1e6,
                                   doc="spike grating amplitude, intensity units")
    delays_s: dict[int, float] = _spec({}, doc="volume index -> seconds it is sent late")
    drop_volumes: list[int] = _spec([], lo=0, hi=100000, doc="volume indices never sent")

    def __post_init__(self) -> None:
        if self.anatomy == "epi_image":
            if self.base_image is None:
                raise ConfigError("simulator.base_image: null, but simulator.anatomy is "
                                  "epi_image; give the path of an EPI volume (NIfTI or "
                                  "whole-volume DICOM)")
            if not Path(self.base_image).is_file():
                raise ConfigError(f"simulator.base_image: {self.base_image!r} is not a file")


@dataclass(frozen=True)
class DemoConfig:
    """`rtsc demo`."""

    n_volumes: int = _spec(80, lo=1, hi=100000)
    speed: float = _spec(10.0, lo=0.0, hi=1e6, doc="0 means as fast as possible")


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    watcher: WatcherConfig = field(default_factory=WatcherConfig)
    assembler: AssemblerConfig = field(default_factory=AssemblerConfig)
    series_filter: SeriesFilterConfig = field(default_factory=SeriesFilterConfig)
    multi_echo: MultiEchoConfig = field(default_factory=MultiEchoConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    spinal_cord: SpinalCordConfig = field(default_factory=SpinalCordConfig)
    glm: GlmConfig = field(default_factory=GlmConfig)
    physio: PhysioConfig = field(default_factory=PhysioConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        if self.glm.n_volumes is not None and self.glm.n_volumes > self.session.max_volumes:
            raise ConfigError(f"glm.n_volumes: {self.glm.n_volumes} is more than "
                              f"session.max_volumes ({self.session.max_volumes})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_range(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: "
                          + ", ".join(repr(c) for c in choices))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{path}: {value!r} is out of range; allowed: {lo} to {hi}")


def _coerce(path: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        if value is None:
            raise ConfigError(f"{path}: null is not allowed; expected {_type_name(tp)}")
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; expected a list "
                              f"of {_type_name(item_tp)}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{path}: {value!r} has {len(value)} items; expected {length}")
        return [_coerce(f"{path}[{i}]", v, item_tp, meta) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; expected a mapping")
        return {_coerce(f"{path}.<key>", k, key_tp, {}): _coerce(f"{path}.{k}", v, val_tp, {})
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; expected {_type_name(tp)}")
    _check_range(path, value, meta)
    return value


def _build(cls: Any, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys"
                          f"{' under ' + path if path else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(key_path, value, hints[name], fields[name].metadata)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (as parsed from YAML) into a :class:`Config`.

    Raises
    ------
    ConfigError
        Naming the key path, the value and what is allowed.
    """
    return typing.cast(Config, _build(Config, data, ""))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file; ``None`` gives the built-in defaults.

    Parameters
    ----------
    path : path to config.yaml, or None
    overrides : nested mapping merged over the file's content before validation

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, or any key, type or value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = merge(data, overrides)
    return config_from_dict(data)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested mappings; values of ``extra`` win."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for qc.json and logs)."""
    return dataclasses.asdict(config)
