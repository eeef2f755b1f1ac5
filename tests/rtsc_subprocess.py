"""`rtsc run` as a subprocess on free loopback ports, for tests that watch the whole process
(its output, its peak memory)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

from conftest import free_port
from rtsc.config import merge


def rtsc_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m rtsc.cli``."""
    script = Path(sys.executable).with_name("rtsc")
    if script.exists():
        return [str(script)]
    found = shutil.which("rtsc")
    return [found] if found else [sys.executable, "-m", "rtsc.cli"]


@dataclass
class RtscProcess:
    """A running `rtsc run`: its process, C-STORE port and combined stdout/stderr file."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def stop(self) -> int:
        """SIGTERM, then the exit code (`rtsc run` processes what it received first)."""
        self.proc.terminate()
        return self.proc.wait(timeout=60)


@contextlib.contextmanager
def rtsc_run(tmp_path: Path, **sections: dict[str, Any]) -> Iterator[RtscProcess]:
    """Start `rtsc run` with ``sections`` merged into a loopback config; kill it after."""
    port, pub, snap = free_port(), free_port(), free_port()
    cfg = merge({
        "receiver": {"port": port},
        "publish": {"endpoint": f"tcp://127.0.0.1:{pub}",
                    "snapshot_endpoint": f"tcp://127.0.0.1:{snap}"},
        "session": {"dir": str(tmp_path / "sessions")},
    }, sections)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "rtsc.log"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rtsc.cli", "run", "--config",
                                 str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    running = RtscProcess(proc, port, log_path)
    try:
        deadline = time.time() + 60
        while "Ctrl-C to stop" not in running.output():
            assert proc.poll() is None, running.output()
            assert time.time() < deadline, "rtsc run did not start"
            time.sleep(0.1)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_deflate_bomb(path: Path, inflated_mb: float) -> FileMetaDataset:
    """A Deflated Explicit VR Little Endian MR file whose pixel data inflate to
    ``inflated_mb`` MB of zeros (written compressing as it goes: the test never holds it).

    Returns the file meta (SOP class and instance as C-STORE needs them).
    """
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    n_pixels = int(inflated_mb * 1e6) // 2
    ds.Rows, ds.Columns = n_pixels // 4096, 4096
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = False, True
    write_dataset(head, ds)
    n_bytes = ds.Rows * ds.Columns * 2
    head.write(b"\xe0\x7f\x10\x00OW\x00\x00" + n_bytes.to_bytes(4, "little"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        f.write(deflate.compress(head.getvalue()))
        zeros = bytes(1 << 22)
        left = n_bytes
        while left:
            piece = zeros[:min(left, len(zeros))]
            f.write(deflate.compress(piece))
            left -= len(piece)
        f.write(deflate.flush())
    return meta
