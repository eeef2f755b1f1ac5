"""Typed configuration, validated once at load.

The YAML file maps onto frozen dataclasses, one per section (``rtsc.config.intake``,
``output``, ``pipeline``, ``qc``, ``simulator``; the root :class:`Config` in
``schema``). Every field declares its type and, where it matters, its allowed range or
choices and a description; :func:`load_config` refuses an unknown key, a wrong type or
an out-of-range value with a :class:`~rtsc.errors.ConfigError` that names the key path,
the value given and what is allowed. The reference docs/configuration.md is generated
from these fields by :mod:`rtsc.config.reference`.
"""

from rtsc.config.fields import parse_networks
from rtsc.config.intake import (AssemblerConfig, MultiEchoConfig, ReceiverConfig,
                                SeriesFilterConfig, WatcherConfig)
from rtsc.config.load import config_from_dict, load_config, merge, to_dict
from rtsc.config.output import HistoryConfig, PublishConfig, SessionConfig
from rtsc.config.pipeline import (CordMocoConfig, CordQcConfig, GlmConfig, MotionConfig,
                                  PhysioConfig, PipelineConfig, SpinalCordConfig)
from rtsc.config.qc import (AlertRuleConfig, ProtocolConfig, QcConfig, VerdictConfig,
                            _default_rules)
from rtsc.config.schema import Config
from rtsc.config.simulator import CordSimConfig, DemoConfig, SimulatorConfig
from rtsc.errors import ConfigError

__all__ = [
    "AlertRuleConfig", "AssemblerConfig", "Config", "ConfigError", "CordMocoConfig",
    "CordQcConfig", "CordSimConfig", "DemoConfig", "GlmConfig", "HistoryConfig", "MotionConfig",
    "MultiEchoConfig", "PhysioConfig", "PipelineConfig", "ProtocolConfig", "PublishConfig",
    "QcConfig", "ReceiverConfig", "SeriesFilterConfig", "SessionConfig", "SimulatorConfig",
    "SpinalCordConfig", "VerdictConfig", "WatcherConfig", "_default_rules",
    "config_from_dict", "load_config", "merge", "parse_networks", "to_dict",
]
