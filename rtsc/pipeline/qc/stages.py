"""The quality-control stages: timing, slice checks (spikes, SNR), tSNR and usable frames,
DVARS.

Order in the pipeline: ``timing`` and ``spikes`` run first, on the volume as acquired
(a spike is a property of the acquired slice; reslicing would smear it over its
neighbours); ``dvars`` and ``qc`` run after the motion stage, on the corrected volume,
``qc`` with the motion parameters and FD from ``upstream``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rtsc.config import QcConfig
from rtsc.conventions import FD_RADIUS_MM, MOTION_NAMES
from rtsc.pipeline.qc.snr import (
    SliceQcState,
    TsnrState,
    slice_qc_init,
    slice_qc_step,
    tsnr_init,
    tsnr_catch_up,
    tsnr_maps,
    tsnr_detrended_median,
    tsnr_restrict,
    tsnr_step,
)
from rtsc.pipeline.qc.dvars_online import DvarsTracker
from rtsc.pipeline.stages import (NO_FIELDS, StageResult, automatic_mask, coverage_left,
                                  coverage_news)
from rtsc.pipeline.qc.usable import (
    NotchFilter,
    clean_minutes,
    criterion_status,
    filtered_fd_step,
    finite_or_none,
    notch_coefficients,
    projected_minutes,
    session_minutes,
    usable_counts,
    usable_mask,
)
from rtsc.volume import Coverage, Volume


def _none_if_nan(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---- timing ----------------------------------------------------------------------------

@dataclass
class TimingState:
    """Arrival history of a series (seconds since the epoch)."""

    last_index: int | None = None
    last_received: float | None = None
    late: list[int] = field(default_factory=list)
    # Indices skipped, as [first, last] ranges: one per gap, not one entry per index (a
    # header numbering a volume 3,000,000 skips millions).
    missing: list[list[int]] = field(default_factory=list)
    intervals: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TimingEvent:
    """What the arrival of one volume says.

    Attributes
    ----------
    interval_s : float or None, since the previous volume was received
    late : bool, the interval exceeds ``(gap - 1 + late_factor) x TR``
    missing : range, indices skipped since the previous volume (empty if none)
    """

    interval_s: float | None
    late: bool
    missing: range


def timing_step(state: TimingState, index: int, t_received: float, tr_s: float | None,
                late_factor: float) -> TimingEvent:
    """Judge the arrival of volume ``index`` at ``t_received`` (seconds).

    A volume is late when it arrives more than ``late_factor`` TRs after the previous
    one, counting the slots of volumes missing in between (a gap of two volumes allows
    ``1 + late_factor`` TRs). Indices skipped since the previous volume are missing;
    the first volume is compared with nothing.
    """
    interval = None
    late = False
    missing = range(0)
    if state.last_index is not None and state.last_received is not None:
        interval = t_received - state.last_received
        gap = max(index - state.last_index, 1)
        missing = range(state.last_index + 1, index)
        if tr_s:
            late = interval > (gap - 1 + late_factor) * tr_s
        state.intervals.append(interval)
    elif index > 0:
        missing = range(0, index)
    if missing:
        state.missing.append([missing[0], missing[-1]])
    if late:
        state.late.append(index)
    if state.last_index is None or index > state.last_index:
        state.last_index, state.last_received = index, t_received
    return TimingEvent(interval, late, missing)


class TimingStage:
    """Late and missing volumes, and the per-volume ``timing`` field.

    Parameters
    ----------
    late_factor : float, see :func:`timing_step`
    """

    name = "timing"
    produces = frozenset({"timing", "interval_s", "late_by_s", "missing_before"})
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, late_factor: float = 1.5) -> None:
        self.late_factor = late_factor
        self.state = TimingState()

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        tr = volume.info.tr_s
        event = timing_step(self.state, volume.index, volume.t_received, tr, self.late_factor)
        out = StageResult()
        acquired = volume.t_received - volume.t_acquired if volume.t_acquired is not None \
            else None
        out.metrics = {
            "timing": {"acquired_to_received_s": acquired,
                       "received_to_assembled_s": volume.t_assembled - volume.t_received,
                       "assembled_to_published_s": None},  # filled in when published
            "interval_s": event.interval_s,
        }
        if event.late:
            out.flags.append("late_volume")
            assert event.interval_s is not None and tr is not None
            out.metrics["late_by_s"] = event.interval_s - tr
        if event.missing:
            first, last = event.missing[0], event.missing[-1]
            which = f"volume {first}" if first == last else f"volumes {first}-{last}"
            out.metrics["missing_before"] = [first, last]
            out.alerts.append(("warning", "missing_volume",  # type: ignore[arg-type]
                               f"{which} never arrived (volume {volume.index} did)", first))
        return out

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        intervals = np.asarray(self.state.intervals)
        return {"late_volumes": list(self.state.late),
                "interval_s_median": float(np.median(intervals)) if intervals.size else None,
                "interval_s_max": float(intervals.max()) if intervals.size else None}


# ---- spikes and SNR on the acquired volume ------------------------------------------------

class SliceQcStage:
    """Slice-wise spike detection and SNR against the background (acquired data).

    Parameters
    ----------
    config : QcConfig
    mask_fraction : float, automatic mask (the head, for the SNR's signal)
    """

    name = "spikes"
    produces = frozenset({"snr", "noise_sigma", "slice_spikes"})
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, config: QcConfig, mask_fraction: float) -> None:
        self.config = config
        self.mask_fraction = mask_fraction
        self.state: SliceQcState | None = None
        self.spikes: dict[int, list[int]] = {}
        self.snr: list[float] = []
        self.sigma: list[float] = []

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        cfg = self.config
        if self.state is None:
            self.state = slice_qc_init(volume.data, self.mask_fraction,
                                       cfg.background_dilate_vox, cfg.spike_window)
        values = slice_qc_step(self.state, volume.data, cfg.spike_threshold,
                               cfg.spike_min_history, skip=volume.missing_slices)
        self.snr.append(values.snr)
        self.sigma.append(values.noise_sigma)
        out = StageResult(metrics={"snr": _none_if_nan(values.snr),
                                   "noise_sigma": _none_if_nan(values.noise_sigma),
                                   "slice_spikes": values.spikes})
        if values.spikes:
            self.spikes[volume.index] = values.spikes
            out.flags.append("spike")
        return out

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        snr = np.asarray(self.snr)
        sigma = np.asarray(self.sigma)
        return {
            "snr_background": float(np.nanmedian(snr)) if np.isfinite(snr).any() else None,
            "noise_sigma": float(np.nanmedian(sigma)) if np.isfinite(sigma).any() else None,
            "spike_volumes": sorted(self.spikes),
            "spike_slices": {str(k): v for k, v in sorted(self.spikes.items())},
        }


# ---- tSNR and usable frames on the corrected volume ------------------------------------

class QcStage:
    """Running tSNR (plain and detrended), usable frames, clean and projected minutes,
    the session criterion, and the respiration-filtered FD.

    The tSNR figures are over the automatic mask of the first volume AND the run's
    validity mask (``Volume.coverage``).

    Parameters
    ----------
    config : QcConfig
    mask_fraction : float, automatic mask of the first (corrected) volume
    fd_thresholds_mm : sequence of float
    fd_radius_mm : float
    session_base_minutes : mapping threshold -> clean minutes of the earlier series of
        the session (held by the service; the stage only reads it)
    slice_tsnr : bool
        Publish ``slice_tsnr`` (per slice, in the head mask). False in spinal cord
        mode, where cord QC publishes that of the cord mask.

    The motion parameters and FD come from ``upstream`` when a motion stage runs;
    without one there are no usable frames (and no criterion).
    """

    name = "qc"
    consumes = NO_FIELDS
    consumes_optional = frozenset({"framewise_displacement", *MOTION_NAMES})

    def __init__(self, config: QcConfig, mask_fraction: float,
                 fd_thresholds_mm: Sequence[float], fd_radius_mm: float = FD_RADIUS_MM,
                 session_base_minutes: Mapping[str, float] | None = None,
                 slice_tsnr: bool = True) -> None:
        self.config = config
        self.publish_slice_tsnr = slice_tsnr
        self.mask_fraction = mask_fraction
        thresholds = list(fd_thresholds_mm)
        if config.criterion_threshold_mm not in thresholds:
            thresholds.append(config.criterion_threshold_mm)
        self.thresholds = thresholds
        self.radius_mm = fd_radius_mm
        self.base = dict(session_base_minutes or {})
        self.tsnr: TsnrState | None = None
        self.coverage: Coverage | None = None  # the run's validity mask last applied
        self.fd: list[float] = []
        self.tsnr_values: tuple[float, np.ndarray] | None = None
        self._notch: NotchFilter | None = None
        self._notch_checked = False
        self._last_input: np.ndarray | None = None
        self._last_filtered: np.ndarray | None = None
        self.tr_s: float | None = None
        self.n_expected: int | None = None
        self.has_motion = True  # False when no motion stage runs: usable frames unknown

    @property
    def produces(self) -> frozenset[str]:
        fields = {"tsnr", "usable_frames", "clean_minutes", "session_clean_minutes",
                  "projected_minutes", "criterion"}
        if self.publish_slice_tsnr:
            fields.add("slice_tsnr")
        if self.config.respiration_filter:
            fields.add("framewise_displacement_filtered")
        return frozenset(fields)

    def _filtered_fd(self, upstream: Mapping[str, Any]) -> tuple[float, list[Any]]:
        """FD after the respiration notch; NaN for a volume without parameters."""
        alerts: list[Any] = []
        if not self._notch_checked:
            self._notch_checked = True
            coef = notch_coefficients(self.tr_s, self.config.breaths_per_min,
                                      self.config.respiration_bandwidth_bpm) \
                if self.tr_s else None
            if coef is None:
                alerts.append(("info", "respiration_filter_off",
                               f"respiration filter not applied: {self.config.breaths_per_min:g} "
                               f"breaths/min is not below the Nyquist rate of TR {self.tr_s} s"))
            else:
                self._notch = NotchFilter(*coef)
        values = [upstream.get(name) for name in MOTION_NAMES]
        fd_raw = upstream.get("framewise_displacement")
        if self._notch is None:
            return (float(fd_raw) if fd_raw is not None else float("nan")), alerts
        ok = all(v is not None for v in values) and fd_raw is not None
        if ok:
            self._last_input = np.asarray(values, dtype=np.float64)
        if self._last_input is None:
            return float("nan"), alerts
        filtered = self._notch.step(self._last_input)  # held input while not registered
        if not ok:
            return float("nan"), alerts
        fd = filtered_fd_step(self._last_filtered, filtered, self.radius_mm)
        self._last_filtered = filtered
        return fd, alerts

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        upstream = upstream or {}
        cfg = self.config
        out = StageResult()
        if self.tsnr is None:
            self.tr_s, self.n_expected = volume.info.tr_s, volume.info.n_expected
            self.has_motion = "framewise_displacement" in upstream
            self.tsnr = tsnr_init(volume.data, automatic_mask(volume.data, self.mask_fraction))
        coverage = coverage_news(volume, self.coverage)
        if coverage is not None:  # voxels left the acquired grid: out of the tSNR figures
            tsnr_restrict(self.tsnr, coverage.mask, coverage_left(coverage, self.coverage))
            self.coverage = coverage
        # The grid outside the mask is only in the maps: its statistics wait until the
        # volume message is out (StageResult.after_publish; any reader catches up first).
        state = self.tsnr
        values = tsnr_step(state, volume.data, float(volume.index), defer_outside=True)
        if state.pending is not None:
            out.after_publish = lambda: tsnr_catch_up(state)
        self.tsnr_values = (values.median, values.slices)
        metrics: dict[str, Any] = {"tsnr": _none_if_nan(values.median)}
        if self.publish_slice_tsnr:
            metrics["slice_tsnr"] = [_none_if_nan(float(v)) for v in values.slices]
        if cfg.respiration_filter:
            fd, alerts = self._filtered_fd(upstream)
            out.alerts.extend(alerts)
            metrics["framewise_displacement_filtered"] = _none_if_nan(fd)
        else:
            raw = upstream.get("framewise_displacement")
            fd = float(raw) if raw is not None else float("nan")
        self.fd.append(fd)
        metrics.update(self.usable_metrics())
        out.metrics = metrics
        return out

    def usable_metrics(self) -> dict[str, Any]:
        """usable_frames, clean_minutes, session_clean_minutes, projected_minutes and
        criterion after the frames so far."""
        cfg = self.config
        fd = np.asarray(self.fd)
        tr = self.tr_s
        if not self.has_motion:
            return {"usable_frames": {}, "clean_minutes": None, "session_clean_minutes": None,
                    "projected_minutes": None, "criterion": None}
        counts = usable_counts(fd, self.thresholds, cfg.min_run_frames)
        if not tr:
            return {"usable_frames": counts, "clean_minutes": None,
                    "session_clean_minutes": None, "projected_minutes": None,
                    "criterion": None}
        minutes = {k: clean_minutes(v, tr) for k, v in counts.items()}
        n_seen = len(fd)
        projected = None if self.n_expected is None else {
            k: projected_minutes(v, n_seen, self.n_expected, tr) for k, v in counts.items()}
        session = session_minutes(self.base, minutes)
        key = f"{cfg.criterion_threshold_mm:g}"
        criterion = criterion_status(session[key], cfg.criterion_minutes,
                                     cfg.criterion_threshold_mm,
                                     counts[key] / n_seen if n_seen else None)
        return {"usable_frames": counts, "clean_minutes": minutes,
                "session_clean_minutes": session, "projected_minutes": projected,
                "criterion": criterion}

    def maps(self) -> dict[str, np.ndarray]:
        if self.tsnr is None or self.tsnr.n < 2:
            return {}
        plain, detrended = tsnr_maps(self.tsnr)
        return {"tsnr": plain, "tsnr_detrended": detrended}

    def summary(self) -> dict[str, Any]:
        fd = np.asarray(self.fd, dtype=np.float64)
        threshold = self.config.criterion_threshold_mm
        good = fd[np.isfinite(fd)]
        above = int(np.sum(good > threshold))
        out: dict[str, Any] = {
            "tsnr": None, "tsnr_detrended": None, "slice_tsnr": None,
            "fd_num": above if self.has_motion else None,
            "fd_perc": float(100.0 * above / fd.size) if fd.size and self.has_motion else None,
            "fd_threshold_mm": threshold,
        }
        if self.tsnr_values is not None and self.tsnr is not None:
            median, slices = self.tsnr_values
            out.update(tsnr=finite_or_none(median),
                       tsnr_detrended=finite_or_none(tsnr_detrended_median(self.tsnr)),
                       slice_tsnr=[finite_or_none(float(v)) for v in slices])
        if self.config.respiration_filter:
            out["fd_mean_filtered"] = float(good.mean()) if good.size else None
        usable = self.usable_metrics()
        out.update(usable_frames=usable["usable_frames"], clean_minutes=usable["clean_minutes"],
                   session_clean_minutes=usable["session_clean_minutes"],
                   criterion=usable["criterion"])
        out["usable_frame_indices"] = {
            f"{t:g}": [int(i) for i in np.flatnonzero(usable_mask(fd, t, self.config
                                                                  .min_run_frames))]
            for t in self.thresholds} if self.has_motion else None
        return out


# ---- DVARS on the corrected volume -----------------------------------------------------

#: Volumes the live std_DVARS needs before it flags an outlier. It is Nipype's value for
#: the run so far, whose robust SD comes from the "lower" quartiles of the t + 1 values
#: of each voxel: on white noise without motion (20 000 voxels, 20 seeds) it is 1.39,
#: 0.92, 1.26 and 1.50 after 3, 4, 5 and 6 volumes (so volume 5 crossed the default
#: threshold of 1.5 in about half of all clean runs), and 1.27 at most from 7 volumes on.
OUTLIER_MIN_VOLUMES = 7


class DvarsStage:
    """DVARS and std_DVARS (Nipype/fMRIPrep definitions) of the corrected volumes, over
    the automatic mask of the first volume AND the run's validity mask
    (``Volume.coverage``: a voxel leaves when its sample falls outside the acquired grid).

    Live values are those of the run so far (``dvars`` within 1e-5 of an offline
    recomputation, ``std_dvars`` within about 1 %; see
    :mod:`rtsc.pipeline.qc.dvars_online`); at series end :meth:`final_confounds` gives the
    exact offline values, which replace the live ones in confounds.tsv.

    Parameters
    ----------
    mask_fraction : float, automatic mask of the first (corrected) volume
    outlier_threshold : float, std_dvars above it flags the volume as an outlier (from
        the ``OUTLIER_MIN_VOLUMES``-th volume on)
    memory_mb : float or None, masked series held in memory (the rest in a temporary file)
    """

    name = "dvars"
    produces = frozenset({"dvars", "std_dvars", "outlier"})
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, mask_fraction: float, outlier_threshold: float,
                 memory_mb: float | None = None) -> None:
        self.mask_fraction = mask_fraction
        self.outlier_threshold = outlier_threshold
        self.memory_mb = memory_mb
        self.tracker: DvarsTracker | None = None
        self.coverage: Coverage | None = None  # the run's validity mask last applied
        self.std_values: list[float] = []
        self.n_outliers = 0

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        if self.tracker is None:
            mask = automatic_mask(volume.data, self.mask_fraction)
            self.tracker = DvarsTracker(mask, n_expected=volume.info.n_expected,
                                        memory_mb=self.memory_mb)
        coverage = coverage_news(volume, self.coverage)
        if coverage is not None:  # voxels left the acquired grid: they leave the run
            self.tracker.restrict(coverage.mask, coverage_left(coverage, self.coverage))
            self.coverage = coverage
        dvars, std_dvars = self.tracker.update(volume.data)
        self.std_values.append(std_dvars)
        outlier = bool(math.isfinite(std_dvars) and std_dvars > self.outlier_threshold
                       and self.tracker.state.n >= OUTLIER_MIN_VOLUMES)
        self.n_outliers += outlier
        return StageResult(metrics={"dvars": dvars, "std_dvars": std_dvars, "outlier": outlier},
                           flags=["outlier"] if outlier else [])

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def final_confounds(self) -> dict[str, np.ndarray]:
        """Exact offline dvars and std_dvars of the whole series (first row NaN)."""
        if self.tracker is None:
            return {}
        dvars, std_dvars = self.tracker.final()
        self.tracker.state.close()
        return {"dvars": dvars, "std_dvars": std_dvars}

    def summary(self) -> dict[str, Any]:
        values = np.asarray(self.std_values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        return {"dvars_std": float(finite.mean()) if finite.size else None,
                "dvars_outliers": self.n_outliers}
