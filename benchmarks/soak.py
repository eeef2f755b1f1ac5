"""Soak: many large volumes as fast as possible over concurrent associations.

A subprocess `rtsc run` (report off) receives ``--volumes`` volumes of ``--shape``
(default 1000 of 128x128x72, Siemens mosaics) from ``--senders`` sender processes, each
its own series over its own association, sending without pacing. Printed: volumes sent
and acknowledged, files archived, volumes in each bold.nii.gz, volume messages published,
peak resident memory of `rtsc run` (VmHWM from /proc) and the drain time (last
acknowledgement -> last volume published).

Not part of the test suite. Pixel data: ``--distinct`` simulator volumes reused in turn
(computing 1000 volumes of the simulator would take longer than sending them); each
dataset still has its own index, UIDs and header.

Usage: python benchmarks/soak.py [--volumes 1000] [--shape 128 128 72] [--senders 2]
                                 [--backlog catch_up|newest] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsc.client import Subscriber  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sender(port: int, n: int, shape: list[int], distinct: int, series_number: int,
            results: "mp.Queue", interval: float = 0.0) -> None:
    from rtsc.config import config_from_dict
    from simulator.bold import iter_volumes
    from simulator.dicom_series import new_series_info
    from simulator.dicom_writer import volume_to_mosaic
    from simulator.scanner import make_plan
    from simulator.sender import SendError, send_series

    sim = config_from_dict({"simulator": {"shape": shape, "n_volumes": distinct,
                                          "seed": series_number}}).simulator
    plan = make_plan(sim)
    base = [v.quantised for v in iter_volumes(plan)]
    affine = plan.grid.affine()
    info = new_series_info(series_number, sim.tr_s, n_volumes=n, start_time=time.time())
    acked: list[float] = []

    def stream():
        for t in range(n):
            yield [volume_to_mosaic(base[t % distinct], affine, info, t)]

    t0 = time.time()
    try:
        report = send_series(stream(), "127.0.0.1", port, tr_s=interval or sim.tr_s,
                             speed=1.0 if interval else 0.0,
                             on_sent=lambda i: acked.append(time.time()))
        n_sent, error = report.n_sent, None
    except SendError as exc:
        n_sent, error = (exc.report.n_sent if exc.report else len(acked)), str(exc)
    results.put({"series_number": series_number, "n_sent": n_sent, "error": error,
                 "t_start": t0, "t_last_ack": acked[-1] if acked else None})


def _growth(progress: list[tuple[int, int]]) -> str:
    """Least-squares slope of RSS over volumes published, from the 100th volume on, and
    the RSS there and at the end (MB)."""
    after = [(n, kb) for n, kb in progress if n >= 100]
    if len(after) < 3 or after[-1][0] == after[0][0]:
        return "n/a"
    n, kb = (np.array(c, dtype=float) for c in zip(*after))
    slope = np.polyfit(n, kb / 1024, 1)[0]
    return (f"{slope:.3f} (RSS {after[0][1] / 1024:.0f} MB at volume {after[0][0]}, "
            f"{after[-1][1] / 1024:.0f} MB at {after[-1][0]})")


def _flatness(progress: list[tuple[int, int]], total: int) -> str:
    """Issue 18's target (RSS flat after the first 100 volumes, within 5 %), judged on the
    level: the median RSS of each window of 100 volumes published from volume 100 on
    (while volumes arrive: the series' ends, with their final DVARS and outputs, are
    not growth per volume), against the first window's. The largest sample after volume
    100 is printed beside it: short peaks (a map publication, a series' end) are not
    growth, but they are memory too."""
    windows = [[kb for n, kb in progress if a <= n < min(a + 100, total)]
               for a in range(100, total, 100)]
    medians = [float(np.median(w)) / 1024 for w in windows if w]
    after = [kb / 1024 for n, kb in progress if 100 <= n < total]
    if len(medians) < 2:
        return "n/a"
    growth = max(medians) / medians[0] - 1
    return (f"window medians {' / '.join(f'{m:.0f}' for m in medians)} MB: largest "
            f"{100 * growth:+.1f} % of the first, "
            f"{'flat within 5 %' if growth <= 0.05 else 'NOT flat within 5 %'}; "
            f"largest sample {max(after):.0f} MB ({100 * (max(after) / medians[0] - 1):+.1f} %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=1000, help="total, over all senders")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 72])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--backlog", choices=("catch_up", "newest"), default="catch_up")
    parser.add_argument("--keep", type=Path, default=None, help="session folder to keep")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between a sender's volumes (0: no pacing; paced below "
                             "the pipeline's rate, no backlog blurs the memory curve)")
    args = parser.parse_args()
    per_sender = args.volumes // args.senders

    work = Path(tempfile.mkdtemp(prefix="rtsc-soak-"))
    session_dir = args.keep or work / "sessions"
    port, pub, snap = _free_port(), _free_port(), _free_port()
    config = {"receiver": {"port": port},
              "publish": {"endpoint": f"tcp://127.0.0.1:{pub}",
                          "snapshot_endpoint": f"tcp://127.0.0.1:{snap}"},
              "session": {"dir": str(session_dir), "report": False, "series_timeout_s": 600.0},
              "pipeline": {"backlog": args.backlog}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    log_path = work / "rtsc.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rtsc.cli", "run", "--config",
                                 str(work / "config.yaml")], stdout=log,
                                stderr=subprocess.STDOUT)
    while "Ctrl-C to stop" not in log_path.read_text():
        if proc.poll() is not None:
            print(log_path.read_text())
            return 1
        time.sleep(0.1)
    rss_idle_kb = _status_kb(proc.pid, "VmRSS")

    published: dict[str, list[int]] = {}
    last_publish = [0.0]
    ended: list[dict] = []
    stop = threading.Event()
    sub = Subscriber(f"tcp://127.0.0.1:{pub}")

    def collect() -> None:
        while not stop.is_set():
            message = sub.receive(timeout_s=0.1)
            if message is None:
                continue
            if message.topic == "volume":
                published.setdefault(message.header["series"], []).append(message.header["index"])
                last_publish[0] = time.time()
            elif message.topic == "series.end":
                ended.append(message.header)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    time.sleep(0.5)

    rss_samples: list[int] = []
    progress: list[tuple[int, int]] = []  # (volumes published so far, RSS kB)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            rss_samples.append(_status_kb(proc.pid, "VmRSS"))
            progress.append((sum(len(v) for v in list(published.values())), rss_samples[-1]))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    senders = [ctx.Process(target=_sender, args=(port, per_sender, args.shape, args.distinct,
                                                  i + 1, results, args.interval))
               for i in range(args.senders)]
    t0 = time.time()
    for s in senders:
        s.start()
    outcomes = [results.get(timeout=7200) for _ in senders]
    for s in senders:
        s.join()
    t_sent = max(o["t_last_ack"] or 0.0 for o in outcomes)
    deadline = time.time() + 3600
    while len(ended) < args.senders and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    peak_kb = _status_kb(proc.pid, "VmHWM")
    sampling.set()
    stop.set()
    collector.join(5)
    sub.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)

    series_dirs = sorted(p for p in session_dir.iterdir() if p.is_dir() and p.name != "rejected")
    n_archived = sum(len(list((d / "dicom").glob("*.dcm"))) for d in series_dirs)
    bold_volumes = [nib.load(d / "bold.nii.gz").shape[3] for d in series_dirs
                    if (d / "bold.nii.gz").exists()]
    n_acked = sum(o["n_sent"] for o in outcomes)
    complete = all(sorted(v) == list(range(per_sender)) for v in published.values())
    skipped = sum(len(e["summary"].get("skipped_volumes") or []) for e in ended)
    latency = [e["summary"].get("latency_ms_median") for e in ended]
    send_s = t_sent - min(o["t_start"] for o in outcomes)
    rows = [
        ("volumes sent / acknowledged", f"{args.senders * per_sender} / {n_acked}"),
        ("sender errors", str([o["error"] for o in outcomes if o["error"]] or "none")),
        ("files archived", str(n_archived)),
        ("volumes in bold.nii.gz", " + ".join(map(str, bold_volumes))),
        ("volume messages published", " + ".join(str(len(v)) for v in published.values())
         + (" (every index, in order)" if complete else " (INCOMPLETE)")),
        ("volumes skipped (backlog newest)", str(skipped)),
        ("send time, s (first send -> last ack)", f"{send_s:.1f}"),
        ("send rate, volumes/s", f"{n_acked / send_s:.1f}" if send_s > 0 else "n/a"),
        ("drain, s (last ack -> last volume published)", f"{last_publish[0] - t_sent:.1f}"),
        ("peak RSS of rtsc run (VmHWM), MB", f"{peak_kb / 1024:.0f}"),
        ("RSS idle after start, MB", f"{rss_idle_kb / 1024:.0f}"),
        ("RSS median while running, MB",
         f"{sorted(rss_samples)[len(rss_samples) // 2] / 1024:.0f}" if rss_samples else "n/a"),
        ("RSS at 25/50/75/100 % of volumes published, MB", " / ".join(
            next((f"{kb / 1024:.0f}" for n, kb in progress if n >= q * n_acked), "n/a")
            for q in (0.25, 0.5, 0.75, 1.0))),
        ("RSS at 10/20/.../100 % of volumes published, MB", " / ".join(
            next((f"{kb / 1024:.0f}" for n, kb in progress if n >= q * n_acked / 10), "n/a")
            for q in range(1, 11))),
        ("RSS growth after the first 100 volumes, MB per volume", _growth(progress)),
        ("RSS flat after volume 100? (per 100 volumes)", _flatness(progress, n_acked)),
        ("series latency median, ms", ", ".join(f"{v:.0f}" for v in latency if v is not None)),
    ]
    print(f"soak: {args.senders} senders x {per_sender} volumes of {args.shape}, "
          f"backlog {args.backlog}, "
          f"{f'every {args.interval} s' if args.interval else 'no pacing'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    (work / "soak.json").write_text(json.dumps(
        {**dict(rows), "progress_volumes_rss_kb": progress}, indent=2))
    ok = (n_acked == args.senders * per_sender and n_archived == n_acked
          and sum(bold_volumes) == n_acked and complete)
    print("OK" if ok else "FAILED", f"(work dir {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
