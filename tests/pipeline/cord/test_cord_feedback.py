"""Neurofeedback in spinal cord mode: an ROI on the cord, its feedback value, and the
feedback-integrity check on the slice-wise FD, the cord DVARS and the global signal."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.config import CordSimConfig, SimulatorConfig, config_from_dict
from rtsc.pipeline.roi.integrity import FeedbackIntegrityStage, window_r
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.volume import SeriesInfo, Volume
from simulator.cord import iter_cord_volumes, plan_cord_run

N = 24
WINDOW = 8


@pytest.mark.slow
def test_cord_feedback_has_its_integrity_check():
    plan = plan_cord_run(SimulatorConfig(n_volumes=N, seed=3, cord=CordSimConfig(
        shape=[96, 96, 12], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=2.0)))
    affine = plan.grid.affine()
    cord = plan.masks()["cord"]
    centre = affine[:3, :3] @ np.argwhere(cord).mean(axis=0) + affine[:3, 3]
    config = config_from_dict({
        "pipeline": {"mode": "spinal_cord"},
        "spinal_cord": {"moco": {"reference_volumes": 3}},
        "glm": {"roi": {"cord": {"center_ras_mm": centre.tolist(), "radius_mm": 6.0}},
                "baseline_volumes": 3, "feedback_integrity_window": WINDOW}})
    info = SeriesInfo(series="cord", tr_s=plan.tr_s, n_expected=N, series_number=1,
                      description="", source="mosaic", phase_encoding_axis="j",
                      bandwidth_pe_hz=plan.bandwidth_per_pixel_phase_hz)
    stages, _ = build_stages(config, info)
    names = [s.name for s in stages]
    assert isinstance(stages[names.index("feedback_integrity")], FeedbackIntegrityStage)
    # after every stage whose fields it reads
    assert names.index("feedback_integrity") > max(names.index(n) for n in
                                                   ("slice_moco", "cord_qc", "signal", "roi"))
    pipeline = SeriesPipeline(stages)  # checks the declarations
    rows = []
    for t, data in enumerate(iter_cord_volumes(plan)):
        out = pipeline.process(Volume(np.asfortranarray(data.data), affine, t, info,
                                      t * plan.tr_s, 0.0, 0.0, slice_times_s=plan.slice_times_s))
        assert not [a for a in out.alerts if a[1] == "stage_failed"], out.alerts
        rows.append(out.metrics)
    feedback = np.array([np.nan if m["feedback"] is None else m["feedback"] for m in rows])
    assert np.isfinite(feedback[3:]).all()
    nuisances = ("framewise_displacement", "dvars", "global_signal")
    table = np.array([[np.nan if m.get(k) is None else m[k] for k in nuisances] for m in rows])
    for t in range(WINDOW - 1, N):
        part = slice(t - WINDOW + 1, t + 1)
        expected = window_r(feedback[part], table[part], (WINDOW + 1) // 2)
        published = rows[t]["feedback_integrity"]
        for key, r in zip(nuisances, expected):
            assert published[key] == pytest.approx(r, abs=1e-12) if r is not None \
                else published[key] is None
    assert any(v is not None for v in rows[-1]["feedback_integrity"].values())
