"""Loading and validating: YAML -> plain mapping -> checked, frozen :class:`Config`.

Every value is checked against its field's annotation and metadata (range, choices,
list length, see :func:`rtsc.config.fields._spec`); the first problem raises a
:class:`~rtsc.errors.ConfigError` naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from rtsc.config.schema import Config
from rtsc.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_range(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: "
                          + ", ".join(repr(c) for c in choices))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{path}: {value!r} is out of range; allowed: {lo} to {hi}")


def _coerce(path: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        if value is None:
            raise ConfigError(f"{path}: null is not allowed; expected {_type_name(tp)}")
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; expected a list "
                              f"of {_type_name(item_tp)}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{path}: {value!r} has {len(value)} items; expected {length}")
        return [_coerce(f"{path}[{i}]", v, item_tp, meta) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; expected a mapping")
        return {_coerce(f"{path}.<key>", k, key_tp, {}): _coerce(f"{path}.{k}", v, val_tp, {})
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}; "
                          f"expected {_type_name(tp)}")
    _check_range(path, value, meta)
    return value


def _build(cls: Any, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys"
                          f"{' under ' + path if path else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(key_path, value, hints[name], fields[name].metadata)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (as parsed from YAML) into a :class:`Config`.

    Raises
    ------
    ConfigError
        Naming the key path, the value and what is allowed.
    """
    return typing.cast(Config, _build(Config, data, ""))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file; ``None`` gives the built-in defaults.

    Parameters
    ----------
    path : path to config.yaml, or None
    overrides : nested mapping merged over the file's content before validation

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, or any key, type or value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = merge(data, overrides)
    return config_from_dict(data)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested mappings; values of ``extra`` win."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for qc.json and logs)."""
    return dataclasses.asdict(config)
