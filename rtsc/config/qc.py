"""Configuration of quality control: the QC section, alert rules, protocol, verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtsc.config.fields import _spec


@dataclass(frozen=True)
class AlertRuleConfig:
    """One alert rule: ``metric op value`` in ``count`` of the last ``window`` volumes.

    It fires once when the count is reached and fires again only after it has cleared
    (the count fell to ``clear_count`` or below): hysteresis, so one condition is never
    announced every volume.
    """

    code: str = _spec("motion", doc="alert code published")
    level: str = _spec("warning", choices=("info", "warning", "critical"),
                       doc="severity published with the alert")
    metric: str = _spec("framewise_displacement",
                        doc="a numeric field of the volume message (framewise_displacement, "
                            "tsnr, snr, latency_s, std_dvars, ...) or flag:<name> (1 when "
                            "the volume has that flag)")
    op: str = _spec(">", choices=(">", "<", ">=", "<="),
                    doc="how the metric is compared with value (metric op value is a hit)")
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
    voxel_size_mm: list[float] | None = _spec(None, lo=0.01, hi=100.0, length=3,
                                              doc="voxel size, mm")
    tolerance: float = _spec(0.01, lo=0.0, hi=1.0,
                             doc="relative tolerance on TR and voxel size")


@dataclass(frozen=True)
class VerdictConfig:
    """Pass / warn / fail criteria of a series (null: not checked)."""

    fd_mean_warn_mm: float | None = _spec(0.2, lo=0.0, hi=100.0,
                                          doc="mean FD above this: warn, mm")
    fd_mean_fail_mm: float | None = _spec(0.5, lo=0.0, hi=100.0,
                                          doc="mean FD above this: fail, mm")
    usable_warn_fraction: float | None = _spec(
        0.8, lo=0.0, hi=1.0, doc="usable frames under qc.criterion_threshold_mm / volumes "
                                 "below this: warn")
    usable_fail_fraction: float | None = _spec(0.5, lo=0.0, hi=1.0,
                                               doc="usable fraction below this: fail")
    tsnr_warn: float | None = _spec(30.0, lo=0.0, hi=10000.0,
                                    doc="median tSNR in the mask below this: warn")
    tsnr_fail: float | None = _spec(15.0, lo=0.0, hi=10000.0,
                                    doc="median tSNR below this: fail")
    spike_warn_volumes: int | None = _spec(1, lo=0, hi=100000,
                                           doc="this many volumes with spikes or more: warn "
                                               "(0: never)")
    spike_fail_fraction: float | None = _spec(0.05, lo=0.0, hi=1.0,
                                              doc="fraction of volumes with spikes above "
                                                  "this: fail")
    missing_warn_volumes: int | None = _spec(1, lo=0, hi=100000,
                                             doc="this many missing volumes or more: warn "
                                                 "(0: never)")
    missing_fail_fraction: float | None = _spec(0.1, lo=0.0, hi=1.0,
                                                doc="fraction of the expected volumes missing "
                                                    "above this: fail")
    registration_fail_fraction: float | None = _spec(
        0.1, lo=0.0, hi=1.0, doc="fraction of volumes whose registration failed above this: "
                                 "fail (any failure: warn)")
    incomplete: str = _spec("fail", choices=("pass", "warn", "fail"),
                            doc="a series that stopped before its announced end")


@dataclass(frozen=True)
class QcConfig:
    """Quality control: tSNR, spikes, SNR, usable frames, timing, alerts, verdict."""

    enabled: bool = _spec(True, doc="run the QC stages: timing, slice spikes, tSNR, SNR, "
                                    "usable frames")
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
    breaths_per_min: float = _spec(18.0, lo=1.0, hi=120.0,
                                   doc="breathing rate at the centre of the stop band, "
                                       "per minute")
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

