"""The heads acceptance tests run on: the analytic phantom and real anatomy cut by the
field of view (simulator.real_anatomy).

``phantom`` is the analytic head, wholly inside the field of view; ``axasc35`` a real
Siemens EPI volume (heudiconv's test mosaic, fetched by tests/real_data.py; acquired grid
64 x 64 x 31 at 3.25 x 3.25 x 3.6 mm whatever the test's grid); ``mni152`` nilearn's
template with EPI contrast, on the test's grid.
"""

from __future__ import annotations

import functools
from typing import Any

from real_data import AXASC35, fetch
from simulator.phantom import Grid
from simulator.real_anatomy import RealAnatomy, epi_anatomy, mni152_anatomy

HEADS = ("phantom", "axasc35", "mni152")
REAL_HEADS = ("axasc35", "mni152")


@functools.lru_cache(maxsize=1)
def axasc35_anatomy() -> tuple[Grid, RealAnatomy]:
    return epi_anatomy(fetch(AXASC35))


def simulated_head(name: str, grid: Grid) -> tuple[Grid, dict[str, Any]]:
    """The acquired grid and the keyword arguments of simulate_run / plan_run for a head.

    Real anatomy is sampled at voxel centres (``psf_samples`` 1: the base already holds
    voxel averages).
    """
    if name == "phantom":
        return grid, {}
    if name == "axasc35":
        acquired, head = axasc35_anatomy()
        return acquired, {"phantom": head, "psf_samples": 1}
    if name == "mni152":
        return grid, {"phantom": mni152_anatomy(grid), "psf_samples": 1}
    raise ValueError(name)


def simulator_section(name: str) -> dict[str, Any]:
    """The ``simulator`` config keys selecting a head."""
    if name == "phantom":
        return {"anatomy": "brain"}
    if name == "axasc35":
        return {"anatomy": "epi_image", "base_image": str(fetch(AXASC35))}
    if name == "mni152":
        return {"anatomy": "mni152"}
    raise ValueError(name)
