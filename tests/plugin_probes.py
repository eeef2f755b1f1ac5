"""Plugin classes for the plugin tests (tests/ is on sys.path: ``plugin_probes:Counter``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rtsc.pipeline.plugins import PluginContext, StageResult, Volume


def counter_value(index: int) -> float | None:
    """The value :class:`Counter` publishes for volume ``index`` (None at 5, NaN at 6)."""
    if index == 5:
        return None
    if index == 6:
        return math.nan
    return math.sin(index) + index / 10.0


class Counter:
    """Publishes :func:`counter_value`, the FD it read upstream and the volume's in-grid
    sum; ``fail_on``: raises on that volume index."""

    name = "counter"
    produces = frozenset({"plugin_counter_value", "plugin_counter_fd", "plugin_counter_sum"})
    consumes = frozenset()
    consumes_optional = frozenset({"framewise_displacement"})
    #: every instance's (index, data copy), for the tests
    seen: list[tuple[int, np.ndarray]] = []

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        self.fail_on = options.get("fail_on")
        self.context = context
        Counter.seen = []

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        if volume.index == self.fail_on:
            raise RuntimeError(f"counter fails on purpose at {volume.index}")
        Counter.seen.append((volume.index, volume.data.copy(order="F")))
        return StageResult(metrics={
            "plugin_counter_value": counter_value(volume.index),
            "plugin_counter_fd": (upstream or {}).get("framewise_displacement"),
            "plugin_counter_sum": np.nansum(volume.data, dtype=np.float64)})

    def summary(self) -> dict[str, Any]:
        return {"plugin_counter": {"volumes": len(Counter.seen)}}


class Second:
    """Reads the counter's value (a later plugin) and doubles it."""

    name = "second"
    produces = frozenset({"plugin_second_value"})
    consumes = frozenset({"plugin_counter_value"})
    consumes_optional = frozenset()

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        pass

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        value = (upstream or {}).get("plugin_counter_value")
        return StageResult(metrics={"plugin_second_value": None if value is None
                                    else 2 * value})


class BadInit(Second):
    name = "bad_init"
    produces = frozenset({"plugin_bad_init_value"})
    consumes = frozenset()

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        raise ValueError("no scanner licence")


class Clash(Second):
    """Produces the counter's field."""

    name = "clash"
    produces = frozenset({"plugin_counter_value"})
    consumes = frozenset()


class Unprefixed(Second):
    """A class-level field without the prefix: refused at start-up."""

    name = "unprefixed"
    produces = frozenset({"dvars"})
    consumes = frozenset()


class InstanceUnprefixed(Second):
    """Declares an unprefixed field per instance: left out of the series."""

    name = "instance_unprefixed"
    consumes = frozenset()

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        self.produces = frozenset({"value"})


class NeedsDvars(Second):
    """Consumes a field of a stage after the plugins."""

    name = "needs_dvars"
    produces = frozenset({"plugin_needs_dvars_value"})
    consumes = frozenset({"dvars"})


class BadResults(Second):
    """Volume 1: an unprefixed flag; volume 2: a metric that is no JSON value; volume 3:
    an unprefixed alert code; else fine."""

    name = "bad_results"
    produces = frozenset({"plugin_bad_results_value"})
    consumes = frozenset()

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        result = StageResult(metrics={"plugin_bad_results_value": np.float32(1.5)})
        if volume.index == 1:
            result.flags.append("outlier")
        elif volume.index == 2:
            result.metrics["plugin_bad_results_value"] = object()
        elif volume.index == 3:
            result.alerts.append(("warning", "motion", "not mine to raise"))
        else:
            result.flags.append("plugin_bad_results_ok")
        return result


class NoName:
    produces = frozenset({"plugin_x"})

    def update(self, volume: Volume, upstream: Any = None) -> StageResult:
        return StageResult()


class Picky(Second):
    """Checks its options at start-up."""

    name = "picky"
    produces = frozenset({"plugin_picky_value"})
    consumes = frozenset()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if options.get("level", 1) not in (1, 2):
            raise ValueError(f"level {options.get('level')!r}: allowed 1 or 2")


not_a_class = 42
CounterAlias = Counter  # another entry, the same plugin name
