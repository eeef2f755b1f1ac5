"""Plugins: stages written outside rtsc that a lab runs without editing it.

Configuration
-------------
``pipeline.plugins`` lists the plugins to run, in order; nothing else runs (an
installed entry point is not run unless listed)::

    pipeline:
      plugins: ["decoder", "my_lab.stages:Breathing"]
      plugin_options: {decoder: {train_volumes: 60}}

An entry is ``package.module:StageClass`` (imported from ``sys.path``) or the name of an
entry point of the group :data:`ENTRY_POINT_GROUP` (``rtsc.stages``), which a package
declares in its ``pyproject.toml``::

    [project.entry-points."rtsc.stages"]
    decoder = "my_lab.decoder:DecoderStage"

``pipeline.plugin_options`` maps an entry, as written in ``pipeline.plugins``, to the
options its class is constructed with. The syntax of both keys is checked when the
configuration is loaded (which imports nothing); the classes are imported and checked
at start-up (:func:`check_plugins`, called by ``rtsc run`` before it listens), so a
missing module, class or entry point, or a class that breaks the rules below, stops
rtsc with a :class:`~rtsc.errors.ConfigError` naming ``pipeline.plugins[i]``.

The interface
-------------
A plugin is a class with:

* ``name``: a class attribute, ``[a-z][a-z0-9_]*``, unique among the plugins; its
  stage is called ``plugin:<name>`` (in ``stage_ms``, alerts and logs).
* ``produces``, ``consumes``, ``consumes_optional``: the declarations of
  :mod:`rtsc.pipeline.stages` (frozensets of field names; class attributes, or
  attributes set in ``__init__`` when they depend on the options). A plugin reads
  from ``upstream`` only what it declares and returns only what it declares.
* ``__init__(self, options: dict, context: PluginContext)``: ``options`` is a copy of
  its ``pipeline.plugin_options`` entry (``{}`` when none); ``context`` is a
  :class:`PluginContext`. One instance per series, built at the series' first volume.
* ``update(self, volume, upstream) -> StageResult``: once per volume in acquisition
  order (not on volumes skipped with ``pipeline.backlog: newest``). ``volume`` is the
  motion-corrected :class:`~rtsc.volume.Volume` (``data`` (nx, ny, nz) float32,
  Fortran order, NaN where the volume's sample fell outside the acquired grid;
  ``affine``, ``index``, ``t_acquired``, ``coverage``); do not modify it. ``upstream``
  answers the declared fields the earlier stages produced for this volume (the motion
  parameters ``trans_x`` ... ``rot_z`` and ``framewise_displacement``, mm and radians;
  ``valid_voxels``; ``roi``, ``roi_mean``, ``roi_detrended`` when the ROI stage runs
  before; earlier plugins' fields). The run so far is what the plugin keeps itself.
* optional: ``maps() -> {name: (nx, ny, nz) float32}``, ``summary() -> dict`` (in
  qc.json and ``series.end``), ``finish() -> list of alerts`` (series end), and a
  ``check_options(options)`` classmethod, run at start-up, that raises (any exception)
  on bad options: a :class:`~rtsc.errors.ConfigError` naming
  ``pipeline.plugin_options.<entry>``.

The ``StageResult``'s ``metrics`` are published in the ``volume`` message (numbers,
strings, booleans, None, lists and mappings of them: numpy scalars and arrays are
converted, NaN becomes null); ``handoff`` passes values to later plugins unpublished;
``flags``, ``alerts`` and ``after_publish`` work as for rtsc's stages. A plugin may not
replace the volume (``StageResult.volume``).

Naming rule: everything a plugin names starts with :data:`PLUGIN_PREFIX` (``plugin_``):
its fields (metrics and hand-offs), maps, summary keys, alert codes and flags. No
field of rtsc starts so, so a plugin cannot collide with rtsc; two plugins producing one
field are refused like two stages (:func:`~rtsc.pipeline.stages.check_declarations`).

Where plugins run
-----------------
After the volume is motion-corrected (the reslice stage): with ``glm.feedback: plugin``
right after the reslice, before the GLM and a contrast or top-k ROI, so the plugin's
feedback waits for neither; otherwise after the ROI stage (and the GLM), so a slow
plugin does not delay rtsc's feedback value. In both cases before DVARS, the global
signal, QC and the carpet, whose fields a plugin therefore cannot read.

Failure policy
--------------
A plugin that cannot be imported or breaks the interface stops start-up
(:func:`check_plugins`). At a series' start, a plugin whose constructor raises, whose
declarations break the rules or do not fit the stages (a consumed field no earlier
stage produces) is left out of that series with a ``plugin_disabled`` alert; the series
runs without it. A plugin whose ``update`` raises, or returns a field, flag or alert
code against the rules or a value that is not JSON, gets a ``stage_failed`` alert
naming ``plugin:<name>`` and the volume; its fields are absent from that volume's
message and the run goes on with the next volume
(:class:`~rtsc.pipeline.series.SeriesPipeline`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from rtsc.config import Config
from rtsc.config.pipeline import PLUGIN_PATH, PLUGIN_PREFIX
from rtsc.errors import ConfigError
from rtsc.messages import jsonable
from rtsc.pipeline.glm.build import glm_events
from rtsc.pipeline.stages import (
    Alert,
    Stage,
    StageContractError,
    StageResult,
    check_declarations,
)
from rtsc.volume import SeriesInfo, Volume

__all__ = ["ENTRY_POINT_GROUP", "PLUGIN_PREFIX", "PluginContext", "PluginStage",
           "StageResult", "Volume", "build_plugin_stages", "check_plugins", "insert_plugins",
           "load_plugin"]

#: The entry point group plugins are found in by name.
ENTRY_POINT_GROUP = "rtsc.stages"
#: A plugin's ``name``.
PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_]*")
DECLARATIONS = ("produces", "consumes", "consumes_optional")


@dataclass(frozen=True)
class PluginContext:
    """What a plugin is constructed with, for one series (read-only).

    Attributes
    ----------
    name : str
        The plugin's ``name``.
    entry : str
        Its entry in ``pipeline.plugins``.
    info : SeriesInfo
        The series: ``tr_s`` (s), ``n_expected`` (volumes, or None), ``slice_times_s``,
        ``series_number``, ``description`` ... The matrix and the affine (voxel -> RAS+
        mm) come with every volume (``volume.data.shape``, ``volume.affine``), the same
        for the whole series.
    config : Config
        The whole configuration (frozen dataclasses), e.g. ``config.pipeline.mask_fraction``.
    events : tuple of (onset_s, duration_s, trial_type) or None
        The paradigm of ``glm.events`` and ``glm.conditions``, sorted by onset, seconds
        from the start of volume 0; None when neither is configured (or the events file
        cannot be read: the GLM's ``glm_disabled`` alert says why).
    """

    name: str
    entry: str
    info: SeriesInfo
    config: Config
    events: tuple[tuple[float, float, str], ...] | None

    @property
    def tr_s(self) -> float | None:
        """Repetition time, s (None when the headers do not give it)."""
        return self.info.tr_s


def _entry_point(name: str, key: str) -> Any:
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    values = sorted({ep.value for ep in found})
    if not found:
        installed = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise ConfigError(f"{key}: {name!r} is no entry point of the group "
                          f"{ENTRY_POINT_GROUP!r} (installed: "
                          f"{', '.join(installed) or 'none'}); a plugin is named by an entry "
                          "point or as 'package.module:StageClass'")
    if len(values) > 1:
        raise ConfigError(f"{key}: entry point {name!r} of {ENTRY_POINT_GROUP!r} is "
                          f"installed more than once, as {', '.join(values)}; name one as "
                          "'package.module:StageClass'")
    try:
        return found[0].load()
    except Exception as exc:  # noqa: BLE001 - any import error of third-party code
        raise ConfigError(f"{key}: entry point {name!r} ({values[0]}) cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from exc


def load_plugin(entry: str, key: str = "pipeline.plugins") -> type:
    """The class an entry of ``pipeline.plugins`` names (imported; no instance).

    Parameters
    ----------
    entry : str
        ``package.module:StageClass`` or an entry point name of :data:`ENTRY_POINT_GROUP`.
    key : str
        The key named in errors (``pipeline.plugins[i]``).

    Raises
    ------
    ConfigError
        Naming the key: a module that cannot be imported (and why), a missing attribute,
        an unknown or ambiguous entry point, or something that is not a class.
    """
    if PLUGIN_PATH.fullmatch(entry):
        module_name, _, attribute = entry.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import error of third-party code
            raise ConfigError(f"{key}: {entry!r}: module {module_name!r} cannot be imported: "
                              f"{type(exc).__name__}: {exc}") from exc
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ConfigError(f"{key}: {entry!r}: {getattr(target, '__name__', target)!r}"
                                  f" has no attribute {part!r}")
            target = getattr(target, part)
    else:
        target = _entry_point(entry, key)
    if not inspect.isclass(target):
        raise ConfigError(f"{key}: {entry!r} is a {type(target).__name__}, not a class")
    return target


def _check_fields(names: Any, what: str, owner: str) -> frozenset[str]:
    """``names`` as a frozenset of plugin names (StageContractError naming ``owner``)."""
    if isinstance(names, str) or not isinstance(names, (set, frozenset, list, tuple)):
        raise StageContractError(f"{owner}: {what} is a {type(names).__name__}; expected a "
                                 "frozenset of field names")
    names = frozenset(names)
    if not all(isinstance(n, str) for n in names):
        raise StageContractError(f"{owner}: {what} holds a name that is not a string")
    return names


def check_plugin_class(cls: type, key: str) -> str:
    """The ``name`` of a plugin class, checked with what can be checked without an
    instance: ``name``, a callable ``update``, and ``produces`` when it is a class
    attribute (every field starts with :data:`PLUGIN_PREFIX`).

    Raises
    ------
    ConfigError
        Naming the key and the rule broken.
    """
    name = getattr(cls, "name", None)
    label = f"{key}: {cls.__module__}.{cls.__qualname__}"
    if not isinstance(name, str) or not PLUGIN_NAME.fullmatch(name):
        raise ConfigError(f"{label}: its class attribute 'name' is {name!r}; expected a "
                          "string [a-z][a-z0-9_]* (the stage is called plugin:<name>)")
    if not callable(getattr(cls, "update", None)):
        raise ConfigError(f"{label}: no update(volume, upstream) method")
    produces = inspect.getattr_static(cls, "produces", None)
    if isinstance(produces, (set, frozenset, list, tuple)):
        bad = sorted(f for f in produces if not str(f).startswith(PLUGIN_PREFIX))
        if bad:
            raise ConfigError(f"{label}: produces {', '.join(map(repr, bad))}; a plugin's "
                              f"fields start with {PLUGIN_PREFIX!r}")
    return name


def static_produces(cls: type) -> frozenset[str] | None:
    """A plugin class's ``produces`` when it is a class attribute, else None (set per
    instance)."""
    produces = inspect.getattr_static(cls, "produces", None)
    if isinstance(produces, (set, frozenset, list, tuple)):
        return frozenset(produces)
    return None


def check_plugins(config: Config) -> list[type]:
    """Import and check the classes of ``pipeline.plugins`` at start-up (no instance).

    Checks each class (:func:`check_plugin_class`), that the names are unique, the
    options (a class's ``check_options(options)``, when it has one), and, with
    ``glm.feedback: plugin``, that a plugin declares ``glm.feedback_plugin_field``
    (when every plugin declares ``produces`` as a class attribute).

    Returns
    -------
    list of classes, in the order of ``pipeline.plugins``

    Raises
    ------
    ConfigError
        Naming ``pipeline.plugins[i]``, ``pipeline.plugin_options.<entry>`` or
        ``glm.feedback_plugin_field``.
    """
    classes: list[type] = []
    names: dict[str, str] = {}
    for i, entry in enumerate(config.pipeline.plugins):
        key = f"pipeline.plugins[{i}]"
        cls = load_plugin(entry, key)
        name = check_plugin_class(cls, key)
        if name in names:
            raise ConfigError(f"{key}: {entry!r} is named {name!r}, like {names[name]!r}; "
                              "plugin names must differ")
        names[name] = entry
        check = getattr(cls, "check_options", None)
        if callable(check):
            options = copy.deepcopy(config.pipeline.plugin_options.get(entry, {}))
            try:
                check(options)
            except Exception as exc:  # noqa: BLE001 - the plugin's own check
                raise ConfigError(f"pipeline.plugin_options.{entry}: {exc}") from exc
        classes.append(cls)
    field = config.glm.feedback_plugin_field
    if config.glm.feedback == "plugin" and field is not None:
        declared = [static_produces(cls) for cls in classes]
        if all(d is not None for d in declared) and not any(field in d for d in declared):
            produced = sorted(set().union(*declared))  # type: ignore[arg-type]
            raise ConfigError(f"glm.feedback_plugin_field: {field!r} is produced by no plugin "
                              f"of pipeline.plugins; they produce: "
                              f"{', '.join(produced) or 'nothing'}")
    return classes


class PluginStage:
    """A plugin instance as a pipeline stage: named ``plugin:<name>``, held to the
    naming rule and to JSON metrics (module docstring).

    Parameters
    ----------
    plugin : the plugin instance
    name : str, the plugin's ``name``
    entry : str, its entry in ``pipeline.plugins``

    Raises
    ------
    StageContractError
        Declarations that are not sets of names, or a produced field without the prefix.
    """

    def __init__(self, plugin: Any, name: str, entry: str) -> None:
        self.plugin = plugin
        self.plugin_name = name
        self.entry = entry
        self.name = f"plugin:{name}"
        fields = {kind: _check_fields(getattr(plugin, kind, frozenset()), kind, self.name)
                  for kind in DECLARATIONS}
        bad = sorted(f for f in fields["produces"] if not f.startswith(PLUGIN_PREFIX))
        if bad:
            raise StageContractError(f"{self.name} produces {', '.join(map(repr, bad))}; a "
                                     f"plugin's fields start with {PLUGIN_PREFIX!r}")
        self.produces: frozenset[str] = fields["produces"]
        self.consumes: frozenset[str] = fields["consumes"]
        self.consumes_optional: frozenset[str] = fields["consumes_optional"]

    def _check_names(self, names: Any, what: str) -> None:
        bad = sorted(str(n) for n in names if not str(n).startswith(PLUGIN_PREFIX))
        if bad:
            raise StageContractError(f"{self.name} gave {what} {', '.join(map(repr, bad))}; "
                                     f"a plugin's {what} start with {PLUGIN_PREFIX!r}")

    def _check_alerts(self, alerts: Any) -> list[Alert]:
        checked: list[Alert] = []
        for alert in alerts:
            level, code, text = alert
            if level not in ("info", "warning", "critical"):
                raise StageContractError(f"{self.name} gave an alert of level {level!r}; "
                                         "allowed: info, warning, critical")
            self._check_names([code], "alert codes")
            checked.append((level, code, str(text)))
        return checked

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """The plugin's update, its result checked and its metrics made JSON values.

        Raises
        ------
        StageContractError
            Not a StageResult, a replaced volume, a flag or alert code without the
            prefix, or a metric that is not a JSON value: a ``stage_failed`` alert.
        """
        result = self.plugin.update(volume, upstream)
        if not isinstance(result, StageResult):
            raise StageContractError(f"{self.name} returned a {type(result).__name__}, not "
                                     "a StageResult")
        if result.volume is not None:
            raise StageContractError(f"{self.name} returned a volume; a plugin may not "
                                     "replace the volume of the stages after it")
        self._check_names(result.flags, "flags")
        metrics = {}
        for key, value in result.metrics.items():
            value = jsonable(value)
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise StageContractError(f"{self.name}: field {key!r} is not a JSON value: "
                                         f"{exc}") from None
            metrics[key] = value
        return StageResult(metrics=metrics, flags=list(result.flags),
                           alerts=self._check_alerts(result.alerts),
                           handoff=dict(result.handoff), after_publish=result.after_publish)

    def maps(self) -> dict[str, np.ndarray]:
        maps = getattr(self.plugin, "maps", None)
        found = dict(maps()) if callable(maps) else {}
        self._check_names(found, "map names")
        return found

    def summary(self) -> dict[str, Any]:
        summary = getattr(self.plugin, "summary", None)
        found = dict(summary()) if callable(summary) else {}
        self._check_names(found, "summary keys")
        return found

    def finish(self) -> list[Alert]:
        finish = getattr(self.plugin, "finish", None)
        return self._check_alerts(finish() or []) if callable(finish) else []


def build_plugin_stages(config: Config, info: SeriesInfo) -> tuple[list[PluginStage],
                                                                    list[Alert]]:
    """The plugins of a new series, constructed; a plugin that fails to load, to
    construct, or breaks the rules is left out with a ``plugin_disabled`` alert.

    Returns
    -------
    stages : list of PluginStage, in the order of ``pipeline.plugins``
    alerts : list of (level, code, message)
    """
    if not config.pipeline.plugins:
        return [], []
    try:
        events = glm_events(config)
    except Exception:  # noqa: BLE001 - the GLM's builder alerts about it (glm_disabled)
        events = None
    stages: list[PluginStage] = []
    alerts: list[Alert] = []
    for i, entry in enumerate(config.pipeline.plugins):
        key = f"pipeline.plugins[{i}]"
        try:
            cls = load_plugin(entry, key)
            name = check_plugin_class(cls, key)
            if any(stage.plugin_name == name for stage in stages):
                raise ConfigError(f"{key}: the name {name!r} is taken by an earlier plugin")
            context = PluginContext(name, entry, info, config,
                                    None if events is None else tuple(events))
            options = copy.deepcopy(config.pipeline.plugin_options.get(entry, {}))
            stages.append(PluginStage(cls(options, context), name, entry))
        except Exception as exc:  # noqa: BLE001 - a plugin must not stop the series
            alerts.append(("warning", "plugin_disabled", f"plugin {entry} does not run in "
                           f"this series: {type(exc).__name__}: {exc}"))
    return stages, alerts


def insert_plugins(stages: list[Stage], at: int, plugins: list[PluginStage]) -> list[Alert]:
    """Insert ``plugins`` into ``stages`` (in place) at position ``at``, in order, each
    only if the declarations still hold with it (:func:`check_declarations`): a plugin
    consuming a field no earlier stage produces, or producing a field another stage
    does, is left out with a ``plugin_disabled`` alert.

    Returns
    -------
    alerts : list of (level, code, message)
    """
    alerts: list[Alert] = []
    accepted: list[PluginStage] = []
    for plugin in plugins:
        trial = [*stages[:at], *accepted, plugin, *stages[at:]]
        try:
            check_declarations(trial)
        except StageContractError as exc:
            alerts.append(("warning", "plugin_disabled", f"plugin {plugin.entry} does not run "
                           f"in this series: {exc}"))
            continue
        accepted.append(plugin)
    stages[at:at] = accepted
    return alerts
