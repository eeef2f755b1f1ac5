"""The example plugin examples/decoder_plugin.py: an SGD decoder learnt on a localizer,
its decision value as the feedback, run on the simulator's task/rest blocks through the
whole pipeline (the simulator has one condition, ``task``: the classes are task and
rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from rtsc.config import config_from_dict
from rtsc.pipeline.plugins import check_plugins
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.volume import SeriesInfo, Volume
from simulator.bold import iter_volumes
from simulator.output import write_events
from simulator.scanner import make_plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENTRY = "decoder_plugin:DecoderStage"
N, TRAIN = 120, 60


@pytest.fixture
def decoder_module(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import decoder_plugin  # noqa: PLC0415

    return decoder_plugin


def _run(tmp_path: Path, activation_pct: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A 120-volume run (TR 2 s, 20 s blocks, 3 % BOLD, noise 10, the default slow head
    motion up to 1 mm and 1 degree, no sudden jumps) through every stage, the decoder's
    value as the feedback; each volume's metrics and the summary."""
    sim = {"n_volumes": N, "shape": [48, 48, 28], "voxel_size_mm": [4.0, 4.0, 4.0],
           "psf_samples": 1, "seed": 0, "activation_pct": activation_pct, "n_jumps": 0}
    plan = make_plan(config_from_dict({"simulator": sim}).simulator)
    events = tmp_path / "events.tsv"
    write_events(plan.events, events)
    cfg = config_from_dict({
        "simulator": sim,
        "pipeline": {"plugins": [ENTRY], "plugin_options": {ENTRY: {"train_volumes": TRAIN}}},
        "glm": {"events": str(events), "feedback": "plugin",
                "feedback_plugin_field": "plugin_decoder_value"}})
    check_plugins(cfg)
    info = SeriesInfo("s", plan.tr_s, N, 1, "test", "mosaic")
    stages, alerts = build_stages(cfg, info)
    assert alerts == []
    pipeline = SeriesPipeline(stages)
    metrics = []
    for v in iter_volumes(plan):
        out = pipeline.process(Volume(np.asfortranarray(v.quantised, dtype=np.float32),
                                      plan.grid.affine(), v.index, info, None, 0.0, 0.0))
        assert "stage_failed" not in [a[1] for a in out.alerts]
        metrics.append(out.metrics)
    return metrics, pipeline.summary()


def _held_out(metrics: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Decision values of the labelled volumes after the localizer: task, rest."""
    pairs = [(m["plugin_decoder_value"], m["plugin_decoder_label"]) for m in metrics[TRAIN:]
             if m["plugin_decoder_label"] is not None]
    return (np.array([v for v, label in pairs if label == "task"]),
            np.array([v for v, label in pairs if label == "rest"]))


def _scores(task: np.ndarray, rest: np.ndarray) -> tuple[float, float, float]:
    """Accuracy (sign of the value), its one-sided binomial p against always answering
    the larger class (the chance level of an unbalanced test set, 33 task / 18 rest
    here), and the one-sided Mann-Whitney p of task values above rest values."""
    hits = int((task > 0).sum() + (rest < 0).sum())
    n = task.size + rest.size
    chance = max(task.size, rest.size) / n
    return (hits / n, stats.binomtest(hits, n, chance, alternative="greater").pvalue,
            stats.mannwhitneyu(task, rest, alternative="greater").pvalue)


def test_labels_follow_the_shifted_blocks(decoder_module):
    events = ((10.0, 20.0, "task"), (50.0, 20.0, "task"))
    label = [decoder_module.volume_label(t, events, 4.0, 6.0, 8.0) for t in range(0, 60, 2)]
    #  t:   0-8 rest | 10-12 onset | 14-34 task | 36 | 38-48 rest | 50-52 | 54- task
    assert label == ["rest"] * 5 + [None] * 2 + ["task"] * 11 + [None] + ["rest"] * 6 \
        + [None] * 2 + ["task"] * 3
    two = ((0.0, 10.0, "left"), (8.0, 10.0, "right"))  # windows [4, 16) and [12, 24)
    assert [decoder_module.volume_label(t, two, 4.0, 6.0, 8.0) for t in (5, 14, 20, 25, 26)] \
        == ["left", None, "right", None, "rest"]  # 14: both; 25: the response's tail


def test_options_are_checked_at_start_up(decoder_module, tmp_path):
    cfg = config_from_dict({"pipeline": {"plugins": [ENTRY], "plugin_options": {
        ENTRY: {"train_volume": 10}}}})
    with pytest.raises(Exception, match="pipeline.plugin_options.decoder_plugin:DecoderStage: "
                       "unknown option 'train_volume'"):
        check_plugins(cfg)


@pytest.mark.slow
def test_decoder_separates_task_from_rest_on_held_out_volumes(decoder_module, tmp_path):
    metrics, summary = _run(tmp_path, 3.0)
    task, rest = _held_out(metrics)
    accuracy, p_binomial, p_ranks = _scores(task, rest)
    # measured: 50 of 51 right (0.98), p 7e-9 against 33/51; Mann-Whitney p 3e-9
    assert accuracy > 0.85 and p_binomial < 0.01 and p_ranks < 0.01, (accuracy, p_binomial,
                                                                        p_ranks)
    assert summary["plugin_decoder"]["test_accuracy"] == pytest.approx(accuracy)
    assert summary["plugin_decoder"]["trained_volumes"] == sum(
        m["plugin_decoder_label"] is not None for m in metrics[:TRAIN])
    # the feedback is the decision value (no smoothing), None during the localizer
    assert [m["feedback"] for m in metrics] == [m["plugin_decoder_value"] for m in metrics]
    assert all(m["feedback"] is None for m in metrics[:TRAIN])


@pytest.mark.slow
def test_decoder_is_at_chance_without_activation(decoder_module, tmp_path):
    """The control: the same run with no BOLD response; nothing to decode."""
    metrics, summary = _run(tmp_path, 0.0)
    task, rest = _held_out(metrics)
    accuracy, p_binomial, p_ranks = _scores(task, rest)
    # measured: 33 of 51 (every volume called task), p 0.56; Mann-Whitney p 0.56
    assert p_binomial > 0.05 and p_ranks > 0.05, (accuracy, p_binomial, p_ranks)
