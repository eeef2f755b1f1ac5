"""Tests of simulator.sender against real localhost peers: a pynetdicom storage SCP and
dcmtk's storescp, both on port-0 / free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt

from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices, write_dataset
from simulator.sender import SendError, send_files, send_series

STORESCP = "/usr/bin/storescp"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def make_volumes(rng, n=3, shape=(12, 10, 5), mosaic=True, tr_s=2.0):
    """n volumes as lists of datasets, and the series info."""
    info = new_series_info(9, tr_s, n_volumes=n, start_time=1.7e9)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    out = []
    for i in range(n):
        data = rng.integers(-500, 500, size=shape, dtype=np.int16)
        out.append([volume_to_mosaic(data, affine, info, i)] if mosaic
                   else volume_to_slices(data, affine, info, i))
    return out


class StorageSCP:
    """pynetdicom storage SCP on 127.0.0.1 and a port-0 port, keeping what it gets."""

    def __init__(self, ae_title="RTSC", require_called=False, status_for=None,
                 implicit_only=False):
        self.received: list[pydicom.Dataset] = []
        self.status_for = status_for or (lambda ds: 0x0000)
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called
        syntaxes = [ImplicitVRLittleEndian] if implicit_only else [
            ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        self.ae.add_supported_context(MRImageStorage, syntaxes)
        self.lock = threading.Lock()
        self.server = None

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return self.status_for(ds)

    def __enter__(self):
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]  # the bound port-0 port
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_send_series_delivers_identical_datasets(rng):
    volumes = make_volumes(rng, n=2, mosaic=False) + make_volumes(rng, n=2, mosaic=True)
    sent_callbacks = []
    with StorageSCP() as scp:
        report = send_series(volumes, "127.0.0.1", scp.port, speed=0,
                             on_sent=sent_callbacks.append)
    sent = [ds for vol in volumes for ds in vol]
    assert report.n_sent == len(sent) == 2 * 5 + 2 and report.n_failed == 0
    assert report.failures == [] and report.n_volumes == 4
    assert sent_callbacks == [0, 1, 2, 3]
    assert len(scp.received) == len(sent)
    for tx, rx in zip(sent, scp.received):
        assert rx.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert rx == tx  # every element, private CSA headers and pixels included
        np.testing.assert_array_equal(rx.pixel_array, tx.pixel_array)


def test_implicit_only_peer_gets_converted_datasets(rng):
    volumes = make_volumes(rng, n=1, mosaic=True)
    with StorageSCP(implicit_only=True) as scp:
        report = send_series(volumes, "127.0.0.1", scp.port, speed=0)
    assert report.n_sent == 1
    rx, tx = scp.received[0], volumes[0][0]
    assert rx.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(rx.pixel_array, tx.pixel_array)
    assert rx[0x0029, 0x1010].value == tx[0x0029, 0x1010].value  # CSA header intact


def test_pacing_follows_tr_over_speed(rng):
    volumes = make_volumes(rng, n=4, mosaic=True)
    with StorageSCP() as scp:
        t0 = time.monotonic()
        report = send_series(volumes, "127.0.0.1", scp.port, tr_s=0.3, speed=2.0)
        elapsed = time.monotonic() - t0
    starts = np.array([start for start, _ in report.volume_send_times])
    # Volume n is due at start + n * 0.15 s: never ahead of that schedule, and on it
    # typically (a stall of the shared machine delays one volume, not the next ones).
    behind = starts - starts[0] - 0.15 * np.arange(len(starts))
    assert behind.min() >= -0.01, behind
    assert abs(np.median(np.diff(starts)) - 0.15) < 0.04, np.diff(starts)
    assert elapsed >= 0.45
    assert all(end >= start for start, end in report.volume_send_times)


@pytest.mark.parametrize("speed", [0.0, float("inf")])
def test_speed_zero_or_inf_means_no_pacing(rng, speed):
    volumes = make_volumes(rng, n=3, mosaic=True)
    with StorageSCP() as scp:
        t0 = time.monotonic()
        report = send_series(volumes, "127.0.0.1", scp.port, tr_s=30.0, speed=speed)
    assert time.monotonic() - t0 < 5.0
    assert report.n_sent == 3


def test_failed_status_is_recorded(rng):
    volumes = make_volumes(rng, n=3, mosaic=False)
    bad = {ds.SOPInstanceUID for ds in volumes[1][:2]}
    with StorageSCP(status_for=lambda ds: 0xA700 if ds.SOPInstanceUID in bad else 0) as scp:
        report = send_series(volumes, "127.0.0.1", scp.port, speed=0)
    assert report.n_sent == 13 and report.n_failed == 2
    assert {f.instance for f in report.failures} == bad
    assert {(f.volume, f.status) for f in report.failures} == {(1, 0xA700)}


def test_rejected_association_raises(rng):
    with StorageSCP(ae_title="OTHER", require_called=True) as scp:
        with pytest.raises(SendError, match="rejected"):
            send_series(make_volumes(rng, n=1), "127.0.0.1", scp.port, called_ae="RTSC")
        assert scp.received == []


def test_refused_connection_raises(rng):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SendError, match="could not be reached"):
        send_series(make_volumes(rng, n=1), "127.0.0.1", port)


def test_negative_speed_raises(rng):
    with pytest.raises(ValueError):
        send_series([], "127.0.0.1", 1, speed=-1.0)


def write_series(volumes, folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for n, vol in enumerate(volumes):
        for k, ds in enumerate(vol):
            paths.append(folder / f"{n:04d}_{k:03d}.dcm")
            write_dataset(ds, paths[-1])
    return paths


def test_send_files_groups_volumes_by_acquisition(rng, tmp_path):
    volumes = make_volumes(rng, n=3, mosaic=False)
    paths = write_series(volumes, tmp_path / "in")
    calls = []
    with StorageSCP() as scp:
        report = send_files(paths, "127.0.0.1", scp.port, on_sent=calls.append)
    assert report.n_sent == 15 and report.n_volumes == 3 and calls == [0, 1, 2]
    assert [ds.SOPInstanceUID for ds in scp.received] == [
        ds.SOPInstanceUID for vol in volumes for ds in vol]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def storescp(tmp_path):
    """dcmtk storescp on a free port, writing into tmp_path / 'storescp'."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "RTSC", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"storescp did not start: {proc.stdout.read()!r}")
                time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.system
