"""Decode benchmark: the pipeline worker's CPU from a received dataset to the assembled
volume, no network.

The simulator writes each series (single slices, Siemens mosaics, enhanced MR
multi-frame; 128x128x72 by default) before timing. Each file is split as the receiver
hands it on (Part 10 header, encoded dataset) and fed to an :class:`Assembler` as an
:class:`Incoming` (``raw`` + ``header``), in a fresh process per code tree (``--tree``;
the first is this one), trees interleaved, ``--repeats`` times; the garbage collector is
frozen after the warm-up as the service does at start.

Columns: ``CPU ms/file`` = the worker thread's CPU time (``time.thread_time``) for the
whole series / files (includes the first volumes, whose headers the vendor rules read);
``steady`` = median per file over the files after the first third (the series known).

Usage: python benchmarks/decode.py [--tree /tmp/before] [--repeats 5] [--volumes 10]
       [--shape 128 128 72] [--formats slices mosaic multiframe]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from trees import (load_average, median, named_trees, print_trees, run_child,  # noqa: E402
                   simulate)


def child(root: str, files: list[str], passes: int) -> dict:
    """Run in a process whose ``rtsc`` is imported from ``root``."""
    sys.path.insert(0, root)
    import gc

    from rtsc.config import AssemblerConfig
    from rtsc.dicom._csa_kernels import warm_up as warm_up_csa
    from rtsc.dicom.unmosaic import warm_up as warm_up_mosaic
    from rtsc.dicom.assemble import Assembler
    from rtsc.dicom.incoming import Incoming
    from rtsc.volume import Volume

    warm_up_mosaic()
    warm_up_csa()
    items = []
    for name in files:
        data = Path(name).read_bytes()
        end = 144 + struct.unpack("<I", data[140:144])[0]  # after the file meta group
        items.append((data[:end], data[end:], Path(name)))

    def run() -> tuple[float, list[float], int]:
        assembler = Assembler(AssemblerConfig())
        per_file, n_volumes = [], 0
        for header, raw, path in items:
            item = Incoming(None, path, time.time(), "cstore", raw=raw, header=header)
            t0 = time.thread_time()
            events = assembler.add(item)
            per_file.append(time.thread_time() - t0)
            n_volumes += sum(isinstance(e, Volume) for e in events)
        return sum(per_file), per_file, n_volumes

    run()  # warm-up: imports, caches
    gc.collect()
    gc.freeze()
    totals, steady = [], []
    for _ in range(passes):
        total, per_file, n_volumes = run()
        totals.append(total)
        steady.extend(per_file[len(per_file) // 3:])
    return {"cpu_ms_per_file": 1000 * median(totals) / len(items),
            "steady_ms": 1000 * median(steady), "volumes": n_volumes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=5, help="processes per tree")
    parser.add_argument("--passes", type=int, default=3, help="series passes per process")
    parser.add_argument("--volumes", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 72])
    parser.add_argument("--formats", nargs="+", default=["slices", "mosaic", "multiframe"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(child(spec["root"], spec["files"], spec["passes"])))
        return
    trees, names = named_trees(args.tree)
    print(f"decode: {'x'.join(map(str, args.shape))}, Incoming(raw, header) -> "
          f"Assembler.add; {args.repeats} processes x {args.passes} passes per tree, "
          f"interleaved, medians; load average {load_average()}")
    print_trees(names, trees)
    print(f"{'format':<11} {'tree':<8} {'files':>6} {'CPU ms/file':>12} {'steady ms':>10} "
          f"{'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="rtsc-decode-bench-") as tmp:
        for fmt in args.formats:
            files = simulate(fmt, args.shape, args.volumes, Path(tmp))
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for _ in range(args.repeats):
                for name, tree in zip(names, trees):
                    runs[name].append(run_child(__file__, tree, {"files": files,
                                                                  "passes": args.passes}))
            meds = {name: {k: median([r[k] for r in rs]) for k in rs[0]}
                    for name, rs in runs.items()}
            for name in names:
                med = meds[name]
                ratio = med["cpu_ms_per_file"] / meds[names[-1]]["cpu_ms_per_file"]
                print(f"{fmt:<11} {name:<8} {len(files):>6} {med['cpu_ms_per_file']:>12.3f} "
                      f"{med['steady_ms']:>10.3f} {ratio:>7.2f}", flush=True)
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "load average", load_average())


if __name__ == "__main__":
    main()
