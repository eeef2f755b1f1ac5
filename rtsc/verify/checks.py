"""The checks of `rtsc verify`: one PASS/FAIL/SKIP line each, from a series' facts.

:class:`SeriesFacts` is what :mod:`rtsc.verify.folder` gathers about one series: from
its files' headers (read once, header only) and from the volumes rtsc's own assembler
made of them. Each ``check_*`` function turns the facts into one :class:`Check`; they
are pure, so tests call them on facts of real series, altered on purpose.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from rtsc.dicom.geometry import WORLD_DIRECTIONS, phase_encoding_label, world_axis
from rtsc.volume import SeriesInfo

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: Assembler alert codes that are not a problem of the series itself.
_HARMLESS_ALERTS = frozenset({"skipped_series"})
#: Header values and positions are decimal strings rounded by the scanner: compared
#: within this, mm.
HEADER_TOL_MM = 0.01
#: ImageOrientationPatient of real scanners is orthonormal to ~1e-6; a sheared stack
#: (GE gantry tilt) is off by degrees.
ORTHOGONAL_TOL = 1e-3
#: Volumes' acquisition times may step by a few ms more than the TR (Siemens writes the
#: measured start, on a 2.5 ms grid); a wrong TR is off by far more.
TR_STEP_TOL = 0.05


@dataclass(frozen=True)
class Check:
    """One line of the table.

    Attributes
    ----------
    name : str
        What is checked, e.g. ``voxel size`` (also the key in the JSON results).
    status : str
        ``PASS``, ``FAIL`` or ``SKIP``.
    value : str
        What was found, with units, or why the check was skipped.
    details : tuple of str
        Further lines (the first alerts of a failed ``volumes`` check...).
    data : dict
        The values as numbers, for the JSON results.
    """

    name: str
    status: str
    value: str
    details: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeriesFacts:
    """Everything the checks look at for one series.

    Attributes
    ----------
    manufacturer : str or None
        ``GE``, ``SIEMENS``, ``PHILIPS``... (:func:`rtsc.dicom.vendor.manufacturer`).
    n_files : int
        Files of the series (its SeriesInstanceUID) in the folder.
    n_duplicates : int
        Files repeating a SOPInstanceUID already seen: the assembler drops them silently.
    syntaxes : Counter
        Transfer syntax name -> files.
    measures : dict
        ``PixelSpacing`` (row, column spacing, mm), ``SliceThickness``,
        ``SpacingBetweenSlices`` (mm) -> Counter of the values the files give.
    positions : list of float or None
        Distinct slice positions along the slice normal, mm (single-slice series).
    header_matrix : (columns, rows) or None
        Of one slice, as the headers give it (a mosaic's tile).
    header_nz : int or None
        Slices per volume as the headers give it (:func:`rtsc.dicom.vendor.slices_per_volume`).
    info : SeriesInfo or None
        The series' facts as the assembler left them (after its second volume).
    indices : list of int
        Indices of the volumes assembled, in the order they were released.
    shapes : Counter
        Matrix (nx, ny, nz) -> volumes.
    affine : (4, 4) ndarray or None
        The first volume's voxel -> RAS+ affine, mm.
    t_acquired : dict
        Volume index -> acquisition time (s since the epoch) or None.
    alerts : list of (code, text)
        The assembler's alerts, texts naming images by InstanceNumber, not file name.
    """

    manufacturer: str | None = None
    n_files: int = 0
    n_duplicates: int = 0
    syntaxes: Counter = field(default_factory=Counter)
    measures: dict[str, Counter] = field(default_factory=dict)
    positions: list[float] | None = None
    header_matrix: tuple[int, int] | None = None
    header_nz: int | None = None
    info: SeriesInfo | None = None
    indices: list[int] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    affine: np.ndarray | None = None
    t_acquired: dict[int, float | None] = field(default_factory=dict)
    alerts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The most common matrix, or None without volumes."""
        return self.shapes.most_common(1)[0][0] if self.shapes else None


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}".rstrip("0").rstrip(".") if math.isfinite(value) else "?"


def _counts(counter: Counter, unit: str = "") -> str:
    return ", ".join(f"{_value_text(v)}{unit} in {n}" for v, n in counter.most_common())


def _value_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(_fmt(v) for v in value)
    return _fmt(value) if isinstance(value, float) else str(value)


