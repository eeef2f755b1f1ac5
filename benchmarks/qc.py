"""QC benchmark: what the quality-control stages add per volume.

For each matrix (field of view 192 x 192 x 108 mm) the simulator makes a seeded run
without motion (the QC cost does not depend on the motion), with a k-space spike in a
few volumes. The three QC stages run as in the pipeline, on the same volumes:

timing
    ``TimingStage``: arrival interval, late and missing volumes, the ``timing`` field.
spikes
    ``SliceQcStage``: per-slice sums over the head and the air (numba), each slice's
    robust z against its history, SNR against the background noise.
qc
    ``QcStage``: Welford update of mean, M2 and the co-moment with time for every voxel
    (numba), tSNR of the mask voxels, exact median over the mask and per slice (numba
    selection seeded by the previous volume's medians), usable frames, clean and
    projected minutes, the session criterion (FD from a random walk, as the motion
    stage would publish).

Printed: median and p95 per volume of each stage and of their sum, in ms, over the
volumes after the first ``--skip`` (the first ones set up masks and histories). numba
runs on one thread, as in the pipeline. The machine's load average is printed: other
work on the cores inflates every figure.

Usage: python benchmarks/qc.py [--volumes 100] [--skip 5] [--matrices 64x64x36,128x128x72]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc.config import QcConfig  # noqa: E402
from rtsc.pipeline.qc._kernels import warm_up  # noqa: E402
from rtsc.pipeline.qc.stages import QcStage, SliceQcStage, TimingStage  # noqa: E402
from rtsc.volume import SeriesInfo, Volume  # noqa: E402
from simulator.bold import iter_volumes, plan_run  # noqa: E402
from simulator.phantom import Grid  # noqa: E402

TR_S = 2.0
FOV_MM = (192.0, 192.0, 108.0)


def run(shape: tuple[int, int, int], n: int, skip: int) -> dict[str, np.ndarray]:
    voxel = tuple(f / s for f, s in zip(FOV_MM, shape))
    rng = np.random.default_rng(0)
    spikes = [(int(v), int(rng.integers(0, shape[2])), 20.0) for v in (20, 50, 80) if v < n]
    plan = plan_run(Grid(shape, voxel), n, TR_S, seed=1, motion=np.zeros((n, 6)),
                    psf_samples=1, spikes=spikes)
    info = SeriesInfo("bench", TR_S, n, 1, "", "mosaic")
    affine = plan.grid.affine()
    volumes = [Volume(np.asfortranarray(v.quantised.astype(np.float32)), affine, v.index, info,
                      v.index * TR_S, v.index * TR_S + 0.5, v.index * TR_S + 0.51)
               for v in iter_volumes(plan)]
    cfg = QcConfig()
    stages = [TimingStage(cfg.late_factor), SliceQcStage(cfg, 0.2),
              QcStage(cfg, 0.2, [0.2, 0.3, 0.4])]
    fd = np.abs(rng.normal(0.15, 0.1, n))
    times = {s.name: [] for s in stages}
    for vol in volumes:
        upstream = {"framewise_displacement": float(fd[vol.index])}
        for stage in stages:
            t0 = time.perf_counter()
            result = stage.update(vol, upstream)
            times[stage.name].append((time.perf_counter() - t0) * 1000.0)
            upstream.update(result.metrics)
    out = {name: np.asarray(values[skip:]) for name, values in times.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--matrices", default="64x64x36,128x128x72")
    args = parser.parse_args()
    numba.set_num_threads(1)
    warm_up()
    matrices = [tuple(int(x) for x in m.split("x")) for m in args.matrices.split(",")]
    print(f"QC stages per volume, {args.volumes} volumes (first {args.skip} left out), "
          f"numba 1 thread; load average {os.getloadavg()[0]:.2f}")
    print("| matrix | timing | spikes | qc | total (median) | total (p95) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in matrices:
        t = run(shape, args.volumes, args.skip)  # type: ignore[arg-type]
        med = {k: float(np.median(v)) for k, v in t.items()}
        print(f"| {'x'.join(map(str, shape))} | {med['timing']:.3f} ms | {med['spikes']:.2f} ms "
              f"| {med['qc']:.2f} ms | {med['total']:.2f} ms | "
              f"{float(np.percentile(t['total'], 95)):.2f} ms |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
