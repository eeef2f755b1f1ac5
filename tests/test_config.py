"""Config: the shipped config.yaml, validation messages, immutability."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtsc.config import Config, config_from_dict, load_config, merge, to_dict
from rtsc.errors import ConfigError, RtscError

SHIPPED = Path(__file__).resolve().parent.parent / "config.yaml"


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


# ---- the shipped file -------------------------------------------------------------------

def test_shipped_config_equals_defaults_except_where_the_file_differs() -> None:
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    loaded = to_dict(load_config(SHIPPED))
    defaults = to_dict(load_config(None))
    assert defaults == to_dict(Config())
    # Every value the file sets is taken as written (ints where floats are declared
    # compare equal), and everything else is the built-in default.
    expected = merge(defaults, raw)
    assert loaded == expected


def test_shipped_config_documents_every_section_and_key() -> None:
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    sections = {f.name: f for f in dataclasses.fields(Config)}
    assert set(raw) == set(sections), "config.yaml sections differ from the Config dataclass"
    for name in sections:
        section_cls = type(getattr(Config(), name))
        keys = {f.name for f in dataclasses.fields(section_cls)}
        assert isinstance(raw[name], dict), name
        assert set(raw[name]) == keys, f"config.yaml section {name!r} does not list all keys"


def test_design_contract_keys_keep_their_defaults() -> None:
    config = load_config(None)
    assert (config.receiver.ae_title, config.receiver.host, config.receiver.port) == \
        ("RTSC", "127.0.0.1", 11112)
    assert config.publish.endpoint == "tcp://127.0.0.1:5556"
    assert config.publish.snapshot_endpoint == "tcp://127.0.0.1:5557"
    assert config.session.dir == "./sessions"
    assert config.pipeline.mode == "brain"
    assert config.spinal_cord.mask is None
    assert config.glm.events is None and config.glm.contrasts == {}
    assert config.glm.hrf == "spm" and config.glm.high_pass_s == 128
    assert config.glm.roi is None


def test_empty_file_gives_defaults_and_values_are_canonical(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == load_config(None)
    config = load_config(_write(tmp_path, "simulator:\n  tr_s: 1\n  shape: [16, 16, 8]\n"))
    assert config.simulator.tr_s == 1.0 and isinstance(config.simulator.tr_s, float)
    assert config.simulator.shape == [16, 16, 8]
    assert config.simulator.n_volumes == load_config(None).simulator.n_volumes


def test_overrides_merge_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "receiver:\n  port: 104\n  ae_title: SCANNER\n")
    config = load_config(path, overrides={"receiver": {"port": 0}})
    assert config.receiver.port == 0
    assert config.receiver.ae_title == "SCANNER"


# ---- errors: key path, value given, what is allowed --------------------------------------

def test_unknown_top_level_key() -> None:
    message = _error({"recever": {"port": 1}})
    assert "recever" in message
    for section in ("receiver", "publish", "session", "pipeline", "simulator", "demo"):
        assert section in message


def test_unknown_nested_key() -> None:
    message = _error({"receiver": {"prot": 104}})
    assert "receiver.prot" in message
    for key in ("ae_title", "host", "port", "enabled"):
        assert key in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "pipeline:\n  mode: brain\n  fd_radius: 50\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "pipeline.fd_radius" in str(info.value)
    assert "fd_radius_mm" in str(info.value)


def test_string_for_int() -> None:
    message = _error({"receiver": {"port": "eleven"}})
    assert "receiver.port" in message and "'eleven'" in message and "int" in message


def test_bool_for_float() -> None:
    message = _error({"pipeline": {"fd_radius_mm": True}})
    assert "pipeline.fd_radius_mm" in message and "True" in message and "float" in message


def test_bool_for_int() -> None:
    message = _error({"simulator": {"n_volumes": False}})
    assert "simulator.n_volumes" in message and "False" in message and "int" in message


def test_wrong_list_length() -> None:
    message = _error({"simulator": {"shape": [64, 64]}})
    assert "simulator.shape" in message and "[64, 64]" in message and "3" in message


def test_wrong_list_item_type() -> None:
    message = _error({"simulator": {"shape": [64, "x", 36]}})
    assert "simulator.shape[1]" in message and "'x'" in message and "int" in message


def test_scalar_for_list() -> None:
    message = _error({"pipeline": {"fd_thresholds_mm": 0.5}})
    assert "pipeline.fd_thresholds_mm" in message and "0.5" in message and "list" in message


def test_port_out_of_range() -> None:
    message = _error({"receiver": {"port": 70000}})
    assert "receiver.port" in message and "70000" in message
    assert "0" in message and "65535" in message


def test_tr_zero_out_of_range() -> None:
    message = _error({"simulator": {"tr_s": 0}})
    assert "simulator.tr_s: 0" in message
    assert "0.05" in message and "60" in message


def test_list_item_out_of_range() -> None:
    message = _error({"simulator": {"shape": [64, 2, 36]}})
    assert "simulator.shape[1]" in message and "2" in message and "512" in message


def test_bad_choice() -> None:
    message = _error({"pipeline": {"mode": "spine"}})
    assert "pipeline.mode" in message and "'spine'" in message
    assert "brain" in message and "spinal_cord" in message


def test_null_for_required_value() -> None:
    message = _error({"receiver": {"port": None}})
    assert "receiver.port" in message and "int" in message


def test_section_that_is_not_a_mapping() -> None:
    message = _error({"receiver": [1, 2]})
    assert "receiver" in message and "mapping" in message and "[1, 2]" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "receiver:\n  port: [11112\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "YAML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_top_level_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "- receiver\n- publish\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "mapping" in str(info.value)


def test_config_error_is_an_rtsc_error() -> None:
    assert issubclass(ConfigError, RtscError)


# ---- immutability ---------------------------------------------------------------------

def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.receiver = config.receiver  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.receiver.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.simulator.shape = [8, 8, 8]  # type: ignore[misc]
    assert config.receiver.port == 11112


def test_list_defaults_are_not_shared() -> None:
    a, b = Config(), Config()
    assert a.simulator.shape == b.simulator.shape
    assert a.simulator.shape is not b.simulator.shape
    assert a.glm.contrasts is not b.glm.contrasts


def test_header_count_caps_are_validated() -> None:
    """Issue 16 item 3: the caps on header counts are config keys, checked at load."""
    config = config_from_dict({})
    assert config.assembler.max_slices == 1024 and config.session.max_volumes == 100000
    message = _error({"assembler": {"max_slices": 0}})
    assert "assembler.max_slices: 0" in message and "1" in message and "65536" in message
    message = _error({"session": {"max_volumes": 10**8}})
    assert "session.max_volumes" in message and "10000000" in message
    message = _error({"assembler": {"slices_per_volume": 64, "max_slices": 32}})
    assert "assembler.slices_per_volume: 64" in message and "assembler.max_slices (32)" in message
    message = _error({"glm": {"n_volumes": 500}, "session": {"max_volumes": 300}})
    assert "glm.n_volumes: 500" in message and "session.max_volumes (300)" in message
