"""Fault injection: fsync before success, a failing stage, SIGTERM, SIGKILL and restart,
a killed display coming back from the snapshot."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from faults_helpers import send_in_background, start_rtsc_run, wait_for
from rtsc.config import config_from_dict
import rtsc.intake.receiver as receiver_module
from rtsc.intake.receiver import Receiver
from rtsc.pipeline.stages import SignalStage
from rtsc.output.session import SessionStore


def _mr(series_uid: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store_three(port: int) -> list[int]:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSC")
    assert assoc.is_established
    uid = generate_uid()
    statuses = [assoc.send_c_store(_mr(uid)).Status for _ in range(3)]
    assoc.release()
    return statuses


def _receiver_with_events(tmp_path, monkeypatch, fail_fsync: bool = False):
    events: list[tuple] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if fail_fsync and target.endswith(".part"):
            raise OSError(5, "Input/output error (injected)")
        real_fsync(fd)
        events.append(("fsync", target))

    # The status the C-STORE is answered with, as both data paths (pynetdicom's
    # _on_store and rtsc.intake.dataphase's _on_store_lean) return it, right before the
    # answer is sent.
    original = Receiver._archive

    def archive(self, *args):
        status = original(self, *args)
        on_disk = sorted(p.name for p in Path(tmp_path / "sessions").rglob("*.dcm"))
        events.append(("answer", status, on_disk))
        return status

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Receiver, "_archive", archive)
    config = config_from_dict({"receiver": {"port": 0}})
    rec = Receiver(config.receiver, SessionStore(tmp_path / "sessions"), queue.Queue())
    rec.start()
    return rec, events


@pytest.mark.parametrize("lean", [True, False], ids=["dataphase", "pynetdicom"])
def test_cstore_is_fsynced_before_success(tmp_path, monkeypatch, lean):
    monkeypatch.setattr(receiver_module, "LEAN_DATA_PHASE", lean)
    rec, events = _receiver_with_events(tmp_path, monkeypatch)
    try:
        assert _store_three(rec.port) == [0, 0, 0]
    finally:
        rec.close()
    answers = [i for i, e in enumerate(events) if e[0] == "answer"]
    assert len(answers) == 3
    start = 0
    for n, i in enumerate(answers, start=1):
        before = events[start:i]
        name = f"{n:06d}.dcm"
        if n == 1:
            # the new folders' entries first: sessions/ in its parent, the series folder
            # in sessions/, dicom/ in the series folder (issue 16 item 8)
            (series_dir,) = (tmp_path / "sessions").iterdir()
            assert [e[1] for e in before[:3]] == [str(tmp_path), str(tmp_path / "sessions"),
                                                  str(series_dir)]
            before = before[3:]
        # the file's data, then its directory entry, were fsynced before the answer
        assert [e[1].endswith(f"/dicom/{name}.part") for e in before] == [True, False]
        assert before[1][1].endswith("/dicom")
        assert name in events[i][2]  # and the file was in place when success was sent
        start = i + 1


@pytest.mark.parametrize("lean", [True, False], ids=["dataphase", "pynetdicom"])
def test_failed_fsync_is_not_acknowledged(tmp_path, monkeypatch, lean):
    monkeypatch.setattr(receiver_module, "LEAN_DATA_PHASE", lean)
    rec, events = _receiver_with_events(tmp_path, monkeypatch, fail_fsync=True)
    try:
        assert _store_three(rec.port) == [0xA700] * 3  # out of resources: the sender retries
    finally:
        rec.close()
    assert not list((tmp_path / "sessions").rglob("*.dcm"))


@pytest.mark.slow
def test_stage_exception_does_not_stop_the_run(service_factory, tmp_path, monkeypatch):
    from simulator.scanner import run_simulation

    original = SignalStage.update

    def flaky(self, volume, upstream=None):
        if volume.index in (5, 6, 7):
            raise RuntimeError("injected failure")
        return original(self, volume, upstream)

    monkeypatch.setattr(SignalStage, "update", flaky)
    service, collector = service_factory()
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0
    assert collector.ended.wait(30)
    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(20))
    failed = [m.header for m in collector.topic("alert") if m.header["code"] == "stage_failed"]
    assert [a["index"] for a in failed] == [5, 6, 7]
    assert all("signal" in a["message"] and "injected failure" in a["message"] for a in failed)
    gs = [m.header.get("global_signal") for m in volumes]
    assert all(gs[i] is None for i in (5, 6, 7))
    assert all(gs[i] is not None for i in range(20) if i not in (5, 6, 7))
    # the other stages ran on every volume
    assert all(m.header.get("framewise_displacement") is not None for m in volumes)
    end = collector.topic("series.end")[0].header
    series_dir = Path(end["outputs"]["bold"]).parent
    assert len(list((series_dir / "dicom").glob("*.dcm"))) == 20
    quantised = np.load(sim.truth_dir / "bold_quantised.npy")
    np.testing.assert_array_equal(np.asarray(nib.load(end["outputs"]["bold"]).dataobj), quantised)
    rows = (series_dir / "confounds.tsv").read_text().splitlines()[1:]
    assert len(rows) == 20


def _series_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "rejected")


def _confound_rows(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1


@pytest.mark.system
@pytest.mark.slow
def test_sigterm_mid_series_flushes_everything(tmp_path):
    run = start_rtsc_run(tmp_path)
    sent = send_in_background(run.port, 60, tr_s=2.0, speed=20.0)  # 0.1 s per volume
    wait_for(lambda: len(sent.acked_volumes) >= 15, 60, "15 acknowledged volumes")
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=60) == 0, run.log_path.read_text()
    assert sent.done.wait(30) and sent.error is not None  # the association went away
    acked = list(sent.acked_volumes)
    assert 15 <= len(acked) < 60
    (series_dir,) = _series_dirs(run.session_dir)
    bold = nib.load(series_dir / "bold.nii.gz")
    n = bold.shape[3]
    qc = json.loads((series_dir / "qc.json").read_text())
    assert qc["n_volumes"] == n and qc["incomplete"] is True
    assert _confound_rows(series_dir / "confounds.tsv") == n
    assert not (series_dir / "bold.nii").exists()
    # nothing acknowledged is lost: every acknowledged file archived, every acked volume in bold
    archived = sorted((series_dir / "dicom").glob("*.dcm"))
    assert len(archived) >= sent.n_acked_files == len(acked)
    assert n >= len(acked)
    assert not any(a <= i <= b for i in acked for a, b in qc["missing_volumes"])


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.system
@pytest.mark.slow
def test_sigkill_and_restart_loses_nothing_acknowledged(tmp_path):
    first = start_rtsc_run(tmp_path, name="first")
    sent = send_in_background(first.port, 30, tr_s=2.0, speed=20.0)
    wait_for(lambda: len(sent.acked_volumes) >= 10, 60, "10 acknowledged volumes")
    first.proc.kill()
    first.proc.wait(timeout=30)
    assert sent.done.wait(30)
    acked = sent.n_acked_files
    assert 10 <= acked < 30
    (old_dir,) = _series_dirs(first.session_dir)
    archived = sorted((old_dir / "dicom").glob("*.dcm"))
    assert len(archived) >= acked
    for path in archived:  # every archived file is complete
        assert pydicom.dcmread(path).SeriesInstanceUID == sent.series_uid
    # the growing bold.nii is a valid image after the crash
    crashed = nib.load(old_dir / "bold.nii")
    assert 1 <= crashed.shape[3] <= len(archived)
    before = _digest(old_dir)

    # Restart on the same port and session folder; the scanner resends the whole series.
    second = start_rtsc_run(tmp_path, name="second", session_dir=first.session_dir,
                            port=first.port)
    again = send_in_background(second.port, 30, speed=0.0, info=sent.info)
    assert again.done.wait(60) and again.error is None and again.n_acked_files == 30
    wait_for(lambda: len(_series_dirs(first.session_dir)) == 2
             and (_series_dirs(first.session_dir)[-1] / "qc.json").exists(), 60, "series end")
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=60) == 0
    log = second.log_path.read_text()
    assert "Traceback" not in log, log
    # the operator is told about the interrupted series, and it is left untouched
    assert f"series folder {old_dir.name} was not finished by an earlier run " \
           f"({crashed.shape[3]} volumes in its bold.nii, no qc.json); left as it is" in log, log
    assert _digest(old_dir) == before
    new_dir = [d for d in _series_dirs(first.session_dir) if d != old_dir][0]
    assert new_dir.name.split("_")[-1].split("-")[0] == old_dir.name.split("_")[-1]
    assert len(list((new_dir / "dicom").glob("*.dcm"))) == 30
    assert nib.load(new_dir / "bold.nii.gz").shape[3] == 30


@pytest.mark.system
@pytest.mark.slow
def test_display_killed_comes_back_from_snapshot(service_factory, tmp_path):
    service, collector = service_factory(session={"report": False})
    pub, snap = service.publisher.endpoint, service.publisher.snapshot_endpoint
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("DISPLAY", None)

    def display(name: str) -> tuple[subprocess.Popen, Path]:
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rtsc.cli", "display", "--headless", "--out",
                 str(tmp_path / name), "--endpoint", pub, "--snapshot-endpoint", snap,
                 "--exit-after-end"], stdout=log, stderr=subprocess.STDOUT, env=env)
        return proc, log_path

    first, _ = display("first")
    sent = send_in_background(service.receiver.port, 40, tr_s=2.0, speed=8.0)  # 0.25 s/volume
    wait_for(lambda: len(sent.acked_volumes) >= 8, 60, "8 volumes")
    first.kill()
    first.wait(timeout=10)
    wait_for(lambda: len(sent.acked_volumes) >= 16, 60, "16 volumes")
    second, log_path = display("second")
    try:
        assert second.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if second.poll() is None:
            second.kill()
    assert sent.done.wait(30) and sent.error is None
    log = log_path.read_text()
    # It started after 16 volumes had been published and still shows all 40: the snapshot.
    assert "display ended after 40 volumes" in log, log
    pngs = list((tmp_path / "second").glob("dashboard_*.png"))
    assert len(pngs) == 1
