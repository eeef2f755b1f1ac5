"""Receive-side CPU and wall time per file alone: dcmtk's storescu (default options) ->
rtsc's Receiver (``archive_wait_ms`` 0, every file fsynced before its success) -> a queue
drained without processing (no decode, no assembly), so that what is left is the
receiver's threads.

For each code tree (``--tree``, repeatable; the first is this one) and format, a fresh
process per run; trees interleaved; the files of benchmarks/intake.py's simulator
(128x128x72), each mosaic and multi-frame file sent ``--repeat`` times (new archive
files, the same bytes). Columns: ``recv CPU ms/file`` = the process's CPU time from
storescu's start to its exit / files (the draining thread does nothing but ``get``);
``wall ms/file`` = that span / files.

Usage: python benchmarks/intake_receive.py --tree /path/to/before [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trees import HERE, load_average, revision, run_child, simulate  # noqa: E402


def child(root: str, files: list[str]) -> dict:
    sys.path.insert(0, root)
    from rtsc.config import ReceiverConfig
    from rtsc.intake.receiver import Receiver
    from rtsc.output.session import SessionStore

    q: queue.Queue = queue.Queue()

    def drain() -> None:
        while (item := q.get()) is not None:
            if getattr(item, "processed", None) is not None:
                item.processed.set()

    with tempfile.TemporaryDirectory(prefix="rtsc-recv-", dir=os.environ.get("TMPDIR")) \
            as tmp:
        rec = Receiver(ReceiverConfig(port=0, archive_wait_ms=0.0), SessionStore(Path(tmp)), q)
        rec.start()
        worker = threading.Thread(target=drain, daemon=True)
        worker.start()
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        try:
            cpu0, t0 = time.process_time(), time.time()
            proc = subprocess.run(["storescu", "-aec", "RTSC", "127.0.0.1", str(rec.port),
                                   *files], env=env, capture_output=True, timeout=900)
            cpu1, t1 = time.process_time(), time.time()
        finally:
            q.put(None)
            worker.join(timeout=10)
            rec.close()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
    n = len(files)
    return {"recv_cpu_ms_per_file": 1000 * (cpu1 - cpu0) / n,
            "wall_ms_per_file": 1000 * (t1 - t0) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(child(spec["root"], spec["files"])))
        return
    trees = [str(HERE), *args.tree]
    revs = {tree: revision(tree).split(" ", 1)[0] for tree in trees}
    print(f"receive only, storescu -> receiver -> queue; load average {load_average()}")
    for tree in trees:
        print(f"  {revs[tree]}  {tree}")
    print(f"{'format':<11} {'tree':<9} {'files':>6} {'recv CPU ms/file (runs)':>34} "
          f"{'wall ms/file (runs)':>30}")
    with tempfile.TemporaryDirectory(prefix="rtsc-recv-bench-") as tmp:
        for fmt, n in (("slices", 14), ("mosaic", 20), ("multiframe", 20)):
            files = simulate(fmt, [128, 128, 72], n, Path(tmp))
            if fmt != "slices":
                files = files * args.repeat
            results: dict[str, list[dict]] = {t: [] for t in trees}
            for _ in range(args.runs):
                for tree in trees:
                    results[tree].append(run_child(__file__, tree, {"files": files}))
            for tree in trees:
                rev = revs[tree]
                cpu = sorted(r["recv_cpu_ms_per_file"] for r in results[tree])
                wall = sorted(r["wall_ms_per_file"] for r in results[tree])
                print(f"{fmt:<11} {rev:<9} {len(files):>6} "
                      f"{' '.join(f'{c:.2f}' for c in cpu):>34} "
                      f"{' '.join(f'{w:.2f}' for w in wall):>30}", flush=True)
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "load average", load_average())


if __name__ == "__main__":
    main()
