"""Helpers of the benchmarks that time code trees side by side (intake.py,
intake_receive.py, decode.py): the simulated series on disk, one case in a fresh
process importing ``rtsc`` from a given tree, the trees' names and revisions.

Each benchmark runs its own script again with ``--child`` in that process (the spec as
JSON on stdin, the result as JSON on the last line of stdout), so the "before" tree is
timed by the same benchmark code as this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: This checkout (the tree the benchmark scripts belong to).
HERE = Path(__file__).resolve().parents[1]


def simulate(fmt: str, shape: list[int], n: int, workdir: Path) -> list[str]:
    """The series on disk (written before timing, so generating does not compete)."""
    sys.path.insert(0, str(HERE))
    from rtsc.config import config_from_dict, merge, to_dict
    from simulator.scanner import run_simulation

    cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": fmt, "shape": shape, "n_volumes": n, "speed": 0.0}})).simulator
    return [str(f) for f in run_simulation(cfg, out_dir=workdir / f"scan-{fmt}").files]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_child(script: str, root: str, spec: dict[str, Any]) -> dict:
    """``script --child`` in a fresh process whose ``rtsc`` is imported from ``root``."""
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child"],
                          input=json.dumps({"root": root, **spec}), capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=root))
    if proc.returncode != 0:
        raise RuntimeError(f"{root}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def revision(tree: str) -> str:
    """``tree``'s commit: short hash and subject."""
    return subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"],
                          capture_output=True, text=True).stdout.strip()


def named_trees(others: list[str]) -> tuple[list[str], list[str]]:
    """This tree and ``others`` (``--tree``), and their names: after, before[N]."""
    trees = [str(HERE), *others]
    names = ["after"] + [f"before{'' if len(others) == 1 else i + 1}"
                         for i in range(len(others))]
    return trees, names


def print_trees(names: list[str], trees: list[str]) -> None:
    for name, tree in zip(names, trees):
        print(f"  {name:<8} {tree}  ({revision(tree)[:70]})")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
