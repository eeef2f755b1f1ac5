"""Alert rules from the config, evaluated on each published ``volume`` header, with
hysteresis; and the protocol check of a new series.

A rule ``metric op value in count of the last window volumes`` fires once when the
count is reached; while it stays active it is silent; it re-arms when the hits in its
window fall to ``clear_count`` (optionally announcing that with an info alert). A
metric missing from a volume (null) is not a hit. ``flag:<name>`` is 1 for a volume
whose ``flags`` contain ``name``. With ``unit: tr`` the threshold is ``value`` times the
series' TR (a rule without a TR is not evaluated).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rtsc.config import AlertRuleConfig, ProtocolConfig, QcConfig
from rtsc.errors import ConfigError
from rtsc.pipeline.stages import Alert

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}


def check_rules(rules: Sequence[AlertRuleConfig]) -> None:
    """Refuse rules that could never fire or never clear.

    Raises
    ------
    ConfigError
        Naming ``qc.alerts[i].<key>``, its value and what is allowed.
    """
    for i, rule in enumerate(rules):
        if rule.count > rule.window:
            raise ConfigError(f"qc.alerts[{i}].count: {rule.count} is out of range; allowed: "
                              f"1 to window ({rule.window})")
        if rule.clear_count >= rule.count:
            raise ConfigError(f"qc.alerts[{i}].clear_count: {rule.clear_count} is out of "
                              f"range; allowed: 0 to count - 1 ({rule.count - 1})")
        if rule.metric.startswith("flag:") and len(rule.metric) == 5:
            raise ConfigError(f"qc.alerts[{i}].metric: {rule.metric!r}; allowed: a field "
                              "name or flag:<name>")


def series_rules(qc: QcConfig) -> list[AlertRuleConfig]:
    """The rules a series is watched with: ``qc.alerts`` and, with ``qc.fd_jump_mm``, one
    that fires on the first volume of every head jump (the configured motion rule wants
    several volumes over its threshold, and lets a few large, isolated jumps pass)."""
    rules = list(qc.alerts)
    if qc.fd_jump_mm is not None:
        rules.append(AlertRuleConfig(code="motion_jump", level="warning",
                                     metric="framewise_displacement", op=">",
                                     value=qc.fd_jump_mm, count=1, window=1))
    return rules


def metric_value(header: Mapping[str, Any], metric: str) -> float | None:
    """The rule's number for one volume header (None when absent or not a number)."""
    if metric.startswith("flag:"):
        return 1.0 if metric[5:] in (header.get("flags") or ()) else 0.0
    value = header.get(metric)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class RuleState:
    """Hits over the last ``window`` volumes and whether the rule is active."""

    hits: deque[bool]
    active: bool = False
    fired: int = 0


@dataclass
class AlertEngine:
    """The rules of one series.

    Parameters
    ----------
    rules : sequence of AlertRuleConfig
    tr_s : float or None, the series' TR (for ``unit: tr``)
    """

    rules: Sequence[AlertRuleConfig]
    tr_s: float | None
    states: list[RuleState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = [RuleState(deque(maxlen=r.window)) for r in self.rules]

    def threshold(self, rule: AlertRuleConfig) -> float | None:
        """The rule's threshold in the metric's units, None when it needs a missing TR."""
        if rule.unit == "tr":
            return rule.value * self.tr_s if self.tr_s else None
        return rule.value

    def update(self, header: Mapping[str, Any]) -> list[Alert]:
        """Feed one published ``volume`` header; returns the alerts to publish."""
        out: list[Alert] = []
        index = int(header.get("index", 0))
        for rule, state in zip(self.rules, self.states):
            threshold = self.threshold(rule)
            if threshold is None or index < rule.after_volumes:
                continue
            value = metric_value(header, rule.metric)
            state.hits.append(value is not None and _OPS[rule.op](value, threshold))
            n_hits = sum(state.hits)
            if not state.active and n_hits >= rule.count:
                state.active = True
                state.fired += 1
                out.append((rule.level, rule.code, self._describe(rule, threshold, value,
                                                                  n_hits, index)))
            elif state.active and n_hits <= rule.clear_count:
                state.active = False
                if rule.notify_clear:
                    out.append(("info", rule.code, f"cleared at volume {index}: "
                                f"{rule.metric} {rule.op} {threshold:g} in {n_hits} of the "
                                f"last {len(state.hits)} volumes"))
        return out

    @staticmethod
    def _describe(rule: AlertRuleConfig, threshold: float, value: float | None,
                  n_hits: int, index: int) -> str:
        unit = f" ({rule.value:g} TR)" if rule.unit == "tr" else ""
        now = "" if value is None or rule.metric.startswith("flag:") else f"; now {value:.3g}"
        if rule.window == 1:
            where = f"volume {index}"
        else:
            where = f"{n_hits} of the last {rule.window} volumes (to volume {index})"
        what = rule.metric[5:] if rule.metric.startswith("flag:") else \
            f"{rule.metric} {rule.op} {threshold:g}{unit}"
        return f"{what} in {where}{now}"


def protocol_differences(shape: Sequence[int], voxel_size_mm: Sequence[float],
                         tr_s: float | None, protocol: ProtocolConfig) -> list[str]:
    """How a series differs from the configured protocol (empty: it matches)."""
    found = []
    tol = protocol.tolerance
    if protocol.shape is not None and list(shape) != list(protocol.shape):
        found.append(f"matrix {'x'.join(map(str, shape))} differs from the protocol's "
                     f"{'x'.join(map(str, protocol.shape))}")
    if protocol.tr_s is not None:
        if tr_s is None:
            found.append("no TR in the header (protocol: "
                         f"{protocol.tr_s:g} s)")
        elif abs(tr_s - protocol.tr_s) > tol * protocol.tr_s:
            found.append(f"TR {tr_s:g} s differs from the protocol's {protocol.tr_s:g} s")
    if protocol.voxel_size_mm is not None:
        if any(abs(a - b) > tol * b for a, b in zip(voxel_size_mm, protocol.voxel_size_mm)):
            found.append("voxel size " + "x".join(f"{v:.3g}" for v in voxel_size_mm)
                         + " mm differs from the protocol's "
                         + "x".join(f"{v:.3g}" for v in protocol.voxel_size_mm) + " mm")
    return found
