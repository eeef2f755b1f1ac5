"""Where the soak's memory goes: `rtsc run`'s service fed in process, no network.

A :class:`rtsc.service.run.RunService` (receiver off, publisher bound to loopback,
report off, the soak's config otherwise) gets ``--volumes`` simulated volumes of
``--shape`` on its queue, ``--senders`` series interleaved (as two senders make them),
as :class:`rtsc.volume.Volume` items (what ``rtsc replay`` puts; the assembler and
archive are left out: they keep nothing per volume). The volumes are put one at a
time, each after the previous one was published (no queue in the curve).

Printed every ``--every`` volumes: VmRSS (MB), glibc's heap figures (mallinfo2:
``arena`` bytes from brk/arena heaps, ``hblkhd`` mmapped chunks, ``uordblks`` in use,
``fordblks`` free inside the heaps: fragmentation), and with ``--trace`` the top
allocation sites grown between volume ``--trace-from`` and the end (tracemalloc,
which numpy reports its buffers to).

Usage: python benchmarks/soak_inprocess.py [--volumes 1000] [--shape 128 128 72]
                                           [--senders 2] [--trace]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rtsc.config import config_from_dict  # noqa: E402
from rtsc.service.run import RunService  # noqa: E402
from rtsc.volume import SeriesInfo, Volume  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict[str, float]:
    """glibc's mallinfo2 (all arenas), MB; empty where glibc has none."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {k: getattr(info, k) / 2**20 for k in ("arena", "hblkhd", "uordblks", "fordblks")}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _row(n: int, trace: bool) -> tuple[int, float]:
    rss = rss_mb()
    m = mallinfo()
    traced = tracemalloc.get_traced_memory()[0] / 2**20 if trace else 0
    print(f"{n:>7} {rss:>8.1f} {m.get('arena', 0):>7.1f} {m.get('hblkhd', 0):>8.1f} "
          f"{m.get('uordblks', 0):>7.1f} {m.get('fordblks', 0):>6.1f} {traced:>7.1f}", flush=True)
    return n, rss