def check_volumes(facts: SeriesFacts) -> Check:
    """Every file went into a volume (or repeats one that did), no volume zero-filled.

    FAIL on any assembler alert (unplaced, late, missing slices, unreadable image,
    geometry change...) or without a volume; duplicates are counted, not failed: the
    same image sent twice is dropped by design.
    """
    codes = Counter(code for code, _ in facts.alerts if code not in _HARMLESS_ALERTS)
    n = len(facts.indices)
    per = f" ({facts.shape[2]} slices each)" if facts.info is not None \
        and facts.info.source == "slices" and facts.shape else ""
    late = codes.pop("late_slice", 0) + codes.pop("late_volume", 0)
    value = (f"{n} volume{'s' if n != 1 else ''} from {facts.n_files} files{per}; unplaced "
             f"{codes.pop('unplaced', 0)}, late {late}, duplicate {facts.n_duplicates}")
    if codes:
        value += "; " + ", ".join(f"{code} {count}" for code, count in sorted(codes.items()))
    bad = [text for code, text in facts.alerts if code not in _HARMLESS_ALERTS]
    status = PASS if n and not bad else FAIL
    return Check("volumes", status, value, tuple(bad[:5]) + (
        (f"... and {len(bad) - 5} more",) if len(bad) > 5 else ()),
        {"n_volumes": n, "n_files": facts.n_files, "n_duplicates": facts.n_duplicates,
         "alerts": dict(Counter(code for code, _ in facts.alerts))})


def check_matrix(facts: SeriesFacts) -> Check:
    """The volumes' matrix equals the headers' image size and slice count, in every volume."""
    shape = facts.shape
    if shape is None:
        return Check("matrix", FAIL, "no volume assembled")
    text = " x ".join(map(str, shape))
    problems = []
    if len(facts.shapes) > 1:
        problems.append("volumes differ: " + _counts(Counter(
            {" x ".join(map(str, s)): n for s, n in facts.shapes.items()})))
    if facts.header_matrix is not None and tuple(shape[:2]) != tuple(facts.header_matrix):
        problems.append(f"the headers' images are {facts.header_matrix[0]} x "
                        f"{facts.header_matrix[1]}")
    if facts.header_nz is not None and shape[2] != facts.header_nz:
        problems.append(f"the headers announce {facts.header_nz} slices")
    if facts.positions is not None and len(facts.positions) != shape[2]:
        problems.append(f"the images lie at {len(facts.positions)} slice positions")
    return Check("matrix", FAIL if problems else PASS,
                 text + (f" ({'; '.join(problems)})" if problems else ""),
                 data={"shape": list(shape), "header_slices": facts.header_nz})


def check_voxel_size(facts: SeriesFacts) -> Check:
    """The affine's voxel size equals PixelSpacing and the slice spacing, and every file
    gives the same PixelSpacing, SliceThickness and SpacingBetweenSlices.

    The slice spacing is compared with SpacingBetweenSlices when given (within
    :data:`HEADER_TOL_MM`); against SliceThickness alone a difference is a slice gap
    (or overlap), reported, not failed. Single slices must lie on one evenly spaced grid.
    """
    if facts.affine is None:
        return Check("voxel size", FAIL, "no volume assembled")
    sizes = np.sqrt((facts.affine[:3, :3] ** 2).sum(axis=0))
    text = " x ".join(f"{s:.3f}" for s in sizes) + " mm"
    problems, notes = [], []
    for name, counter in facts.measures.items():
        if len(counter) > 1:
            problems.append(f"{name} differs between files: {_counts(counter)}")
    spacing = _most_common(facts.measures.get("PixelSpacing"))
    if spacing is None:
        problems.append("no PixelSpacing")
    elif abs(sizes[0] - spacing[1]) > HEADER_TOL_MM or abs(sizes[1] - spacing[0]) > HEADER_TOL_MM:
        problems.append(f"PixelSpacing says {_value_text(spacing)} mm (rows/columns)")
    between = _most_common(facts.measures.get("SpacingBetweenSlices"))
    thickness = _most_common(facts.measures.get("SliceThickness"))
    if between is not None and abs(sizes[2] - between) > HEADER_TOL_MM:
        problems.append(f"SpacingBetweenSlices says {_fmt(between)} mm")
    if thickness is not None:
        gap = sizes[2] - thickness
        notes.append(f"slice thickness {_fmt(thickness)} mm" + (
            f", gap {_fmt(gap)} mm" if gap > HEADER_TOL_MM else
            f", overlap {_fmt(-gap)} mm" if gap < -HEADER_TOL_MM else ""))
    if facts.positions is not None and len(facts.positions) > 1:
        steps = np.diff(sorted(facts.positions))
        if np.abs(steps - sizes[2]).max() > HEADER_TOL_MM:
            problems.append(f"slice positions are not evenly spaced by {sizes[2]:.3f} mm "
                            f"(steps {_fmt(float(steps.min()))} to {_fmt(float(steps.max()))} mm)")
    shown = "; ".join(problems + notes)
    return Check("voxel size", FAIL if problems else PASS,
                 text + (f" ({shown})" if shown else ""),
                 data={"voxel_size_mm": [float(s) for s in sizes],
                       "slice_thickness_mm": thickness, "spacing_between_slices_mm": between})


