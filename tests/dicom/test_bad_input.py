"""Bad input through the running service: each fault gives a log line and an alert, and
nothing else is lost.

Acceptance: "a non-DICOM file in the watched folder, a truncated DICOM, a CT image, a
series whose matrix changes mid-run, a slice that never arrives: each gives a clear log
line and an `alert` (`bad_dicom`, `missing_slices`, ...), the receiver keeps running,
and no other data is lost."

Every test injects its fault and, in the same service run, a normal simulator series;
it then checks the alert and the log record, that the normal series ends complete with
its voxels equal to the simulator's truth, that every received file is archived, and
that the receiver still answers a C-ECHO.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ct_image import ct_dataset
from rtsc.config import SimulatorConfig, config_from_dict, merge, to_dict
from rtsc.messages import Message
from rtsc.volume import series_id
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, write_dataset
from simulator.phantom import Grid
from simulator.output import SimulationResult
from simulator.scanner import run_simulation
from simulator.sender import send_files, send_series

N_VOLUMES = 6
WAIT_S = 20.0


# ------------------------------------------------------------------------ helpers


def sim_config(service, **overrides) -> SimulatorConfig:
    """A small, fast simulator run (32x32x12, N_VOLUMES volumes, no pacing)."""
    section = {"shape": [32, 32, 12], "n_volumes": N_VOLUMES, "speed": 0.0, **overrides}
    return config_from_dict(merge(to_dict(service.config), {"simulator": section})).simulator


def send_normal_series(service, tmp_path: Path, series_number: int = 2) -> SimulationResult:
    """Send a normal mosaic series over C-STORE; returns the simulation (with its truth)."""
    sim = run_simulation(sim_config(service), send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / f"truth-normal-{series_number}",
                         series_number=series_number)
    assert sim.failures == 0 and sim.n_files == N_VOLUMES
    return sim


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def of_series(messages: list[Message], uid: str) -> list[Message]:
    sid = series_id(uid)
    return [m for m in messages if m.header["series"] == sid]


def wait_series_end(collector, uid: str) -> dict:
    wait_for(lambda: of_series(collector.topic("series.end"), uid), f"series.end of {uid}")
    (end,) = of_series(collector.topic("series.end"), uid)
    return end.header


def wait_alert(collector, code: str, n: int = 1) -> list[Message]:
    found = lambda: [m for m in collector.topic("alert") if m.header["code"] == code]  # noqa: E731
    wait_for(lambda: len(found()) >= n, f"{n} alert(s) {code}")
    return found()


def assert_logged(caplog, logger_prefix: str, *fragments: str) -> None:
    """A WARNING (or worse) record from ``logger_prefix`` containing every fragment."""
    for record in caplog.records:
        text = record.getMessage()
        if (record.levelno >= logging.WARNING and record.name.startswith(logger_prefix)
                and all(f in text for f in fragments)):
            return
    pytest.fail(f"no warning from {logger_prefix} mentioning {fragments}; got "
                f"{[(r.name, r.getMessage()) for r in caplog.records]}")


def assert_series_complete(collector, sim: SimulationResult, n: int = N_VOLUMES) -> Path:
    """The series ended with all n volumes, in order, and bold.nii.gz equals the truth."""
    end = wait_series_end(collector, sim.series_uid)
    assert end["n_volumes"] == n and end["summary"]["missing_volumes"] == []
    volumes = of_series(collector.topic("volume"), sim.series_uid)
    assert [m.header["index"] for m in volumes] == list(range(n))
    assert not any("missing_slices" in m.header["flags"] for m in volumes)
    truth = np.load(sim.truth_dir / "bold_quantised.npy")
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), truth)
    series_dir = Path(end["outputs"]["bold"]).parent
    assert len(list((series_dir / "dicom").glob("*.dcm"))) == sim.n_files
    return series_dir


def assert_receiver_alive(service) -> None:
    """The receiver answers a C-ECHO and the worker has not died or hit an internal error."""
    ae = AE(ae_title="ECHO_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.receiver.port, ae_title="RTSC")
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    assert status and status.Status == 0x0000
    assert service.worker.is_alive()


def assert_no_internal_error(collector) -> None:
    assert [m for m in collector.topic("alert") if m.header["code"] == "internal_error"] == []


def put_file(path: Path, payload: bytes) -> None:
    """Write a file into the watched folder atomically (hidden name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def small_volume(rng: np.random.Generator, shape=(16, 16, 8)) -> np.ndarray:
    return rng.integers(0, 3000, size=shape, dtype=np.int16)


# -------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_watched_folder_non_dicom_and_truncated_files(service_factory, tmp_path, rng, caplog):
    caplog.set_level(logging.INFO)
    inbox = tmp_path / "inbox"
    service, collector = service_factory(
        watcher={"dir": str(inbox), "settle_s": 0.1, "poll_s": 0.05, "retry_s": 0.5})

    (inbox / "notdicom.dcm").write_text("this is a text file, not DICOM\n")
    # A real simulator file, cut in the middle of its pixel data.
    info = new_series_info(5, 2.0, n_volumes=1, start_time=time.time())
    source = volume_to_mosaic(small_volume(rng), Grid((16, 16, 8), (3, 3, 3)).affine(), info, 0)
    write_dataset(source, tmp_path / "whole.dcm")
    whole = (tmp_path / "whole.dcm").read_bytes()
    cut = whole[:len(whole) - len(source.PixelData) // 2]
    put_file(inbox / "truncated.dcm", cut)
    # Cut inside the length of the first long-VR element header, (0002,0001) OB: pydicom
    # raises struct.error here, not InvalidDicomError (this killed the watcher thread).
    header_end = whole.index(b"\x02\x00\x01\x00OB\x00\x00") + 10
    put_file(inbox / "header_cut.dcm", whole[:header_end])

    sim = run_simulation(sim_config(service), out_dir=inbox / "scan",
                         truth_dir=tmp_path / "truth")
    assert sim.n_files == N_VOLUMES

    alerts = wait_alert(collector, "bad_dicom", n=3)
    texts = [m.header["message"] for m in alerts]
    assert len(alerts) == 3
    assert any("notdicom.dcm" in t and "not a readable DICOM" in t for t in texts), texts
    assert any("header_cut.dcm" in t and "not a readable DICOM" in t for t in texts), texts
    assert any("truncated" in t.lower() for t in texts), texts
    assert all(m.header["level"] == "warning" for m in alerts)
    assert_logged(caplog, "rtsc.intake.watcher", "notdicom.dcm", "not a readable DICOM")
    assert_logged(caplog, "rtsc.intake.watcher", "header_cut.dcm", "not a readable DICOM")
    assert_logged(caplog, "rtsc.dicom.assemble", "truncated PixelData")
    assert_logged(caplog, "rtsc.service.series", "bad_dicom")

    assert_series_complete(collector, sim)
    # The truncated file was read as DICOM: it is archived byte for byte in its series.
    truncated_dir = service.store.series_dir(series_id(info.series_uid)) / "dicom"
    (archived,) = truncated_dir.glob("*.dcm")
    assert archived.read_bytes() == cut
    assert not of_series(collector.topic("series.start"), info.series_uid)
    assert_receiver_alive(service)
    assert_no_internal_error(collector)


@pytest.mark.slow
def test_cstore_ct_image_is_archived_and_reported(service_factory, tmp_path, rng, caplog):
    caplog.set_level(logging.INFO)
    service, collector = service_factory()
    ct = ct_dataset(rng)
    ae = AE(ae_title="CT_SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", service.receiver.port, ae_title="RTSC")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ct)
    finally:
        assoc.release()
    assert status and status.Status == 0x0000  # archived: the data path accepted it

    sim = send_normal_series(service, tmp_path)

    (alert,) = wait_alert(collector, "unsupported")
    assert "CT Image Storage" in alert.header["message"]
    assert alert.header["level"] == "warning"
    assert_logged(caplog, "rtsc.dicom.assemble", "CT Image Storage is not an MR image")
    assert_series_complete(collector, sim)
    ct_dir = service.store.series_dir(series_id(ct.SeriesInstanceUID)) / "dicom"
    assert ct_dir.is_relative_to(Path(service.config.session.dir))
    (archived,) = ct_dir.glob("*.dcm")
    stored = pydicom.dcmread(archived)
    assert stored.SOPInstanceUID == ct.SOPInstanceUID and stored.Modality == "CT"
    assert stored.PixelData == ct.PixelData
    assert not of_series(collector.topic("series.start"), ct.SeriesInstanceUID)
    assert_receiver_alive(service)
    assert_no_internal_error(collector)


@pytest.mark.slow
def test_matrix_change_mid_series(service_factory, tmp_path, rng, caplog):
    caplog.set_level(logging.INFO)
    service, collector = service_factory()
    n, odd_index = 6, 3
    info = new_series_info(4, 2.0, n_volumes=n, start_time=time.time())
    affine = Grid((16, 16, 8), (3, 3, 3)).affine()
    data = [small_volume(rng) for _ in range(n)]
    odd = small_volume(rng, (20, 20, 8))
    volumes = [[volume_to_mosaic(odd, Grid((20, 20, 8), (3, 3, 3)).affine(), info, i)]
               if i == odd_index else [volume_to_mosaic(d, affine, info, i)]
               for i, d in enumerate(data)]
    report = send_series(volumes, "127.0.0.1", service.receiver.port, speed=0)
    assert report.n_sent == n and report.n_failed == 0

    sim = send_normal_series(service, tmp_path)

    (alert,) = wait_alert(collector, "geometry_changed")
    assert f"volume {odd_index}" in alert.header["message"]
    assert_logged(caplog, "rtsc.dicom.assemble", "geometry changed", f"volume {odd_index}")
    end = wait_series_end(collector, info.series_uid)
    kept = [i for i in range(n) if i != odd_index]
    assert end["n_volumes"] == n - 1
    assert end["summary"]["missing_volumes"] == [[odd_index, odd_index]]
    assert [m.header["index"] for m in of_series(collector.topic("volume"),
                                                 info.series_uid)] == kept
    bold = np.asarray(nib.load(end["outputs"]["bold"]).dataobj)
    np.testing.assert_array_equal(bold, np.stack([data[i] for i in kept], axis=-1))
    # Every dataset is archived, the odd one included.
    archived = sorted((Path(end["outputs"]["bold"]).parent / "dicom").glob("*.dcm"))
    assert len(archived) == n
    columns = [int(pydicom.dcmread(p, stop_before_pixels=True).Columns) for p in archived]
    assert columns.count(3 * 20) == 1 and columns.count(3 * 16) == n - 1

    assert_series_complete(collector, sim)
    assert_receiver_alive(service)
    assert_no_internal_error(collector)


@pytest.mark.slow
def test_slice_that_never_arrives(service_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    service, collector = service_factory(assembler={"slice_timeout_s": 1.0})
    lost_volume, lost_slice = 2, 5
    scan = run_simulation(sim_config(service, format="slices"), out_dir=tmp_path / "scan")
    lost = scan.dicom_dir / f"vol{lost_volume:05d}_sl{lost_slice:03d}.dcm"
    assert lost in scan.files
    report = send_files([p for p in scan.files if p != lost], "127.0.0.1",
                        service.receiver.port)
    assert report.n_failed == 0 and report.n_sent == len(scan.files) - 1

    sim = send_normal_series(service, tmp_path)

    (alert,) = wait_alert(collector, "missing_slices")
    assert alert.header["index"] == lost_volume
    assert alert.header["series"] == series_id(scan.series_uid)
    assert f"(slices {lost_slice})" in alert.header["message"]
    assert_logged(caplog, "rtsc.dicom.assemble", f"volume {lost_volume}", "never arrived")

    end = wait_series_end(collector, scan.series_uid)
    assert end["n_volumes"] == N_VOLUMES and end["summary"]["missing_volumes"] == []
    volumes = of_series(collector.topic("volume"), scan.series_uid)
    assert [m.header["index"] for m in volumes] == list(range(N_VOLUMES))
    for m in volumes:
        assert ("missing_slices" in m.header["flags"]) == (m.header["index"] == lost_volume)
    truth = np.load(scan.truth_dir / "bold_quantised.npy")
    expected = truth.copy()
    expected[:, :, lost_slice, lost_volume] = 0
    assert np.any(truth[:, :, lost_slice, lost_volume] != 0)  # the zeros are a real change
    bold = np.asarray(nib.load(end["outputs"]["bold"]).dataobj)
    np.testing.assert_array_equal(bold, expected)
    archived = list((Path(end["outputs"]["bold"]).parent / "dicom").glob("*.dcm"))
    assert len(archived) == len(scan.files) - 1

    assert_series_complete(collector, sim)
    assert_receiver_alive(service)
    assert_no_internal_error(collector)
