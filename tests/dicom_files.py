"""Bytes of DICOM files for the tests that compare what was sent with what was archived."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom

from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, write_dataset
from simulator.phantom import Grid


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]  # preamble+DICM, group-length element, group


def mosaic_file_bytes(tmp_path: Path, rng) -> tuple[bytes, np.ndarray]:
    """A 16x16x8 random mosaic written to ``tmp_path/source.dcm``: its bytes and data."""
    data = rng.integers(0, 3000, size=(16, 16, 8)).astype(np.int16)
    info = new_series_info(3, 2.0, n_volumes=1, start_time=time.time())
    write_dataset(volume_to_mosaic(data, Grid((16, 16, 8), (3, 3, 3)).affine(), info, 0),
                  tmp_path / "source.dcm")
    return (tmp_path / "source.dcm").read_bytes(), data
