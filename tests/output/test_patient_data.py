"""No patient identifier leaves rtsc except in the DICOM archive; DICOM strings never make paths."""

from __future__ import annotations

import gzip
import logging
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import zmq
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

import simulator.scanner as scanner
from rtsc.client import request_snapshot
from rtsc.config import config_from_dict
from rtsc.redact import REDACTED, redact
from rtsc_subprocess import rtsc_run
from simulator.dicom_series import new_series_info
from simulator.scanner import datasets, make_plan, run_simulation

NAME = "QZXDOE^JANEQZX"
PATIENT_ID = "QZX4471ID"
BIRTH = "19311231"


class _RawSub:
    """Every frame of every published message, as bytes."""

    def __init__(self, endpoint: str) -> None:
        self.frames: list[bytes] = []
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                self.frames.extend(bytes(f) for f in self._sock.recv_multipart())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)


def _identifiers(sim_info) -> list[bytes]:
    words = [NAME, NAME.replace("^", " "), "QZXDOE", "JANEQZX", PATIENT_ID, BIRTH,
             sim_info.series_uid, sim_info.study_uid]
    return [w.encode() for w in words]


@pytest.mark.slow
def test_no_identifier_in_messages_logs_or_outputs(service_factory, tmp_path, monkeypatch,
                                                     caplog):
    made = []

    def distinctive(*args, **kw):
        info = new_series_info(*args, patient_name=NAME, patient_id=PATIENT_ID,
                               patient_birth_date=BIRTH, **kw)
        made.append(info)
        return info

    monkeypatch.setattr(scanner, "new_series_info", distinctive)
    caplog.set_level(logging.DEBUG)
    service, collector = service_factory(session={"report": True}, simulator={
        "shape": [32, 32, 12], "voxel_size_mm": [6.0, 6.0, 9.0], "n_volumes": 10})
    raw = _RawSub(service.publisher.endpoint)
    time.sleep(0.3)
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0
    assert collector.ended.wait(30)
    snapshot = request_snapshot(service.publisher.snapshot_endpoint, timeout_s=5)
    service.stop()  # waits for report.html
    raw.close()
    (info,) = made
    words = _identifiers(info)

    # The archive keeps the original bytes (that is its purpose): the name is there.
    session_root = Path(service.config.session.dir)
    archived = sorted(session_root.rglob("*.dcm"))
    assert len(archived) == 10
    assert str(pydicom.dcmread(archived[0]).PatientName) == NAME

    # Published messages (every frame, headers and buffers) and the snapshot.
    assert len(raw.frames) > 20
    blob = b"\n".join(raw.frames)
    snap_blob = repr(snapshot).encode()
    # Captured log lines at DEBUG (rtsc and its libraries).
    log_blob = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert log_blob
    # Every output file's name, and the content of every non-DICOM output.
    outputs = [p for p in session_root.rglob("*") if p.is_file()]
    names = {p.name for p in outputs}
    assert {"bold.nii.gz", "confounds.tsv", "qc.json", "report.html"} <= names
    name_blob = "\n".join(str(p.relative_to(session_root)) for p in session_root.rglob("*"))
    contents = []
    for path in outputs:
        if path.suffix == ".dcm":
            continue
        data = path.read_bytes()
        contents.append(gzip.decompress(data) if path.suffix == ".gz" else data)
        if path.name.endswith(".nii.gz"):
            header = nib.load(path).header
            contents.append(bytes(header["descrip"]) + bytes(header["aux_file"])
                            + bytes(header["intent_name"]))
    for word in words:
        assert word not in blob, word
        assert word not in snap_blob, word
        assert word not in log_blob, word
        assert word.decode() not in name_blob, word
        for content in contents:
            assert word not in content, word
    # The series is named by its hashed UID only.
    assert info.series_uid not in name_blob


