"""Configuration sections of the processing: pipeline, motion, spinal cord, physio, GLM."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtsc.config.fields import _spec
from rtsc.errors import ConfigError

#: ``pipeline.plugins`` entries: ``package.module:Class`` (an attribute path after the
#: colon) or the name of an entry point of the ``rtsc.stages`` group.
PLUGIN_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
PLUGIN_ENTRY_POINT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Every name a plugin gives (fields, maps, summary keys, alert codes, flags) starts so.
PLUGIN_PREFIX = "plugin_"


def check_plugin_entries(plugins: list[str], options: dict[str, dict[str, Any]]) -> None:
    """The syntax of ``pipeline.plugins`` and ``pipeline.plugin_options`` (no import: the
    plugins are imported at start-up, :func:`rtsc.pipeline.plugins.check_plugins`).

    Raises
    ------
    ConfigError
        Naming the key, the value and the expected form.
    """
    for i, entry in enumerate(plugins):
        if not (PLUGIN_PATH.fullmatch(entry) or PLUGIN_ENTRY_POINT.fullmatch(entry)):
            raise ConfigError(f"pipeline.plugins[{i}]: {entry!r} is not a plugin; expected "
                              "'package.module:StageClass' or the name of an entry point "
                              "of the group 'rtsc.stages'")
        if entry in plugins[:i]:
            raise ConfigError(f"pipeline.plugins[{i}]: {entry!r} is listed twice")
    for key in options:
        if key not in plugins:
            raise ConfigError(f"pipeline.plugin_options.{key}: not in pipeline.plugins "
                              f"({', '.join(map(repr, plugins)) or 'empty'}); the keys are "
                              "the entries of pipeline.plugins, as written there")


@dataclass(frozen=True)
class PipelineConfig:
    """The processing stages."""

    mode: str = _spec("brain", choices=("brain", "spinal_cord"),
                      doc="brain: rigid motion correction and whole-brain stages; "
                          "spinal_cord: the spinal cord stages (slice-wise motion, cord QC; "
                          "docs/spinal-cord.md)")
    fd_radius_mm: float = _spec(50.0, lo=1.0, hi=500.0,
                                doc="sphere radius turning rotations into mm (Power's FD)")
    fd_thresholds_mm: list[float] = _spec([0.2, 0.3, 0.4], lo=0.0, hi=100.0,
                                          doc="FD thresholds counted as usable frames")
    mask_fraction: float = _spec(
        0.2, lo=0.0, hi=1.0,
        doc="automatic mask: voxels above this fraction of the 98th percentile of the first "
            "volume")
    dvars_outlier: float = _spec(1.5, lo=0.0, hi=100.0, doc="std_dvars above this flags an outlier")
    series_memory_mb: float = _spec(
        32.0, lo=1.0, hi=1e6,
        doc="masked series held in memory for the exact DVARS at series end, MB; later "
            "volumes go to a temporary file, so memory does not grow with the series")
    backlog: str = _spec("catch_up", choices=("catch_up", "newest"),
                         doc="volumes waiting: process each (catch_up), or run the live "
                         "stages on the newest only (the others are published flagged "
                         "skipped; every volume is still archived and in bold.nii.gz)")
    threads: int = _spec(1, lo=1, hi=256,
                         doc="numba threads for the pipeline's kernels; 1 keeps latency steady "
                             "when the receiver's threads share the cores")
    plugins: list[str] = _spec([], doc="third-party stages to run, in this order: "
                                       "'package.module:StageClass' or the name of an entry "
                                       "point of the group 'rtsc.stages'; imported at "
                                       "start-up; nothing else runs (docs/pipeline.md, "
                                       "Plugins)")
    plugin_options: dict[str, dict[str, Any]] = _spec(
        {}, doc="options of each plugin, keyed by its entry in plugins as written there: "
                "{entry: {option: value}}, given to the plugin's constructor")

    def __post_init__(self) -> None:
        check_plugin_entries(self.plugins, self.plugin_options)


#: ``motion.reference`` naming the reference of the series that ended last in the run.
PREVIOUS_SERIES = "series:PREVIOUS"
_REFERENCE_FORMS = ("'first', 'volume:N' (N >= 0, 0-based), 'series:PREVIOUS' or the path "
                    "of an existing NIfTI in the acquired grid")


def parse_motion_reference(reference: str) -> tuple[str, int | None]:
    """``motion.reference`` as (kind, volume index): ("volume", N) for 'first' (N = 0)
    and 'volume:N', ("previous", None) for 'series:PREVIOUS', ("file", None) for a path.

    Raises
    ------
    ConfigError
        Naming the key, the value and the allowed forms.
    """
    if reference == "first":
        return "volume", 0
    if reference == PREVIOUS_SERIES:
        return "previous", None
    number = reference.removeprefix("volume:")
    if number != reference and number.isdigit():
        return "volume", int(number)
    if not reference.startswith(("volume:", "series:")) and Path(reference).is_file():
        return "file", None
    raise ConfigError(f"motion.reference: {reference!r}; allowed: {_REFERENCE_FORMS}")


@dataclass(frozen=True)
class MotionConfig:
    """Online rigid registration (motion stage)."""

    enabled: bool = _spec(True, doc="register every volume to the reference")
    reference: str = _spec("first", doc="'first', 'volume:N' (0-based), 'series:PREVIOUS' "
                                        "(the reference of the run's series that ended "
                                        "last, resampled onto this grid: one head position "
                                        "for the session) or a NIfTI path in the acquired "
                                        "grid")
    smooth_vox: float = _spec(1.2, lo=0.0, hi=5.0,
                              doc="Gaussian sigma (voxels) applied to both images before the fit")
    max_points: int = _spec(8000, lo=1000, hi=10_000_000, doc="mask voxels used per iteration")
    reslice: str = _spec("head", choices=("head", "full"),
                         doc="interpolate the head (registration mask + 3 voxels) and keep the "
                             "acquired background, or interpolate every voxel")
    max_iterations: int = _spec(30, lo=1, hi=500,
                                doc="Gauss-Newton updates per volume at most")
    tolerance_mm: float = _spec(0.01, lo=1e-6, hi=1.0,
                                doc="stop when an update moves points by less than this")
    max_jump_mm: float = _spec(10.0, lo=0.1, hi=1000.0,
                               doc="a volume whose head moved more than this from the previous "
                                   "one is flagged as not registered")
    fail_rms_factor: float = _spec(3.0, lo=1.0, hi=1000.0,
                                   doc="residual above this multiple of the median of the "
                                       "last 5 volumes: registration failed")

    def __post_init__(self) -> None:
        parse_motion_reference(self.reference)


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
    max_iterations: int = _spec(30, lo=1, hi=500,
                                doc="Gauss-Newton updates per slice and pass at most")
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

    mask: str | None = _spec(None, doc="cord mask NIfTI in the acquired grid (e.g. "
                                       "sct_deepseg_sc), also the mask of the RETROICOR GLM; "
                                       "null: found automatically (approximate: an ellipse "
                                       "inside the canal)")
    moco: CordMocoConfig = field(default_factory=CordMocoConfig,
                                 metadata={"doc": "slice-wise motion correction"})
    qc: CordQcConfig = field(default_factory=CordQcConfig, metadata={"doc": "cord QC"})


@dataclass(frozen=True)
class PhysioConfig:
    """Physiological recordings and RETROICOR regressors in a slice-wise GLM."""

    file: str | None = _spec(None, doc="BIDS *_physio.tsv[.gz] (a .tsv may grow during the "
                                       "run) or Siemens .puls/.resp; null: no RETROICOR")
    format: str = _spec("auto", choices=("auto", "bids", "siemens"),
                        doc="auto: from the file name (.tsv or .tsv.gz: BIDS; .puls or "
                            ".resp: Siemens PMU logs)")
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
    """General linear model: design, fit, contrasts, ROIs and the feedback value."""

    events: str | None = _spec(None, doc="BIDS events.tsv path; null (and no conditions): "
                                         "no GLM")
    conditions: dict[str, Any] = _spec({}, doc="inline paradigm: trial_type -> {onsets_s: "
                                               "[...], durations_s: s or [...]}")
    contrasts: dict[str, str] = _spec({}, doc="name -> expression over trial types; "
                                              "empty: one contrast per trial type")
    hrf: str = _spec("spm", choices=("spm", "spm_derivative", "delayed"),
                     doc="spm: SPM's canonical double gamma (peak ~5 s), one column per "
                         "condition; spm_derivative: + its temporal derivative; delayed: + "
                         "the dispersion derivative too, for later or longer responses "
                         "(slow tasks, spinal cord); contrasts weight the canonical column")
    high_pass_s: float = _spec(128.0, lo=1.0, hi=10000.0,
                               doc="cosine drift cut-off period, seconds")
    drift: str = _spec("cosine", choices=("cosine", "polynomial", "none"),
                       doc="cosine: DCT basis below 1 / high_pass_s (SPM's high-pass); "
                           "polynomial: of drift_order; none")
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
                               "in MNI space {atlas: path, label: n}, {mask_mni: path} or "
                               "{center_mni_mm: [x,y,z], radius_mm: r} (the first volume "
                               "registered to nilearn's MNI152 template), "
                               "{contrast: name, top_k: k, within: ..., freeze_after: n}, "
                               "or a mapping of ROI names to these")
    feedback: str = _spec("psc", choices=("psc", "contrast", "difference", "correlation",
                                          "plugin"),
                          doc="the `feedback` value: percent signal change of feedback_roi; "
                              "the GLM contrast effect averaged over it; difference: its "
                              "PSC minus feedback_roi_b's; correlation: the two ROIs' "
                              "sliding-window correlation (connectivity feedback); plugin: "
                              "the field feedback_plugin_field of a plugin "
                              "(pipeline.plugins)")
    feedback_plugin_field: str | None = _spec(
        None, doc="feedback: plugin: the field (plugin_...) whose number is the feedback, "
                  "smoothed by feedback_smoothing")
    feedback_roi: str | None = _spec(None, doc="ROI name; null: the first ROI")
    feedback_roi_b: str | None = _spec(None, doc="the second ROI of feedback: difference "
                                                 "or correlation")
    feedback_window: int = _spec(20, lo=3, hi=10000,
                                 doc="feedback: correlation: volumes in the sliding window")
    feedback_motion_regression: bool = _spec(
        False, doc="regress the six motion parameters out of the feedback: psc and "
                   "difference over the run so far (from 14 volumes on), correlation out "
                   "of both signals within the window (10 or more); needs motion.enabled; "
                   "not with contrast")
    feedback_smoothing: str = _spec("none", choices=("none", "ema", "kalman"),
                                    doc="smoothing of the feedback value (feedback_raw "
                                        "keeps it unsmoothed)")
    feedback_ema_alpha: float = _spec(0.5, lo=1e-6, hi=1.0,
                                      doc="ema weight of the newest value, (0, 1]")
    feedback_kalman_q_over_r: float = _spec(0.1, lo=1e-9, hi=1e9,
                                            doc="kalman: process over measurement noise "
                                                "variance; larger follows faster")
    feedback_integrity_window: int = _spec(30, lo=0, hi=10000,
                                           doc="volumes over which the feedback is "
                                               "correlated with FD, DVARS and the global "
                                               "signal (FD's raises feedback_follows_head);"
                                               " 0: off, else 6 or more")
    feedback_integrity_threshold: float = _spec(0.6, lo=0.01, hi=1.0,
                                                doc="|r| with FD that raises "
                                                    "feedback_follows_head")
    feedback_contrast: str | None = _spec(None, doc="contrast name for feedback: contrast; "
                                                    "null: the ROI's or the first contrast")
    baseline_volumes: int | None = _spec(None, lo=1, hi=100000,
                                         doc="PSC baseline: the first N volumes; null: the "
                                             "design's rest volumes (the first 10 without "
                                             "events)")
    detrend: str = _spec("linear", choices=("linear", "none"),
                         doc="ROI time course: remove a line fitted with the task columns")

    def __post_init__(self) -> None:
        if self.feedback != "plugin":
            return
        field_name = self.feedback_plugin_field
        if field_name is None:
            raise ConfigError("glm.feedback_plugin_field: null, but glm.feedback is plugin; "
                              f"name the plugin's field ({PLUGIN_PREFIX}...) to feed back")
        if not field_name.startswith(PLUGIN_PREFIX) or len(field_name) == len(PLUGIN_PREFIX):
            raise ConfigError(f"glm.feedback_plugin_field: {field_name!r} is not a plugin "
                              f"field; a plugin's fields start with {PLUGIN_PREFIX!r}")

