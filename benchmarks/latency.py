"""Latency benchmark: last byte received -> `volume` message published, per volume.

The whole pipeline runs: motion correction, DVARS, global signal, the QC stages, the
GLM on the simulated paradigm and an ROI whose percent signal change is the `feedback`
value (``--no-qc`` leaves the QC stages out, ``--no-glm`` leaves the last two out; ``--spine`` runs only the spine issue's simple
stages, the volume mean and global signal, as that issue's target is stated for them;
``--spine-dvars`` adds DVARS, the first stage of the motion issue).

For each matrix size the simulator writes a series to disk first (so generating data
does not compete with rtsc), then a separate process sends it over C-STORE at a fixed
interval to an in-process `rtsc run` service; a subscriber collects the `volume`
messages. Printed: median, p95, p99 and maximum of the latency (publish - received),
the medians of its parts (received -> assembled, assembled -> published), the median
and p99 latency of the `feedback` message (published once the ROI stage has run, before
the observer stages), in ms, and each stage's median time (``stage_ms``).

``--load`` runs a second process spinning on one core for the whole benchmark (what
another job on the scanner's console does to a 2-core machine): the pipeline must keep
its latency with one core left to it.

Usage: python benchmarks/latency.py [--volumes 40] [--interval 0.25] [--format mosaic]
                                    [--load] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import Collector, make_config  # noqa: E402
from rtsc.config import merge, config_from_dict, to_dict  # noqa: E402
import rtsc.service.series as service_module  # noqa: E402
from rtsc.pipeline.series import build_stages  # noqa: E402
from rtsc.pipeline.stages import SignalStage  # noqa: E402
from rtsc.service.run import RunService  # noqa: E402
from simulator.output import write_events  # noqa: E402
from simulator.scanner import make_plan, run_simulation  # noqa: E402

#: The load generator: one process, one core, busy until killed.
SPINNER = "while True: pass"

SENDER = """
import sys, time
from pathlib import Path
from simulator.sender import send_files
port, interval, files = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
report = send_files([Path(f) for f in files], "127.0.0.1", port, tr_s=interval, speed=1.0)
sys.exit(1 if report.n_failed else 0)
"""


def send_and_collect(cfg, files, interval: float) -> Collector:
    """Start an in-process `rtsc run` service on ``cfg``, send ``files`` from another
    process over C-STORE every ``interval`` seconds, and return the subscriber's
    messages once the series has ended."""
    service = RunService(cfg)
    service.start()
    collector = Collector(service.publisher.endpoint)
    time.sleep(0.3)
    try:
        subprocess.run([sys.executable, "-c", SENDER, str(service.receiver.port), str(interval),
                        *map(str, files)], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        if not collector.ended.wait(60):
            raise RuntimeError("series did not end")
    finally:
        collector.close()
        service.stop()
    return collector


def latency_summary(volumes: list[dict]) -> dict:
    """Medians (ms) of a run's ``volume`` headers: latency (and p95), received ->
    assembled, assembled -> published, and each stage's time."""
    latency = np.array([h["latency_s"] for h in volumes]) * 1000
    assemble = np.array([h["t_assembled"] - h["t_received"] for h in volumes]) * 1000
    publish = np.array([h["t_published"] - h["t_assembled"] for h in volumes]) * 1000
    stages = sorted({name for h in volumes for name in h.get("stage_ms", {})})
    stage_ms = {name: float(np.median([h["stage_ms"][name] for h in volumes
                                       if name in h.get("stage_ms", {})])) for name in stages}
    return {"n": len(volumes), "median": float(np.median(latency)),
            "p95": float(np.percentile(latency, 95)), "p99": float(np.percentile(latency, 99)),
            "max": float(latency.max()), "assemble": float(np.median(assemble)),
            "pipeline": float(np.median(publish)), "stage_ms": stage_ms}


def _cached_series(folder: Path) -> list[Path] | None:
    """The files of a series simulated earlier into ``folder`` (``--cache``), or None."""
    listing = folder / "files.txt"
    if not listing.exists():
        return None
    return [Path(line) for line in listing.read_text().splitlines()]


def spine_stages(config, info, *_args, **_kwargs):
    """The spine issue's simple stages only (mean and global signal), no set-up alerts."""
    return [SignalStage(config.pipeline.mask_fraction)], []


