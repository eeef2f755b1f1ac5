"""`rtsc archive-qc`: an archive's series found on disk, processed on Dask (local worker
processes), equal to a live run of the same files sent by dcmtk's storescu; a failing
series reported while the rest go on; a second run skips what is done."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_config
from rtsc.archive.jobs import find_jobs
from rtsc.archive.run import DONE_FILE, FAILED_FILE, WORKER_MALLOC, archive_qc, local_cluster
from rtsc.config import config_from_dict, merge, to_dict
from rtsc.errors import RtscError
from rtsc_subprocess import rtsc_command
from simulator.scanner import run_simulation

STORESCU = "/usr/bin/storescu"
#: qc.json fields that depend on the data alone (not on arrival times or host speed)
DATA_FIELDS = ("n_volumes", "shape", "voxel_size_mm", "tr_s", "fd_mean", "fd_max",
               "fd_num_by_threshold", "max_abs_trans_mm", "max_abs_rot_deg",
               "registration_failed", "valid_voxels", "snr_background", "noise_sigma",
               "spike_volumes", "spike_slices", "dvars_std", "dvars_outliers",
               "global_signal_mean", "global_signal_cv_pct", "mask_voxels", "tsnr",
               "tsnr_detrended", "slice_tsnr", "fd_num", "fd_perc", "usable_frames",
               "clean_minutes", "usable_frame_indices")


def dicom_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)


def test_jobs_found_in_bids_dicom_and_mixed_trees(tmp_path):
    func = tmp_path / "bids" / "sub-01" / "ses-1" / "func"
    func.mkdir(parents=True)
    for run in (1, 2):
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)),
                 func / f"sub-01_ses-1_task-motor_run-{run}_bold.nii.gz")
        (func / f"sub-01_ses-1_task-motor_run-{run}_bold.json").write_text("{}")
    (func / "sub-01_ses-1_task-motor_run-1_events.tsv").write_text("onset\tduration\n")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
             tmp_path / "bids" / "sub-01" / "ses-1" / "anat_T1w.nii.gz")  # not a run
    for series in ("s01", "s02"):
        for k in range(3):
            dicom_file(tmp_path / "dicom" / "exam" / series / f"IM{k:04d}")
    (tmp_path / "dicom" / "exam" / "truth").mkdir()
    (tmp_path / "dicom" / "exam" / "truth" / "motion.npy").write_bytes(b"\x93NUMPY")
    jobs = find_jobs([tmp_path / "bids", tmp_path / "dicom", tmp_path / "dicom" / "exam" / "s01"])
    kinds = [(j.kind, j.name) for j in jobs]
    assert kinds == [("nifti", "sub-01_ses-1_func_sub-01_ses-1_task-motor_run-1_bold"),
                     ("nifti", "sub-01_ses-1_func_sub-01_ses-1_task-motor_run-2_bold"),
                     ("dicom", "exam_s01"), ("dicom", "exam_s02")]  # s01 once
    assert jobs[0].events.endswith("run-1_events.tsv") and jobs[1].events is None
    assert find_jobs([tmp_path / "dicom"])[0].job_id == jobs[2].job_id  # stable
    with pytest.raises(RtscError, match="does not exist"):
        find_jobs([tmp_path / "nowhere"])
    with pytest.raises(RtscError, match="no BIDS run"):
        find_jobs([tmp_path / "dicom" / "exam" / "truth"])


def simulate(tmp_path: Path, name: str, seed: int) -> list[Path]:
    base = make_config(tmp_path)
    cfg = config_from_dict(merge(to_dict(base), {"simulator": {
        "shape": [32, 32, 16], "voxel_size_mm": [6.0, 6.0, 7.0], "n_volumes": 14,
        "seed": seed}})).simulator
    sim = run_simulation(cfg, out_dir=tmp_path / "archive" / name, series_number=seed + 1)
    return list(sim.files)


@pytest.mark.slow
@pytest.mark.system
def test_archive_qc_equals_a_live_run_and_resumes(service_factory, tmp_path):
    files = {name: simulate(tmp_path, name, seed) for seed, name in enumerate(("a", "b"))}
    # a third series whose files are cut short: nothing can be assembled from them
    broken = tmp_path / "archive" / "c" / "dicom"
    broken.mkdir(parents=True)
    for path in files["a"]:
        (broken / path.name).write_bytes(path.read_bytes()[:1200])

    # live: series a sent by dcmtk's storescu to `rtsc run`'s receiver
    service, collector = service_factory(session={"report": False})
    sent = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", str(service.receiver.port),
                           *map(str, files["a"])], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert collector.ended.wait(60)
    (live_end,) = [m.header for m in collector.topic("series.end")]
    live_dir = Path(live_end["outputs"]["qc"]).parent

    config = make_config(tmp_path, session={"report": False})
    out = tmp_path / "out"
    results = archive_qc([tmp_path / "archive"], config, out, workers=2, progress=None)
    status = {Path(r.job.path).parent.name: r.status for r in results}
    assert status == {"a": "done", "b": "done", "c": "failed"}
    failed = next(r for r in results if r.status == "failed")
    assert "no DICOM files" in failed.error  # every file cut short: none readable
    assert (Path(failed.directory) / FAILED_FILE).is_file()

    done = next(r for r in results if Path(r.job.path).parent.name == "a")
    (series,) = done.series
    archived_dir = Path(series["outputs"]["qc"]).parent
    live_qc = json.loads((live_dir / "qc.json").read_text())
    archived_qc = json.loads((archived_dir / "qc.json").read_text())
    for key in DATA_FIELDS:
        assert archived_qc[key] == live_qc[key], key
    for name in ("bold.nii.gz", "maps/tsnr.nii.gz", "maps/mean.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(archived_dir / name).dataobj),
                                      np.asarray(nib.load(live_dir / name).dataobj))
    assert (archived_dir / "confounds.tsv").read_text() == (live_dir / "confounds.tsv").read_text()

    # the archive run's history holds the two series, with their qc.json figures
    from rtsc.history.store import HistoryStore, default_url

    with HistoryStore.open(default_url(out)) as store:
        rows = {row["series_id"]: row for row in store.rows()}
    ended = {s["series"]: s for r in results if r.status == "done" for s in r.series}
    assert set(rows) == set(ended)
    assert rows[series["series"]]["tsnr"] == pytest.approx(archived_qc["tsnr"], rel=1e-12)

    # again: the done jobs are skipped, the failed one is tried again (and fails again)
    again = archive_qc([tmp_path / "archive"], config, out, workers=1, progress=None)
    assert sorted(r.status for r in again) == ["failed", "skipped", "skipped"]
    assert next(r for r in again if r.job.job_id == done.job.job_id).series == done.series


@pytest.mark.slow
@pytest.mark.system
def test_cli_reports_the_failure_and_exits_1(tmp_path):
    simulate(tmp_path, "a", 0)
    broken = tmp_path / "archive" / "b"
    broken.mkdir()
    (broken / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00")  # no dataset
    (tmp_path / "rtsc.yaml").write_text(f"session: {{dir: '{tmp_path / 'sessions'}', "
                                        "report: false}\n")
    run = subprocess.run([*rtsc_command(), "archive-qc", str(tmp_path / "archive"),
                          "--config", str(tmp_path / "rtsc.yaml"), "--workers", "2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "2 jobs" in run.stdout and "1 done" in run.stdout and "1 failed" in run.stdout
    assert f"FAILED {broken.resolve()}" in run.stdout
    assert "2/2 series" in run.stderr  # the progress bar
    outputs = tmp_path / "sessions" / "archive-qc"
    assert len(list(outputs.glob(f"*/{DONE_FILE}"))) == 1
    shutil.rmtree(outputs)


@pytest.mark.slow
def test_a_bids_run_gets_its_events_file(tmp_path):
    """A BIDS NIfTI run with its _events.tsv, on a Dask scheduler given by address: the
    GLM of the archived run finds the simulated activation (the events file was used,
    the config names none)."""
    from simulator.bold import simulate_run
    from simulator.output import write_events
    from simulator.phantom import Grid

    run = simulate_run(Grid((32, 32, 16), (6.0, 6.0, 7.0)), 60, 2.0, seed=3)
    func = tmp_path / "bids" / "sub-01" / "func"
    func.mkdir(parents=True)
    image = nib.Nifti1Image(run.quantised, run.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = 2.0
    nib.save(image, func / "sub-01_task-loc_bold.nii.gz")
    write_events(run.events, func / "sub-01_task-loc_events.tsv")
    config = make_config(tmp_path, session={"report": False},
                         glm={"contrasts": {"task": "task"}})
    # through a Dask distributed scheduler given by its address (--scheduler)
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        (result,) = archive_qc([tmp_path / "bids"], config, tmp_path / "out",
                               scheduler=cluster.scheduler_address, progress=None)
    assert result.status == "done", result.error
    (series,) = result.series
    contrast = series["summary"]["glm_contrasts"]["task"]
    # measured: peak t 6.6, 17 voxels over p < 0.001 (the activated ball is ~25 voxels)
    assert contrast["peak_t"] > contrast["threshold_t"] and contrast["voxels_above"] >= 5


@pytest.mark.system
def test_local_workers_get_the_malloc_settings_not_dasks_trim_threshold(monkeypatch):
    """The local workers' glibc settings are rtsc's (WORKER_MALLOC), not Dask's
    MALLOC_TRIM_THRESHOLD_=65536 (which turns glibc's adaptive mmap threshold off: every
    volume-sized buffer faulted in anew), even when this process's environment holds
    Dask's value (a Nanny writes it there); Dask's other settings (BLAS threads) stay."""
    import os

    import dask
    from distributed import Client

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"] \
        == 65536
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with local_cluster(1) as cluster, Client(cluster) as client:
        environ = next(iter(client.run(lambda: dict(os.environ)).values()))
    assert {k: environ.get(k) for k in WORKER_MALLOC} == WORKER_MALLOC
    assert int(environ["MALLOC_TRIM_THRESHOLD_"]) == 128 << 20
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's, restored
    assert environ.get("OPENBLAS_NUM_THREADS") == "1"
