"""The configuration reference, docs/configuration.md, rendered from the schema.

The dataclasses of :mod:`rtsc.config` are the one source of every key's type, default,
allowed values and description; this module prints them as Markdown, so the reference
cannot drift from what :func:`~rtsc.config.load_config` accepts. Regenerate with::

    python -m rtsc.config.reference > docs/configuration.md

``tests/test_config_reference.py`` fails when the committed file differs.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from typing import Any

from rtsc.config.qc import AlertRuleConfig, _default_rules
from rtsc.config.schema import Config

REGENERATE = "python -m rtsc.config.reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from the schema (rtsc/config/) by `{REGENERATE}`.
     Do not edit by hand: change the field's description in rtsc/config/ and regenerate;
     tests/test_config_reference.py fails when this file is stale. -->

Every command takes `--config PATH`; without it `./config.yaml` is used if present,
otherwise the built-in defaults below. The repository's `config.yaml` lists every key
with its default (a test keeps it so). Each key is validated at load: an unknown key, a
wrong type or an out-of-range value stops rtsc with a message that names the key path,
the value and what is allowed, for example
`receiver.port: 70000 is out of range; allowed: 0 to 65535`.

Ranges are inclusive; for a list they apply to every item. `null` is YAML's empty value
(Python `None`). Types are the schema's Python annotations: `str | None` takes a string
or null, `list[float]` a YAML list of numbers.

Sections: {{sections}}.
"""


def _fmt(value: Any) -> str:
    """A value as it would be written in config.yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_fmt(k)}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _allowed(meta: typing.Mapping[str, Any], is_list: bool) -> str:
    parts = []
    if meta.get("choices") is not None:
        parts.append(", ".join(_code(_fmt(c)) for c in meta["choices"]))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        span = (f"{_fmt(lo) if lo is not None else '-inf'} to "
                f"{_fmt(hi) if hi is not None else 'inf'}")
        parts.append(("each " if is_list else "") + span)
    if meta.get("length") is not None:
        parts.append(f"{meta['length']} items")
    return "; ".join(parts)


def _summary(cls: type) -> str:
    """A class docstring as one paragraph per blank-line-separated block."""
    doc = inspect.cleandoc(cls.__doc__ or "").replace("``", "`")
    return "\n\n".join(" ".join(block.split()) for block in doc.split("\n\n"))


def _section(cls: type, path: str, out: list[str], pending: list[tuple[type, str]]) -> None:
    hints = typing.get_type_hints(cls)
    out += [f"## `{path}`", "", _summary(cls), "",
            "| key | type | default | allowed | description |",
            "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        meta = f.metadata
        doc = meta.get("doc", "")
        key = f"{path}.{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            pending.append((typing.cast(type, tp), key))
            doc = doc or _summary(typing.cast(type, tp)).split("\n")[0]
            row = [f.name, "section", f"see [`{key}`](#{_anchor(key)})", "", doc]
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            pending.append((args[0], key + "[]"))
            rules = _default(f)
            count = f"{len(rules)} rules, see below" if rules else "`[]`"
            row = [f.name, f"list of `{key}[]` items", count, "", doc]
        else:
            is_list = typing.get_origin(tp) is list or any(
                typing.get_origin(a) is list for a in args)
            row = [f.name, _code(str(f.type)), _code(_fmt(_default(f))),
                   _allowed(meta, is_list), doc]
        row[-1] = row[-1].replace("<", "&lt;")  # plain text: "<name>" is not an HTML tag
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    out.append("")
    if cls is AlertRuleConfig:
        _default_rule_table(out)


def _default_rule_table(out: list[str]) -> None:
    names = [f.name for f in dataclasses.fields(AlertRuleConfig)]
    out += ["The default rules of `qc.alerts` (a list given in config.yaml replaces them "
            "all):", "",
            "| " + " | ".join(names) + " |", "| " + " | ".join("---" for _ in names) + " |"]
    for rule in _default_rules():
        out.append("| " + " | ".join(_cell(_code(_fmt(getattr(rule, n)))) for n in names)
                   + " |")
    out.append("")


def _anchor(path: str) -> str:
    """GitHub's heading anchor of ``## `path` ``."""
    return "".join(ch for ch in path.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def render_reference() -> str:
    """docs/configuration.md: every section and key of :class:`~rtsc.config.Config`.

    Returns
    -------
    str
        Markdown: an introduction, then one table per section (nested sections and the
        alert rule after their parent), each row key, type, default, allowed values or
        range, description.
    """
    out: list[str] = []
    hints = typing.get_type_hints(Config)
    pending = [(hints[f.name], f.name) for f in dataclasses.fields(Config)]
    order = []
    while pending:
        cls, path = pending.pop(0)
        order.append(path)
        nested: list[tuple[type, str]] = []
        _section(cls, path, out, nested)
        pending = nested + pending
    links = ", ".join(f"[`{p}`](#{_anchor(p)})" for p in order)
    return _INTRO.format(sections=links) + "\n" + "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    """Print the reference to stdout."""
    sys.stdout.write(render_reference())


if __name__ == "__main__":
    main()