def _most_common(counter: Counter | None) -> Any:
    return counter.most_common(1)[0][0] if counter else None


def check_orientation(facts: SeriesFacts) -> Check:
    """Axis codes of the RAS affine (``LPS``: i toward left, j toward posterior, k toward
    superior) and the obliquity; FAIL when the voxel axes are not orthogonal (slices
    sheared, as a gantry tilt makes them) or the affine is degenerate."""
    if facts.affine is None:
        return Check("orientation", FAIL, "no volume assembled")
    matrix = facts.affine[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(norms <= 0):
        return Check("orientation", FAIL, "degenerate affine")
    unit = matrix / norms
    codes = "".join(nib.aff2axcodes(facts.affine))
    cosines = np.abs(unit.T @ unit - np.eye(3))
    oblique = max(math.degrees(math.acos(min(1.0, float(np.abs(unit[:, a]).max()))))
                  for a in range(3))
    shear = math.degrees(math.asin(min(1.0, float(cosines.max()))))
    text = f"{codes}, " + (f"oblique {oblique:.1f} deg" if oblique >= 0.05 else "not oblique")
    data = {"axcodes": codes, "oblique_deg": oblique, "shear_deg": shear}
    if cosines.max() > ORTHOGONAL_TOL:
        return Check("orientation", FAIL, f"{text}; voxel axes {shear:.2f} deg from "
                     "orthogonal (slices sheared: gantry tilt?)", data=data)
    return Check("orientation", PASS, text, data=data)


def check_tr(facts: SeriesFacts) -> Check:
    """TR known and positive; where the volumes' acquisition times step, they step by
    the TR (within :data:`TR_STEP_TOL`)."""
    tr = facts.info.tr_s if facts.info is not None else None
    if not tr or tr <= 0:
        return Check("TR", FAIL, "no repetition time in the headers")
    times = [(i, facts.t_acquired.get(i)) for i in sorted(facts.t_acquired)]
    steps = [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(times, times[1:])
             if t0 is not None and t1 is not None and i1 > i0]
    step = float(np.median(steps)) if steps else None
    data = {"tr_s": tr, "acquisition_step_s": step}
    if step is None or step <= 0:
        why = "one volume" if len(times) < 2 else "the acquisition times do not step"
        return Check("TR", PASS, f"{tr:.3f} s ({why}: not cross-checked)", data=data)
    text = f"{tr:.3f} s (volumes acquired every {step:.3f} s)"
    return Check("TR", PASS if abs(step - tr) <= TR_STEP_TOL * tr else FAIL, text, data=data)


def check_run_length(facts: SeriesFacts, partial: bool = False) -> Check:
    """The run length the headers announce against the volumes present: all of them,
    none missing in between. ``partial``: a folder holding only the first volumes of the
    run passes (the corpus keeps only a few volumes of long runs)."""
    announced = facts.info.n_expected if facts.info is not None else None
    present = sorted(set(facts.indices))
    n = len(present)
    gaps = sorted(set(range(present[-1] + 1)) - set(present)) if present else []
    data = {"announced": announced, "present": n, "missing": gaps}
    if not present:
        return Check("run length", FAIL, f"no volume of {announced or '?'} announced", data=data)
    if gaps:
        return Check("run length", FAIL, f"{n} of {announced or '?'} announced; missing "
                     f"{volume_ranges(gaps)}", data=data)
    if announced is None:
        return Check("run length", SKIP, f"{n} volumes; the headers announce no run length "
                     "(rtsc ends such a series session.series_timeout_s after its last volume)",
                     data=data)
    if n > announced:
        return Check("run length", FAIL, f"{n} volumes but {announced} announced", data=data)
    if n < announced:
        missing = volume_ranges(list(range(n, announced)))
        if partial:
            return Check("run length", PASS, f"the first {n} of {announced} announced "
                         f"(--partial: {missing} not in the folder)", data=data)
        return Check("run length", FAIL, f"{n} of {announced} announced: {missing} missing "
                     "(--partial accepts a folder holding only the first volumes)", data=data)
    return Check("run length", PASS, f"{n} of {announced} announced", data=data)


def volume_ranges(indices: list[int]) -> str:
    """``volumes 3, 7-9`` from [3, 7, 8, 9]."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ("volume " if len(indices) == 1 else "volumes ") + ", ".join(parts)


def check_slice_times(facts: SeriesFacts) -> Check:
    """Slice times present, one per slice, within [0, TR), and each time shared by
    exactly multiband-factor slices; the value names the order along the slice axis."""
    info = facts.info
    times = None if info is None or info.slice_times_s is None \
        else np.asarray(info.slice_times_s, dtype=np.float64)
    if times is None:
        if facts.manufacturer == "PHILIPS":
            return Check("slice times", SKIP, "Philips DICOM carries no slice times")
        return Check("slice times", FAIL, "absent from the headers")
    tr = info.tr_s if info is not None else None
    nz = facts.shape[2] if facts.shape else None
    mb = info.multiband_factor if info is not None else None
    groups = Counter(np.round(times, 4).tolist())
    sizes = Counter(groups.values())
    data = {"slice_times_s": times.tolist(), "multiband_factor": mb}
    problems = []
    if nz is not None and times.size != nz:
        problems.append(f"{times.size} times for {nz} slices")
    if times.min() < 0 or (tr and times.max() >= tr):
        problems.append(f"span {_fmt(float(times.min()))}-{_fmt(float(times.max()))} s "
                        f"beyond the TR {_fmt(tr or float('nan'))} s")
    if mb is None:
        problems.append("multiband factor unknown")
    elif set(sizes) != {mb}:
        problems.append("slices per time " + ", ".join(
            f"{size} ({count}x)" for size, count in sorted(sizes.items()))
            + f" for multiband {mb}")
    order = _acquisition_order(times, facts.affine, mb or 1) if facts.affine is not None else ""
    text = (f"{times.size} slices at 0-{_fmt(float(times.max()))} s within TR "
            f"{_fmt(tr or float('nan'))} s, {order}multiband {mb if mb is not None else '?'}")
    return Check("slice times", FAIL if problems else PASS,
                 text + (f" ({'; '.join(problems)})" if problems else ""), data=data)


def _acquisition_order(times: np.ndarray, affine: np.ndarray, mb: int) -> str:
    """``sequential I>S, `` / ``interleaved along I-S, ``: the order of the first
    band's slices along the world axis of k."""
    world, sign = world_axis(affine, 2)
    along = times if sign > 0 else times[::-1]
    band = along[:max(1, along.size // max(mb, 1))]
    low, high = WORLD_DIRECTIONS[world]
    steps = np.diff(band)
    if band.size < 2:
        return ""
    if np.all(steps > 0):
        return f"sequential {low}>{high}, "
    if np.all(steps < 0):
        return f"sequential {high}>{low}, "
    return f"interleaved along {low}-{high}, "


def check_phase_encoding(facts: SeriesFacts) -> Check:
    """Phase-encoding direction (axis and polarity) known: BIDS form in rtsc's voxel
    axes and as the console names it (``A>>P``)."""
    info = facts.info
    direction = info.phase_encoding_direction if info is not None else None
    axis = info.phase_encoding_axis if info is not None else None
    if direction is not None and facts.affine is not None:
        return Check("phase encoding", PASS,
                     f"{direction} ({phase_encoding_label(direction, facts.affine)})",
                     data={"direction": direction,
                           "label": phase_encoding_label(direction, facts.affine)})
    if axis is not None and facts.manufacturer == "PHILIPS":
        world = WORLD_DIRECTIONS[world_axis(facts.affine, "ij".index(axis))[0]] \
            if facts.affine is not None else ("?", "?")
        return Check("phase encoding", SKIP, f"axis {axis} ({world[0]}-{world[1]}); Philips "
                     "DICOM does not give the polarity", data={"axis": axis})
    return Check("phase encoding", FAIL, "absent from the headers"
                 + (f" (axis {axis}, polarity unknown)" if axis else ""), data={"axis": axis})


def check_transfer_syntax(facts: SeriesFacts, accepted: dict[str, str]) -> Check:
    """Every file in a transfer syntax rtsc's receiver accepts (``accepted``: UID ->
    name); a compressed series is refused by the receiver and cannot be assembled."""
    text = "; ".join(f"{accepted.get(uid, _syntax_name(uid))} ({n} files)"
                     for uid, n in facts.syntaxes.most_common())
    refused = [uid for uid in facts.syntaxes if uid not in accepted]
    data = {"syntaxes": {uid: n for uid, n in facts.syntaxes.items()}}
    if not facts.syntaxes:
        return Check("transfer syntax", FAIL, "no file meta information", data=data)
    if refused:
        return Check("transfer syntax", FAIL, f"{text}: rtsc takes uncompressed data only "
                     "(set the console's DICOM node to uncompressed)", data=data)
    return Check("transfer syntax", PASS, text, data=data)


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def header_checks(facts: SeriesFacts, accepted_syntaxes: dict[str, str],
                  partial: bool = False) -> list[Check]:
    """The checks that need no reference reader, in table order."""
    return [check_volumes(facts), check_matrix(facts), check_voxel_size(facts),
            check_orientation(facts), check_tr(facts), check_run_length(facts, partial),
            check_slice_times(facts), check_phase_encoding(facts),
            check_transfer_syntax(facts, accepted_syntaxes)]
