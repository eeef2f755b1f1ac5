"""The GLM's fit update after the ``volume`` message (StageResult.after_publish): only
when no later stage reads the fit of the same volume, and with the same fit, maps and
summary as the update run in place; a failure there is a ``stage_failed`` alert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conftest import make_config
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.stages import StageResult
from rtsc.volume import SeriesInfo, Volume
from simulator.bold import iter_volumes
from simulator.scanner import make_plan, write_events

N_VOLUMES = 8
SHAPE = (40, 40, 12)


def _config(tmp_path: Path, feedback: str | None) -> tuple[Any, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    simulator = {"n_volumes": N_VOLUMES, "shape": list(SHAPE), "max_trans_mm": 1.5,
                 "max_rot_deg": 1.5}
    plan = make_plan(make_config(tmp_path, simulator=simulator).simulator)
    events = tmp_path / "events.tsv"
    write_events(plan.events, events)
    glm: dict[str, Any] = {"events": str(events), "n_volumes": N_VOLUMES}
    if feedback is not None:
        centre = (plan.grid.affine() @ [*(np.array(SHAPE) / 2), 1.0])[:3].tolist()
        glm.update(feedback=feedback, roi={"center_ras_mm": centre, "radius_mm": 6.0})
    if feedback == "contrast":
        glm.update(contrasts={"task": "task"}, feedback_contrast="task")
    return make_config(tmp_path, simulator=simulator, glm=glm), plan


def _volumes(plan: Any, info: SeriesInfo) -> list[Volume]:
    return [Volume(np.asfortranarray(v.quantised, dtype=np.float32), plan.grid.affine(),
                   v.index, info, None, 0.0, 0.0) for v in iter_volumes(plan)]


def test_deferred_only_when_no_later_stage_reads_the_fit(tmp_path):
    info = SeriesInfo("s", 2.0, N_VOLUMES, 1, "test", "mosaic")
    for feedback, deferred in ((None, True), ("psc", True), ("contrast", False)):
        cfg, _ = _config(tmp_path / str(feedback), feedback)
        glm = next(s for s in build_stages(cfg, info)[0] if s.name == "glm")
        assert glm.defer_update is deferred, feedback


def test_deferred_fit_equals_the_fit_in_place(tmp_path):
    """Same volumes through two pipelines built alike, one with the GLM's update left
    for run_later (as the service runs it, after the message), one in place: the
    messages' metrics, the maps and the summary's GLM figures are equal, bit for bit."""
    cfg, plan = _config(tmp_path, "psc")
    info = SeriesInfo("s", 2.0, N_VOLUMES, 1, "test", "mosaic")
    deferred_stages, _ = build_stages(cfg, info)
    in_place_stages, _ = build_stages(cfg, info)
    next(s for s in in_place_stages if s.name == "glm").defer_update = False
    deferred, in_place = SeriesPipeline(deferred_stages), SeriesPipeline(in_place_stages)
    glm = next(s for s in deferred_stages if s.name == "glm")
    assert glm.defer_update
    for volume in _volumes(plan, info):
        a = deferred.process(volume)
        # not run yet: the fit holds the volumes before this one
        assert (glm.state.n if glm.state is not None else 0) == volume.index
        assert deferred.run_later() == []
        assert glm.state.n == volume.index + 1
        b = in_place.process(volume)
        assert a.alerts == b.alerts and a.flags == b.flags
        assert a.metrics.keys() == b.metrics.keys()
        np.testing.assert_equal(a.metrics, b.metrics)  # NaN equal to NaN
        assert a.stage_ms.keys() == b.stage_ms.keys()
    maps_a, maps_b = deferred.maps(), in_place.maps()
    assert {k for k in maps_a if k.startswith(("t:", "beta:"))}
    assert maps_a.keys() == maps_b.keys()
    for name in maps_a:
        np.testing.assert_array_equal(maps_a[name], maps_b[name], err_msg=name)
    summary_a, summary_b = deferred.summary(), in_place.summary()
    for key in ("glm_volumes", "glm_contrasts", "glm_rank", "glm_dof"):
        assert summary_a[key] == summary_b[key], key
    # the deferred time counts in the stage's median, one entry per volume
    assert len(deferred.stage_times_ms["glm"]) == N_VOLUMES


def test_pending_work_runs_before_the_next_volume_and_the_maps(tmp_path):
    """A caller that never calls run_later (a replay, a test) sees the same fit."""
    cfg, plan = _config(tmp_path, None)
    info = SeriesInfo("s", 2.0, N_VOLUMES, 1, "test", "mosaic")
    stages, _ = build_stages(cfg, info)
    pipeline = SeriesPipeline(stages)
    glm = next(s for s in stages if s.name == "glm")
    volumes = _volumes(plan, info)
    pipeline.process(volumes[0])
    assert glm.state is None  # set up after the message, not before it
    pipeline.process(volumes[1])
    assert glm.state.n == 1  # volume 0's update ran first
    assert any(k.startswith("t:") for k in pipeline.maps())
    assert glm.state.n == 2


class _Failing:
    name = "failing"
    produces = frozenset({"x"})

    def update(self, volume: Volume, upstream: Any = None) -> StageResult:
        def later() -> None:
            raise RuntimeError("boom")
        return StageResult(metrics={"x": 1}, after_publish=later)

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


def test_failing_after_publish_work_is_a_stage_failed_alert(tmp_path):
    cfg, plan = _config(tmp_path, None)
    info = SeriesInfo("s", 2.0, N_VOLUMES, 1, "test", "mosaic")
    pipeline = SeriesPipeline([_Failing()])
    volumes = _volumes(plan, info)
    out = pipeline.process(volumes[0])
    assert out.metrics == {"x": 1}
    assert pipeline.run_later() == [("warning", "stage_failed",
                                     "stage failing failed on volume 0: boom", 0)]
    assert pipeline.run_later() == []  # once
    pipeline.process(volumes[1])
    out = pipeline.process(volumes[2])  # volume 1's failure, not run by the caller
    assert [a[1] for a in out.alerts] == ["stage_failed"] and out.alerts[0][3] == 1
    pipeline.process(volumes[3])
    assert [a[1] for a in pipeline.finish()] == ["stage_failed"]