def test_send_files_to_dcmtk_storescp(rng, tmp_path, storescp):
    port, out = storescp
    volumes = make_volumes(rng, n=2, mosaic=True) + make_volumes(rng, n=1, mosaic=False)
    paths = write_series(volumes, tmp_path / "in")
    report = send_files(paths, "127.0.0.1", port, called_ae="RTSC")
    assert report.n_sent == len(paths) == 7 and report.n_failed == 0

    deadline = time.monotonic() + 5  # storescp may still be flushing the last file
    while len(list(out.iterdir())) < len(paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    received = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sorted(out.iterdir()))}
    sent = {ds.SOPInstanceUID: ds for vol in volumes for ds in vol}
    assert received.keys() == sent.keys()
    for uid, ds in sent.items():
        rx = received[uid]
        np.testing.assert_array_equal(rx.pixel_array, ds.pixel_array)
        assert rx.SeriesInstanceUID == ds.SeriesInstanceUID
        if "MOSAIC" in ds.ImageType:
            assert rx[0x0029, 0x1010].value == ds[0x0029, 0x1010].value


def test_association_aborted_mid_series_raises_with_report(rng):
    volumes = make_volumes(rng, n=4, mosaic=True)
    abort_uid = volumes[2][0].SOPInstanceUID

    class AbortingSCP(StorageSCP):
        def _on_store(self, event):
            if event.dataset.SOPInstanceUID == abort_uid:
                event.assoc.abort()
                return 0xA700
            return super()._on_store(event)

    with AbortingSCP() as scp:
        with pytest.raises(SendError, match="volume 2") as info:
            send_series(volumes, "127.0.0.1", scp.port, speed=0)
    report = info.value.report
    assert report is not None and report.n_sent == 2 and report.n_failed == 1
    assert report.failures[0].volume == 2 and report.failures[0].status is None


class _RacyCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint with its race made certain: after each pause
    request (``clear``), the reactor's next ``wait`` returns anyway, once the response
    is on the DIMSE queue (the reactor flagged as paused until then, so the sender
    sends), and the reactor then polls the queue: pynetdicom issue #875, where the
    reactor passed its wait just before the pause request."""

    def __init__(self, queue):
        super().__init__()
        self.set()
        self.queue = queue
        self.one_more = False

    def clear(self):
        self.one_more = True
        super().clear()

    def wait(self, timeout=None):
        if self.one_more:
            self.one_more = False
            deadline = time.monotonic() + 2.0
            while not self.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.0002)
            return True
        return super().wait(timeout)


def test_responses_the_reactor_takes_reach_the_sender(rng, monkeypatch):
    """pynetdicom's requestor reactor can take a C-STORE response off the queue before
    send_c_store waits for it; the sender gets it back instead of waiting out the DIMSE
    timeout. The race is made certain (_RacyCheckpoint, a sender that waits late)."""
    import simulator.sender as sender_module

    real_associate = sender_module._associate
    taken = []

    def racing_associate(*args, **kwargs):
        assoc = real_associate(*args, **kwargs)
        assoc._reactor_checkpoint = _RacyCheckpoint(assoc.dimse.msg_queue)
        get_msg = assoc.dimse.get_msg

        def late_get_msg(block=False):  # the sender's thread gets the core late
            if block:
                time.sleep(0.02)
            return get_msg(block)

        assoc.dimse.get_msg = late_get_msg
        assoc.dimse_timeout = 3.0
        serve = assoc._serve_request

        def counting(msg, context_id):
            taken.append(type(msg).__name__)
            serve(msg, context_id)

        assoc._serve_request = counting
        return assoc

    monkeypatch.setattr(sender_module, "_associate", racing_associate)
    volumes = make_volumes(rng, n=40, mosaic=True, shape=(8, 8, 4))
    with StorageSCP() as scp:
        report = send_series(volumes, "127.0.0.1", scp.port, speed=0)
    assert report.n_sent == 40 and report.n_failed == 0, report.failures
    assert len(scp.received) == 40
    assert taken == ["C_STORE"] * 40  # the reactor took every response
