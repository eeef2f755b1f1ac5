"""The ``plugin`` feedback kind: a plugin's field as the neurofeedback value.

With ``glm.feedback: plugin`` the ``feedback`` value of each volume is the number a
plugin (:mod:`rtsc.pipeline.plugins`) publishes in ``glm.feedback_plugin_field``,
smoothed as every kind is (``glm.feedback_smoothing``: :func:`make_smoother`'s EMA or
Kalman filter, the same state rules: a missing value gives None and leaves the state);
``feedback_raw`` is the value before smoothing. :class:`PluginFeedbackStage` runs right
after the plugin that produces the field, and the ``feedback`` message leaves as soon as
it has run (:class:`~rtsc.pipeline.series.SeriesPipeline` calls ``on_feedback`` after the
stage that produces ``feedback``). An ROI stage still runs when ``glm.roi`` is set, for
its ``roi`` values, without its own feedback (:class:`RoiWithoutFeedback`).

A value that is not a finite real number (None, a string, a list, NaN, a boolean) is
no value for that volume: ``feedback`` and ``feedback_raw`` are then None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import numpy as np

from rtsc.pipeline.roi.feedback import make_smoother
from rtsc.pipeline.stages import NO_FIELDS, StageResult, declared
from rtsc.volume import Volume

#: The fields of the feedback value, produced by the ROI stage or, with ``glm.feedback:
#: plugin``, by :class:`PluginFeedbackStage`.
FEEDBACK_FIELDS = frozenset({"feedback", "feedback_raw"})


def feedback_number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite real number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class PluginFeedbackStage:
    """``feedback`` and ``feedback_raw`` from a plugin's field, smoothed.

    Parameters
    ----------
    field : str
        The plugin field (``glm.feedback_plugin_field``).
    smoothing, alpha, q_over_r : see :func:`~rtsc.pipeline.roi.feedback.make_smoother`
    """

    name = "feedback"
    produces = FEEDBACK_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, field: str, smoothing: str = "none", alpha: float = 0.5,
                 q_over_r: float = 0.1) -> None:
        self.field = field
        self.consumes = frozenset({field})
        self.smoothing = smoothing
        self.smoother = make_smoother(smoothing, alpha, q_over_r)
        self.n_values = 0

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        raw = feedback_number((upstream or {}).get(self.field))
        value = raw if self.smoother is None else self.smoother.update(raw)
        self.n_values += raw is not None
        return StageResult(metrics={"feedback": value, "feedback_raw": raw})

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"feedback_plugin": {"field": self.field, "smoothing": self.smoothing,
                                    "volumes_with_value": self.n_values}}


class RoiWithoutFeedback:
    """The ROI stage when the feedback comes from a plugin: its ROI values (``roi``,
    ``roi_mean``, ``roi_detrended``), maps and summary, not its feedback fields.

    Every other attribute is the wrapped stage's (``needs_glm``, ``feedback_roi`` ...).
    """

    def __init__(self, roi: Any) -> None:
        self.roi = roi
        self.name = roi.name
        self.produces = declared(roi, "produces") - FEEDBACK_FIELDS
        self.consumes = declared(roi, "consumes")
        self.consumes_optional = declared(roi, "consumes_optional")

    def __getattr__(self, name: str) -> Any:
        if name == "roi":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.roi, name)

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        result = self.roi.update(volume, upstream)
        for name in FEEDBACK_FIELDS:
            result.metrics.pop(name, None)
        return result

    def maps(self) -> dict[str, np.ndarray]:
        return self.roi.maps()

    def summary(self) -> dict[str, Any]:
        summary = dict(self.roi.summary())
        summary.pop("roi_feedback", None)  # it would name the ROI's kind, not the plugin
        return summary
