"""RETROICOR GLM benchmark: per-volume cost of the slice-wise GLM with physiology.

A simulated cord run (128 x 128 x 24, 1 x 1 x 5 mm, TR 2.3 s, the simulator's defaults,
``--volumes`` volumes) goes through :class:`rtsc.pipeline.cord.slice_glm.CordGlmStage` with
its BIDS physiology growing as the run goes (the samples up to the end of each volume are
appended before the volume is processed, as ``simulator.cord`` writes them during a
send). The GLM design: one block condition, cosine drifts, the constant; plus the
RETROICOR columns of the preset per slice. Two masks: the simulator's cord mask (~1900
voxels) and the automatic mask of the first volume (the whole neck).

Measured, medians over the run in ms:

update
    ``CordGlmStage.update`` per volume: the tail of the physio file read, the model
    without physiology updated, and the waiting volumes whose physiology is there fitted
    (about one per call once the lag is filled): phases from the recording so far, the
    slice rows, one Givens step per slice.
maps
    ``CordGlmStage.maps()`` at the end (both models' t-maps and the variance explained).

Usage: python benchmarks/cord_glm.py [--volumes 120]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc.config import CordSimConfig, SimulatorConfig  # noqa: E402
from rtsc.pipeline.glm.design import make_design  # noqa: E402
from rtsc.pipeline.physio.retroicor import PhysioSource, RetroicorOrders  # noqa: E402
from rtsc.pipeline.cord.slice_glm import CordGlmStage  # noqa: E402
from rtsc.volume import SeriesInfo, Volume  # noqa: E402
from simulator.cord import iter_cord_volumes, plan_cord_run  # noqa: E402
from simulator.physio import ProgressiveBidsWriter  # noqa: E402


def run(plan, volumes, preset: str, mask_kind: str) -> tuple[float, float, int]:
    masks = plan.masks()
    with tempfile.TemporaryDirectory() as tmp:
        writer = ProgressiveBidsWriter(plan.physio, Path(tmp), "bench")
        design = make_design(plan.events, plan.n_volumes, plan.tr_s)
        stage = CordGlmStage(design, {}, PhysioSource(writer.path),
                             RetroicorOrders.preset(preset),
                             mask=masks["cord"] if mask_kind == "cord" else None,
                             csf_mask=masks["csf"])
        info = SeriesInfo("bench", plan.tr_s, plan.n_volumes, 1, "cord", "mosaic")
        times = []
        for t, data in enumerate(volumes):
            writer.advance((t + 1) * plan.tr_s)
            vol = Volume(data, plan.grid.affine(), t, info, 1.0e9 + t * plan.tr_s, 0.0, 0.0,
                         plan.slice_times_s)
            t0 = time.perf_counter()
            stage.update(vol)
            times.append(time.perf_counter() - t0)
        writer.finish()
        stage.finish()
        t0 = time.perf_counter()
        stage.maps()
        t_maps = time.perf_counter() - t0
        assert stage.with_physio is not None
        return 1000 * float(np.median(times[5:])), 1000 * t_maps, stage.with_physio.index.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=120)
    args = parser.parse_args()
    plan = plan_cord_run(SimulatorConfig(n_volumes=args.volumes, seed=0, cord=CordSimConfig(
        shape=[128, 128, 24], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=2.3)))
    volumes = [np.asfortranarray(v.data) for v in iter_cord_volumes(plan)]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.volumes} volumes 128x128x24")
    print(f"{'preset':8} {'mask':6} {'voxels':>7} {'update ms':>10} {'maps ms':>8}")
    for preset in ("tapas", "spinal"):
        for mask_kind in ("cord", "auto"):
            update, maps, n_vox = run(plan, volumes, preset, mask_kind)
            print(f"{preset:8} {mask_kind:6} {n_vox:7d} {update:10.2f} {maps:8.1f}")


if __name__ == "__main__":
    main()
