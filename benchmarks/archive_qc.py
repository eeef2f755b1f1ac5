"""archive-qc benchmark: 8 simulated series processed by `rtsc archive-qc` with 1 local
worker process, then with 2, side by side in one run. Issue 20's target: 2 workers at
least 1.7x faster than 1.

The series (DICOM mosaics, ``--shape``, ``--volumes`` each, different seeds) are written
first; each configuration then processes the whole archive into its own output folder
(nothing skipped). Printed per configuration: wall time of `archive_qc` (cluster start
included) and of the jobs alone (first job submitted -> last result), and the speedup.

The series are simulated once; ``--rounds`` then alternate 1 and 2 workers. Also
printed: the CPU time of this process (Dask's scheduler and client) during each call.

Usage: python benchmarks/archive_qc.py [--series 8] [--volumes 150] [--shape 64 64 36]
       [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--volumes", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archive", type=Path, default=None,
                        help="simulate the series into this folder, or reuse them there")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 36])
    args = parser.parse_args()

    from conftest import make_config
    from rtsc.archive.run import archive_qc
    from rtsc.config import config_from_dict, merge, to_dict
    from simulator.scanner import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = make_config(work, session={"report": False})
        archive = args.archive or work / "archive"
        for seed in range(args.series):
            if (archive / f"s{seed}").is_dir():
                continue  # kept from an earlier run with --archive
            sim = config_from_dict(merge(to_dict(base), {"simulator": {
                "shape": args.shape, "n_volumes": args.volumes, "seed": seed}})).simulator
            run_simulation(sim, out_dir=archive / f"s{seed}", series_number=seed + 1)
        speedups = []
        for round_ in range(1, args.rounds + 1):
            walls = {}
            for workers in (1, 2):
                out = work / f"out{round_}-{workers}"
                t0, cpu0 = time.perf_counter(), time.process_time()
                results = archive_qc([archive], base, out, workers=workers,
                                     progress=None)
                walls[workers] = time.perf_counter() - t0
                here = time.process_time() - cpu0
                jobs = sum(r.seconds for r in results)
                cpu = sum(r.cpu_seconds for r in results)
                assert all(r.status == "done" for r in results), [r.error for r in results]
                print(f"round {round_}, {workers} worker(s): {len(results)} series of "
                      f"{args.volumes} volumes {'x'.join(map(str, args.shape))} in "
                      f"{walls[workers]:.1f} s (sum of job times {jobs:.1f} s, of their CPU "
                      f"times {cpu:.1f} s; this process's CPU {here:.1f} s)", flush=True)
            speedups.append(walls[1] / walls[2])
            print(f"round {round_}: speedup 2 vs 1 worker {speedups[-1]:.2f}x", flush=True)
        print(f"speedup 2 vs 1 worker, median of {args.rounds} rounds: "
              f"{sorted(speedups)[len(speedups) // 2]:.2f}x (target >= 1.7)")


if __name__ == "__main__":
    main()
