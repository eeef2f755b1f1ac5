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

from rtsc.config import WatcherConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.config import AssemblerConfig
from rtsc.dicom.watcher import FolderWatcher
from rtsc.session import SessionStore
from rtsc.volume import Volume
from simulator.dicom_writer import new_series_info, volume_to_mosaic, write_dataset
from simulator.phantom import Grid

SETTLE_S = 0.05


def _file_bytes(tmp_path: Path, rng) -> tuple[bytes, np.ndarray]:
    data = rng.integers(0, 3000, size=(16, 16, 8)).astype(np.int16)
    info = new_series_info(3, 2.0, n_volumes=1, start_time=time.time())
    write_dataset(volume_to_mosaic(data, Grid((16, 16, 8), (3, 3, 3)).affine(), info, 0),
                  tmp_path / "source.dcm")
    return (tmp_path / "source.dcm").read_bytes(), data


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
    whole, data = _file_bytes(tmp_path, rng)
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
    whole, _ = _file_bytes(tmp_path, rng)
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
