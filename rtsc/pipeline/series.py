"""Composes the stages for one series and times each of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rtsc.config import Config
from rtsc.errors import ConfigError, RtscError
from rtsc.pipeline.qc.carpet import CarpetStage
from rtsc.pipeline.cord.stages import build_cord_stages
from rtsc.pipeline.glm.design import (
    DesignError,
    conditions_to_events,
    cosine_drift_order,
    make_design,
    motion_confound_names,
    parse_contrast,
    read_events,
)
from rtsc.pipeline.glm.recursive import GlmStage
from rtsc.pipeline.motion.stages import DvarsStage, MotionStage, ResliceStage
from rtsc.pipeline.physio.retroicor import PhysioSource, RetroicorOrders
from rtsc.pipeline.cord.slice_glm import CordGlmStage
from rtsc.pipeline.qc.stages import QcStage, SliceQcStage, TimingStage
from rtsc.pipeline.roi.stage import RoiStage
from rtsc.pipeline.roi.spec import ContrastRoi, MaskRoi, load_mask, parse_roi_spec
from rtsc.pipeline.stages import SignalStage, Stage
from rtsc.volume import SeriesInfo, Volume

log = logging.getLogger(__name__)


@dataclass
class VolumeOutput:
    """Everything the pipeline produced for one volume.

    Attributes
    ----------
    metrics : dict
        Fields for the ``volume`` message and the confounds row.
    flags : list of str
    alerts : list of (level, code, message) or (level, code, message, index)
        (an index when the alert is about another volume than this one)
    stage_ms : dict stage name -> processing time, ms
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)


Alert = tuple[str, str, str]

#: Volumes a run needs per design column for the GLM to keep its default 24 motion
#: columns; a shorter run gets 6 (with an info alert): 24 columns of a 24-volume run
#: leave no degrees of freedom, and even at half a run a map waits for the columns.
MIN_VOLUMES_PER_COLUMN = 2

#: Most cosine drift columns a GLM design may have (a run of 3.6 hours with
#: ``glm.high_pass_s`` 128 s). The design is sized by the run length before the run
#: (the cosines depend on it), the GLM's state by its columns (columns x voxels, and
#: columns**2 work per volume): a header announcing NumberOfTemporalPositions 20000 at
#: TR 2 s would want 625 columns. Such a series gets no GLM, with an alert.
MAX_DRIFT_COLUMNS = 200


def glm_events(config: Config) -> list[tuple[float, float, str]] | None:
    """The paradigm: ``glm.events`` (a BIDS events.tsv) plus ``glm.conditions`` (inline),
    sorted by onset; None when neither is given (no GLM).

    Raises
    ------
    DesignError or OSError
        A file that cannot be read or a malformed event (naming the file or the key).
    """
    glm = config.glm
    if glm.events is None and not glm.conditions:
        return None
    events = read_events(glm.events) if glm.events is not None else []
    events += conditions_to_events(glm.conditions)
    return sorted(events, key=lambda e: (e[0], e[2]))


def check_glm_config(config: Config) -> None:
    """Read the paradigm, parse ``glm.contrasts`` and ``glm.roi`` once at start-up.

    Raises
    ------
    ConfigError
        Naming the key: an unreadable or malformed events file or condition, a contrast
        that names an unknown trial type or is not a linear expression, a bad ROI.
    """
    glm = config.glm
    rois = parse_roi_spec(glm.roi)  # ConfigError naming glm.roi
    for spec in rois.values():
        for part in (spec, getattr(spec, "within", None)):
            if isinstance(part, MaskRoi):
                try:
                    load_mask(part.path)
                except RtscError as exc:
                    raise ConfigError(f"glm.roi: {exc}") from None
    top_k = [name for name, spec in rois.items() if isinstance(spec, ContrastRoi)]
    try:
        if glm.events is not None:
            read_events(glm.events)
    except (OSError, DesignError) as exc:
        raise ConfigError(f"glm.events: {exc}") from None
    try:
        conditions_to_events(glm.conditions)
    except DesignError as exc:
        raise ConfigError(str(exc)) from None  # names glm.conditions.<trial_type>
    events = glm_events(config)
    if events is None:
        if glm.contrasts:
            raise ConfigError("glm.contrasts: given without glm.events or glm.conditions "
                              "(no design to contrast)")
        if top_k or glm.feedback == "contrast":
            what = f"glm.roi ({', '.join(top_k)}: top-k of a contrast)" if top_k \
                else "glm.feedback: contrast"
            raise ConfigError(f"{what} needs the GLM: set glm.events or glm.conditions")
        return
    trial_types = sorted({e[2] for e in events})
    for name, expression in glm.contrasts.items():
        try:
            parse_contrast(expression, trial_types)
        except DesignError as exc:
            raise ConfigError(f"glm.contrasts.{name}: {exc}") from None
    contrasts = list(glm.contrasts) or trial_types
    for name in top_k:
        if rois[name].contrast not in contrasts:  # type: ignore[union-attr]
            raise ConfigError(f"glm.roi: ROI {name!r} selects by contrast "
                              f"{rois[name].contrast!r}; contrasts: "  # type: ignore[union-attr]
                              f"{', '.join(contrasts)}")
    if glm.feedback_contrast is not None and glm.feedback_contrast not in contrasts:
        raise ConfigError(f"glm.feedback_contrast: {glm.feedback_contrast!r} is not a "
                          f"contrast; contrasts: {', '.join(contrasts)}")


