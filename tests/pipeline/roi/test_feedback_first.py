"""Neurofeedback first: a percent-signal-change ROI runs before the volume is resliced,
reading its voxels motion-corrected, with the values of the resliced volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from conftest import make_config
from rtsc.config import config_from_dict, merge, to_dict
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.roi.spec import roi_mean
from rtsc.pipeline.stages import StageResult
from rtsc.volume import SeriesInfo, Volume
from simulator.bold import iter_volumes
from simulator.output import write_events
from simulator.scanner import make_plan


class _LastVolume:
    """Records the (corrected) volume the last stages see."""

    name = "probe"

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        self.seen.append(volume.data.copy(order="F"))
        return StageResult()

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


def _config(tmp_path: Path, feedback: str) -> tuple[Any, Any]:
    cfg = make_config(tmp_path, simulator={"n_volumes": 12, "max_trans_mm": 2.0,
                                           "max_rot_deg": 2.0})
    plan = make_plan(cfg.simulator)
    events = tmp_path / "events.tsv"
    write_events(plan.events, events)
    centre = plan.phantom.activation_center_ras.tolist()
    glm: dict[str, Any] = {"events": str(events), "n_volumes": 12, "feedback": feedback,
                           "roi": {"center_ras_mm": centre, "radius_mm": 6.0}}
    if feedback == "contrast":
        glm["contrasts"] = {"task": "task"}
        glm["feedback_contrast"] = "task"
    return config_from_dict(merge(to_dict(cfg), {"glm": glm})), plan


@pytest.mark.slow
def test_psc_roi_runs_before_reslicing_with_the_resliced_values(tmp_path):
    cfg, plan = _config(tmp_path, "psc")
    info = SeriesInfo("s", cfg.simulator.tr_s, 12, 1, "test", "mosaic")
    stages, alerts = build_stages(cfg, info)
    names = [s.name for s in stages]
    assert names.index("motion") < names.index("roi") < names.index("reslice") \
        < names.index("glm") < names.index("dvars"), names
    assert names.index("roi") < names.index("spikes") < names.index("reslice")
    probe = _LastVolume()
    pipeline = SeriesPipeline(stages + [probe])
    roi = next(s for s in stages if s.name == "roi")
    early_values = []
    for v in iter_volumes(plan):
        volume = Volume(np.asfortranarray(v.quantised, dtype=np.float32), plan.grid.affine(),
                        v.index, info, None, 0.0, 0.0)
        out = pipeline.process(volume, on_feedback=lambda m: early_values.append(
            dict(m["roi_mean"])))
        assert "stage_failed" not in [a[1] for a in out.alerts]
    index = roi.tracks[next(iter(roi.tracks))].index  # set at the first volume
    assert index.size > 20
    # the motion is real: the corrected volume differs from the acquired one in the ROI
    moved = [np.abs(seen.ravel(order="F")[index] - np.asarray(v.quantised, np.float32)
                    .ravel(order="F")[index]).max() for seen, v in zip(probe.seen,
                                                                       iter_volumes(plan))]
    assert max(moved) > 1.0
    for seen, early in zip(probe.seen, early_values):
        (name, value), = early.items()
        assert value == roi_mean(seen.ravel(order="F"), index)  # bit-identical


def test_contrast_feedback_keeps_the_roi_after_the_glm(tmp_path):
    cfg, _ = _config(tmp_path, "contrast")
    info = SeriesInfo("s", cfg.simulator.tr_s, 12, 1, "test", "mosaic")
    names = [s.name for s in build_stages(cfg, info)[0]]
    assert names.index("reslice") < names.index("glm") < names.index("roi"), names
