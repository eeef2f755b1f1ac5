"""The ROI / neurofeedback stage of a new series, built from the configuration (shared
by brain and spinal cord mode)."""

from __future__ import annotations

from typing import Any

from rtsc.config import Config
from rtsc.errors import RtscError
from rtsc.pipeline.glm.recursive import GlmStage
from rtsc.pipeline.plugin_feedback import RoiWithoutFeedback
from rtsc.pipeline.roi.spec import ContrastRoi, parse_roi_spec
from rtsc.pipeline.roi.stage import RoiStage
from rtsc.pipeline.stages import Alert


def build_roi_stage(config: Config, glm: GlmStage | None) -> tuple[Any, list[Alert]]:
    """The ROI / neurofeedback stage of a new series (a :class:`RoiStage`), or None when
    ``glm.roi`` is null; with ``glm.feedback: plugin`` the ROI values only
    (:class:`~rtsc.pipeline.plugin_feedback.RoiWithoutFeedback`: a plugin gives the
    feedback)."""
    g = config.glm
    from_plugin = g.feedback == "plugin"
    rois = parse_roi_spec(g.roi)
    if not rois:
        return None, []
    needs_glm = g.feedback == "contrast" or any(isinstance(s, ContrastRoi) for s in rois.values())
    if needs_glm and glm is None:
        return None, [("warning", "roi_disabled", "no ROI values or feedback for this series: "
                       "they need the GLM, which is not running (see the glm_disabled alert)")]
    try:
        stage = RoiStage(rois, feedback="psc" if from_plugin else g.feedback,
                         feedback_roi=g.feedback_roi, feedback_contrast=g.feedback_contrast,
                         baseline=g.baseline_volumes if g.baseline_volumes else "auto",
                         detrend=g.detrend, glm=glm, feedback_roi_b=g.feedback_roi_b,
                         window=g.feedback_window,
                         motion_regression=g.feedback_motion_regression,
                         smoothing=g.feedback_smoothing, ema_alpha=g.feedback_ema_alpha,
                         kalman_q_over_r=g.feedback_kalman_q_over_r)
    except RtscError as exc:  # e.g. a mask file changed since start-up
        return None, [("warning", "roi_disabled", f"no ROI values or feedback: {exc}")]
    return (RoiWithoutFeedback(stage) if from_plugin else stage), []
