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
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from rtsc.config import config_from_dict
from rtsc.intake.access import AccessPolicy
from rtsc.intake.receiver import Receiver
from rtsc.errors import ConfigError
from rtsc.output.session import SessionStore
from rtsc_subprocess import rtsc_run, write_deflate_bomb

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


@pytest.mark.system
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


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the receiver closes ``sock`` (EOF or reset), None if not within."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except ConnectionError:
            return time.monotonic() - t0
    return None


def _echoscu(port: int, timeout_s: float = 5.0) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    result = subprocess.run([ECHOSCU, "-to", str(timeout_s), "-ta", str(timeout_s),
                             "-td", str(timeout_s), "-aec", "RTSC", "127.0.0.1", str(port)],
                            capture_output=True, text=True, timeout=30)
    return result, time.monotonic() - t0


@pytest.mark.system
@pytest.mark.slow
def test_slowloris_holds_no_association_slot_and_is_dropped(tmp_path):
    """8 peers that send 4 bytes of a PDU header (and 1 that sends nothing) hold none of
    the 8 association slots: echoscu is answered at once; each is closed at its deadline."""
    rec, out = _receiver(tmp_path, request_timeout_s=2.0)  # max_associations: 8 (default)
    attackers = []
    try:
        for _ in range(rec.config.max_associations):
            sock = socket.create_connection(("127.0.0.1", rec.port), timeout=5)
            sock.sendall(b"\x01\x00\x00\x00")  # A-ASSOCIATE-RQ, 2 of its 4 length bytes
            attackers.append((sock, time.monotonic()))
        silent = socket.create_connection(("127.0.0.1", rec.port), timeout=5)
        attackers.append((silent, time.monotonic()))
        time.sleep(0.3)
        result, seconds = _echoscu(rec.port)
        assert result.returncode == 0, result.stdout + result.stderr
        assert seconds < 3.0
        for sock, t_connect in attackers:
            waited = _closed_within(sock, 10.0)
            assert waited is not None, "a slowloris connection was not closed in 10 s"
            # closed at request_timeout_s after it connected (2 s), not later
            assert time.monotonic() - t_connect < 2.0 + 1.5
        assert rec.n_rejected_associations == 0
    finally:
        for sock, _ in attackers:
            sock.close()
        rec.close()


def test_request_deadline_is_not_reset_by_trickling(tmp_path):
    """A peer sending its request one byte every 0.2 s is closed at the deadline, even
    though it is never idle for long."""
    rec, out = _receiver(tmp_path, request_timeout_s=1.0)
    try:
        with socket.create_connection(("127.0.0.1", rec.port), timeout=5) as sock:
            t0 = time.monotonic()
            request = b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 256
            closed = False
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                except ConnectionError:
                    closed = True
                    break
                if _closed_within(sock, 0.2) is not None:
                    closed = True
                    break
            assert closed
            assert time.monotonic() - t0 < 1.0 + 1.0
    finally:
        rec.close()


@pytest.mark.system
def test_pending_connections_limited_per_host(tmp_path):
    """One address holds at most max_pending_per_host connections that have not sent a
    request; the next is closed at once; another address is served meanwhile."""
    rec, out = _receiver(tmp_path, request_timeout_s=5.0, max_pending_per_host=4)
    held = []
    try:
        for _ in range(4):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", rec.port))
            held.append(sock)
        time.sleep(0.3)
        extra = socket.socket()
        extra.bind(("127.0.0.2", 0))
        extra.connect(("127.0.0.1", rec.port))
        held.append(extra)
        assert _closed_within(extra, 1.0) is not None
        assert all(_closed_within(s, 0.2) is None for s in held[:4])
        result, seconds = _echoscu(rec.port)  # from 127.0.0.1
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in held:
            sock.close()
        rec.close()


def test_stalled_pdu_in_an_association_is_dropped(tmp_path):
    """An established association whose peer stops in the middle of a PDU is closed after
    network_timeout_s (the receiver's DUL no longer waits for the rest forever)."""
    rec, out = _receiver(tmp_path, network_timeout_s=1.0)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", rec.port, ae_title="RTSC")
        assert assoc.is_established
        t0 = time.monotonic()
        assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x00")  # P-DATA-TF, half a header
        while not assoc.is_aborted and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert assoc.is_aborted
        assert time.monotonic() - t0 < 1.0 + 2.0
    finally:
        rec.close()


def test_request_timeout_validated():
    with pytest.raises(ConfigError, match="receiver.request_timeout_s"):
        config_from_dict({"receiver": {"request_timeout_s": 0}})
    with pytest.raises(ConfigError, match="receiver.max_pending_per_host"):
        config_from_dict({"receiver": {"max_pending_per_host": 0}})


def _send_file(port: int, path: Path, monkeypatch) -> int:
    """C-STORE a file as it is encoded (pynetdicom reads it in chunks, never inflates it)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage, DeflatedExplicitVRLittleEndian)
    ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSC")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()


def test_deflate_bomb_refused_while_inflating(tmp_path, monkeypatch):
    """A deflated dataset is measured inflated, and inflation stops at the limit: a 0.1 MB
    file inflating to 100 MB is out of resources with max_dataset_mb 8, nothing archived;
    a small deflated dataset is still received and decoded; a truncated one is refused."""
    rec, out = _receiver(tmp_path, max_dataset_mb=8.0)
    try:
        bomb = tmp_path / "bomb.dcm"
        write_deflate_bomb(bomb, 100.0)
        assert bomb.stat().st_size < 200_000
        assert _send_file(rec.port, bomb, monkeypatch) == 0xA700
        assert not list((tmp_path / "sessions").rglob("*.dcm*")) and out.empty()
        assert rec.n_stored == 0

        ds = _mr_dataset(64)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        good = tmp_path / "good.dcm"
        ds.save_as(good, enforce_file_format=True)
        assert _send_file(rec.port, good, monkeypatch) == 0x0000
        item = out.get(timeout=5)
        loaded = item.load()
        assert loaded.SeriesInstanceUID == ds.SeriesInstanceUID
        assert loaded.PixelData == ds.PixelData
        if item.processed is not None:
            item.processed.set()

        encoded = good.read_bytes()
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes(encoded[:-20])
        assert _send_file(rec.port, truncated, monkeypatch) == 0xC210
    finally:
        rec.close()


@pytest.mark.system
@pytest.mark.slow
def test_deflate_bomb_memory_of_rtsc_run(tmp_path, monkeypatch):
    """`rtsc run` answered a 0.4 MB deflated dataset inflating to 400 MB with success and
    its peak memory grew by 760 MB; now out of resources, and it grows by about the limit."""
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, 400.0)
    assert bomb.stat().st_size < 600_000
    with rtsc_run(tmp_path, receiver={"max_dataset_mb": 64.0}) as run:
        time.sleep(1.0)  # start-up allocations settle
        before = run.peak_rss_mb()
        status = _send_file(run.port, bomb, monkeypatch)
        time.sleep(1.0)  # the worker would be decoding it now
        after = run.peak_rss_mb()
        output = run.output()
        assert run.stop() == 0
    assert status == 0xA700, output[-2000:]
    assert after - before < 64 + 40, (before, after)
    assert "inflates past receiver.max_dataset_mb" in output
    assert not list((tmp_path / "sessions").rglob("*.dcm*"))
