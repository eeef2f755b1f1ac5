"""Composes the stages for one series, checks their declared fields (which stage
produces and consumes what, :mod:`rtsc.pipeline.stages`) and times each of them.

The GLM and ROI stages are built by :mod:`rtsc.pipeline.glm.build` and
:mod:`rtsc.pipeline.roi.build`, the stages of spinal cord mode by
:mod:`rtsc.pipeline.cord.stages`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rtsc.config import Config
from rtsc.pipeline.cord.stages import build_cord_stages
from rtsc.pipeline.glm.build import build_glm_stage
from rtsc.pipeline.glm.recursive import GlmStage
from rtsc.pipeline.motion.reference import ReferenceImage
from rtsc.pipeline.motion.stages import MotionStage, ResliceStage
from rtsc.pipeline.plugin_feedback import PluginFeedbackStage
from rtsc.pipeline.plugins import build_plugin_stages, insert_plugins
from rtsc.pipeline.qc.carpet import CarpetStage
from rtsc.pipeline.qc.stages import DvarsStage, QcStage, SliceQcStage, TimingStage
from rtsc.pipeline.roi.build import build_roi_stage
from rtsc.pipeline.roi.criterion import ActivationCriterionStage
from rtsc.pipeline.roi.integrity import FeedbackIntegrityStage
from rtsc.pipeline.stages import (
    Alert,
    SignalStage,
    Stage,
    Upstream,
    check_declarations,
    check_result,
    declared,
)
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
    volume : Volume or None, the volume as the last stage saw it (motion-corrected when
        the motion stages ran)
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    volume: Volume | None = None


def build_stages(config: Config, info: SeriesInfo,
                 session_minutes: Mapping[str, float] | None = None,
                 previous_reference: ReferenceImage | None = None,
                 ) -> tuple[list[Stage], list[Alert]]:
    """The stages for a new series, in processing order, and alerts about their set-up.

    ``session_minutes`` (threshold -> clean minutes of the session's earlier series) is
    the QC stage's starting point for the session criterion; ``previous_reference`` the
    motion reference of the run's series that ended last (``motion.reference:
    series:PREVIOUS``). ``pipeline.mode:
    spinal_cord`` builds the stages of :mod:`rtsc.pipeline.cord.stages` instead.
    Plugins (``pipeline.plugins``, :mod:`rtsc.pipeline.plugins`) run after the reslice:
    with ``glm.feedback: plugin`` right after it (and the feedback stage right after the
    plugin producing the field), else after the ROI stage and the GLM.
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
        # usable_frames has one producer: the QC stage when it runs (it counts runs of
        # qc.min_run_frames, on the respiration-filtered FD when asked), else this one.
        stages.append(MotionStage(config.motion, config.pipeline.fd_radius_mm,
                                  config.pipeline.fd_thresholds_mm, defer_reslice=True,
                                  count_usable=not qc.enabled,
                                  previous_reference=previous_reference))
    if roi is not None and early_roi:
        stages.append(roi)
    if qc.enabled:  # slice spikes are judged on the acquired (not resliced) data
        stages.append(SliceQcStage(qc, config.pipeline.mask_fraction))
    if config.motion.enabled:
        stages.append(ResliceStage())
    from_plugin = config.glm.feedback == "plugin"
    plugins_at = len(stages)  # with plugin feedback: before the GLM and a late ROI
    if glm is not None:
        stages.append(glm)
        if isinstance(glm, GlmStage) and (roi is None or early_roi):
            # Nothing after the GLM reads its fit of this volume (only a contrast or
            # top-k ROI would): its update, the costliest whole-volume pass (~0.9 ms at
            # 64x64x36, ~11 ms at 128x128x72), waits until the volume message is out.
            glm.defer_update = True
    if roi is not None and not early_roi:
        stages.append(roi)
    if not from_plugin:
        plugins_at = len(stages)  # after the feedback value
    stages.append(DvarsStage(config.pipeline.mask_fraction, config.pipeline.dvars_outlier,
                             config.pipeline.series_memory_mb))
    stages.append(SignalStage(config.pipeline.mask_fraction))
    if qc.enabled:
        stages.append(QcStage(qc, config.pipeline.mask_fraction,
                              config.pipeline.fd_thresholds_mm, config.pipeline.fd_radius_mm,
                              session_minutes))
    if (roi is not None or from_plugin) and config.glm.feedback_integrity_window:
        # last but the carpet: it reads the feedback, FD, DVARS and the global signal
        stages.append(FeedbackIntegrityStage(config.glm.feedback_integrity_window,
                                             config.glm.feedback_integrity_threshold))
    if roi is not None and isinstance(glm, GlmStage) and glm.contrast_names:
        contrast = roi.feedback_contrast or glm.contrast_names[0]
        stages.append(ActivationCriterionStage(
            glm.design, glm.contrast_weights[glm.contrast_names.index(contrast)],
            roi.feedback_roi, contrast, config.glm.p_value))
    if config.publish.carpet_voxels:
        stages.append(CarpetStage(config.pipeline.mask_fraction, config.publish.carpet_voxels))
    plugins, plugin_alerts = build_plugin_stages(config, info)
    plugin_alerts += insert_plugins(stages, plugins_at, plugins)
    if from_plugin:
        plugin_alerts += _add_plugin_feedback(config, stages)
    return stages, alerts + roi_alerts + plugin_alerts


