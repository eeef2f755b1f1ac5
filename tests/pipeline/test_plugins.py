"""Plugins (rtsc/pipeline/plugins.py): configuration, discovery, naming, isolation and the
plugin feedback kind. The probe plugins are in tests/plugin_probes.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_config
from plugin_probes import Counter, counter_value
from rtsc.config import ConfigError, config_from_dict, merge, to_dict
from rtsc.config.pipeline import PLUGIN_PREFIX
from rtsc.pipeline.plugins import check_plugins, load_plugin
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.pipeline.stages import declared
from rtsc.volume import SeriesInfo, Volume
from simulator.bold import iter_volumes
from simulator.output import write_events
from simulator.scanner import make_plan, run_simulation

N = 10
SIM = {"n_volumes": N, "shape": [32, 32, 18], "voxel_size_mm": [6.0, 6.0, 6.0],
       "psf_samples": 1, "max_trans_mm": 1.0, "max_rot_deg": 1.0}
COUNTER = "plugin_probes:Counter"


def _config(tmp_path: Path, plugins: list[str], options: dict[str, Any] | None = None,
            **sections: dict[str, Any]) -> Any:
    cfg = make_config(tmp_path, simulator=SIM)
    events = tmp_path / "events.tsv"
    write_events(make_plan(cfg.simulator).events, events)
    glm = {"events": str(events), "n_volumes": N, "motion_confounds": 6,
           **sections.pop("glm", {})}
    return config_from_dict(merge(to_dict(cfg), {
        "pipeline": {"plugins": plugins, "plugin_options": options or {}},
        "glm": glm, **sections}))


def _run(cfg: Any, on_feedback: list | None = None) -> tuple[list[str], list[Any], list]:
    """The stage names, each volume's output and the set-up alerts of a simulated run."""
    plan = make_plan(cfg.simulator)
    info = SeriesInfo("s", cfg.simulator.tr_s, N, 1, "test", "mosaic")
    stages, alerts = build_stages(cfg, info)
    pipeline = SeriesPipeline(stages)
    outputs = []
    for v in iter_volumes(plan):
        volume = Volume(np.asfortranarray(v.quantised, dtype=np.float32), plan.grid.affine(),
                        v.index, info, None, 0.0, 0.0)
        callback = None if on_feedback is None else \
            (lambda metrics: on_feedback.append(dict(metrics)))
        outputs.append(pipeline.process(volume, on_feedback=callback))
        pipeline.run_later()
    outputs[-1].summary = pipeline.summary()
    return [s.name for s in stages], outputs, alerts


