"""GLM benchmark: the recursive GLM's per-volume cost against refitting on every volume.

For each matrix (field of view 192 x 192 x 108 mm) the simulator makes a seeded run
without motion (the data only need to look like EPI; the GLM's cost does not depend on
them) and a design of 12 columns: one block condition (spm HRF), the 6 motion
parameters (a random walk, as the motion stage would publish), the cosine drifts below
1/128 Hz (4 for 150 volumes of TR 2 s) and the constant. The mask is the automatic
head mask of the first volume (~27 % of the grid).

Measured, medians in ms:

update
    ``GlmStage.update`` per volume: design row, the p x p Givens step and the voxel
    kernel (``rtsc.pipeline.glm._kernels``), numba on ``--threads`` threads (the
    kernel itself is serial).
t-map
    ``GlmStage.maps()`` at the end of the run: the solve (p x p), one contrast's effect,
    variance and t for every voxel, scattered into (nx, ny, nz) float32 maps; also
    ``glm_fit(..., with_beta=True)`` (all p x V betas) as "fit+betas".
refit lstsq / refit nilearn
    What a pipeline without a recursive GLM pays per volume: ``numpy.linalg.lstsq`` of
    all volumes so far on the in-mask voxels, and ``nilearn.glm.first_level.run_glm(Y, X,
    noise_model="ols")`` plus ``compute_contrast`` on the same (float64) matrix. The cost
    grows with the volumes so far, so it is timed at n/2 and at n volumes (the median
    over a run is the n/2 figure); the matrices are gathered beforehand and not timed.

OpenBLAS runs on one thread (``OPENBLAS_NUM_THREADS=1`` unless set), as in the
pipeline. The machine's load average is printed: other work on the cores inflates
every figure.

Usage: python benchmarks/glm.py [--volumes 150] [--repeats 3] [--threads 1]
           [--matrices 64x64x36,128x128x72] [--no-nilearn]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc.pipeline.glm._kernels import warm_up  # noqa: E402
from rtsc.conventions import MOTION_NAMES  # noqa: E402
from rtsc.pipeline.glm.design import make_design  # noqa: E402
from rtsc.pipeline.glm.recursive import GlmStage, glm_fit  # noqa: E402
from rtsc.volume import SeriesInfo, Volume  # noqa: E402
from simulator.bold import block_events, iter_volumes, plan_run  # noqa: E402
from simulator.phantom import Grid  # noqa: E402

TR_S = 2.0


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def run_case(shape: tuple[int, int, int], n_volumes: int, repeats: int,
             with_nilearn: bool) -> dict[str, float | int | str]:
    grid = Grid(shape, (192.0 / shape[0], 192.0 / shape[1], 108.0 / shape[2]))
    plan = plan_run(grid, n_volumes, TR_S, seed=5, motion=np.zeros((n_volumes, 6)))
    rng = np.random.default_rng(1)
    motion = np.cumsum(rng.normal(0.0, 0.02, (n_volumes, 6)), axis=0)
    motion[:, 3:] *= 0.01  # radians
    design = make_design(block_events(n_volumes, TR_S), n_volumes, TR_S,
                         extra_names=MOTION_NAMES)
    stage = GlmStage(design, {"task": "task"}, mask_fraction=0.2)
    info = SeriesInfo("bench", TR_S, n_volumes, 1, "bench", "mosaic")
    update_s: list[float] = []
    gathered: np.ndarray | None = None
    for sim in iter_volumes(plan):
        data = np.asfortranarray(sim.data)
        volume = Volume(data, grid.affine(), sim.index, info, None, 0.0, 0.0)
        upstream = dict(zip(MOTION_NAMES, map(float, motion[sim.index])))
        t0 = time.perf_counter()
        stage.update(volume, upstream)
        update_s.append(time.perf_counter() - t0)
        assert stage.state is not None
        if gathered is None:
            gathered = np.empty((n_volumes, stage.state.index.size), dtype=np.float32)
        gathered[sim.index] = data.ravel(order="F")[stage.state.index]
    assert stage.state is not None and gathered is not None
    state = stage.state
    row: dict[str, float | int | str] = {
        "matrix": "x".join(map(str, shape)), "voxels": int(state.index.size), "p": design.p,
        "update": 1000.0 * float(np.median(update_s[1:])),  # the first pays the mask
        "update_p95": 1000.0 * float(np.percentile(update_s[1:], 95)),
        "t-map": _median_ms(stage.maps, repeats),
        "fit+betas": _median_ms(lambda: glm_fit(state, stage.contrast_weights), repeats),
    }
    X = design.matrix({name: motion[:, j] for j, name in enumerate(MOTION_NAMES)})
    contrast = stage.contrast_weights[0]
    for label, n in (("n/2", n_volumes // 2), ("n", n_volumes)):
        Y = gathered[:n].astype(np.float64)
        row[f"lstsq {label}"] = _median_ms(lambda: np.linalg.lstsq(X[:n], Y, rcond=None),
                                           max(1, repeats // 2))
        if with_nilearn:
            from nilearn.glm.contrasts import compute_contrast
            from nilearn.glm.first_level import run_glm

            def nilearn_fit() -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    labels, results = run_glm(Y, X[:n], noise_model="ols")
                    compute_contrast(labels, results, contrast).stat()
            row[f"nilearn {label}"] = _median_ms(nilearn_fit, max(1, repeats // 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="numba threads")
    parser.add_argument("--matrices", default="64x64x36,128x128x72")
    parser.add_argument("--no-nilearn", action="store_true")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    warm_up()
    shapes = [tuple(int(n) for n in m.split("x")) for m in args.matrices.split(",")]
    rows = [run_case(s, args.volumes, args.repeats, not args.no_nilearn)  # type: ignore[arg-type]
            for s in shapes]
    print(f"\nGLM per volume, ms (median; {args.volumes} volumes, TR {TR_S} s, numba threads "
          f"{args.threads}, load average {os.getloadavg()[0]:.2f})")
    keys = ["update", "update_p95", "t-map", "fit+betas", "lstsq n/2", "lstsq n"]
    if not args.no_nilearn:
        keys += ["nilearn n/2", "nilearn n"]
    header = f"{'':>14}" + "".join(f"{str(r['matrix']) + ' (' + str(r['voxels']) + ' vox)':>26}"
                                   for r in rows)
    print(header)
    for key in keys:
        cells = []
        for r in rows:
            value = float(r[key])
            ratio = value / float(r["update"])
            cells.append(f"{value:12.3f}" + (f"  ({ratio:8.0f}x upd)" if key != "update"
                                             else " " * 15))
        print(f"{key:>14}" + "".join(f"{c:>26}" for c in cells))
    print(f"columns: {rows[0]['p']}; 'x upd' = time / the recursive update's median; the refits "
          "are per volume at n/2 (a run's median) and at the last volume")


if __name__ == "__main__":
    main()
