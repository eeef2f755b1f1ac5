"""Folder export: files appear while being written, with pauses longer than settle_s.

A partly written file must be retried, never read half and never lost: the watcher must
hand on exactly the whole file once, byte for byte, however the writer pauses; a file
that stays short is taken as it is only after ``retry_s`` (then the assembler alerts).
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pydicom

from dicom_files import mosaic_file_bytes
from rtsc.config import WatcherConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.config import AssemblerConfig
from rtsc.intake.watcher import FolderWatcher
from rtsc.output.session import SessionStore
from rtsc.volume import Volume

SETTLE_S = 0.05


def _watcher(tmp_path: Path, retry_s: float = 30.0):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    out: queue.Queue = queue.Queue()
    cfg = WatcherConfig(dir=str(inbox), poll_s=0.01, settle_s=SETTLE_S, retry_s=retry_s)
    return FolderWatcher(cfg, SessionStore(tmp_path / "sessions"), out), inbox, out


def _scan_for(watcher: FolderWatcher, seconds: float) -> int:
    handed = 0
    end = time.time() + seconds
    while time.time() < end:
        handed += watcher.scan()
        time.sleep(0.01)
    return handed


def test_file_written_with_long_pauses_is_taken_once_and_whole(tmp_path, rng):
    whole, data = mosaic_file_bytes(tmp_path, rng)
    pixel_start = whole.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData
    watcher, inbox, out = _watcher(tmp_path)
    target = inbox / "0001.dcm"
    # Cut points: inside the file meta, just before PixelData (a dataset without pixels
    # parses), and in the middle of the pixels; each pause is 6x settle_s.
    cuts = [200, pixel_start, pixel_start + (len(whole) - pixel_start) // 2, len(whole)]
    written = 0
    with open(target, "wb") as fh:
        for cut in cuts:
            fh.write(whole[written:cut])
            fh.flush()
            written = cut
            handed = _scan_for(watcher, 6 * SETTLE_S)
            if cut < len(whole):
                assert handed == 0 and out.empty(), f"read half (at {cut} of {len(whole)})"
    assert handed == 1 and out.qsize() == 1
    item = out.get_nowait()
    assert item.path.read_bytes() == whole  # archived byte for byte
    (volume,) = Assembler(AssemblerConfig()).add(item)
    assert isinstance(volume, Volume)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    assert _scan_for(watcher, 3 * SETTLE_S) == 0  # never taken twice


def test_file_that_stays_short_is_taken_after_retry_s_and_alerted(tmp_path, rng):
    whole, _ = mosaic_file_bytes(tmp_path, rng)
    watcher, inbox, out = _watcher(tmp_path, retry_s=0.3)
    cut = whole[:len(whole) - 500]
    (inbox / "short.dcm").write_bytes(cut)
    t0 = time.time()
    assert _scan_for(watcher, 0.2) == 0
    handed = _scan_for(watcher, 0.4)
    assert handed == 1 and time.time() - t0 >= 0.3
    item = out.get_nowait()
    assert item.path.read_bytes() == cut  # archived as it is: nothing lost
    (alert,) = Assembler(AssemblerConfig()).add(item)
    assert isinstance(alert, AssemblyAlert) and "truncated PixelData" in alert.message


def test_text_file_is_retried_then_reported(tmp_path):
    watcher, inbox, out = _watcher(tmp_path, retry_s=0.2)
    (inbox / "notes.dcm").write_text("not DICOM\n")
    assert _scan_for(watcher, 0.1) == 0
    assert _scan_for(watcher, 0.3) == 1
    item = out.get_nowait()
    assert item.error is not None and "not a readable DICOM" in item.error


# ---- issue 16, item 6: whole means the pixel data is; a later version replaces a part;
# ---- what is not a regular file is never opened

def _cut_before_rows(whole: bytes) -> bytes:
    """The file cut at the element boundary just before Rows (0028,0010): everything up to
    SeriesInstanceUID and beyond parses, with no Rows, no pixels."""
    rows = whole.index(b"\x28\x00\x10\x00US")
    assert whole.index(b"\x20\x00\x0e\x00UI") < rows  # SeriesInstanceUID is before the cut
    return whole[:rows]


def test_file_cut_before_rows_waits_for_its_pixels(tmp_path, rng):
    """An MR image without Rows is not whole (it used to be read as "not an image")."""
    whole, data = mosaic_file_bytes(tmp_path, rng)
    cut = _cut_before_rows(whole)
    parsed = pydicom.dcmread(__import__("io").BytesIO(cut))
    assert "Rows" not in parsed and "SeriesInstanceUID" in parsed  # what the watcher sees
    watcher, inbox, out = _watcher(tmp_path)
    target = inbox / "0001.dcm"
    target.write_bytes(cut)
    assert _scan_for(watcher, 6 * SETTLE_S) == 0 and out.empty(), "a cut file taken as whole"
    with open(target, "ab") as fh:
        fh.write(whole[len(cut):])
    assert _scan_for(watcher, 6 * SETTLE_S) == 1
    item = out.get_nowait()
    assert item.path.read_bytes() == whole
    (volume,) = Assembler(AssemblerConfig()).add(item)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))


def test_non_image_sop_class_is_whole_without_pixels(tmp_path):
    """Raw Data Storage has no pixels: it is taken once it parses, without waiting."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data Storage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    watcher, inbox, out = _watcher(tmp_path)
    ds.save_as(inbox / "raw.dcm", enforce_file_format=True)
    assert _scan_for(watcher, 4 * SETTLE_S) == 1
    assert out.get_nowait().error is None


