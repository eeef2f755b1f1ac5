"""Receiver access control: allow-lists, association limit, dataset size, idle timeout."""

from __future__ import annotations

import queue
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from rtsc.config import config_from_dict
from rtsc.dicom.access import AccessPolicy
from rtsc.dicom.receiver import Receiver
from rtsc.errors import ConfigError
from rtsc.session import SessionStore

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"


def _receiver(tmp_path: Path, **receiver) -> tuple[Receiver, queue.Queue]:
    config = config_from_dict({"receiver": {"port": 0, "host": "127.0.0.1", **receiver}})
    out: queue.Queue = queue.Queue()
    rec = Receiver(config.receiver, SessionStore(tmp_path / "sessions"), out)
    rec.start()
    return rec, out


def _echo(port: int, calling: str = "SCU", called: str = "RTSC"):
    """Association result of a pynetdicom C-ECHO: (established, rejected)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    established, rejected = assoc.is_established, assoc.is_rejected
    if established:
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    return established, rejected


def _mr_dataset(n_pixels: int = 16) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 1, n_pixels
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros(n_pixels, np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_policy_networks_and_titles():
    policy = AccessPolicy.from_lists(["RTSC"], ["SCANNER "], ["10.1.0.0/16", "::1"])
    assert policy.check("10.1.2.3", "SCANNER", "RTSC") is None
    assert policy.check("::1", "SCANNER", "RTSC   ") is None
    assert policy.check("::ffff:10.1.9.9", "SCANNER", "RTSC") is None
    assert policy.check("10.2.0.1", "SCANNER", "RTSC")[0] == (1, 1, 1)
    assert policy.check("not an address", "SCANNER", "RTSC")[0] == (1, 1, 1)
    assert policy.check("10.1.2.3", "OTHER", "RTSC")[0] == (1, 1, 3)
    assert policy.check("10.1.2.3", "SCANNER", "PACS")[0] == (1, 1, 7)
    assert AccessPolicy().check("192.0.2.1", "ANY", "ANY") is None


def test_bad_allowed_host_is_a_config_error():
    with pytest.raises(ConfigError, match=r"receiver.allowed_hosts\[1\].*'10.0.0.300'"):
        config_from_dict({"receiver": {"allowed_hosts": ["10.0.0.1", "10.0.0.300"]}})


def test_default_binds_loopback_and_allows_any():
    config = config_from_dict({}).receiver
    assert config.host == "127.0.0.1"
    assert config.called_aets == [] and config.calling_aets == [] and config.allowed_hosts == []


def test_disallowed_titles_and_address_rejected_at_association(tmp_path):
    rec, out = _receiver(tmp_path, called_aets=["RTSC"], calling_aets=["SCANNER"],
                         allowed_hosts=["127.0.0.0/8"])
    try:
        assert _echo(rec.port, "SCANNER", "RTSC") == (True, False)
        assert _echo(rec.port, "INTRUDER", "RTSC") == (False, True)
        assert _echo(rec.port, "SCANNER", "PACS") == (False, True)
        assert rec.n_rejected_associations == 2
    finally:
        rec.close()
    rec, out = _receiver(tmp_path, allowed_hosts=["192.0.2.0/24"])
    try:
        assert _echo(rec.port, "SCANNER", "RTSC") == (False, True)
    finally:
        rec.close()


def test_dcmtk_refused(tmp_path):
    """dcmtk's echoscu and storescu with a wrong calling AE title: association rejected."""
    rec, out = _receiver(tmp_path, calling_aets=["SCANNER"])
    try:
        ok = subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "RTSC", "127.0.0.1",
                             str(rec.port)], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([ECHOSCU, "-aet", "INTRUDER", "-aec", "RTSC", "127.0.0.1",
                              str(rec.port)], capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0
        assert "Rejected" in bad.stdout + bad.stderr
        path = tmp_path / "one.dcm"
        _mr_dataset().save_as(path, enforce_file_format=True)
        store = subprocess.run([STORESCU, "-aet", "INTRUDER", "-aec", "RTSC", "127.0.0.1",
                                str(rec.port), str(path)], capture_output=True, text=True,
                               timeout=30)
        assert store.returncode != 0
        assert "Rejected" in store.stdout + store.stderr
        assert rec.n_stored == 0 and out.empty()
        assert not list((tmp_path / "sessions").rglob("*.dcm"))
    finally:
        rec.close()


def test_association_limit(tmp_path):
    rec, out = _receiver(tmp_path, max_associations=1)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", rec.port, ae_title="RTSC")
        assert first.is_established
        second = ae.associate("127.0.0.1", rec.port, ae_title="RTSC")
        assert second.is_rejected
        first.release()
        time.sleep(0.3)  # the first association's thread ends
        assert _echo(rec.port) == (True, False)
    finally:
        rec.close()


def test_oversized_dataset_refused_nothing_archived(tmp_path):
    rec, out = _receiver(tmp_path, max_dataset_mb=0.01)  # 10 kB
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", rec.port, ae_title="RTSC")
        assert assoc.is_established
        small = assoc.send_c_store(_mr_dataset(16))
        big = assoc.send_c_store(_mr_dataset(20000))  # 40 kB of pixels
        assoc.release()
        assert small.Status == 0x0000
        assert big.Status == 0xA700
        archived = list((tmp_path / "sessions").rglob("*.dcm*"))
        assert len(archived) == 1 and rec.n_stored == 1
        assert out.qsize() == 1
    finally:
        rec.close()


def test_idle_association_closed(tmp_path):
    rec, out = _receiver(tmp_path, network_timeout_s=0.5, acse_timeout_s=0.5)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", rec.port, ae_title="RTSC")
        assert assoc.is_established
        deadline = time.time() + 10
        while assoc.is_established and time.time() < deadline:
            time.sleep(0.1)
        assert assoc.is_aborted
        # A TCP peer that never sends an A-ASSOCIATE-RQ is dropped after acse_timeout_s.
        with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as sock:
            t0 = time.time()
            assert sock.recv(1) == b""
            assert time.time() - t0 < 5
    finally:
        rec.close()
