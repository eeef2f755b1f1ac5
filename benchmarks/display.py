"""Display benchmark: time per dashboard update at 64x64x36 and 128x128x72.

A message stream like the pipeline's is built with rtsc's own message builders and sent
through encode/decode: series.start with a block design, one ``volume`` message per TR
(random-walk motion, FD, DVARS, global signal, ROI, usable frames, the QC fields, 2,000
carpet samples) and, every ``--map-every`` volumes, the maps the pipeline publishes
(``mean``, ``tsnr``, ``t:task``, ``beta:task``, ``roi:target``) of the full matrix.

One update = decode the new messages, fold them into the DisplayState and redraw the
dashboard with blitting on an Agg canvas (1600 x 900 pixels), which is the work TkAgg
does before copying the pixels to the window. Timed per volume: all updates, the
updates that carried maps, and how many needed a full redraw (series start, a y range
growing). At TR 0.5 s an update must take well under 500 ms to stay current; the target
is a median under 100 ms.

Usage: python benchmarks/display.py [--volumes 300] [--matrices 64x64x36,128x128x72]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc import messages  # noqa: E402
from rtsc.conventions import MOTION_NAMES  # noqa: E402
from rtsc.display.app import new_agg_figure  # noqa: E402
from rtsc.display.dashboard import Dashboard  # noqa: E402
from rtsc.display.state import DisplayState  # noqa: E402


def make_stream(shape: tuple[int, int, int], n: int, map_every: int, seed: int = 0
                ) -> list[list[list[bytes]]]:
    """Encoded messages grouped per volume (the first group also holds series.start)."""
    rng = np.random.default_rng(seed)
    series = "bench0000001"
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    block = ((np.arange(n) // 20) % 2).astype(float)
    start = messages.series_start(shape, (3, 3, 3), 0.5, n, "brain", affine=affine,
                                  design=messages.design_field(["task"], block[:, None]))
    groups: list[list[list[bytes]]] = [[messages.encode(start, series)]]
    motion = np.cumsum(rng.normal(0, 0.02, (n, 6)), axis=0)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    head = (((grid - centre) / (0.4 * np.array(shape))[:, None, None, None]) ** 2).sum(0) < 1
    mean = np.where(head, 600.0, 20.0).astype(np.float32)
    usable = 0
    for i in range(n):
        fd = float(np.abs(np.diff(motion[max(i - 1, 0):i + 1], axis=0)).sum()) if i else 0.0
        usable += fd <= 0.2
        metrics = dict(zip(MOTION_NAMES, motion[i]))
        metrics.update(framewise_displacement=fd, dvars=20 + rng.normal(), std_dvars=1 + 0.1 * rng.normal(),
                       global_signal=600 + rng.normal(), roi={"target": float(block[i] + 0.2 * rng.normal())},
                       feedback=float(block[i]), usable_frames={"0.2": usable, "0.3": usable},
                       tsnr=50.0, clean_minutes={"0.2": usable * 0.5 / 60},
                       criterion={"threshold_mm": 0.2, "target_minutes": 12.5,
                                  "minutes": usable * 0.5 / 60, "fraction": usable * 0.5 / 750,
                                  "eta_s": 600.0, "reached": False}, slice_spikes=[])
        carpet = (600 + 10 * rng.standard_normal(2000)).astype(np.float32)
        message = messages.volume(i, time.time(), time.time(), metrics, [], carpet=carpet,
                                  carpet_mask_voxels=int(head.sum()))
        group = [messages.encode(message, series)]
        if (i + 1) % map_every == 0:
            t = np.where(head, rng.normal(0, 1, shape) + 6 * (grid[0] > shape[0] * 0.6), 0)
            for name, data in (("mean", mean), ("tsnr", mean / 10), ("t:task", t),
                               ("beta:task", t), ("roi:target", (t > 5).astype(np.float32))):
                group.append(messages.encode(messages.map_message(name, affine, data, i), series))
        groups.append(group)
    return groups


def bench(shape: tuple[int, int, int], n: int, map_every: int) -> dict[str, float]:
    groups = make_stream(shape, n, map_every)
    state = DisplayState()
    dashboard = Dashboard(new_agg_figure(), blit=True)
    times, map_times = [], []
    redraws = [0]
    full_redraw = dashboard.full_redraw

    def counted() -> None:
        redraws[0] += 1
        full_redraw()

    dashboard.full_redraw = counted  # type: ignore[method-assign]
    for group in groups:
        t0 = time.perf_counter()
        for frames in group:
            state.fold(messages.decode(frames))
        dashboard.update(state)
        elapsed = 1000 * (time.perf_counter() - t0)
        times.append(elapsed)
        if len(group) > 1:
            map_times.append(elapsed)
    times_a = np.asarray(times[1:])  # the first (series start) builds the figure
    return {"median": float(np.median(times_a)), "p95": float(np.percentile(times_a, 95)),
            "max": float(times_a.max()), "maps_median": float(np.median(map_times)),
            "full_redraws": redraws[0], "first": times[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300)
    parser.add_argument("--map-every", type=int, default=10)
    parser.add_argument("--matrices", default="64x64x36,128x128x72")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; "
          f"{args.volumes} volumes, maps every {args.map_every}; ms per update")
    print("| matrix | median | p95 | max | with maps (median) | full redraws | first draw |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.matrices.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        r = bench(shape, args.volumes, args.map_every)  # type: ignore[arg-type]
        print(f"| {spec} | {r['median']:.1f} | {r['p95']:.1f} | {r['max']:.1f} | "
              f"{r['maps_median']:.1f} | {r['full_redraws']} | {r['first']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
