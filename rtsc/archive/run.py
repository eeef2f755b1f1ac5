"""`rtsc archive-qc`: the live pipeline over an archive, series in parallel on Dask.

Each job (:mod:`rtsc.archive.jobs`) is one `rtsc replay` of its series at full speed, in
a Dask worker process: the same assembler, pipeline and session writer as `rtsc run`
(qc.json, confounds.tsv, maps, report.html), into ``<out>/<name>-<job id>/sessions``;
the DICOM files are read where they are, not copied (the archive is already one).
Local worker processes by default (a ``distributed.LocalCluster``, one thread each: the
pipeline is single-threaded, as the live service runs it); ``scheduler`` names a Dask
distributed scheduler (``tcp://HOST:PORT``) whose workers see the same paths.

Every series is recorded in the history (:mod:`rtsc.history`): ``history.url``, else one
SQLite file for the archive run, ``<out>/history.sqlite``.

Resumable: a job that ended writes ``done.json`` (its series' summaries and outputs)
last; a later run skips it. A job that fails writes ``failed.json`` (the error) and is
tried again next time; the other jobs go on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rtsc.archive.jobs import ArchiveJob, find_jobs
from rtsc.errors import HistoryError, RtscError
from rtsc.history.store import HistoryStore, default_url

log = logging.getLogger(__name__)

#: Written last into a job's folder when it ended: its presence makes a job done.
DONE_FILE = "done.json"
FAILED_FILE = "failed.json"


@dataclass
class JobResult:
    """What became of one job.

    Attributes
    ----------
    job : ArchiveJob
    status : ``"done"``, ``"skipped"`` (done by an earlier run) or ``"failed"``
    series : list of dict, per series: ``series``, ``summary`` (qc.json's), ``outputs``
    error : str or None
    seconds : float, wall time of the job, s
    directory : str, the job's output folder
    cpu_seconds : float, CPU time of the worker process during the job, s
    """

    job: ArchiveJob
    status: str
    series: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    directory: str = ""
    cpu_seconds: float = 0.0


def job_directory(out_dir: Path, job: ArchiveJob) -> Path:
    """``<out>/<name>-<job id>``."""
    return Path(out_dir) / f"{job.name}-{job.job_id}"


def job_config(config: dict[str, Any], job: ArchiveJob, directory: Path) -> dict[str, Any]:
    """The configuration of one job: the run's, with its own session folder, ephemeral
    publisher ports (jobs run side by side), no receiver or watcher, and the run's BIDS
    events file when the configuration names none."""
    from rtsc.config import merge

    overrides: dict[str, Any] = {
        "session": {"dir": str(directory / "sessions")},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"},
        "receiver": {"enabled": False}, "watcher": {"dir": None}}
    if job.events is not None and not (config.get("glm") or {}).get("events"):
        overrides["glm"] = {"events": job.events}
    return merge(config, overrides)


def prepare_history(config: Any, out_dir: Path) -> str | None:
    """Create or migrate the archive run's history database once, before the jobs (two
    jobs starting together on an empty database would both create its tables); its
    URL, or None when the history is off. A database that cannot be opened is left to
    the jobs, whose runs alert ``history_unavailable`` and go on."""
    if not config.history.enabled:
        return None
    url = config.history.url or default_url(out_dir)
    try:
        HistoryStore.open(url).close()
    except HistoryError as exc:
        log.warning("archive-qc: %s", exc)
    return url


#: glibc malloc settings of the local workers (see worker_environment), bytes, as the
#: environment holds them
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                 "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


def worker_environment(pre_spawn: dict[str, Any]) -> dict[str, Any]:
    """Dask's environment for its local worker processes, with :data:`WORKER_MALLOC`.

    Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` to hand freed memory back to the system
    at once (and writes it into this process's environment too, so a later cluster
    inherits it). Setting it also turns off glibc's adaptive mmap threshold: every
    buffer of 128 kB or more (a 64x64x36 volume is 590 kB) becomes a fresh mapping,
    faulted in page by page and unmapped when freed. Measured in a worker over a
    150-volume series: 260,000 page faults and 1.9-2.0 s, against 2,000-50,000 faults
    and 1.45-1.55 s with buffers under 32 MiB from the heap and up to 128 MiB of free
    heap kept. A job's memory is bounded by its series (``pipeline.series_memory_mb``)
    and reused by the next job.
    """
    return {**pre_spawn, **WORKER_MALLOC}


def local_cluster(workers: int) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` processes, one thread each, with
    :func:`worker_environment`.

    Dask takes a variable of its pre-spawn environment from this process's
    environment when it is there, and a Nanny writes its values there: an earlier
    cluster's 65536 would win. The environment is set for the cluster's start (each
    Nanny keeps the values for its restarts) and restored after it.
    """
    import dask
    from distributed import LocalCluster

    environ = worker_environment(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    saved = dict(os.environ)
    try:
        os.environ.update(WORKER_MALLOC)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                dashboard_address=None, silence_logs=logging.WARNING)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def process_job(job: ArchiveJob, config: dict[str, Any], out_dir: str) -> JobResult:
    """Run one job (in a Dask worker); never raises: a failure is the result's error.

    Parameters
    ----------
    job : ArchiveJob
    config : the run's configuration as a plain mapping (``rtsc.config.to_dict``)
    out_dir : the archive run's output folder
    """
    from threadpoolctl import threadpool_limits

    from rtsc.config import config_from_dict
    from rtsc.intake.replay import run_replay

    directory = job_directory(Path(out_dir), job)
    done = directory / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        return JobResult(job, "skipped", record.get("series", []), None, 0.0, str(directory))
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        if directory.exists():  # an earlier attempt's partial outputs
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        quiet = logging.getLogger("rtsc")
        level = quiet.level
        # the volumes' alerts are in each qc.json: on the console they would bury the bar
        quiet.setLevel(logging.ERROR)
        try:
            with threadpool_limits(1):  # one core per job, as the live worker
                ended = run_replay(config_from_dict(job_config(config, job, directory)),
                                   Path(job.path), speed=0.0, copy_dicom=False)
        finally:
            quiet.setLevel(level)
        if not ended:
            raise RuntimeError("no series was assembled from it")
    except Exception as exc:  # noqa: BLE001 - one series' failure must not stop the rest
        error = f"{type(exc).__name__}: {exc}"
        log.warning("archive-qc: %s failed: %s", job.path, error)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FAILED_FILE).write_text(json.dumps({"job": asdict(job), "error": error},
                                                        indent=2), encoding="utf-8")
        return JobResult(job, "failed", [], error, time.monotonic() - t0, str(directory))
    # the DICOM stay where they are in the archive (not copied into the session)
    series = [{"series": h.get("series"), "summary": h.get("summary"),
               "outputs": {**(h.get("outputs") or {}),
                           **({"dicom": job.path} if job.kind == "dicom" else {})}}
              for h in ended]
    seconds = time.monotonic() - t0
    (directory / FAILED_FILE).unlink(missing_ok=True)
    done.write_text(json.dumps({"job": asdict(job), "series": series, "seconds": seconds},
                               indent=2, default=str), encoding="utf-8")
    return JobResult(job, "done", series, None, seconds, str(directory),
                     time.process_time() - cpu0)


class Progress:
    """A one-line text progress bar (on a terminal; a line per job otherwise)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream = total, stream
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.t0 = time.monotonic()

    def update(self, result: JobResult) -> None:
        self.counts[result.status] += 1
        if self.stream is None:
            return
        n = sum(self.counts.values())
        width = 30
        filled = int(width * n / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {n}/{self.total} series "
                f"({self.counts['failed']} failed, {self.counts['skipped']} skipped) "
                f"{time.monotonic() - self.t0:.1f} s")
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if n == self.total else ""))
        else:
            self.stream.write(f"{line}  {result.status}: {result.job.path}\n")
        self.stream.flush()


