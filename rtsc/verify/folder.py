"""`rtsc verify FOLDER`: every series in a folder tree through rtsc's own assembler.

The files are read once header-only and grouped by SeriesInstanceUID. A series rtsc's
series filter does not process is listed with the reason. Each other series is handed,
file by file in acquisition order, to a fresh :class:`~rtsc.dicom.assemble.Assembler`
as :class:`~rtsc.dicom.incoming.Incoming` items, exactly as the receiver and the folder
watcher hand them to `rtsc run`'s worker; the volumes and alerts it returns, with the
headers, make the :class:`~rtsc.verify.checks.SeriesFacts` the checks read. When
dcm2niix is installed it converts the same files first, and each volume is compared
with its conversion as the assembler releases it.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from rtsc.config import Config
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.mosaic import is_mosaic
from rtsc.dicom.geometry import int_or_none, plane_geometry
from rtsc.dicom.multiframe import MULTIFRAME_SOP_CLASSES
from rtsc.dicom.incoming import Incoming
from rtsc.intake.receiver import UNCOMPRESSED_SYNTAXES
from rtsc.dicom.recognise import skip_reason
from rtsc.dicom.vendor import manufacturer, slices_per_volume
from rtsc.errors import DicomError, RtscError
from rtsc.intake.replay import acquisition_order_key
from rtsc.verify import dcm2niix
from rtsc.verify.checks import FAIL, SKIP, SeriesFacts, header_checks
from rtsc.verify.report import SeriesReport, VerifyReport
from rtsc.volume import Volume, series_id

log = logging.getLogger(__name__)

#: Transfer syntaxes rtsc's receiver accepts: UID -> name.
ACCEPTED_SYNTAXES = {str(uid): uid.name for uid in UNCOMPRESSED_SYNTAXES}
_MEASURES = ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")


@dataclass(frozen=True)
class _File:
    """What verify keeps of one file's header (not the header: a long single-slice
    series has tens of thousands)."""

    path: Path
    order: tuple[int, int, str]
    instance: int | None
    sop_uid: str
    syntax: str | None
    measures: dict[str, Any]
    position: float | None


@dataclass
class SeriesFiles:
    """The files of one SeriesInstanceUID, in acquisition order, and its first header."""

    uid: str
    first: Dataset
    files: list[_File] = field(default_factory=list)


def pixel_measures(ds: Dataset) -> dict[str, Any]:
    """PixelSpacing (row, column spacing, mm), SliceThickness and SpacingBetweenSlices
    (mm) of an image: its own elements, else (enhanced multi-frame) the shared, else
    the first frame's PixelMeasuresSequence. Absent or malformed values are left out."""
    sources = [ds]
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(sequence) or []
        for item in (groups[0].get("PixelMeasuresSequence") or [])[:1] if groups else []:
            sources.append(item)
    out: dict[str, Any] = {}
    for keyword in _MEASURES:
        for source in sources:
            value = source.get(keyword)
            if value in (None, ""):
                continue
            try:
                numbers = tuple(round(float(v), 4) for v in value) \
                    if keyword == "PixelSpacing" else round(float(value), 4)
            except (TypeError, ValueError):
                break
            if keyword == "PixelSpacing" and len(numbers) != 2:
                break
            out[keyword] = numbers
            break
    return out


def _slice_position(ds: Dataset) -> float | None:
    """Position along the slice normal, mm, of a single-slice image (rounded as the
    assembler rounds it), None for mosaics, multi-frame images and broken geometry."""
    if str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES or is_mosaic(ds):
        return None
    try:
        row_cos, col_cos, _, ipp = plane_geometry(ds)
    except DicomError:
        return None
    return round(float(ipp @ np.cross(row_cos, col_cos)), 3)


def read_folder(folder: Path) -> tuple[list[SeriesFiles], Counter]:
    """The DICOM files under ``folder`` grouped by series (by SeriesNumber), and counts
    of the files left out (``not DICOM``, ``no SeriesInstanceUID``)."""
    groups: dict[str, SeriesFiles] = {}
    left_out: Counter = Counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - whatever pydicom cannot read is not DICOM here
            left_out["Philips PAR/REC (rtsc verify checks DICOM only)"
                     if path.suffix.lower() in (".par", ".rec") else "not DICOM"] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            left_out["no SeriesInstanceUID"] += 1
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        group = groups.setdefault(uid, SeriesFiles(uid, ds))
        group.files.append(_File(path, acquisition_order_key(ds, path.name),
                                 int_or_none(ds.get("InstanceNumber")),
                                 str(ds.get("SOPInstanceUID", "")),
                                 None if syntax is None else str(syntax), pixel_measures(ds),
                                 _slice_position(ds)))
    ordered = sorted(groups.values(), key=lambda g: (
        int_or_none(g.first.get("SeriesNumber")) or 0, series_id(g.uid)))
    for group in ordered:
        group.files.sort(key=lambda f: f.order)
    return ordered, left_out


