"""Typed stage results: every pipeline mode's stages declare the fields they produce and
consume, the declarations hold (one producer per field, producers before consumers) and
the stages keep to them volume by volume; a duplicate producer, a wrong order and an
undeclared field are refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_config
from rtsc.config import MotionConfig, config_from_dict
from rtsc.pipeline.motion.stages import MotionStage, PendingReslice, ResliceStage
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.stages import (
    SignalStage,
    StageContractError,
    StageResult,
    Upstream,
    check_declarations,
    check_result,
    declared,
)
from rtsc.volume import SeriesInfo, Volume
from simulator.bold import iter_volumes
from simulator.scanner import make_plan, write_events
from cord_images import cord_slices

N_VOLUMES = 6
SHAPE = (40, 40, 12)
CORD_SHAPE = (48, 48, 6)


def _brain_config(tmp_path: Path, glm: str | None = None, **sections: Any) -> Any:
    """``glm``: None (no GLM), "glm" (GLM only), "psc" (GLM and a sphere ROI read before
    the reslice) or "contrast" (contrast feedback: the ROI after the GLM)."""
    simulator = {"n_volumes": N_VOLUMES, "shape": list(SHAPE), "max_trans_mm": 1.0,
                 "max_rot_deg": 1.0}
    plan = make_plan(make_config(tmp_path, simulator=simulator).simulator)
    if glm is not None:
        events = tmp_path / "events.tsv"
        write_events(plan.events, events)
        section: dict[str, Any] = {"events": str(events), "n_volumes": N_VOLUMES}
        if glm in ("psc", "contrast"):
            centre = (plan.grid.affine() @ [*(np.array(SHAPE) / 2), 1.0])[:3].tolist()
            section.update(feedback=glm, roi={"center_ras_mm": centre, "radius_mm": 6.0})
        if glm == "contrast":
            section.update(contrasts={"task": "task"}, feedback_contrast="task")
        sections["glm"] = section
    return make_config(tmp_path, simulator=simulator,
                       publish={"carpet_voxels": 64}, **sections), plan


def _brain_volumes(plan: Any, info: SeriesInfo) -> list[Volume]:
    return [Volume(np.asfortranarray(v.quantised, dtype=np.float32), plan.grid.affine(),
                   v.index, info, None, 0.0, 0.0) for v in iter_volumes(plan)]


def _cord_volumes(info: SeriesInfo) -> list[Volume]:
    rng = np.random.default_rng(3)
    affine = np.diag([-1.0, -1.0, 5.0, 1.0])
    volumes = []
    for t in range(N_VOLUMES):
        shift = 0.5 * np.sin(t + np.arange(CORD_SHAPE[2]))
        centres = np.stack([np.full(CORD_SHAPE[2], 24.0), 24.0 + shift], axis=1)
        now = time.time()
        volumes.append(Volume(cord_slices(CORD_SHAPE, centres, rng), affine, t, info, now,
                              now, now))
    return volumes


def _run(stages: list[Any], volumes: list[Volume]) -> list[Any]:
    """Run the volumes; every result field is declared by its stage, none fails."""
    check_declarations(stages)
    pipeline = SeriesPipeline(stages)
    produced = frozenset().union(*(declared(s, "produces") for s in stages))
    outputs = []
    for volume in volumes:
        out = pipeline.process(volume)
        failed = [a for a in out.alerts if a[1] == "stage_failed"]
        assert not failed, failed
        assert set(out.metrics) <= produced, set(out.metrics) - produced
        outputs.append(out)
    return outputs


def _producers(stages: list[Any], name: str) -> list[str]:
    return [s.name for s in stages if name in declared(s, "produces")]


BRAIN_MODES = {
    "default": {},
    "glm": {"glm": "glm"},
    "glm_psc_roi": {"glm": "psc"},
    "glm_contrast_roi": {"glm": "contrast"},
    "no_motion": {"glm": "glm", "motion": {"enabled": False}},
    "no_qc": {"qc": {"enabled": False}},
    "no_respiration_filter": {"qc": {"respiration_filter": False}},
}


@pytest.mark.parametrize("mode", sorted(BRAIN_MODES))
def test_brain_modes_keep_their_declarations(tmp_path, mode):
    options = dict(BRAIN_MODES[mode])
    config, plan = _brain_config(tmp_path, options.pop("glm", None), **options)
    info = SeriesInfo("s", config.simulator.tr_s, N_VOLUMES, 1, "test", "mosaic")
    stages, _ = build_stages(config, info)
    names = [s.name for s in stages]
    assert ("glm" in names) == (config.glm.events is not None)
    assert ("roi" in names) == (config.glm.roi is not None)
    outputs = _run(stages, _brain_volumes(plan, info))
    # one producer of usable_frames: the QC stage when it runs, else the motion stage
    expected = ["qc"] if config.qc.enabled else ["motion"] if config.motion.enabled else []
    assert _producers(stages, "usable_frames") == expected
    if config.motion.enabled:
        assert names.index("motion") < names.index("reslice")
        assert _producers(stages, "pending_reslice") == ["motion"]
        # the hand-off is never published
        assert all("pending_reslice" not in o.metrics for o in outputs)
    if expected == ["motion"]:  # frames at or under each threshold, as published
        fd = [o.metrics["framewise_displacement"] for o in outputs]
        for key, count in outputs[-1].metrics["usable_frames"].items():
            assert count == sum(1 for v in fd if v is not None and v <= float(key))


@pytest.mark.parametrize("with_glm", [False, True])
def test_spinal_cord_mode_keeps_its_declarations(tmp_path, with_glm):
    sections: dict[str, Any] = {"pipeline": {"mode": "spinal_cord"},
                                "spinal_cord": {"moco": {"reference_volumes": 2}}}
    if with_glm:
        events = tmp_path / "events.tsv"
        events.write_text("onset\tduration\ttrial_type\n2.3\t4.6\ttask\n")
        sections["glm"] = {"events": str(events), "n_volumes": N_VOLUMES}
    config = config_from_dict(sections)
    info = SeriesInfo(series="cord", tr_s=2.3, n_expected=N_VOLUMES, series_number=1,
                      description="", source="mosaic", phase_encoding_axis="j",
                      bandwidth_pe_hz=17.0)
    stages, _ = build_stages(config, info)
    assert ("glm" in [s.name for s in stages]) == with_glm
    outputs = _run(stages, _cord_volumes(info))
    # slice_tsnr is cord QC's (cord mask) alone; FD is the slice-wise motion stage's
    assert _producers(stages, "slice_tsnr") == ["cord_qc"]
    assert _producers(stages, "framewise_displacement") == ["slice_moco"]
    assert _producers(stages, "usable_frames") == ["qc"]
    assert len(outputs[-1].metrics["slice_tsnr"]) == CORD_SHAPE[2]


class _Fake:
    """A stage with given declarations that writes ``writes`` and reads ``reads``."""

    def __init__(self, name: str, produces: set[str] = frozenset(),
                 consumes: set[str] = frozenset(), writes: set[str] | None = None,
                 reads: tuple[str, ...] = ()) -> None:
        self.name = name
        self.produces = frozenset(produces)
        self.consumes = frozenset(consumes)
        self.consumes_optional = frozenset()
        self.writes = set(self.produces if writes is None else writes)
        self.reads = reads

    def update(self, volume: Volume, upstream: Any = None) -> StageResult:
        for name in self.reads:
            upstream.get(name)
        return StageResult(metrics={name: 1.0 for name in self.writes})

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


def test_two_producers_of_a_field_are_refused():
    with pytest.raises(StageContractError, match=r"'global_signal'.*'signal' and 'fake'"):
        SeriesPipeline([SignalStage(0.2), _Fake("fake", {"global_signal"})])


def test_a_consumer_before_its_producer_is_refused():
    motion = MotionStage(MotionConfig(), defer_reslice=True)
    with pytest.raises(StageContractError,
                       match=r"stage 'reslice' consumes 'pending_reslice', produced by the "
                             r"later stage 'motion'; order: reslice -> motion"):
        SeriesPipeline([ResliceStage(), motion])
    with pytest.raises(StageContractError, match="'reslice' consumes 'pending_reslice', "
                                                 "which no stage produces"):
        SeriesPipeline([ResliceStage()])
    SeriesPipeline([motion, ResliceStage()])  # the right order


def test_an_optional_field_produced_later_is_refused():
    qc = next(s for s in build_stages(config_from_dict({}),
                                      SeriesInfo("s", 2.0, 10, 1, "d", "mosaic"))[0]
              if s.name == "qc")
    motion = MotionStage(MotionConfig(), count_usable=False)
    with pytest.raises(StageContractError, match="stage 'qc' consumes "
                                                 "'framewise_displacement', produced by the "
                                                 "later stage 'motion'"):
        check_declarations([qc, motion])
    check_declarations([motion, qc])
    check_declarations([qc])  # absent: the QC stage runs without usable frames


def test_undeclared_fields_fail_the_stage_at_run_time():
    info = SeriesInfo("s", 2.0, 10, 1, "d", "mosaic")
    volume = Volume(np.ones((4, 4, 4), np.float32, order="F"), np.eye(4), 0, info, None,
                    0.0, 0.0)
    writer = _Fake("writer", {"w"}, writes={"w", "b"})
    with pytest.raises(StageContractError, match="'writer' wrote undeclared field.*b"):
        check_result(writer, writer.update(volume, {}))
    reader = _Fake("reader", reads=("a",))
    pipeline = SeriesPipeline([_Fake("first", {"a"}), writer, reader])
    out = pipeline.process(volume)
    messages = [a[2] for a in out.alerts if a[1] == "stage_failed"]
    assert len(messages) == 2
    assert "stage writer failed" in messages[0] and "undeclared field(s) b" in messages[0]
    assert "stage reader failed" in messages[1] and "read undeclared field 'a'" in messages[1]
    assert out.metrics == {"a": 1.0}  # the failed stage's result is not merged


def test_upstream_answers_only_declared_fields():
    stage = _Fake("s", consumes={"a"})
    view = Upstream(stage, {"a": 1, "b": 2}, {})
    assert view["a"] == 1 and view.get("a") == 1 and "a" in view and dict(view) == {"a": 1}
    with pytest.raises(StageContractError):
        view.get("b")
    with pytest.raises(StageContractError):
        "b" in view  # noqa: B015
    assert Upstream(stage, {}, {}).get("a") is None  # declared, not produced this volume


def test_the_reslice_hand_off_is_the_motion_stages_pending_value(tmp_path):
    config, plan = _brain_config(tmp_path)
    info = SeriesInfo("s", config.simulator.tr_s, N_VOLUMES, 1, "test", "mosaic")
    motion = MotionStage(config.motion, defer_reslice=True)
    whole = MotionStage(config.motion)
    reslice = ResliceStage()
    for volume in _brain_volumes(plan, info)[:3]:
        result = motion.update(volume, {})
        pending = result.handoff["pending_reslice"]
        assert isinstance(pending, PendingReslice) and pending.index == volume.index
        assert result.volume.corrected_at == pending.sample
        corrected = reslice.update(result.volume, {"pending_reslice": pending}).volume
        assert corrected.corrected_at is None
        # bit-identical to the motion stage that reslices at once
        np.testing.assert_array_equal(corrected.data, whole.update(volume, {}).volume.data)
        voxels = np.flatnonzero(volume.data.ravel(order="F")
                                > 0.5 * volume.data.max())[::7]  # in the head
        np.testing.assert_array_equal(pending.sample(voxels),
                                      corrected.data.ravel(order="F")[voxels])
    # a hand-off of another volume (the motion stage failed on this one) is not applied
    assert reslice.update(volume, {"pending_reslice": None}).volume is None
