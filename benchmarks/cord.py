"""Spinal cord mode benchmark: slice-wise motion correction and the whole cord pipeline.

1. **Slice-wise correction** of 128x128x24 volumes of the simulator's cord run
   (simulator.cord, default protocol): per volume, the two-pass estimate, regularisation
   and fallbacks (:func:`rtsc.pipeline.motion.slicewise.slice_moco_step`) and the reslicing
   (Fourier, the default, and bilinear), single-threaded numba like ``pipeline.threads:
   1``. Also the translation error against the truth (RMS, mm).
2. **Receive -> publish over C-STORE**: the cord run is written to disk as mosaics,
   then a separate process sends it at a fixed interval to an in-process `rtsc run`
   service in ``pipeline.mode: spinal_cord`` (slice-wise moco, cord QC, spikes, timing,
   global signal, QC, carpet); a subscriber collects the `volume` messages. As
   benchmarks/latency.py: median and p95 of publish - received, the parts, and the
   per-stage medians, first volume excluded.

Targets (issue 7): slice-wise correction < 30 ms median; receive -> publish < 100 ms.

Usage: python benchmarks/cord.py [--volumes 40] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_config  # noqa: E402
from rtsc.config import merge  # noqa: E402
from rtsc.pipeline.motion._slicewise_kernels import (  # noqa: E402
    fourier_shift_slices,
    shift_slices,
    warm_up,
)
from rtsc.pipeline.cord.mask import cylinder_mask, find_cord_centres  # noqa: E402
from rtsc.config import CordMocoConfig, CordSimConfig, SimulatorConfig  # noqa: E402
from rtsc.pipeline.motion.slicewise import (  # noqa: E402
    slice_moco_init,
    slice_moco_step,
)
from simulator.cord import iter_cord_volumes, plan_cord_run  # noqa: E402
from simulator.scanner import run_simulation  # noqa: E402
from latency import latency_summary, send_and_collect  # noqa: E402  (benchmarks/latency.py)


def slicewise_case(n_volumes: int) -> dict:
    """Times of slice-wise correction of the simulator's 128x128x24 cord volumes (ms)."""
    warm_up()
    plan = plan_cord_run(SimulatorConfig(n_volumes=n_volumes, seed=1, cord=CordSimConfig(
        shape=[128, 128, 24], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=2.3)))
    volumes = [np.asfortranarray(v.data) for v in iter_cord_volumes(plan)]
    reference = np.mean(volumes[:5], axis=0, dtype=np.float64).astype(np.float32)
    params = CordMocoConfig()
    voxel = (1.0, 1.0, 5.0)
    mask = cylinder_mask(reference.shape, find_cord_centres(reference, voxel),
                         params.mask_radius_mm, voxel)
    state = slice_moco_init(reference, plan.grid.affine(), mask)
    estimate, fourier, linear, iterations, trans = [], [], [], [], []
    for data in volumes:
        t0 = time.perf_counter()
        result = slice_moco_step(state, data, params)
        t1 = time.perf_counter()
        fourier_shift_slices(data, result.shifts_vox)
        t2 = time.perf_counter()
        shift_slices(data, result.shifts_vox)
        t3 = time.perf_counter()
        estimate.append(t1 - t0)
        fourier.append(t2 - t1)
        linear.append(t3 - t2)
        iterations.append(result.iterations)
        trans.append(result.trans_mm)
    truth = plan.slice_shifts - plan.slice_shifts[:5].mean(axis=0)
    error = np.asarray(trans) - truth
    ms = lambda v: 1000 * float(np.median(v[1:]))  # noqa: E731 - first: one-off costs
    return {"estimate": ms(estimate), "fourier": ms(fourier), "linear": ms(linear),
            "total": ms(np.add(estimate, fourier)), "points": int(state.ref.points.shape[0]),
            "iterations": float(np.median(iterations)),
            "rms_mm": float(np.sqrt(np.mean(error ** 2)))}


def pipeline_case(n_volumes: int, interval: float, workdir: Path) -> dict:
    """Receive -> publish latency of the cord pipeline over C-STORE (ms)."""
    cfg = make_config(workdir, pipeline={"mode": "spinal_cord"},
                      session={"dir": str(workdir / "sessions"), "report": False,
                               "series_timeout_s": 20.0})
    sim_cfg = make_config(workdir, simulator=merge(
        {"anatomy": "spinal_cord", "n_volumes": n_volumes, "speed": 0.0},
        {"cord": {"physio_progressive": False}})).simulator
    sim = run_simulation(sim_cfg, out_dir=workdir / "scan")
    collector = send_and_collect(cfg, sim.files, interval)
    volumes = [m.header for m in collector.topic("volume")][1:]
    if not all(h.get("slice_trans_x") is not None for h in volumes[5:]):
        raise RuntimeError("volume messages without slice translations")
    return latency_summary(volumes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between volumes")
    args = parser.parse_args()
    moco = slicewise_case(args.volumes)
    with tempfile.TemporaryDirectory() as tmp:
        run = pipeline_case(args.volumes, args.interval, Path(tmp))
    print(f"\nSlice-wise motion correction, 128x128x24 cord volumes ({args.volumes}, first "
          f"excluded; 1 numba thread), median ms")
    print(f"{'estimate':>9} {'fourier':>8} {'linear':>7} {'total':>7} {'target':>7} "
          f"{'points':>7} {'iter':>5} {'RMS err mm':>11}")
    print(f"{moco['estimate']:9.2f} {moco['fourier']:8.2f} {moco['linear']:7.2f} "
          f"{moco['total']:7.2f} {'< 30':>7} {moco['points']:7d} {moco['iterations']:5.0f} "
          f"{moco['rms_mm']:11.4f}")
    print(f"\nCord pipeline, last byte received -> volume message published (mosaic, "
          f"{args.volumes} volumes every {args.interval} s; first excluded), ms")
    print(f"{'n':>4} {'median':>8} {'p95':>8} {'recv->asm':>10} {'asm->pub':>9} {'target':>7}")
    print(f"{run['n']:4d} {run['median']:8.2f} {run['p95']:8.2f} {run['assemble']:10.2f} "
          f"{run['pipeline']:9.2f} {'< 100':>7}   stages: "
          + ", ".join(f"{k} {v:.2f}" for k, v in run["stage_ms"].items()))
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