def test_partial_file_taken_as_is_is_replaced_by_its_complete_version(tmp_path, rng):
    """A writer slower than retry_s: the part is taken as it is (archived, alerted); the
    complete file written later at the same path is taken again, archived again, and the
    assembler makes the volume from it."""
    whole, data = mosaic_file_bytes(tmp_path, rng)
    watcher, inbox, out = _watcher(tmp_path, retry_s=0.3)
    target = inbox / "0001.dcm"
    target.write_bytes(_cut_before_rows(whole))
    assert _scan_for(watcher, 0.6) == 1  # taken as it is after retry_s
    assembler = Assembler(AssemblerConfig())
    partial = out.get_nowait()
    assert partial.path.read_bytes() == _cut_before_rows(whole)  # archived: nothing lost
    (alert,) = assembler.add(partial)
    assert isinstance(alert, AssemblyAlert)
    time.sleep(0.02)  # a later mtime, whatever the file system's resolution
    target.write_bytes(whole)  # the writer finishes (rewrites it complete)
    assert _scan_for(watcher, 6 * SETTLE_S) == 1
    complete = out.get_nowait()
    assert complete.path != partial.path and complete.path.read_bytes() == whole
    (volume,) = assembler.add(complete)
    assert isinstance(volume, Volume)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    assert _scan_for(watcher, 4 * SETTLE_S) == 0  # a whole file is not taken twice


def _scan_in_thread(watcher: FolderWatcher, seconds: float) -> int:
    """Scan for ``seconds`` in a thread and fail (instead of hanging) if a scan blocks."""
    import threading

    handed: list[int] = []
    thread = threading.Thread(target=lambda: handed.append(_scan_for(watcher, seconds)),
                              daemon=True)
    thread.start()
    thread.join(seconds + 5.0)
    assert not thread.is_alive(), "the watcher blocked"
    return handed[0]


def test_what_is_not_a_regular_file_is_skipped_with_one_alert_never_opened(tmp_path, rng):
    import os
    import socket

    whole, _ = mosaic_file_bytes(tmp_path, rng)
    watcher, inbox, out = _watcher(tmp_path, retry_s=0.2)
    os.mkfifo(inbox / "0001.dcm")
    (inbox / "link-to-fifo.dcm").symlink_to(inbox / "0001.dcm")
    (inbox / "broken.dcm").symlink_to(inbox / "nowhere.dcm")
    (tmp_path / "elsewhere").mkdir()
    (inbox / "linked-folder").symlink_to(tmp_path / "elsewhere")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(inbox / "0002.dcm"))
    (inbox / "0003.dcm").write_bytes(whole)
    try:
        handed = _scan_in_thread(watcher, 1.0)
    finally:
        server.close()
        try:  # unblock a reader left blocked on the FIFO (the unfixed watcher)
            os.close(os.open(inbox / "0001.dcm", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    from rtsc.intake.watcher import InputAlert

    items = []
    while not out.empty():
        items.append(out.get_nowait())
    alerts = {item.message.split(":")[0]: item.message for item in items
              if isinstance(item, InputAlert)}
    assert handed == 1  # the regular file, and only it
    (taken,) = [item for item in items if not isinstance(item, InputAlert)]
    assert taken.error is None and taken.path.read_bytes() == whole
    assert sorted(alerts) == ["0001.dcm", "0002.dcm", "broken.dcm", "link-to-fifo.dcm",
                              "linked-folder"]  # once each, over ~100 scans
    assert "a FIFO" in alerts["0001.dcm"] and "a socket" in alerts["0002.dcm"]
    assert "a symlink to FIFO" in alerts["link-to-fifo.dcm"]
    assert "a broken symlink" in alerts["broken.dcm"]
    assert all(item.code == "not_regular_file" and item.level == "warning"
               for item in items if isinstance(item, InputAlert))


def test_service_publishes_the_not_regular_file_alert_once(service_factory, tmp_path):
    import os

    inbox = tmp_path / "export"
    inbox.mkdir()
    service, collector = service_factory(
        watcher={"dir": str(inbox), "poll_s": 0.02, "settle_s": 0.05}, receiver={"enabled": False})
    os.mkfifo(inbox / "0001.dcm")  # once the collector is subscribed
    deadline = time.time() + 10
    while time.time() < deadline and not collector.topic("alert"):
        time.sleep(0.05)
    time.sleep(0.5)  # ~25 more scans: still one alert
    alerts = [m.header for m in collector.topic("alert")]
    assert [(a["level"], a["code"]) for a in alerts] == [("warning", "not_regular_file")]
    assert "0001.dcm: a FIFO" in alerts[0]["message"]
    assert service.watcher._thread.is_alive()