def archive_qc(paths: list[Path], config: Any, out_dir: Path, workers: int = 2,
               scheduler: str | None = None, progress: TextIO | None = sys.stderr
               ) -> list[JobResult]:
    """Process every series under ``paths`` on Dask (the module docstring).

    Parameters
    ----------
    paths : archive roots, NIfTI runs or DICOM folders (:func:`find_jobs`)
    config : rtsc.config.Config
    out_dir : where each job's folder goes
    workers : local worker processes (ignored with ``scheduler``)
    scheduler : address of a Dask distributed scheduler, or None for local processes
    progress : where the progress bar goes (None: nowhere)

    Returns
    -------
    one JobResult per job, in the jobs' order
    """
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise RtscError("rtsc archive-qc runs on Dask: pip install 'rtsc[archive]' "
                        f"(dask[distributed]) ({exc})") from exc

    from rtsc.config import merge, to_dict

    jobs = find_jobs([Path(p) for p in paths])
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_dict(config)
    history = prepare_history(config, out_dir)
    if history is not None:  # one history for the archive run, not one per job's folder
        plain = merge(plain, {"history": {"url": history}})
    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    bar = Progress(len(jobs), progress)
    results: dict[str, JobResult] = {}
    try:
        futures = {client.submit(process_job, job, plain, str(out_dir), pure=False,
                                 key=f"rtsc-archive-{job.job_id}"): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker died under the job
                result = JobResult(job, "failed", error=f"worker lost: {exc}",
                                   directory=str(job_directory(out_dir, job)))
            results[job.job_id] = result
            bar.update(result)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [results[job.job_id] for job in jobs]


def archive_command(paths: list[Path], config: Any, out_dir: Path, workers: int,
                    scheduler: str | None) -> int:
    """`rtsc archive-qc`: run, print a summary line and each failure; exit status 1 when
    a job failed."""
    t0 = time.monotonic()
    results = archive_qc(paths, config, out_dir, workers=workers, scheduler=scheduler)
    failed = [r for r in results if r.status == "failed"]
    print(f"rtsc archive-qc: {len(results)} jobs in {time.monotonic() - t0:.1f} s: "
          f"{sum(r.status == 'done' for r in results)} done, "
          f"{sum(r.status == 'skipped' for r in results)} skipped (done before), "
          f"{len(failed)} failed; outputs under {out_dir}")
    for r in failed:
        print(f"  FAILED {r.job.path}: {r.error}")
    return 1 if failed else 0