def _add_plugin_feedback(config: Config, stages: list[Stage]) -> list[Alert]:
    """``glm.feedback: plugin``: the feedback stage right after the plugin producing
    ``glm.feedback_plugin_field``, or a ``feedback_disabled`` alert when none runs."""
    g = config.glm
    assert g.feedback_plugin_field is not None  # checked at load
    for i, stage in enumerate(stages):
        if g.feedback_plugin_field in declared(stage, "produces"):
            stages.insert(i + 1, PluginFeedbackStage(
                g.feedback_plugin_field, g.feedback_smoothing, g.feedback_ema_alpha,
                g.feedback_kalman_q_over_r))
            return []
    return [("warning", "feedback_disabled", f"no feedback value in this series: no running "
             f"plugin produces glm.feedback_plugin_field {g.feedback_plugin_field!r}")]


class SeriesPipeline:
    """Runs the stages over the volumes of one series.

    A stage that raises is reported as a ``stage_failed`` alert and skipped for that
    volume; the other stages and the data path go on (observer failure policy). A stage
    that reads or writes a field it did not declare (:mod:`rtsc.pipeline.stages`)
    raises StageContractError there, so it fails the same way, with the field named.

    Parameters
    ----------
    stages : list of Stage

    Raises
    ------
    StageContractError
        The stages' declarations do not hold (:func:`check_declarations`): two
        producers of a field, or a field consumed before its producer.
    """

    def __init__(self, stages: list[Stage]) -> None:
        check_declarations(stages)
        self.stages = stages
        self.stage_times_ms: dict[str, list[float]] = {s.name: [] for s in stages}
        self.n_volumes = 0
        # (stage name, volume index, work): StageResult.after_publish of the last volume
        self._later: list[tuple[str, int, Callable[[], None]]] = []
        #: on_feedback is called after this stage: the one producing ``feedback``
        self._feedback_stage = next((s.name for s in stages
                                     if "feedback" in declared(s, "produces")), "roi")

    def run_later(self) -> list[Alert]:
        """Run the work the stages left for after the volume's message
        (:attr:`StageResult.after_publish`), in stage order; return ``stage_failed``
        alerts (with the volume's index) for any that raised.

        Called by the service once the ``volume`` message is published; :meth:`process`,
        :meth:`maps`, :meth:`summary`, :meth:`finish` and :meth:`final_confounds` call it
        first too, so a caller that never does sees the same state. Its time is added to
        the stage's entry of :attr:`stage_times_ms` for that volume (the summary's
        ``stage_ms_median`` stays the stage's whole cost), not to the message's
        ``stage_ms``, which was sent before it ran.
        """
        alerts: list[Alert] = []
        pending, self._later = self._later, []
        for name, index, work in pending:
            t0 = time.perf_counter()
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - observers must not stop the run
                log.exception("stage %s failed on volume %d", name, index)
                alerts.append(("warning", "stage_failed",  # type: ignore[arg-type]
                               f"stage {name} failed on volume {index}: {exc}", index))
                continue
            times = self.stage_times_ms[name]
            if times:
                times[-1] += (time.perf_counter() - t0) * 1000.0
        return alerts

    def _run_later_logged(self) -> None:
        for _level, _code, text, *_ in self.run_later():
            log.warning("%s", text)

    def process(self, volume: Volume, only: frozenset[str] | None = None,
                on_feedback: Callable[[dict[str, Any]], None] | None = None) -> VolumeOutput:
        """Run every stage on ``volume`` (or only the stages named in ``only``).

        A volume processed by a subset (a skipped backlog volume) does not count in
        :attr:`n_volumes`. ``on_feedback`` is called with the metrics so far as soon as
        the stage producing ``feedback`` (the ROI stage, or the plugin feedback stage)
        has run, so the feedback value can leave before the rest.
        """
        out = VolumeOutput()
        out.alerts.extend(self.run_later())  # the previous volume's, if not run yet
        handoff: dict[str, Any] = {}  # typed values between stages, never published
        for stage in self.stages:
            if only is not None and stage.name not in only:
                continue
            t0 = time.perf_counter()
            try:
                result = stage.update(volume, Upstream(stage, out.metrics, handoff))
                check_result(stage, result)
            except Exception as exc:  # noqa: BLE001 - observers must not stop the run
                log.exception("stage %s failed on volume %d", stage.name, volume.index)
                out.alerts.append(("warning", "stage_failed",
                                   f"stage {stage.name} failed on volume {volume.index}: {exc}"))
                continue
            elapsed = (time.perf_counter() - t0) * 1000.0
            out.stage_ms[stage.name] = elapsed
            self.stage_times_ms[stage.name].append(elapsed)
            out.metrics.update(result.metrics)
            handoff.update(result.handoff)
            out.flags.extend(result.flags)
            out.alerts.extend(result.alerts)
            if result.after_publish is not None:
                self._later.append((stage.name, volume.index, result.after_publish))
            if result.volume is not None:
                volume = result.volume  # e.g. motion-corrected, for the stages after
            if on_feedback is not None and stage.name == self._feedback_stage:
                on_feedback(out.metrics)
        if only is None:
            self.n_volumes += 1
        out.volume = volume
        return out

    def maps(self) -> dict[str, np.ndarray]:
        """All stages' current maps."""
        self._run_later_logged()
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
        alerts: list[Alert] = [alert[:3] for alert in self.run_later()]  # no index here
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
        self._run_later_logged()
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
        self._run_later_logged()
        summary: dict[str, Any] = {}
        for stage in self.stages:
            try:
                summary.update(stage.summary())
            except Exception:  # noqa: BLE001
                log.exception("stage %s failed to summarise", stage.name)
        summary["stage_ms_median"] = {name: float(np.median(times)) if times else None
                                      for name, times in self.stage_times_ms.items()}
        return summary