def build_cord_glm_stage(config: Config, design: Any,
                         physio: PhysioSource | None = None) -> CordGlmStage:
    """The slice-wise GLM with RETROICOR columns (config ``physio``); its mask is
    ``spinal_cord.mask`` when given, else the automatic mask. ``physio`` is the series'
    reader of ``physio.file`` when another stage shares it; None opens one."""
    ph = config.physio
    assert ph.file is not None
    source = physio if physio is not None else PhysioSource(ph.file, ph.format)
    orders = RetroicorOrders.preset(ph.preset, ph.cardiac_order, ph.respiratory_order,
                                    ph.interaction_order, ph.csf)
    mask = load_mask(config.spinal_cord.mask)[0] if config.spinal_cord.mask else None
    csf_mask = load_mask(ph.csf_mask)[0] if ph.csf_mask and orders.csf else None
    return CordGlmStage(design, config.glm.contrasts, source, orders,
                        mask=mask, csf_mask=csf_mask, lag_s=ph.lag_s,
                        replay_after_run=ph.replay_after_run,
                        mask_fraction=config.pipeline.mask_fraction,
                        forgetting=config.glm.forgetting, p_value=config.glm.p_value)


def build_glm_stage(config: Config, info: SeriesInfo, physio: PhysioSource | None = None,
                    ) -> tuple[GlmStage | CordGlmStage | None, list[Alert]]:
    """The GLM stage of a new series, or None (no events, or the run length unknown).

    The design needs the run length up front (the cosine drift depends on it): the
    header's expected volume count (at most ``session.max_volumes``: the assembler
    refuses more), else ``glm.n_volumes``; a run length that needs more than
    :data:`MAX_DRIFT_COLUMNS` cosine columns gets no GLM (``glm_disabled`` alert).
    ``physio``: the series' shared reader of ``physio.file`` (see
    :func:`build_cord_glm_stage`).
    """
    glm = config.glm
    try:
        events = glm_events(config)
    except (OSError, RtscError) as exc:  # e.g. the events file changed since start-up
        return None, [("warning", "glm_disabled", f"no GLM for this series: {exc}")]
    if events is None:
        return None, []
    n_volumes = info.n_expected or glm.n_volumes
    if n_volumes is None or info.tr_s is None:
        missing = "the run length (no NumberOfTemporalPositions; set glm.n_volumes)" \
            if n_volumes is None else "the TR (no RepetitionTime in the header)"
        return None, [("warning", "glm_disabled", f"no GLM for this series: {missing}")]
    drifts = cosine_drift_order(n_volumes, info.tr_s, glm.high_pass_s) \
        if glm.drift == "cosine" else 0
    if drifts > MAX_DRIFT_COLUMNS:
        source = "the header's run length" if info.n_expected else "glm.n_volumes"
        return None, [("warning", "glm_disabled", (
            f"no GLM for this series: {source}, {n_volumes} volumes at TR {info.tr_s:g} s, "
            f"needs {drifts} cosine drift columns with glm.high_pass_s {glm.high_pass_s:g} "
            f"s, more than {MAX_DRIFT_COLUMNS}"))]
    n_motion = glm.motion_confounds if config.motion.enabled else 0
    alerts: list[Alert] = []
    if glm.motion_confounds and not config.motion.enabled:
        alerts.append(("info", "glm_no_motion_confounds",
                       "glm.motion_confounds ignored: motion.enabled is false"))
    try:
        def design_with(n_motion: int) -> Any:
            return make_design(events, n_volumes, info.tr_s, hrf=glm.hrf,
                               high_pass_s=glm.high_pass_s, drift=glm.drift,
                               drift_order=glm.drift_order,
                               extra_names=motion_confound_names(n_motion) if n_motion else ())

        design = design_with(n_motion)
        if n_motion > 6 and design.p * MIN_VOLUMES_PER_COLUMN > n_volumes:
            # A short run would spend its degrees of freedom on motion columns and show
            # no map until it holds more volumes than columns.
            fewer = design_with(6)
            alerts.append(("info", "glm_motion_confounds_reduced",
                           f"{n_motion} motion columns make {design.p} in all, more than a "
                           f"run of {n_volumes} volumes supports ({MIN_VOLUMES_PER_COLUMN} "
                           f"per column); 6 are used ({fewer.p} columns)"))
            design = fewer
        if config.physio.file is not None:
            stage: GlmStage | CordGlmStage = build_cord_glm_stage(config, design, physio)
        else:
            stage = GlmStage(design, glm.contrasts, mask_fraction=config.pipeline.mask_fraction,
                             forgetting=glm.forgetting, p_value=glm.p_value)
    except RtscError as exc:
        return None, [*alerts, ("warning", "glm_disabled", f"no GLM for this series: {exc}")]
    return stage, alerts