def _hostile(series_uid: str, sop_uid: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = sop_uid
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros(16, np.uint16).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uids_stay_inside_session(service_factory, tmp_path):
    service, collector = service_factory()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", service.receiver.port, ae_title="RTSC")
    assert assoc.is_established
    statuses = []
    for series_uid, sop_uid in [("../../x", "../../y"), ("/tmp/abs", "../../../etc/z"),
                                ("..", "..")]:
        with pydicom.config.disable_value_validation():
            ds = _hostile(series_uid, sop_uid)
        statuses.append(assoc.send_c_store(ds).Status)
    assoc.release()
    assert statuses == [0, 0, 0]
    session_root = Path(service.config.session.dir).resolve()
    service.stop()
    everything = [p.resolve() for p in tmp_path.rglob("*")]
    outside = [p for p in everything if session_root not in p.parents and p != session_root]
    assert outside == []
    assert not Path("/tmp/abs").exists() and not (tmp_path / "x").exists()
    archived = list(session_root.rglob("*.dcm"))
    assert len(archived) == 3
    for path in archived:
        assert path.parent.name == "dicom"
        assert path.parent.parent.parent == session_root


# Non-conformant on purpose (letters, a leading zero, bad dates and times): pydicom and
# pynetdicom report such values, and reported them in clear.
HOSTILE = {
    "series_uid": "1.2.826.0.1.3680043.9.QZXSERIES",
    "study_uid": "1.2.826.0.1.3680043.9.QZXSTUDY",
    "frame_of_reference_uid": "1.2.826.0.1.3680043.9.QZXFOR",
    "sop_uid": "1.2.826.0.1.3680043.09.44710",
    "name": "QZXDOE^JANE",
    "patient_id": "QZX4471ID",
    "birth": "1931QZX",
    "date": "2024QZX0",
    "time": "QZX2359",
}


def _send_hostile_series(port: int, n_volumes: int = 4) -> list[int]:
    """A small mosaic series whose identifiers are all non-conformant; the statuses."""
    info = new_series_info(7, 2.0, series_uid=HOSTILE["series_uid"],
                           study_uid=HOSTILE["study_uid"],
                           frame_of_reference_uid=HOSTILE["frame_of_reference_uid"],
                           patient_name=HOSTILE["name"], patient_id=HOSTILE["patient_id"],
                           patient_birth_date=HOSTILE["birth"], n_volumes=n_volumes)
    sim = config_from_dict({"simulator": {"shape": [32, 32, 12], "n_volumes": n_volumes,
                                          "speed": 0.0}}).simulator
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSC")
    assert assoc.is_established
    statuses = []
    with pydicom.config.disable_value_validation():
        for i, volume in enumerate(datasets(make_plan(sim), info, "mosaic")):
            for ds in volume:
                ds.SOPInstanceUID = f"{HOSTILE['sop_uid']}{i}"
                ds.StudyDate = ds.SeriesDate = ds.ContentDate = HOSTILE["date"]
                ds.StudyTime = ds.SeriesTime = ds.ContentTime = HOSTILE["time"]
                statuses.append(assoc.send_c_store(ds).Status)
    assoc.release()
    return statuses


def _leaks(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if "QZX" in line or any(value in line for value in HOSTILE.values())]


@pytest.mark.system
@pytest.mark.slow
def test_no_received_identifier_in_rtsc_run_output(tmp_path):
    """Everything `rtsc run` writes (log lines, warnings on stderr) while it receives
    datasets with non-conformant UIDs, name, ID, dates and times: none of those values.
    pydicom's and pynetdicom's reports are kept, the values replaced."""
    with rtsc_run(tmp_path, session={"series_timeout_s": 3.0},
                  assembler={"slice_timeout_s": 1.0}) as run:
        assert _send_hostile_series(run.port) == [0] * 4
        deadline = time.time() + 30
        while "volumes" not in run.output() and time.time() < deadline:
            time.sleep(0.2)
        assert run.stop() == 0
        output = run.output()
    assert "4 volumes" in output, output[-3000:]
    assert _leaks(output) == []
    assert "Invalid value for VR UI: " + REDACTED in output  # pydicom still says so
    # The archive holds the values as received.
    archived = sorted((tmp_path / "sessions").rglob("*.dcm"))
    assert len(archived) == 4
    assert pydicom.dcmread(archived[0]).PatientID == HOSTILE["patient_id"]


@pytest.mark.slow
def test_no_received_identifier_in_library_users_logs_or_warnings(service_factory, caplog,
                                                                   recwarn):
    """RunService alone (no CLI): its logging records and Python warnings are redacted."""
    caplog.set_level(logging.DEBUG)
    service, collector = service_factory(session={"series_timeout_s": 3.0},
                                         assembler={"slice_timeout_s": 1.0})
    assert _send_hostile_series(service.receiver.port) == [0] * 4
    assert collector.ended.wait(30)
    service.stop()
    lines = [r.getMessage() for r in caplog.records]
    lines += [str(w.message) for w in recwarn]
    assert _leaks("\n".join(lines)) == []
    assert any(REDACTED in line for line in lines)
    # ... and the filters are gone once it stopped.
    assert not logging.getLogger("pydicom").filters
    assert not any("rtsc-" in str(f[1]) for f in warnings.filters)


def test_redact_keeps_what_is_not_a_value():
    assert redact("Invalid value for VR UI: '1.2.3.QZX'. Please see <https://x/y.html>") == \
        f"Invalid value for VR UI: {REDACTED}. Please see <https://x/y.html>"
    assert redact("Non-conformant 'Affected SOP Instance UID' value '1.2.3.04'") == \
        f"Non-conformant 'Affected SOP Instance UID' value {REDACTED}"
    assert redact("value b'QZX^DOE'") == f"value {REDACTED}"
    assert redact('  File "/opt/rtsc/x.py", line 3, in f') == '  File "/opt/rtsc/x.py", line 3, in f'
    # Unquoted UIDs go, addresses, standard UIDs, file names and versions stay.
    text = ("from 192.168.10.20:11112 (MR 1.2.840.10008.5.1.4.1.1.4) uid 2.25.1234.5678.9 "
            "000001.dcm pydicom 3.0.2")
    assert redact(text, quoted=False) == text.replace("2.25.1234.5678.9", REDACTED)
