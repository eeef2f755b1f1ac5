"""CPU time of each pipeline stage, in process (no receiver, no publisher), per volume.

The stages of benchmarks/latency.py (everything on: motion + reslice, DVARS, QC, GLM on
the simulated paradigm, the feedback ROI) run over simulated volumes computed up front.
Each stage is timed with ``time.thread_time`` (CPU time of the calling thread, so
another process on the machine does not inflate it). Printed: per stage, the median and
p95 CPU ms over the volumes after the first ``--warmup``; the sum of the medians; the
CPU time up to the ROI stage (the ``feedback`` message); up to the ``volume`` message
(``message``: the stages' work left for after it, StageResult.after_publish, not
included); and the whole volume (``process``: with that work, which the stage rows
include too).

``--profile FILE`` writes a cProfile of the timed volumes (of the first volume, the
stages' set-up, with ``--profile-first``); the first volume's CPU time per stage is
printed too. The numba kernels are compiled (or loaded from cache) first, as
``rtsc run`` does at start, so the first volume shows the stages' set-up, not that.

Usage: python benchmarks/pipeline_cpu.py [--shape 64 64 36] [--volumes 60] [--warmup 5]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_config  # noqa: E402
from rtsc.config import config_from_dict, merge, to_dict  # noqa: E402
from rtsc.pipeline.glm._kernels import warm_up as warm_up_glm  # noqa: E402
from rtsc.pipeline.motion._kernels import warm_up as warm_up_motion  # noqa: E402
from rtsc.pipeline.qc._kernels import warm_up as warm_up_qc  # noqa: E402
from rtsc.pipeline.qc._slice_kernels import warm_up as warm_up_slices  # noqa: E402
from rtsc.pipeline.qc.dvars_online import warm_up as warm_up_dvars  # noqa: E402
from rtsc.pipeline.series import SeriesPipeline, build_stages  # noqa: E402
from rtsc.volume import SeriesInfo, Volume  # noqa: E402
from simulator.bold import iter_volumes  # noqa: E402
from simulator.output import write_events  # noqa: E402
from simulator.scanner import make_plan  # noqa: E402


def pipeline_for(shape: list[int], n_volumes: int, workdir: Path):
    """The whole pipeline of benchmarks/latency.py for ``shape``, and its volumes."""
    cfg = make_config(workdir)
    cfg = config_from_dict(merge(to_dict(cfg), {"simulator": {
        "shape": shape, "n_volumes": n_volumes, "speed": 0.0,
        "voxel_size_mm": [192.0 / shape[0], 192.0 / shape[1], 108.0 / shape[2]]}}))
    plan = make_plan(cfg.simulator)
    events = workdir / "events.tsv"
    write_events(plan.events, events)
    target = {"center_ras_mm": plan.phantom.activation_center_ras.tolist(), "radius_mm": 6.0}
    cfg = config_from_dict(merge(to_dict(cfg), {"glm": {"events": str(events),
                                                        "roi": target}}))
    info = SeriesInfo("s", cfg.simulator.tr_s, n_volumes, 1, "bench", "mosaic")
    volumes = [Volume(np.asfortranarray(v.quantised, dtype=np.float32), plan.grid.affine(),
                      v.index, info, None, 0.0, 0.0) for v in iter_volumes(plan)]
    stages, _ = build_stages(cfg, info)
    return stages, volumes


class CpuTimed:
    """A stage wrapper recording the thread CPU time of each update, ms."""

    def __init__(self, stage) -> None:
        self.stage = stage
        self.times: list[float] = []

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def update(self, volume, upstream=None):
        t0 = time.thread_time()
        try:
            result = self.stage.update(volume, upstream)
        finally:
            self.times.append((time.thread_time() - t0) * 1000.0)
        later = getattr(result, "after_publish", None)
        if later is not None:  # the work left for after the message counts here too
            entry = len(self.times) - 1

            def timed_later():
                t1 = time.thread_time()
                try:
                    later()
                finally:
                    self.times[entry] += (time.thread_time() - t1) * 1000.0
            result.after_publish = timed_later
        return result


def run(shape: list[int], n_volumes: int, warmup: int, profile: Path | None,
        threads: int = 1, first: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stages, volumes = pipeline_for(shape, n_volumes, Path(tmp))
        # as the service's worker does (pipeline.threads, default 1)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        for warm_up in (warm_up_motion, warm_up_dvars, warm_up_glm, warm_up_qc, warm_up_slices):
            warm_up()  # as rtsc.service.run does before the first series
        timed = [CpuTimed(s) for s in stages]
        pipeline = SeriesPipeline(timed)  # type: ignore[arg-type]
        totals: list[float] = []
        feedback: list[float] = []
        message: list[float] = []  # CPU up to the volume message (before run_later)
        profiler = cProfile.Profile() if profile else None
        for i, volume in enumerate(volumes):
            t0 = time.thread_time()
            marks: list[float] = []
            if profiler is not None and i == (0 if first else warmup):
                profiler.enable()
            pipeline.process(volume, on_feedback=lambda _m: marks.append(time.thread_time()))
            message.append((time.thread_time() - t0) * 1000.0)
            if hasattr(pipeline, "run_later"):  # as the service does once it has published
                pipeline.run_later()
            totals.append((time.thread_time() - t0) * 1000.0)
            feedback.append((marks[0] - t0) * 1000.0 if marks else float("nan"))
            if profiler is not None and first and i == 0:
                profiler.disable()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    n = len(volumes) - warmup
    print(f"{'x'.join(map(str, shape))}: first volume, CPU ms: " + ", ".join(
        f"{t.stage.name} {t.times[0]:.1f}" for t in timed) + f"; process {totals[0]:.1f}")
    print(f"{'x'.join(map(str, shape))}: CPU ms per volume over {n} volumes (median / p95)")
    for t in timed:
        x = np.asarray(t.times[warmup:])
        print(f"  {t.stage.name:>10} {np.median(x):7.3f} {np.percentile(x, 95):7.3f}")
    print(f"  {'sum':>10} {sum(np.median(t.times[warmup:]) for t in timed):7.3f}")
    print(f"  {'feedback':>10} {np.median(feedback[warmup:]):7.3f} "
          f"{np.percentile(feedback[warmup:], 95):7.3f}")
    print(f"  {'message':>10} {np.median(message[warmup:]):7.3f} "
          f"{np.percentile(message[warmup:], 95):7.3f}")
    print(f"  {'process':>10} {np.median(totals[warmup:]):7.3f} "
          f"{np.percentile(totals[warmup:], 95):7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, action="append")
    parser.add_argument("--volumes", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="numba threads (pipeline.threads)")
    parser.add_argument("--profile-first", action="store_true",
                        help="profile the first volume (set-up of every stage) instead")
    args = parser.parse_args()
    for shape in args.shape or [[64, 64, 36], [128, 128, 72]]:
        run(shape, args.volumes, args.warmup,
            None if args.profile is None else args.profile.with_suffix(
                f".{'x'.join(map(str, shape))}.prof"), args.threads, args.profile_first)


if __name__ == "__main__":
    main()
