"""Intake benchmark: dcmtk's storescu (default options) -> rtsc's receiver -> assembled
volumes, beside dcmtk's storescp taking the same files.

The simulator writes each series to disk first (128x128x72 by default): single slices
(>= 1,000 files), Siemens mosaics and enhanced MR multi-frame files. For each code tree
given (``--tree``; the first is this one), a separate process runs rtsc's real receiver
on a free port, its queue drained by an assembler thread as the service's worker does
(archive written and fsynced before each C-STORE success, dataset decoded, volume
assembled, the archive hand-shake released), after the service's numba warm-up; then
``storescu`` sends the series flat out over one association. dcmtk's ``storescp``
(started here into a temporary folder; it does not fsync) takes the single slices too,
the anchor. Each case runs ``--repeats`` times, trees and anchor interleaved; medians.

Columns: ``files/s`` = files / (storescu's start -> its exit, i.e. the last C-STORE
answered); ``ms/file`` = (storescu's start -> last volume assembled) / files; ``CPU
ms/file`` = the rtsc process's CPU time (all threads) over the same span / files; ``recv
CPU`` = the same without the assembler thread's own CPU time (time.thread_time), i.e. the
receiver's threads (the main thread only waits for storescu).

Usage: python benchmarks/intake.py [--tree /tmp/before] [--repeats 3]
       [--slice-volumes 14] [--volumes 20] [--shape 128 128 72]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from trees import (load_average, median, named_trees, print_trees, run_child,  # noqa: E402
                   simulate)

STORESCU = "storescu"
STORESCP = "storescp"


def _storescu(port: int, files: list[str]) -> subprocess.Popen:
    """storescu with its default options (no TCP_NODELAY), one association."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return subprocess.Popen([STORESCU, "-aec", "RTSC", "127.0.0.1", str(port), *files],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def child(root: str, files: list[str], n_volumes: int) -> dict:
    """Run in a process whose ``rtsc`` is imported from ``root``: one timed case."""
    sys.path.insert(0, root)
    from rtsc.config import AssemblerConfig, ReceiverConfig
    from rtsc.dicom._csa_kernels import warm_up as warm_up_csa
    from rtsc.dicom.unmosaic import warm_up as warm_up_mosaic
    from rtsc.dicom.assemble import Assembler
    from rtsc.intake.receiver import Receiver
    from rtsc.output.session import SessionStore
    from rtsc.volume import Volume

    warm_up_mosaic()  # as the service does at start (rtsc.service.run)
    warm_up_csa()
    q: queue.Queue = queue.Queue()
    done: list[float] = []

    worker_cpu: list[float] = []

    def drain(assembler: Assembler) -> None:
        cpu_start = time.thread_time()
        try:
            _drain(assembler)
        finally:
            worker_cpu.append(time.thread_time() - cpu_start)

    def _drain(assembler: Assembler) -> None:
        while len(done) < n_volumes:
            item = q.get()
            for event in assembler.add(item):
                if isinstance(event, Volume):
                    done.append(time.time())
            # As the service's worker does (ArchiveHandshake): left unset, every file
            # would wait receiver.archive_wait_ms before its archive write.
            if getattr(item, "processed", None) is not None:
                item.processed.set()

    with tempfile.TemporaryDirectory(prefix="rtsc-intake-", dir=os.environ.get("TMPDIR")) \
            as tmp:
        receiver = Receiver(ReceiverConfig(port=0), SessionStore(Path(tmp)), q)
        receiver.start()
        worker = threading.Thread(target=drain, args=(Assembler(AssemblerConfig()),),
                                  daemon=True)
        worker.start()
        try:
            cpu0, t0 = time.process_time(), time.time()
            proc = _storescu(receiver.port, files)
            _out, err = proc.communicate(timeout=900)
            t_answered = time.time()
            if proc.returncode != 0:
                raise RuntimeError(err.decode(errors="replace")[-2000:])
            worker.join(timeout=120)
            cpu1 = time.process_time()
        finally:
            receiver.close()
    if len(done) != n_volumes:
        raise RuntimeError(f"{len(done)} of {n_volumes} volumes assembled")
    n = len(files)
    cpu = cpu1 - cpu0
    return {"files_per_s": n / (t_answered - t0), "ms_per_file": 1000 * (done[-1] - t0) / n,
            "cpu_ms_per_file": 1000 * cpu / n,
            # the receiver's threads: the process's CPU but the assembler thread's (the
            # main thread only waits for storescu)
            "recv_cpu_ms_per_file": 1000 * (cpu - worker_cpu[0]) / n}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_storescp(files: list[str], workdir: Path) -> dict:
    """dcmtk's storescp into a fresh folder, fed by the same storescu: the anchor."""
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=workdir))
    port = _free_port()
    scp = subprocess.Popen([STORESCP, "--output-directory", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("storescp did not start")
                time.sleep(0.05)
        t0 = time.time()
        proc = _storescu(port, files)
        _out, err = proc.communicate(timeout=1800)
        seconds = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(err.decode(errors="replace")[-2000:])
    finally:
        scp.terminate()
        scp.wait()
    n_stored = sum(1 for _ in out.iterdir())
    if n_stored != len(files):
        raise RuntimeError(f"storescp stored {n_stored} of {len(files)} files")
    return {"files_per_s": len(files) / seconds, "ms_per_file": 1000 * seconds / len(files),
            "cpu_ms_per_file": float("nan"), "recv_cpu_ms_per_file": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[],
                        help="another code tree to time beside this one (e.g. a git "
                             "worktree of the commit before)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice-volumes", type=int, default=14,
                        help="volumes of single slices (14 x 72 slices = 1,008 files)")
    parser.add_argument("--volumes", type=int, default=20, help="mosaic and multi-frame")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 72])
    parser.add_argument("--formats", nargs="+", default=["slices", "mosaic", "multiframe"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(child(spec["root"], spec["files"], spec["n_volumes"])))
        return
    trees, names = named_trees(args.tree)
    print(f"intake: {'x'.join(map(str, args.shape))}, storescu (default options) -> "
          f"receiver -> assembled; {args.repeats} runs interleaved, medians; load average "
          f"{load_average()}")
    print_trees(names, trees)
    print(f"{'format':<11} {'receiver':<16} {'files':>6} {'files/s':>8} {'ms/file':>8} "
          f"{'CPU ms/file':>12} {'recv CPU':>9}")
    with tempfile.TemporaryDirectory(prefix="rtsc-intake-bench-") as tmp:
        for fmt in args.formats:
            n = args.slice_volumes if fmt == "slices" else args.volumes
            files = simulate(fmt, args.shape, n, Path(tmp))
            runs: dict[str, list[dict]] = {name: [] for name in names}
            if fmt == "slices":
                runs["dcmtk storescp"] = []
            for _ in range(args.repeats):
                for name, tree in zip(names, trees):
                    runs[name].append(run_child(__file__, tree, {"files": files, "n_volumes": n}))
                if fmt == "slices":
                    runs["dcmtk storescp"].append(run_storescp(files, Path(tmp)))
            for name, results in runs.items():
                med = {k: median([r[k] for r in results]) for k in results[0]}
                for r in results:  # each run, for the spread under a shared machine's load
                    print(f"{'':<11}   {name:<14} run: {r['files_per_s']:.1f} files/s, "
                          f"{r['ms_per_file']:.2f} ms/file, CPU {r['cpu_ms_per_file']:.2f}",
                          flush=True)
                label = f"rtsc {name}" if name in names else name
                cpu = "" if med["cpu_ms_per_file"] != med["cpu_ms_per_file"] \
                    else f"{med['cpu_ms_per_file']:.2f}"
                recv = med.get("recv_cpu_ms_per_file", float("nan"))
                recv_cpu = "" if recv != recv else f"{recv:.2f}"
                print(f"{fmt:<11} {label:<16} {len(files):>6} {med['files_per_s']:>8.1f} "
                      f"{med['ms_per_file']:>8.2f} {cpu:>12} {recv_cpu:>9}", flush=True)
            if fmt == "slices":
                anchor = median([r["files_per_s"] for r in runs["dcmtk storescp"]])
                for name in names:
                    rate = median([r["files_per_s"] for r in runs[name]])
                    print(f"{'':<11} rtsc {name} / storescp = {rate / anchor:.2f}")
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "load average", load_average())


if __name__ == "__main__":
    main()
