"""Intake benchmark: volumes per second from the first byte sent to the assembled volume.

For each format (Siemens mosaic, enhanced MR multi-frame, single slices) the simulator
writes a series to disk first; then a separate process sends the files flat out over
C-STORE (the simulator's SCU, one association) to rtsc's real receiver, whose queue is
drained by an assembler thread (archive written and fsynced, dataset decoded, volume
assembled: everything before the pipeline). Throughput = volumes / (last volume
assembled - the sender's first byte). Each case runs ``--repeats`` times; medians.

Usage: python benchmarks/intake.py [--volumes 20] [--shape 128 128 72] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc.config import AssemblerConfig, ReceiverConfig, config_from_dict, merge, to_dict  # noqa: E402
from rtsc.dicom.assemble import Assembler  # noqa: E402
from rtsc.intake.receiver import Receiver  # noqa: E402
from rtsc.output.session import SessionStore  # noqa: E402
from rtsc.volume import Volume  # noqa: E402
from simulator.scanner import run_simulation  # noqa: E402

SENDER = """
import sys, time
from pathlib import Path
from simulator.sender import send_files
port, files = int(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
print(repr(time.time()), flush=True)
report = send_files(files, "127.0.0.1", port, speed=0.0)
sys.exit(1 if report.n_failed else 0)
"""


def _drain(q: "queue.Queue", assembler: Assembler, n: int, done: list[float],
           stop: threading.Event) -> None:
    while len(done) < n and not stop.is_set():
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            continue
        for event in assembler.add(item):
            if isinstance(event, Volume):
                done.append(time.time())
        # As the service's worker does (ArchiveHandshake): the receiver archives once the
        # worker is done with the dataset; left unset, every file waited archive_wait_ms.
        if getattr(item, "processed", None) is not None:
            item.processed.set()


def simulate(fmt: str, shape: list[int], n: int, workdir: Path):
    """The series on disk (written before timing, so generating does not compete)."""
    cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": fmt, "shape": shape, "n_volumes": n, "speed": 0.0}})).simulator
    return run_simulation(cfg, out_dir=workdir / f"scan-{fmt}")


def run_case(fmt: str, sim, n: int, workdir: Path) -> dict:
    q: queue.Queue = queue.Queue()
    store = SessionStore(workdir / f"sessions-{fmt}-{time.time_ns()}")
    receiver = Receiver(ReceiverConfig(port=0), store, q)
    receiver.start()
    done: list[float] = []
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(q, Assembler(AssemblerConfig()), n, done, stop))
    drain.start()
    try:
        root = str(Path(__file__).resolve().parents[1])
        proc = subprocess.run([sys.executable, "-c", SENDER, str(receiver.port),
                               *map(str, sim.files)], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ, PYTHONPATH=root))
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        t_first = float(proc.stdout.splitlines()[0])
        drain.join(timeout=60)
    finally:
        stop.set()
        drain.join()
        receiver.close()
    if len(done) != n:
        raise RuntimeError(f"{fmt}: {len(done)} of {n} volumes assembled")
    seconds = done[-1] - t_first
    return {"files": len(sim.files), "seconds": seconds, "volumes_per_s": n / seconds,
            "ms_per_file": 1000 * seconds / len(sim.files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 72])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["mosaic", "multiframe", "slices"])
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"intake: {args.volumes} volumes {'x'.join(map(str, args.shape))}, first byte -> "
          f"assembled, {args.repeats} runs, medians; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}")
    print(f"{'format':<11} {'files':>6} {'volumes/s':>10} {'s total':>8} {'ms/file':>8}")
    with tempfile.TemporaryDirectory(prefix="rtsc-intake-") as tmp:
        for fmt in args.formats:
            sim = simulate(fmt, args.shape, args.volumes, Path(tmp))
            runs = [run_case(fmt, sim, args.volumes, Path(tmp) / str(r))
                    for r in range(args.repeats)]
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            print(f"{fmt:<11} {runs[0]['files']:>6} {med['volumes_per_s']:>10.1f} "
                  f"{med['seconds']:>8.2f} {med['ms_per_file']:>8.2f}")


if __name__ == "__main__":
    main()