def run_case(shape: list[int], n_volumes: int, interval: float, fmt: str, workdir: Path,
             glm: bool = True, motion: bool = True, only_spine: bool = False,
             qc: bool = True, cache: Path | None = None, dump: Path | None = None) -> dict:
    cfg = make_config(workdir, motion={"enabled": motion}, qc={"enabled": qc})
    sim_cfg = config_from_dict(merge(to_dict(cfg), {"simulator": {
        "shape": shape, "n_volumes": n_volumes, "format": fmt, "speed": 0.0,
        "voxel_size_mm": [192.0 / shape[0], 192.0 / shape[1], 108.0 / shape[2]]}})).simulator
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"scan-{'x'.join(map(str, shape))}"
    files = _cached_series(cache / f"{name}-{n_volumes}-{fmt}") if cache else None
    if files is None:
        out_dir = cache / f"{name}-{n_volumes}-{fmt}" if cache else workdir / name
        files = run_simulation(sim_cfg, out_dir=out_dir).files
        if cache:
            (out_dir / "files.txt").write_text("\n".join(map(str, files)))
    if glm:  # the whole pipeline, as in `rtsc demo`: GLM on the simulated paradigm and
        # neurofeedback from a 6 mm sphere on the phantom's activation
        plan = make_plan(sim_cfg)
        events = workdir / "events.tsv"
        write_events(plan.events, events)
        target = {"center_ras_mm": plan.phantom.activation_center_ras.tolist(), "radius_mm": 6.0}
        cfg = config_from_dict(merge(to_dict(cfg), {"glm": {"events": str(events),
                                                            "roi": target}}))
    # build_stages is called at each series' first volume: patched for the whole case
    service_module.build_stages = spine_stages if only_spine else build_stages
    try:
        collector = send_and_collect(cfg, files, interval)
    finally:
        service_module.build_stages = build_stages
    volumes = [m.header for m in collector.topic("volume")]
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.json").write_text(json.dumps(
            {"volume": volumes, "feedback": [m.header for m in collector.topic("feedback")]}))
    if glm and not all(h["feedback"] is not None for h in volumes[1:]):
        raise RuntimeError("a volume came without its feedback value")
    # Skip the first volume: it pays one-off costs (mask, output files).
    volumes = volumes[1:]
    early = [m.header["latency_s"] for m in collector.topic("feedback")][1:]
    summary = latency_summary(volumes)
    return {"shape": "x".join(map(str, shape)), "n": summary["n"],
            "stage_ms": summary["stage_ms"],
            "feedback_median": np.median(early) * 1000 if early else float("nan"),
            "feedback_p99": np.percentile(early, 99) * 1000 if early else float("nan"),
            "median": summary["median"], "p95": summary["p95"], "p99": summary["p99"],
            "max": summary["max"],
            "assemble_median": summary["assemble"], "pipeline_median": summary["pipeline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between volumes")
    parser.add_argument("--format", default="mosaic", choices=("mosaic", "slices"))
    parser.add_argument("--no-glm", action="store_true", help="leave the GLM and ROI stages out")
    parser.add_argument("--spine", action="store_true",
                        help="the spine issue's simple stages only: mean and global signal")
    parser.add_argument("--spine-dvars", action="store_true",
                        help="the spine's stages and DVARS: no motion, GLM, ROI or QC")
    parser.add_argument("--no-qc", action="store_true",
                        help="leave the QC stages (timing, spikes, qc) out")
    parser.add_argument("--load", action="store_true",
                        help="a second process keeps one core busy throughout")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the simulated series here and reuse them (before/after runs "
                             "send the same files without simulating again)")
    parser.add_argument("--dump", type=Path, default=None,
                        help="write each case's volume and feedback headers here (JSON)")
    parser.add_argument("--shape", type=int, nargs=3, action="append",
                        help="matrix (repeatable; default 64 64 36 and 128 128 72)")
    args = parser.parse_args()
    rows = []
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER]) if args.load else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in args.shape or ([64, 64, 36], [128, 128, 72]):
                rows.append(run_case(shape, args.volumes, args.interval, args.format,
                                     Path(tmp) / "x".join(map(str, shape)),
                                     glm=not (args.no_glm or args.spine or args.spine_dvars),
                                     motion=not (args.spine or args.spine_dvars),
                                     only_spine=args.spine,
                                     qc=not (args.no_qc or args.spine or args.spine_dvars),
                                     cache=args.cache, dump=args.dump))
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    print(f"\nLatency, last byte received -> volume message published ({args.format}, "
          f"{args.volumes} volumes every {args.interval} s; first volume excluded"
          f"{'; one core kept busy by another process' if args.load else ''}), ms")
    print(f"{'matrix':>12} {'n':>4} {'median':>8} {'p95':>8} {'p99':>8} {'max':>8} "
          f"{'recv->asm':>10} {'asm->pub':>9} {'feedback':>9} {'fb p99':>8}")
    for r in rows:
        print(f"{r['shape']:>12} {r['n']:>4} {r['median']:8.2f} {r['p95']:8.2f} "
              f"{r['p99']:8.2f} {r['max']:8.2f} "
              f"{r['assemble_median']:10.2f} {r['pipeline_median']:9.2f} "
              f"{r['feedback_median']:9.2f} {r['feedback_p99']:8.2f}   stages: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_ms"].items()))


if __name__ == "__main__":
    main()
