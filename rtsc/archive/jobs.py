"""The series of an archive, found on disk: the jobs of `rtsc archive-qc`.

A path given to `rtsc archive-qc` is one of:

* a 4D NIfTI run (``.nii`` / ``.nii.gz``): one job; its BIDS events file is the sibling
  named like the run with ``_bold`` (or the last entity) replaced by ``_events.tsv``;
* a folder: every 4D NIfTI whose name ends in ``_bold`` below it is a BIDS run (one
  job each, with its events file); every other folder below it (itself included) that
  directly holds files which are not NIfTI, JSON or TSV is a DICOM series folder (one
  job: `rtsc replay` assembles whatever series it holds, as `rtsc run` would); a folder
  is taken for DICOM when one of its first three such files (by name) is a DICOM Part 10
  file (``DICM`` after the preamble).

A job's identity is the SHA-1 of its resolved path: the same archive found again gives
the same jobs, which is what makes a run resumable (:mod:`rtsc.archive.run`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from rtsc.errors import RtscError

_NIFTI = (".nii", ".nii.gz")
_SIDECARS = (".json", ".tsv", ".bval", ".bvec", ".txt", ".md")


@dataclass(frozen=True)
class ArchiveJob:
    """One series (a DICOM folder) or run (a NIfTI) to process.

    Attributes
    ----------
    path : str, the NIfTI file or the DICOM folder, resolved
    kind : ``"nifti"`` or ``"dicom"``
    events : str or None, the BIDS events.tsv of a NIfTI run
    job_id : str, 12 hex digits, stable for the path
    name : str, a readable label: the path below the root given, ``/`` as ``_``
    """

    path: str
    kind: str
    events: str | None
    job_id: str
    name: str


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.endswith(".nii.gz") else name[:-4]


def events_for(run: Path) -> Path | None:
    """The BIDS events file of a run: ``<entities>_events.tsv`` beside it, the run's last
    entity (``_bold``, ``_cbv`` ...) replaced; None when there is none."""
    stem = re.sub(r"_[A-Za-z0-9]+$", "", _nifti_stem(run))
    candidate = run.with_name(f"{stem}_events.tsv")
    return candidate if candidate.is_file() else None


def _job(path: Path, kind: str, events: Path | None, root: Path) -> ArchiveJob:
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:12]
    # the path below the root names the job (a DICOM folder is often just "dicom")
    try:
        relative = resolved.relative_to(root.resolve())
        parts = list(relative.parts) or [resolved.name]
    except ValueError:
        parts = [resolved.name]
    if kind == "nifti":
        parts[-1] = _nifti_stem(path)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(parts))[-80:]
    return ArchiveJob(str(resolved), kind, None if events is None else str(events.resolve()),
                      digest, name or digest)


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(_NIFTI)


def find_jobs(paths: list[Path]) -> list[ArchiveJob]:
    """The jobs of the given paths, in a stable order, each once.

    Raises
    ------
    RtscError
        A path does not exist, or nothing to process was found under it.
    """
    jobs: dict[str, ArchiveJob] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise RtscError(f"archive-qc: {root} does not exist")
        found: list[ArchiveJob] = []
        if root.is_file():
            if not _is_nifti(root):
                raise RtscError(f"archive-qc: {root} is a file but not a NIfTI run; give a "
                                "4D NIfTI, a BIDS folder or a folder of DICOM series")
            found.append(_job(root, "nifti", events_for(root), root.parent))
        else:
            for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
                files = [p for p in folder.iterdir() if p.is_file()
                         and not p.name.startswith(".")]
                runs = [p for p in files if _is_nifti(p) and _nifti_stem(p).endswith("_bold")]
                found += [_job(p, "nifti", events_for(p), root) for p in sorted(runs)]
                others = sorted(p for p in files if not _is_nifti(p)
                                and not p.name.endswith(_SIDECARS))
                # a few files decide (an archive folder holds one kind of thing)
                if any(_is_dicom(p) for p in others[:3]):
                    found.append(_job(folder, "dicom", None, root))
        if not found:
            raise RtscError(f"archive-qc: no BIDS run (*_bold.nii[.gz]) and no DICOM series "
                            f"folder under {root}")
        for job in found:
            jobs.setdefault(job.job_id, job)
    return list(jobs.values())