def _top(snap_from, snap_to, since: int) -> None:
    print("top allocation sites grown since volume", since)
    for stat in snap_to.compare_to(snap_from, "traceback")[:15]:
        print(f"  {stat.size_diff / 2**20:+8.2f} MB  {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format()[-8:]:
            print("      " + line)


def network(args) -> int:
    """The service with its receiver, fed by benchmarks/soak.py's sender processes."""
    import multiprocessing as mp
    import socket

    import soak  # benchmarks/soak.py

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    per = args.volumes // args.senders
    work = Path(tempfile.mkdtemp(prefix="rtsc-soak-inproc-"))
    config = config_from_dict({
        "receiver": {"port": port},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"},
        "session": {"dir": str(work / "sessions"), "report": False, "series_timeout_s": 600.0}})
    service = RunService(config)
    count = [0]
    original = service.series._on_published

    def on_published() -> None:
        original()
        count[0] += 1

    service.series._on_published = on_published
    service.start()
    print(f"in-process soak over the network: {args.senders} x {per} volumes of "
          f"{args.shape}, every {args.interval} s; RSS idle {rss_mb():.0f} MB")
    print(f"{'volume':>7} {'RSS MB':>8} {'arena':>7} {'mmapped':>8} {'in use':>7} "
          f"{'free':>6} {'traced':>7}")
    if args.trace:
        tracemalloc.start(12)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    senders = [ctx.Process(target=soak._sender, args=(port, per, args.shape, args.distinct,
                                                       i + 1, results, args.interval))
               for i in range(args.senders)]
    for p in senders:
        p.start()
    total = per * args.senders
    rows: list[tuple[int, float]] = []
    snap_from = None
    next_row = args.every
    while count[0] < total - 1:
        time.sleep(0.2)
        if args.trace and snap_from is None and count[0] >= args.trace_from:
            snap_from = tracemalloc.take_snapshot()
            since = count[0]
        if count[0] >= next_row:
            rows.append(_row(count[0], args.trace))
            next_row += args.every
    rows.append(_row(count[0], args.trace))
    if args.trace and snap_from is not None:
        _top(snap_from, tracemalloc.take_snapshot(), since)
    for p in senders:
        p.join()
    after = [(k, r) for k, r in rows if k >= 100]
    print(f"RSS at volume {after[0][0]}: {after[0][1]:.0f} MB, at {after[-1][0]}: "
          f"{after[-1][1]:.0f} MB, max after 100: {max(r for _, r in after):.0f} MB")
    service.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 72])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--trace-from", type=int, default=100)
    parser.add_argument("--network", action="store_true",
                        help="receiver on: sender processes send DICOM mosaics over "
                             "loopback (benchmarks/soak.py's), every --interval s")
    parser.add_argument("--interval", type=float, default=0.25)
    args = parser.parse_args()
    if args.network:
        return network(args)
    per = args.volumes // args.senders

    from simulator.bold import iter_volumes
    from simulator.scanner import make_plan
    sim = config_from_dict({"simulator": {"shape": args.shape,
                                          "n_volumes": args.distinct}}).simulator
    plan = make_plan(sim)
    base = [np.asfortranarray(v.quantised, dtype=np.float32) for v in iter_volumes(plan)]
    affine = plan.grid.affine()

    work = Path(tempfile.mkdtemp(prefix="rtsc-soak-inproc-"))
    config = config_from_dict({
        "receiver": {"enabled": False},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"},
        "session": {"dir": str(work / "sessions"), "report": False, "series_timeout_s": 600.0}})
    published = threading.Semaphore(0)
    service = RunService(config)
    original = service.series._on_published

    def on_published() -> None:
        original()
        published.release()

    service.series._on_published = on_published
    service.start()
    infos = [SeriesInfo(f"series{s}", sim.tr_s, per, s + 1, "soak", "mosaic")
             for s in range(args.senders)]
    print(f"in-process soak: {args.senders} x {per} volumes of {args.shape}; RSS idle "
          f"{rss_mb():.0f} MB")
    print(f"{'volume':>7} {'RSS MB':>8} {'arena':>7} {'mmapped':>8} {'in use':>7} "
          f"{'free':>6} {'traced':>7}")
    rows: list[tuple[int, float]] = []
    snap_from = None
    if args.trace:
        tracemalloc.start(12)
    t0 = time.time()
    n = 0
    for t in range(per):
        for s, info in enumerate(infos):
            data = base[(t + s) % len(base)].copy(order="F")
            now = time.time()
            service.queue.put(Volume(data, affine, t, info, now, now, now))
            published.acquire()
            n += 1
            if args.trace and n == args.trace_from:
                gc.collect()
                snap_from = tracemalloc.take_snapshot()
            if n % args.every == 0 or n == args.senders * per - 1:
                rss = rss_mb()
                rows.append((n, rss))
                m = mallinfo()
                traced = tracemalloc.get_traced_memory()[0] / 2**20 if args.trace else 0
                print(f"{n:>7} {rss:>8.1f} {m.get('arena', 0):>7.1f} {m.get('hblkhd', 0):>8.1f} "
                      f"{m.get('uordblks', 0):>7.1f} {m.get('fordblks', 0):>6.1f} "
                      f"{traced:>7.1f}", flush=True)
            if args.trace and n == args.senders * per - 1:
                gc.collect()
                snap_to = tracemalloc.take_snapshot()
                print("top allocation sites grown since volume", args.trace_from)
                for stat in snap_to.compare_to(snap_from, "traceback")[:15]:
                    print(f"  {stat.size_diff / 2**20:+8.2f} MB  {stat.count_diff:+7d} blocks")
                    for line in stat.traceback.format()[-8:]:
                        print("      " + line)
    after = [(k, r) for k, r in rows if k >= 100]
    slope = np.polyfit(*zip(*after), 1)[0] if len(after) > 2 else float("nan")
    print(f"{time.time() - t0:.0f} s; RSS at volume {after[0][0]}: {after[0][1]:.0f} MB, "
          f"at {after[-1][0]}: {after[-1][1]:.0f} MB, max after 100: "
          f"{max(r for _, r in after):.0f} MB; slope {slope:.4f} MB/volume")
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
