"""The configuration is described once, by the schema: the reference and config.yaml follow it.

docs/configuration.md is generated from the config dataclasses (rtsc.config.reference);
config.yaml, the file users copy, must load and name only keys the schema has, and it
lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from rtsc.config import Config, load_config, to_dict
from rtsc.config.reference import REGENERATE, render_reference

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_is_the_generated_one() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render_reference(), (
        f"docs/configuration.md differs from the schema; regenerate it: {REGENERATE}")


def test_reference_names_every_key() -> None:
    text = render_reference()

    def walk(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        assert f"## `{path}`" in text
        for f in dataclasses.fields(cls):
            assert f"\n| {f.name} |" in text.split(f"## `{path}`")[1], f"{path}.{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.{f.name}")
            elif typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], f"{path}.{f.name}[]")

    for f in dataclasses.fields(Config):
        walk(typing.get_type_hints(Config)[f.name], f.name)


def _unknown_keys(cls: type, data: Any, path: str) -> list[str]:
    """Keys of ``data`` (as parsed from YAML) that the dataclass ``cls`` does not have."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = []
    for key, value in (data or {}).items():
        key_path = f"{path}.{key}" if path else key
        if key not in names:
            unknown.append(key_path)
            continue
        tp = hints[key]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            unknown += _unknown_keys(tp, value, key_path)
        elif args and dataclasses.is_dataclass(args[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                unknown += _unknown_keys(args[0], item, f"{key_path}[{i}]")
    return unknown


def test_config_yaml_loads_and_every_key_is_in_the_schema() -> None:
    path = ROOT / "config.yaml"
    load_config(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert _unknown_keys(Config, data, "") == []


def test_config_yaml_lists_the_defaults() -> None:
    assert to_dict(load_config(ROOT / "config.yaml")) == to_dict(Config())
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))

    def missing(cls: type, section: Any, path: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.name not in section:
                out.append(f"{path}{f.name}")
            elif dataclasses.is_dataclass(hints[f.name]):
                out += missing(hints[f.name], section[f.name], f"{path}{f.name}.")
        return out

    assert missing(Config, data, "") == []