def build_stages(config: Config, info: SeriesInfo,
                 session_minutes: Mapping[str, float] | None = None,
                 ) -> tuple[list[Stage], list[Alert]]:
    """The stages for a new series, in processing order, and alerts about their set-up.

    ``session_minutes`` (threshold -> clean minutes of the session's earlier series) is
    the QC stage's starting point for the session criterion. ``pipeline.mode:
    spinal_cord`` builds the stages of :mod:`rtsc.pipeline.cord.stages` instead.
    """
    if config.pipeline.mode == "spinal_cord":
        return build_cord_stages(config, info, session_minutes)
    stages: list[Stage] = []
    qc = config.qc
    if qc.enabled:
        stages.append(TimingStage(qc.late_factor))
    glm, alerts = build_glm_stage(config, info)
    # the ROI stage reads a GlmStage's fit; the slice-wise RETROICOR GLM has none
    roi, roi_alerts = build_roi_stage(config, glm if isinstance(glm, GlmStage) else None)
    # Neurofeedback first: the feedback value is published as soon as the ROI stage has
    # it, before the observer stages. A percent-signal-change ROI of fixed voxels needs
    # only the registration and its own voxels, motion-corrected (Volume.corrected_at),
    # so it runs before the volume is resliced; a contrast or a top-k ROI needs the
    # GLM, which needs the resliced volume.
    early_roi = roi is not None and not roi.needs_glm
    if config.motion.enabled:
        motion = MotionStage(config.motion, config.pipeline.fd_radius_mm,
                             config.pipeline.fd_thresholds_mm, defer_reslice=True)
        stages.append(motion)
    if roi is not None and early_roi:
        stages.append(roi)
    if qc.enabled:  # slice spikes are judged on the acquired (not resliced) data
        stages.append(SliceQcStage(qc, config.pipeline.mask_fraction))
    if config.motion.enabled:
        stages.append(ResliceStage(motion))
    if glm is not None:
        stages.append(glm)
    if roi is not None and not early_roi:
        stages.append(roi)
    stages.append(DvarsStage(config.pipeline.mask_fraction, config.pipeline.dvars_outlier,
                             config.pipeline.series_memory_mb))
    stages.append(SignalStage(config.pipeline.mask_fraction))
    if qc.enabled:
        stages.append(QcStage(qc, config.pipeline.mask_fraction,
                              config.pipeline.fd_thresholds_mm, config.pipeline.fd_radius_mm,
                              session_minutes))
    if config.publish.carpet_voxels:
        stages.append(CarpetStage(config.pipeline.mask_fraction, config.publish.carpet_voxels))
    return stages, alerts + roi_alerts


