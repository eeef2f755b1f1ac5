"""The shape of the code: no import cycle among the project's modules and no
module over 600 lines.

Imports are read with :mod:`ast` rather than by importing, so that imports
inside functions (the usual way to hide a cycle) count like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rtsc", "simulator")
MAX_LINES = 600


def _module_name(path: Path) -> str:
    """Dotted module name of a file under ROOT (a package is named by its folder)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of a relative ``from`` import (``level`` leading dots)."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its body.

    ``from pkg import x`` is an edge to ``pkg.x`` when that is a module, and to
    ``pkg`` (its ``__init__``) otherwise.  ``import a.b.c`` is an edge to the
    longest project module named by a prefix of ``a.b.c``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: set[str] = set()

    def add_longest(dotted: str) -> None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                edges.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_longest(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(name, is_package, node.level, node.module)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    edges.add(submodule)
                else:
                    add_longest(source)
    edges.discard(name)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each sorted).

    Tarjan's algorithm, iterative, so a long chain of imports cannot reach the
    recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return components


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through the first module of each strongly connected component
    (breadth-first inside it), e.g. ``["a", "b", "a"]``."""
    cycles = []
    for component in _components(graph):
        members = set(component)
        first = component[0]
        previous: dict[str, str] = {}
        frontier = [first]
        closing = None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for child in sorted(graph[node] & members):
                    if child == first:
                        closing = node
                        break
                    if child not in previous:
                        previous[child] = node
                        following.append(child)
                if closing is not None:
                    break
            frontier = following
        path = [closing]
        while path[-1] != first:
            path.append(previous[path[-1]])
        cycles.append(list(reversed(path)) + [first])
    return cycles


def test_cycle_finder_sees_a_function_level_import(tmp_path):
    """The walker counts an import hidden inside a function."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert _cycles(graph) == [["a", "b", "a"]]


def test_cycle_finder_on_a_tangle():
    """Two cycles sharing a module are one component; the shortest cycle is shown."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"b"}, "e": {"a"}}
    assert _components(graph) == [["a", "b", "c", "d"]]
    assert _cycles(graph) == [["a", "b", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = _graph()
    lines = []
    for component, cycle in zip(_components(graph), _cycles(graph)):
        line = " -> ".join(cycle)
        if len(component) > len(cycle) - 1:  # more modules are tangled than this cycle shows
            line += f"  (tangled together: {', '.join(component)})"
        lines.append(line)
    message = "\n".join(lines)
    assert not lines, f"import cycles among project modules:\n{message}"


def test_no_module_over_600_lines():
    offenders = []
    for name, path in _modules().items():
        with path.open(encoding="utf-8") as handle:
            count = sum(1 for _ in handle)
        if count > MAX_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {count} lines")
    assert not offenders, f"modules over {MAX_LINES} lines:\n" + "\n".join(offenders)
