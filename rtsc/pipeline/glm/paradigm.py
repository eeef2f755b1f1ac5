"""The paradigm as the user writes it: events (a BIDS events.tsv, or ``glm.conditions``
inline) and contrast expressions over trial types, read and checked.

The design matrix built from them is :mod:`rtsc.pipeline.glm.design`'s.
"""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rtsc.errors import RtscError

#: (onset_s, duration_s, trial_type), seconds from the start of volume 0.
Event = tuple[float, float, str]


class DesignError(RtscError, ValueError):
    """A design cannot be built: bad events, unknown contrast names, bad parameters."""


# ---- events --------------------------------------------------------------------------------

def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DesignError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DesignError(f"{where}: {text!r} is not a finite number")
    return value


def read_events(path: str | Path) -> list[Event]:
    """Read a BIDS events.tsv: tab-separated, a header line, ``n/a`` for missing values.

    Columns ``onset`` and ``duration`` (seconds from the start of volume 0) are
    required; ``trial_type`` names the condition (all events are ``"task"`` when the
    column is absent; nilearn calls them ``"dummy"``); other columns are ignored.

    Parameters
    ----------
    path : path to the file

    Returns
    -------
    events : list of (onset_s, duration_s, trial_type), in file order

    Raises
    ------
    DesignError (a ValueError)
        Naming the file, the line (1-based, the header is line 1) and the column of the
        first bad value; or the missing column; or an unreadable or empty file.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DesignError(f"events file {path}: cannot be read ({exc})") from exc
    if not lines or not any(cell.strip() for cell in lines[0]):
        raise DesignError(f"events file {path}: empty (expected a header line with onset, "
                          "duration and trial_type)")
    header = [cell.strip() for cell in lines[0]]
    for required in ("onset", "duration"):
        if required not in header:
            raise DesignError(f"events file {path}: no {required!r} column in the header "
                              f"{header} (is it tab-separated?)")
    columns = {name: header.index(name) for name in ("onset", "duration", "trial_type")
               if name in header}
    events: list[Event] = []
    for number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank lines (a trailing newline or two) carry no event
        if len(cells) != len(header):
            raise DesignError(f"events file {path}, line {number}: {len(cells)} fields, "
                              f"the header has {len(header)}")
        where = f"events file {path}, line {number}, column"
        onset = _number(cells[columns["onset"]].strip(), f"{where} onset")
        duration = _number(cells[columns["duration"]].strip(), f"{where} duration")
        if duration < 0:
            raise DesignError(f"{where} duration: {duration:g} is negative")
        kind = cells[columns["trial_type"]].strip() if "trial_type" in columns else "task"
        if kind in ("", "n/a"):
            raise DesignError(f"{where} trial_type: {kind!r} is not a condition name")
        events.append((onset, duration, kind))
    if not events:
        raise DesignError(f"events file {path}: a header but no events")
    return events


def check_events(events: Iterable[Sequence[object]]) -> list[Event]:
    """Validate a list of (onset_s, duration_s, trial_type); return it as floats and str.

    Raises
    ------
    DesignError
        Naming the position of the first bad event and what is wrong with it.
    """
    checked: list[Event] = []
    for i, event in enumerate(events):
        if len(event) != 3:
            raise DesignError(f"event {i}: {event!r} is not (onset_s, duration_s, trial_type)")
        onset, duration, kind = event
        if isinstance(onset, bool) or not isinstance(onset, (int, float, np.number)) \
                or not math.isfinite(float(onset)):
            raise DesignError(f"event {i}: onset {onset!r} is not a finite number of seconds")
        if isinstance(duration, bool) or not isinstance(duration, (int, float, np.number)) \
                or not math.isfinite(float(duration)) or float(duration) < 0:
            raise DesignError(f"event {i}: duration {duration!r} is not a number of "
                              "seconds >= 0")
        if not isinstance(kind, str) or not kind.strip():
            raise DesignError(f"event {i}: trial_type {kind!r} is not a non-empty string")
        checked.append((float(onset), float(duration), kind.strip()))
    return checked


def conditions_to_events(conditions: Mapping[str, Any], key: str = "glm.conditions") -> list[Event]:
    """Events from conditions given inline (config ``glm.conditions``).

    Parameters
    ----------
    conditions : mapping trial_type -> {"onsets_s": [seconds, ...], "durations_s": seconds
        or [seconds, ...] (one per onset)}; onsets from the start of volume 0
    key : the config key named in errors

    Returns
    -------
    events : list of (onset_s, duration_s, trial_type), sorted by onset

    Raises
    ------
    DesignError
        Naming ``key.<trial_type>`` and what is wrong (unknown or missing fields, a
        durations list of another length, values that are not finite seconds >= 0 for
        durations).
    """
    if not isinstance(conditions, Mapping):
        raise DesignError(f"{key}: {conditions!r} is not a mapping of trial_type -> "
                          "{onsets_s: [...], durations_s: ...}")
    events: list[Event] = []
    for name, spec in conditions.items():
        where = f"{key}.{name}"
        if not isinstance(spec, Mapping) or set(spec) != {"onsets_s", "durations_s"}:
            raise DesignError(f"{where}: {spec!r}; allowed: {{onsets_s: [seconds, ...], "
                              "durations_s: seconds or [seconds, ...]}")
        onsets, durations = spec["onsets_s"], spec["durations_s"]
        if not isinstance(onsets, (list, tuple)) or not onsets:
            raise DesignError(f"{where}.onsets_s: {onsets!r} is not a non-empty list of seconds")
        if not isinstance(durations, (list, tuple)):
            durations = [durations] * len(onsets)
        if len(durations) != len(onsets):
            raise DesignError(f"{where}.durations_s: {len(durations)} values for "
                              f"{len(onsets)} onsets")
        try:
            events += check_events([(o, d, str(name)) for o, d in zip(onsets, durations)])
        except DesignError as exc:
            raise DesignError(f"{where}: {exc}") from None
    return sorted(events, key=lambda e: (e[0], e[2]))


# ---- contrasts -----------------------------------------------------------------------------

def _linear_form(node: ast.AST, known: Sequence[str],
                 expression: str) -> tuple[dict[str, float], float]:
    """Evaluate an expression tree as ``sum(w_name * name) + constant``; refuse anything else."""
    if isinstance(node, ast.Expression):
        return _linear_form(node.body, known, expression)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return {}, float(node.value)
    if isinstance(node, ast.Name):
        if node.id not in known:
            raise DesignError(f"contrast {expression!r}: unknown name {node.id!r}; known: "
                              + ", ".join(known))
        return {node.id: 1.0}, 0.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        terms, const = _linear_form(node.operand, known, expression)
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return {k: sign * v for k, v in terms.items()}, sign * const
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, lc = _linear_form(node.left, known, expression)
        right, rc = _linear_form(node.right, known, expression)
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        terms = dict(left)
        for k, v in right.items():
            terms[k] = terms.get(k, 0.0) + sign * v
        return terms, lc + sign * rc
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        left, lc = _linear_form(node.left, known, expression)
        right, rc = _linear_form(node.right, known, expression)
        if isinstance(node.op, ast.Div):
            if right:
                raise DesignError(f"contrast {expression!r}: division by a condition is not "
                                  "linear")
            if rc == 0:
                raise DesignError(f"contrast {expression!r}: division by zero")
            return {k: v / rc for k, v in left.items()}, lc / rc
        if left and right:
            raise DesignError(f"contrast {expression!r}: a product of conditions is not linear")
        terms, factor = (left, rc) if left else (right, lc)
        return {k: v * factor for k, v in terms.items()}, lc * rc
    raise DesignError(f"contrast {expression!r}: only names, numbers, + - * / and brackets "
                      f"are allowed (found {type(node).__name__})")


def parse_contrast(expression: str, known: Sequence[str]) -> dict[str, float]:
    """Weights of a linear contrast expression such as ``"tap - rest"`` or ``"2*a - b"``.

    Parsed with :mod:`ast` (never evaluated). A name that is not a Python identifier
    (``"left-hand"``) can be used only as the whole expression.

    Parameters
    ----------
    expression : str
    known : the names allowed in it

    Returns
    -------
    weights : dict name -> weight (names with weight 0 dropped)

    Raises
    ------
    DesignError
        Syntax errors, unknown names (listing the known ones), non-linear terms, a
        constant term, or all weights zero.
    """
    text = expression.strip()
    if text in known:
        return {text: 1.0}
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise DesignError(f"contrast {expression!r}: not a valid expression ({exc.msg}); "
                          f"known names: {', '.join(known)}") from None
    terms, const = _linear_form(tree, known, expression)
    if const != 0:
        raise DesignError(f"contrast {expression!r}: has a constant term ({const:g}); a "
                          "contrast weighs conditions only")
    weights = {k: v for k, v in terms.items() if v != 0}
    if not weights:
        raise DesignError(f"contrast {expression!r}: every weight is zero")
    return weights