def _clean(ds: Dataset) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", str(ds.get("SeriesDescription", "") or ""))[:64]


def _header_facts(group: SeriesFiles) -> dict[str, Any]:
    """The facts every echo of a series shares: from its files' headers."""
    first = group.first
    sops = Counter(f.sop_uid for f in group.files)
    nz = slices_per_volume(first)
    cols, rows = int_or_none(first.get("Columns")), int_or_none(first.get("Rows"))
    matrix = None
    if cols and rows:
        tiles = math.ceil(math.sqrt(nz)) if is_mosaic(first) and nz else 1
        matrix = (cols // tiles, rows // tiles)
    measures: dict[str, Counter] = {}
    for f in group.files:
        for name, value in f.measures.items():
            measures.setdefault(name, Counter())[value] += 1
    positions = [f.position for f in group.files]
    return dict(manufacturer=manufacturer(first), n_files=len(group.files),
                n_duplicates=sum(n - 1 for n in sops.values()),
                syntaxes=Counter(f.syntax for f in group.files if f.syntax is not None),
                measures=measures, header_matrix=matrix, header_nz=nz,
                positions=None if any(p is None for p in positions)
                else sorted(set(positions)))  # type: ignore[type-var]


class SeriesRun:
    """One series' volumes and alerts as the assembler hands them out, and their
    comparison with dcm2niix.

    Attributes
    ----------
    facts : dict
        Series id -> :class:`~rtsc.verify.checks.SeriesFacts` (one per echo).
    """

    def __init__(self, conversion: dcm2niix.Conversion | None) -> None:
        self.conversion = conversion
        self.facts: dict[str, SeriesFacts] = {}
        self.comparisons: dict[str, dcm2niix.VoxelComparison | None] = {}
        self.references: dict[str, dcm2niix.Reference | None] = {}

    def take(self, events: list[Any], default_series: str, label: str | None) -> None:
        for event in events:
            if isinstance(event, Volume):
                self._volume(event)
            elif isinstance(event, AssemblyAlert):
                text = event.message
                if text.startswith("dataset: "):
                    text = text[len("dataset: "):]
                facts = self.facts.setdefault(event.series or default_series, SeriesFacts())
                facts.alerts.append((event.code, f"{label}: {text}" if label else text))

    def _volume(self, volume: Volume) -> None:
        sid = volume.info.series
        facts = self.facts.setdefault(sid, SeriesFacts())
        if facts.affine is None:
            facts.affine = np.array(volume.affine)
        facts.info = volume.info
        facts.indices.append(volume.index)
        facts.shapes[volume.shape] += 1
        facts.t_acquired[volume.index] = volume.t_acquired
        if self.conversion is None or self.conversion.error is not None:
            return
        if sid not in self.comparisons:
            ref = dcm2niix.pick(self.conversion, volume.shape, volume.affine, volume.info.echo)
            self.references[sid] = ref
            self.comparisons[sid] = None if ref is None else dcm2niix.VoxelComparison(ref)
        comparison = self.comparisons[sid]
        if comparison is not None:
            comparison.add(volume)

    def dcm2niix_checks(self, sid: str, binary: str | None) -> list:
        facts = self.facts[sid]
        if binary is None:
            return dcm2niix.unavailable(SKIP, "dcm2niix not installed (not on PATH, not "
                                              "beside this Python; --dcm2niix PATH)")
        assert self.conversion is not None
        if self.conversion.error is not None:
            return dcm2niix.unavailable(FAIL, self.conversion.error)
        if not facts.indices:
            return dcm2niix.unavailable(FAIL, "rtsc assembled no volume to compare")
        reference, comparison = self.references.get(sid), self.comparisons.get(sid)
        if reference is None or comparison is None:
            shapes = ", ".join("x".join(map(str, r.image.shape))
                               for r in self.conversion.references)
            return dcm2niix.unavailable(FAIL, f"none of dcm2niix's images ({shapes}) matches "
                                              "this series' matrix")
        return comparison.checks() + dcm2niix.sidecar_checks(
            facts.info, facts.affine, reference.sidecar, np.asarray(reference.image.affine))


def assemble_group(group: SeriesFiles, config: Config,
                   conversion: dcm2niix.Conversion | None = None) -> SeriesRun:
    """One series' files through a fresh assembler, in acquisition order, with the
    headers' facts added: the :class:`SeriesRun` the checks read.

    Parameters
    ----------
    group : a series from :func:`read_folder`
    config : its assembler and series filter settings are used
    conversion : dcm2niix's conversion of the same files, to compare each volume with
    """
    main = series_id(group.uid)
    run = SeriesRun(conversion)
    run.facts[main] = SeriesFacts()
    # A constant clock: files come at once, as from a folder; nothing waits for time.
    assembler = Assembler(config.assembler, clock=lambda: 0.0,
                          series_filter=config.series_filter,
                          max_volumes=config.session.max_volumes)
    for f in group.files:
        label = f"image {f.instance if f.instance is not None else '?'}"
        try:
            ds = pydicom.dcmread(f.path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a finding
            run.take([AssemblyAlert("warning", "bad_dicom", f"unreadable: {exc}", main)],
                     main, label)
            continue
        # No path: alert texts would start with the file name, which may name the
        # patient; images are named by InstanceNumber instead.
        run.take(assembler.add(Incoming(ds, None, 0.0, "folder")), main, label)
    run.take(assembler.poll(now=float("inf")), main, None)
    shared = _header_facts(group)
    for sid in list(run.facts):
        if sid != main and not run.facts[sid].indices:
            del run.facts[sid]  # alerts of an echo that made no volume: kept on echo 1
            continue
        for name, value in shared.items():
            setattr(run.facts[sid], name, value)
    return run


def verify_group(group: SeriesFiles, config: Config, binary: str | None,
                 partial: bool = False) -> list[SeriesReport]:
    """The reports of one series (one per echo of a multi-echo series)."""
    first = group.first
    number, description = int_or_none(first.get("SeriesNumber")), _clean(first)
    reason = skip_reason(first, config.series_filter)
    if reason is not None:
        return [SeriesReport(series_id(group.uid), number, description, manufacturer(first),
                             n_files=len(group.files), skipped=reason)]
    with tempfile.TemporaryDirectory(prefix="rtsc-verify-") as scratch:
        conversion = None if binary is None \
            else dcm2niix.convert([f.path for f in group.files], Path(scratch), binary)
        if conversion is not None and conversion.error is not None:
            log.warning("series %s: %s", series_id(group.uid), conversion.error)
        run = assemble_group(group, config, conversion)
        reports = []
        for sid, facts in run.facts.items():
            info = facts.info
            echo = f"_echo{info.echo}" if info is not None and info.echo not in (None, 1) \
                else ""
            reports.append(SeriesReport(
                sid, number, description + echo, facts.manufacturer,
                info.source if info is not None else None, facts.n_files,
                checks=header_checks(facts, ACCEPTED_SYNTAXES, partial)
                + run.dcm2niix_checks(sid, binary)))
    return reports


def verify_folder(folder: Path, config: Config, binary: str | None,
                  partial: bool = False,
                  progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every series under ``folder``.

    Parameters
    ----------
    folder : a folder tree of DICOM files (any number of series)
    config : the rtsc config (its assembler and series filter settings are used)
    binary : the dcm2niix executable, or None to skip its checks
    partial : a series holding only the first volumes of its announced run passes
    progress : called with a line of text as each series is started

    Raises
    ------
    RtscError
        ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RtscError(f"rtsc verify: {folder} is not a folder")
    groups, left_out = read_folder(folder)
    report = VerifyReport("folder", dcm2niix=dcm2niix.dcm2niix_version(binary)
                          if binary else None)
    for why, count in sorted(left_out.items()):
        report.notes.append(f"{count} file{'s' if count != 1 else ''} left out: {why}")
    if not groups:
        report.failures.append("no DICOM image in the folder")
    for group in groups:
        if progress is not None:
            progress(f"checking series {group.first.get('SeriesNumber', '?')} "
                     f"{_clean(group.first)} [{series_id(group.uid)}]: "
                     f"{len(group.files)} files")
        report.series += verify_group(group, config, binary, partial)
    return report