def build_roi_stage(config: Config, glm: GlmStage | None) -> tuple[RoiStage | None, list[Alert]]:
    """The ROI / neurofeedback stage of a new series, or None when ``glm.roi`` is null."""
    g = config.glm
    rois = parse_roi_spec(g.roi)
    if not rois:
        return None, []
    needs_glm = g.feedback == "contrast" or any(isinstance(s, ContrastRoi) for s in rois.values())
    if needs_glm and glm is None:
        return None, [("warning", "roi_disabled", "no ROI values or feedback for this series: "
                       "they need the GLM, which is not running (see the glm_disabled alert)")]
    try:
        stage = RoiStage(rois, feedback=g.feedback, feedback_roi=g.feedback_roi,
                         feedback_contrast=g.feedback_contrast,
                         baseline=g.baseline_volumes if g.baseline_volumes else "auto",
                         detrend=g.detrend, glm=glm)
    except RtscError as exc:  # e.g. a mask file changed since start-up
        return None, [("warning", "roi_disabled", f"no ROI values or feedback: {exc}")]
    return stage, []


class SeriesPipeline:
    """Runs the stages over the volumes of one series.

    A stage that raises is reported as a ``stage_failed`` alert and skipped for that
    volume; the other stages and the data path go on (observer failure policy).

    Parameters
    ----------
    stages : list of Stage
    """

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.stage_times_ms: dict[str, list[float]] = {s.name: [] for s in stages}
        self.n_volumes = 0

    def process(self, volume: Volume, only: frozenset[str] | None = None,
                on_feedback: Callable[[dict[str, Any]], None] | None = None) -> VolumeOutput:
        """Run every stage on ``volume`` (or only the stages named in ``only``).

        A volume processed by a subset (a skipped backlog volume) does not count in
        :attr:`n_volumes`. ``on_feedback`` is called with the metrics so far as soon as
        the ROI stage (``name == "roi"``) has run, so the feedback value can leave before
        the rest.
        """
        out = VolumeOutput()
        for stage in self.stages:
            if only is not None and stage.name not in only:
                continue
            t0 = time.perf_counter()
            try:
                result = stage.update(volume, out.metrics)
            except Exception as exc:  # noqa: BLE001 - observers must not stop the run
                log.exception("stage %s failed on volume %d", stage.name, volume.index)
                out.alerts.append(("warning", "stage_failed",
                                   f"stage {stage.name} failed on volume {volume.index}: {exc}"))
                continue
            elapsed = (time.perf_counter() - t0) * 1000.0
            out.stage_ms[stage.name] = elapsed
            self.stage_times_ms[stage.name].append(elapsed)
            out.metrics.update(result.metrics)
            out.flags.extend(result.flags)
            out.alerts.extend(result.alerts)
            if result.volume is not None:
                volume = result.volume  # e.g. motion-corrected, for the stages after
            if on_feedback is not None and stage.name == "roi":
                on_feedback(out.metrics)
        if only is None:
            self.n_volumes += 1
        return out

    def maps(self) -> dict[str, np.ndarray]:
        """All stages' current maps."""
        found: dict[str, np.ndarray] = {}
        for stage in self.stages:
            try:
                found.update(stage.maps())
            except Exception:  # noqa: BLE001
                log.exception("stage %s failed to produce maps", stage.name)
        return found

    def finish(self) -> list[Alert]:
        """Series end: stages with a ``finish()`` (the RETROICOR GLM fits the volumes still
        waiting for their physiology) run it; their alerts are returned."""
        alerts: list[Alert] = []
        for stage in self.stages:
            finish = getattr(stage, "finish", None)
            if finish is None:
                continue
            try:
                alerts.extend(finish())
            except Exception as exc:  # noqa: BLE001
                log.exception("stage %s failed to finish", stage.name)
                alerts.append(("warning", "stage_failed", f"stage {stage.name} failed at "
                               f"series end: {exc}"))
        return alerts

    def final_confounds(self) -> dict[str, np.ndarray]:
        """Columns whose exact values are known only at series end (name -> (n,) array)."""
        columns: dict[str, np.ndarray] = {}
        for stage in self.stages:
            final = getattr(stage, "final_confounds", None)
            if final is None:
                continue
            try:
                columns.update(final())
            except Exception:  # noqa: BLE001
                log.exception("stage %s failed to finalise its confounds", stage.name)
        return columns

    def summary(self) -> dict[str, Any]:
        """Stage summaries and per-stage time medians (ms)."""
        summary: dict[str, Any] = {}
        for stage in self.stages:
            try:
                summary.update(stage.summary())
            except Exception:  # noqa: BLE001
                log.exception("stage %s failed to summarise", stage.name)
        summary["stage_ms_median"] = {name: float(np.median(times)) if times else None
                                      for name, times in self.stage_times_ms.items()}
        return summary