# ---- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, message", [
    ({"pipeline": {"plugins": ["not a path"]}},
     "pipeline.plugins[0]: 'not a path' is not a plugin; expected 'package.module:StageClass'"),
    ({"pipeline": {"plugins": ["a.b:C", "a.b:C"]}}, "pipeline.plugins[1]: 'a.b:C' is listed twice"),
    ({"pipeline": {"plugins": "a.b:C"}}, "pipeline.plugins: 'a.b:C' is a str; expected a list"),
    ({"pipeline": {"plugins": ["a.b:C"], "plugin_options": {"C": {}}}},
     "pipeline.plugin_options.C: not in pipeline.plugins"),
    ({"pipeline": {"plugins": ["a.b:C"], "plugin_options": {"a.b:C": 3}}},
     "pipeline.plugin_options.a.b:C: 3 is a int; expected a mapping"),
    ({"glm": {"feedback": "plugin", "feedback_plugin_field": "plugin_x"}},
     "glm.feedback: plugin, but pipeline.plugins is empty"),
    ({"pipeline": {"plugins": ["a.b:C"]}, "glm": {"feedback": "plugin"}},
     "glm.feedback_plugin_field: null, but glm.feedback is plugin"),
    ({"pipeline": {"plugins": ["a.b:C"]},
      "glm": {"feedback": "plugin", "feedback_plugin_field": "dvars"}},
     "glm.feedback_plugin_field: 'dvars' is not a plugin field; a plugin's fields start with"),
    ({"pipeline": {"plugins": ["a.b:C"], "mode": "spinal_cord"}},
     "pipeline.plugins: plugins run in brain mode only"),
])
def test_config_errors_name_the_key(sections, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(sections)
    assert message in str(error.value)


def test_default_is_no_plugin_and_nothing_runs(tmp_path):
    cfg = _config(tmp_path, [])
    assert cfg.pipeline.plugins == [] and cfg.pipeline.plugin_options == {}
    assert check_plugins(cfg) == []
    names = [s.name for s in build_stages(cfg, SeriesInfo("s", 2.0, N, 1, "t", "mosaic"))[0]]
    assert not [n for n in names if n.startswith("plugin:") or n == "feedback"]


@pytest.mark.parametrize("entry, options, message", [
    ("no_such_module_xyz:Stage", {},
     "pipeline.plugins[0]: 'no_such_module_xyz:Stage': module 'no_such_module_xyz' cannot be "
     "imported: ModuleNotFoundError"),
    ("plugin_probes:Missing", {}, "'plugin_probes' has no attribute 'Missing'"),
    ("plugin_probes:not_a_class", {}, "'plugin_probes:not_a_class' is a int, not a class"),
    ("plugin_probes:NoName", {}, "its class attribute 'name' is None; expected a string"),
    ("plugin_probes:Unprefixed", {}, "produces 'dvars'; a plugin's fields start with 'plugin_'"),
    ("no_such_entry_point_xyz", {}, "'no_such_entry_point_xyz' is no entry point of the group "
                                    "'rtsc.stages'"),
    ("plugin_probes:Picky", {"plugin_probes:Picky": {"level": 3}},
     "pipeline.plugin_options.plugin_probes:Picky: level 3: allowed 1 or 2"),
])
def test_start_up_check_names_the_entry(tmp_path, entry, options, message):
    cfg = _config(tmp_path, [entry], options)  # the syntax is fine: loading imports nothing
    with pytest.raises(ConfigError) as error:
        check_plugins(cfg)
    assert message in str(error.value)


def test_start_up_check_of_names_and_the_feedback_field(tmp_path):
    assert check_plugins(_config(tmp_path, [COUNTER, "plugin_probes:Second"])) == [
        Counter, load_plugin("plugin_probes:Second")]
    with pytest.raises(ConfigError, match=r"pipeline.plugins\[1\]: 'plugin_probes:CounterAlias' "
                       r"is named 'counter', like 'plugin_probes:Counter'"):
        check_plugins(_config(tmp_path, [COUNTER, "plugin_probes:CounterAlias"]))
    with pytest.raises(ConfigError, match="glm.feedback_plugin_field: 'plugin_nope' is produced "
                       "by no plugin of pipeline.plugins; they produce: plugin_counter_fd"):
        check_plugins(_config(tmp_path, [COUNTER], glm={
            "feedback": "plugin", "feedback_plugin_field": "plugin_nope"}))


def test_entry_point_discovery(tmp_path, monkeypatch):
    """A real entry point: a dist-info directory with entry_points.txt on sys.path."""
    site = tmp_path / "site"
    (site / "lab_stages-1.0.dist-info").mkdir(parents=True)
    (site / "lab_stages-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lab-stages\nVersion: 1.0\n")
    (site / "lab_stages-1.0.dist-info" / "entry_points.txt").write_text(
        "[rtsc.stages]\nlabcounter = lab_stages_mod:LabCounter\n")
    (site / "lab_stages_mod.py").write_text(
        "from plugin_probes import Counter\n\nclass LabCounter(Counter):\n"
        "    name = 'labcounter'\n"
        "    produces = frozenset({'plugin_labcounter_value', 'plugin_counter_fd', "
        "'plugin_counter_sum', 'plugin_counter_value'})\n")
    with pytest.raises(ConfigError, match="'labcounter' is no entry point"):
        load_plugin("labcounter", "pipeline.plugins[0]")
    monkeypatch.syspath_prepend(str(site))
    cls = load_plugin("labcounter", "pipeline.plugins[0]")
    assert cls.__name__ == "LabCounter" and cls.__module__ == "lab_stages_mod"
    cfg = _config(tmp_path, ["labcounter"], {"labcounter": {"fail_on": 99}})
    assert check_plugins(cfg) == [cls]
    names, outputs, alerts = _run(cfg)
    assert alerts == [] and "plugin:labcounter" in names
    assert [o.metrics["plugin_counter_value"] for o in outputs] == [
        None if i in (5, 6) else counter_value(i) for i in range(N)]


# ---- where plugins run, naming and collisions ---------------------------------------------------

def test_plugins_run_after_the_reslice_on_the_corrected_volume(tmp_path):
    cfg = _config(tmp_path, [COUNTER, "plugin_probes:Second"],
                  glm={"roi": {"center_ras_mm": [0, 0, 0], "radius_mm": 12.0}})
    names, outputs, alerts = _run(cfg)
    assert alerts == []
    # psc ROI feedback: the plugins come after the ROI and the GLM, before the observers
    assert names.index("roi") < names.index("reslice") < names.index("glm") \
        < names.index("plugin:counter") < names.index("plugin:second") < names.index("dvars")
    for out, (index, data) in zip(outputs, Counter.seen):
        assert out.volume is not None and out.volume.index == index
        np.testing.assert_array_equal(data, out.volume.data)  # the resliced volume
        assert out.metrics["plugin_counter_sum"] == pytest.approx(
            float(np.nansum(out.volume.data, dtype=np.float64)))
        # upstream: the FD of the motion stage; a later plugin reads an earlier one's field
        assert out.metrics["plugin_counter_fd"] == out.metrics["framewise_displacement"]
        value = out.metrics["plugin_counter_value"]
        assert out.metrics["plugin_second_value"] == (None if value is None else 2 * value)
        assert "plugin:counter" in out.stage_ms
    assert outputs[-1].summary["plugin_counter"] == {"volumes": N}
    assert np.any(Counter.seen[1][1] != Counter.seen[0][1])
    # with plugin feedback: right after the reslice, before the GLM (and any late ROI)
    cfg = _config(tmp_path, [COUNTER], glm={"feedback": "plugin",
                                            "feedback_plugin_field": "plugin_counter_value"})
    names = [s.name for s in build_stages(cfg, SeriesInfo("s", 2.0, N, 1, "t", "mosaic"))[0]]
    assert names[names.index("reslice") + 1:names.index("glm")] == ["plugin:counter",
                                                                      "feedback"]


def test_no_rtsc_field_has_the_plugin_prefix(tmp_path):
    """The naming rule keeps plugins apart only if rtsc's own fields never start so."""
    cfg = _config(tmp_path, [], glm={"roi": {"a": {"center_ras_mm": [0, 0, 0], "radius_mm": 9},
                                             "b": {"center_ras_mm": [9, 0, 0], "radius_mm": 9}},
                                     "feedback": "correlation", "feedback_roi_b": "b",
                                     "contrasts": {"task": "task"}},
                  qc={"respiration_filter": True}, publish={"carpet_voxels": 100})
    stages, _ = build_stages(cfg, SeriesInfo("s", 2.0, N, 1, "t", "mosaic"))
    fields = set().union(*(declared(s, "produces") for s in stages))
    assert len(fields) > 30
    assert not [f for f in fields if f.startswith(PLUGIN_PREFIX)]


def test_collisions_and_unfit_declarations_leave_the_plugin_out(tmp_path):
    plugins = [COUNTER, "plugin_probes:Clash", "plugin_probes:InstanceUnprefixed",
               "plugin_probes:NeedsDvars", "plugin_probes:Second"]
    names, outputs, alerts = _run(_config(tmp_path, plugins))
    assert [n for n in names if n.startswith("plugin:")] == ["plugin:counter", "plugin:second"]
    # construction first (each plugin alone), then the fit into the stages, in order
    texts = [text for level, code, text in alerts if code == "plugin_disabled"]
    assert len(texts) == 3 and len(alerts) == 3
    assert "plugin:instance_unprefixed produces 'value'; a plugin's fields start with " \
           "'plugin_'" in texts[0]
    assert "plugin plugin_probes:Clash does not run in this series: field " \
           "'plugin_counter_value' is produced by two stages, 'plugin:counter' and " \
           "'plugin:clash'" in texts[1]
    assert "stage 'plugin:needs_dvars' consumes 'dvars', produced by the later stage 'dvars'" \
        in texts[2]
    assert all(o.metrics["plugin_second_value"] is not None
               for o in outputs if o.metrics["plugin_counter_value"] is not None)


# ---- isolation ----------------------------------------------------------------------------------

def test_a_failing_update_is_a_stage_failed_alert_and_the_run_goes_on(tmp_path):
    cfg = _config(tmp_path, [COUNTER, "plugin_probes:Second"], {COUNTER: {"fail_on": 3}})
    names, outputs, alerts = _run(cfg)
    assert alerts == []
    for out in outputs:
        failed = [a for a in out.alerts if a[1] == "stage_failed"]
        if out.volume.index == 3:
            assert failed == [("warning", "stage_failed", "stage plugin:counter failed on "
                               "volume 3: counter fails on purpose at 3")]
            assert "plugin_counter_value" not in out.metrics
            assert out.metrics["plugin_second_value"] is None  # its input was absent
        else:
            assert failed == []
            assert out.metrics["plugin_counter_value"] == (
                None if out.volume.index in (5, 6) else counter_value(out.volume.index))
        assert out.metrics["dvars"] is not None or out.volume.index == 0  # rtsc goes on
    assert [index for index, _ in Counter.seen] == [i for i in range(N) if i != 3]


def test_a_failing_constructor_leaves_the_plugin_out_of_the_series(tmp_path):
    cfg = _config(tmp_path, ["plugin_probes:BadInit", COUNTER])
    assert len(check_plugins(cfg)) == 2  # the constructor runs at the series' start only
    names, outputs, alerts = _run(cfg)
    assert alerts == [("warning", "plugin_disabled", "plugin plugin_probes:BadInit does not run "
                       "in this series: ValueError: no scanner licence")]
    assert "plugin:bad_init" not in names
    assert all("plugin_counter_value" in o.metrics for o in outputs)


def test_results_against_the_rules_fail_the_volume(tmp_path):
    names, outputs, alerts = _run(_config(tmp_path, ["plugin_probes:BadResults"]))
    failed = {o.volume.index: [a[2] for a in o.alerts if a[1] == "stage_failed"]
              for o in outputs}
    assert failed[1] == ["stage plugin:bad_results failed on volume 1: plugin:bad_results "
                         "gave flags 'outlier'; a plugin's flags start with 'plugin_'"]
    assert failed[2][0].startswith("stage plugin:bad_results failed on volume 2: "
                                   "plugin:bad_results: field 'plugin_bad_results_value' is "
                                   "not a JSON value")
    assert "gave alert codes 'motion'" in failed[3][0]
    for index in (0, 4, 5):
        assert failed[index] == []
        out = outputs[index]
        # numpy scalars become plain JSON numbers
        assert type(out.metrics["plugin_bad_results_value"]) is float
        assert "plugin_bad_results_ok" in out.flags
    assert "outlier" not in outputs[1].flags or outputs[1].metrics["outlier"]


# ---- the plugin feedback kind -------------------------------------------------------------------

def _ema(values: list[float | None], alpha: float) -> list[float | None]:
    out, state = [], None
    for v in values:
        if v is None:
            out.append(None)
            continue
        state = v if state is None else alpha * v + (1 - alpha) * state
        out.append(state)
    return out


def _kalman(values: list[float | None], q: float) -> list[float | None]:
    """Random-walk Kalman filter, R = 1, state variance 1 at the first value."""
    out, x, p = [], None, 1.0
    for v in values:
        if v is None:
            out.append(None)
            continue
        if x is None:
            x, p = v, 1.0
        else:
            gain = (p + q) / (p + q + 1.0)
            x, p = x + gain * (v - x), (1.0 - gain) * (p + q)
        out.append(x)
    return out


@pytest.mark.parametrize("smoothing", ["none", "ema", "kalman"])
def test_plugin_feedback_is_the_field_smoothed(tmp_path, smoothing):
    cfg = _config(tmp_path, [COUNTER], glm={
        "feedback": "plugin", "feedback_plugin_field": "plugin_counter_value",
        "feedback_smoothing": smoothing, "feedback_ema_alpha": 0.3,
        "feedback_kalman_q_over_r": 0.2, "roi": {"center_ras_mm": [0, 0, 0], "radius_mm": 12}})
    early: list[dict] = []
    names, outputs, alerts = _run(cfg, on_feedback=early)
    assert alerts == []
    raw = [counter_value(i) for i in range(N)]
    raw = [None if v is None or math.isnan(v) else v for v in raw]
    expected = {"none": raw, "ema": _ema(raw, 0.3), "kalman": _kalman(raw, 0.2)}[smoothing]
    assert [o.metrics["feedback_raw"] for o in outputs] == raw
    got = [o.metrics["feedback"] for o in outputs]
    assert [g is None for g in got] == [e is None for e in expected]
    np.testing.assert_allclose([g for g in got if g is not None],
                               [e for e in expected if e is not None], rtol=1e-12)
    # the ROI values still come, without the ROI's own feedback
    assert all(set(o.metrics["roi"]) == {"roi"} for o in outputs)
    assert "roi_feedback" not in outputs[-1].summary
    assert outputs[-1].summary["feedback_plugin"] == {
        "field": "plugin_counter_value", "smoothing": smoothing, "volumes_with_value": N - 2}
    # published as soon as the feedback stage has run: before the GLM and the observers
    assert [m["feedback"] for m in early] == got
    assert all("dvars" not in m and "plugin_counter_value" in m for m in early)


def test_plugin_feedback_without_its_plugin_alerts(tmp_path):
    cfg = _config(tmp_path, ["plugin_probes:BadInit", COUNTER], glm={
        "feedback": "plugin", "feedback_plugin_field": "plugin_bad_init_value"})
    names, outputs, alerts = _run(cfg)
    assert [a[1] for a in alerts] == ["plugin_disabled", "feedback_disabled"]
    assert "no running plugin produces glm.feedback_plugin_field 'plugin_bad_init_value'" \
        in alerts[1][2]
    assert "feedback" not in names and "feedback" not in outputs[0].metrics


@pytest.mark.slow
def test_service_publishes_plugin_fields_feedback_and_alerts(service_factory, tmp_path):
    """`rtsc run` with a plugin: its fields in the volume messages, its value on the
    feedback topic, its failure as an alert naming it."""
    cfg = make_config(tmp_path, simulator=SIM)
    events = tmp_path / "events.tsv"
    write_events(make_plan(cfg.simulator).events, events)
    service, collector = service_factory(
        simulator=SIM,
        pipeline={"plugins": [COUNTER], "plugin_options": {COUNTER: {"fail_on": 3}}},
        glm={"events": str(events), "feedback": "plugin",
             "feedback_plugin_field": "plugin_counter_value"})
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port))
    assert sim.failures == 0
    assert collector.ended.wait(60)
    volumes = [m.header for m in collector.topic("volume")]
    expected = [None if i in (3, 5, 6) else counter_value(i) for i in range(N)]
    assert [h["plugin_counter_value"] if i != 3 else None
            for i, h in enumerate(volumes)] == expected
    assert [h["feedback"] for h in volumes] == expected
    feedback = [m.header for m in collector.topic("feedback")]  # one per volume, null too
    assert [(h["index"], h["feedback"]) for h in feedback] == list(enumerate(expected))
    alerts = [m.header for m in collector.topic("alert") if m.header["code"] == "stage_failed"]
    assert [(a["index"], a["message"]) for a in alerts] == [
        (3, "stage plugin:counter failed on volume 3: counter fails on purpose at 3")]
    end = collector.topic("series.end")[0].header["summary"]
    assert end["plugin_counter"] == {"volumes": N - 1}
    assert "plugin:counter" in end["stage_ms_median"]
