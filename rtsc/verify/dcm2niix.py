"""rtsc against dcm2niix, the field's reference DICOM reader, on the same files.

dcm2niix converts a series' files (linked into a scratch folder under neutral names)
to an uncompressed NIfTI and its BIDS sidecar. rtsc's volumes are compared with it one
at a time as the assembler releases them (memory stays at one volume): voxels exact
after both are reoriented to RAS+ (nibabel's closest canonical orientation; dcm2niix
flips rows, rtsc keeps the DICOM order), the affine within 1e-3 mm. The sidecar's
RepetitionTime and SliceTiming must agree within 1 ms, PhaseEncodingDirection and
MultibandAccelerationFactor exactly; slice times and phase encoding are compared on
world axes, through each reader's own affine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from rtsc.dicom.geometry import phase_encoding_label, phase_encoding_world, slice_times_world
from rtsc.verify.checks import FAIL, PASS, SKIP, Check
from rtsc.volume import SeriesInfo, Volume

log = logging.getLogger(__name__)

#: The table lines this module fills, in order.
CHECK_NAMES = ("dcm2niix voxels", "dcm2niix affine", "dcm2niix TR", "dcm2niix slice times",
               "dcm2niix phase encoding", "dcm2niix multiband")
AFFINE_TOL_MM = 1e-3
TIME_TOL_S = 1e-3
CONVERT_TIMEOUT_S = 600.0


def find_dcm2niix() -> str | None:
    """The dcm2niix executable: on PATH, else beside this Python (pip's dcm2niix package
    installs it there, in a virtual environment that need not be activated)."""
    found = shutil.which("dcm2niix")
    if found:
        return found
    beside = Path(sys.executable).with_name("dcm2niix")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def dcm2niix_version(binary: str) -> str | None:
    """dcm2niix's version, e.g. ``v1.0.20240202``, or None when it does not run."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    words = [w for w in result.stdout.split() if w.startswith("v1.") or w.startswith("v2.")]
    return words[-1] if words else None


@dataclass
class Reference:
    """One image dcm2niix made: the NIfTI (uncompressed: read a volume at a time) and
    its BIDS sidecar."""

    image: nib.Nifti1Image
    sidecar: dict[str, Any]


@dataclass
class Conversion:
    """What dcm2niix made of a series' files, or why it made nothing."""

    references: list[Reference] = field(default_factory=list)
    error: str | None = None


def convert(files: Sequence[Path], scratch: Path, binary: str,
            timeout_s: float = CONVERT_TIMEOUT_S) -> Conversion:
    """Run dcm2niix on ``files`` (one series).

    The files are linked into ``scratch/in`` as ``000001.dcm``...: dcm2niix sees this
    series only, and no scanner file name (which may name the patient) reaches its
    messages. Output: ``scratch/out``.
    """
    inputs, out = scratch / "in", scratch / "out"
    inputs.mkdir(parents=True)
    out.mkdir()
    for n, path in enumerate(files, 1):
        link = inputs / f"{n:06d}.dcm"
        try:
            link.symlink_to(Path(path).resolve())
        except OSError:  # a file system without symbolic links: copy
            shutil.copyfile(path, link)
    command = [binary, "-z", "n", "-b", "y", "-ba", "y", "-f", "ref", "-o", str(out), str(inputs)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Conversion(error=f"dcm2niix did not finish within {timeout_s:g} s")
    except OSError as exc:
        return Conversion(error=f"dcm2niix did not run: {exc.strerror}")
    references = []
    for nifti in sorted(out.glob("*.nii")):
        try:
            sidecar = json.loads(nifti.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sidecar = {}
        references.append(Reference(nib.load(str(nifti)), sidecar))
    if not references:
        last = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        return Conversion(error=f"dcm2niix made no image (exit status {result.returncode}"
                          + (f": {_without_paths(last[-1], scratch)}" if last else "") + ")")
    return Conversion(references)


def _without_paths(line: str, scratch: Path) -> str:
    return line.replace(str(scratch), "...")[:200]


def canonical_shape(shape: Sequence[int], affine: np.ndarray) -> tuple[int, ...]:
    """The matrix of an image once reoriented to RAS+ (closest canonical)."""
    ornt = nib.orientations.io_orientation(affine)
    return tuple(int(shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))


def pick(conversion: Conversion, shape: Sequence[int], affine: np.ndarray,
         echo: int | None) -> Reference | None:
    """The reference image for an rtsc series: dcm2niix's image of the same echo
    (sidecar EchoNumber; dcm2niix splits echoes) and canonical matrix; when dcm2niix
    made a single image, that one (a mismatch is then the voxels check's finding)."""
    if len(conversion.references) == 1:
        return conversion.references[0]
    wanted = canonical_shape(shape, affine)
    for ref in conversion.references:
        ref_echo = ref.sidecar.get("EchoNumber")
        if echo is not None and ref_echo is not None and int(ref_echo) != echo:
            continue
        if canonical_shape(ref.image.shape[:3], ref.image.affine) == wanted:
            return ref
    return None


class VoxelComparison:
    """rtsc's volumes, one at a time in the order released, against dcm2niix's image.

    Parameters
    ----------
    reference : the dcm2niix image of the series
    """

    def __init__(self, reference: Reference) -> None:
        image = reference.image
        self._proxy = image.dataobj
        self._ref_affine = np.asarray(image.affine, dtype=np.float64)
        self._ref_shape = tuple(image.shape[:3])
        self._ref_ornt = nib.orientations.io_orientation(self._ref_affine)
        self.n_reference = int(image.shape[3]) if len(image.shape) == 4 else 1
        slope, inter = image.dataobj.slope, image.dataobj.inter
        # A scaled NIfTI gives float64 values; rtsc's are float32 (the DICOM rescale
        # applied in float32): equal within one float32 step.
        self._scaled = (float(slope), float(inter)) != (1.0, 0.0)
        self.n_compared = 0
        self.n_extra = 0
        self.differing: list[tuple[int, int, float]] = []  # (index, voxels, max |diff|)
        self.shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.affine_error_mm = 0.0

    def add(self, volume: Volume) -> None:
        """Compare the next volume rtsc released with dcm2niix's next one."""
        k = self.n_compared + self.n_extra
        if k >= self.n_reference:
            self.n_extra += 1
            return
        self.n_compared += 1
        ours_shape = canonical_shape(volume.shape, volume.affine)
        ref_shape = canonical_shape(self._ref_shape, self._ref_affine)
        if ours_shape != ref_shape:  # e.g. dcm2niix stacked every image into one volume
            self.shape_mismatch = self.shape_mismatch or (ours_shape, ref_shape)
            return
        ornt = nib.orientations.io_orientation(volume.affine)
        ours = nib.orientations.apply_orientation(volume.data, ornt)
        ref_raw = self._proxy[..., k] if len(self._proxy.shape) == 4 else self._proxy[...]
        ref = nib.orientations.apply_orientation(np.asarray(ref_raw), self._ref_ornt)
        ours_affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
        ref_affine = self._ref_affine @ nib.orientations.inv_ornt_aff(self._ref_ornt,
                                                                      self._ref_shape)
        self.affine_error_mm = max(self.affine_error_mm,
                                   float(np.abs(ours_affine - ref_affine).max()))
        ours64, ref64 = ours.astype(np.float64), ref.astype(np.float64)
        diff = np.abs(ours64 - ref64)
        tol = np.spacing(np.abs(ref64).astype(np.float32)).astype(np.float64) \
            if self._scaled else 0.0
        bad = diff > tol
        if bad.any():
            self.differing.append((volume.index, int(bad.sum()), float(diff.max())))

    def checks(self) -> list[Check]:
        """The ``dcm2niix voxels`` and ``dcm2niix affine`` lines."""
        n_ours = self.n_compared + self.n_extra
        data = {"volumes_rtsc": n_ours, "volumes_dcm2niix": self.n_reference,
                "differing": [list(d) for d in self.differing]}
        if self.shape_mismatch is not None:
            ours, ref = self.shape_mismatch
            voxels = Check(CHECK_NAMES[0], FAIL, f"matrix in RAS+ {'x'.join(map(str, ours))}, "
                           f"dcm2niix {'x'.join(map(str, ref))}", data=data)
        elif self.differing:
            index, count, worst = self.differing[0]
            voxels = Check(CHECK_NAMES[0], FAIL, f"{len(self.differing)} of {self.n_compared} "
                           f"volumes differ (first: volume {index}, {count} voxels, max |diff| "
                           f"{worst:g})", data=data)
        elif n_ours != self.n_reference:
            voxels = Check(CHECK_NAMES[0], FAIL, f"rtsc assembled {n_ours} volumes, dcm2niix "
                           f"{self.n_reference} (the first {self.n_compared} are equal)",
                           data=data)
        elif self.n_compared == 0:
            voxels = Check(CHECK_NAMES[0], FAIL, "no volume to compare", data=data)
        else:
            voxels = Check(CHECK_NAMES[0], PASS, f"equal in all {self.n_compared} volumes "
                           "(after both are reoriented to RAS+)"
                           + (" within float32 rounding" if self._scaled else ""), data=data)
        error = self.affine_error_mm
        if self.shape_mismatch is not None or not self.n_compared:
            affine = Check(CHECK_NAMES[1], FAIL, "not compared: the matrices differ"
                           if self.n_compared else "no volume to compare")
        else:
            affine = Check(CHECK_NAMES[1], PASS if error <= AFFINE_TOL_MM else FAIL,
                           f"max |diff| {error:.2g} mm (tolerance {AFFINE_TOL_MM:g} mm)",
                           data={"max_abs_diff_mm": error})
        return [voxels, affine]


def sidecar_checks(info: SeriesInfo | None, affine: np.ndarray | None, sidecar: dict[str, Any],
                   ref_affine: np.ndarray) -> list[Check]:
    """TR, slice times, phase encoding and multiband factor against dcm2niix's sidecar.

    Parameters
    ----------
    info : the series' facts as rtsc's assembler left them
    affine : rtsc's affine of the series (its voxel axes give the facts' meaning)
    sidecar : dcm2niix's BIDS sidecar
    ref_affine : dcm2niix's affine
    """
    names = CHECK_NAMES[2:]
    if info is None or affine is None:
        return [Check(name, FAIL, "no volume assembled") for name in names]
    out = []
    ref_tr = sidecar.get("RepetitionTime")
    if ref_tr is None:
        out.append(Check(names[0], SKIP, "dcm2niix gives no RepetitionTime"))
    else:
        ok = info.tr_s is not None and abs(info.tr_s - float(ref_tr)) <= TIME_TOL_S
        out.append(Check(names[0], PASS if ok else FAIL,
                         f"{_s(info.tr_s)}, dcm2niix {_s(float(ref_tr))}",
                         data={"rtsc": info.tr_s, "dcm2niix": ref_tr}))
    ref_times = sidecar.get("SliceTiming")
    ours = info.slice_times_s
    if ref_times is None:
        out.append(Check(names[1], SKIP, "dcm2niix gives no SliceTiming"
                         + ("" if ours is None else "; rtsc's not cross-checked")))
    elif ours is None:
        out.append(Check(names[1], FAIL, f"rtsc has none, dcm2niix {len(ref_times)}"))
    else:
        axis, ours_world = slice_times_world(np.asarray(ours), affine)
        ref_axis, ref_world = slice_times_world(np.asarray(ref_times, dtype=float), ref_affine)
        if axis != ref_axis or ours_world.shape != ref_world.shape:
            out.append(Check(names[1], FAIL, f"{len(ours)} times along world axis {axis}, "
                             f"dcm2niix {len(ref_times)} along {ref_axis}"))
        else:
            worst = float(np.abs(ours_world - ref_world).max())
            out.append(Check(names[1], PASS if worst <= TIME_TOL_S else FAIL,
                             f"max |diff| {worst * 1000:.2f} ms over {len(ours)} slices "
                             f"(tolerance {TIME_TOL_S * 1000:g} ms)",
                             data={"max_abs_diff_s": worst}))
    ref_pe = sidecar.get("PhaseEncodingDirection")
    pe = info.phase_encoding_direction
    if ref_pe is None:
        out.append(Check(names[2], SKIP, "dcm2niix gives no PhaseEncodingDirection"))
    elif pe is None:
        out.append(Check(names[2], FAIL, f"rtsc has none, dcm2niix "
                         f"{phase_encoding_label(ref_pe, ref_affine)}"))
    else:
        same = phase_encoding_world(pe, affine) == phase_encoding_world(ref_pe, ref_affine)
        out.append(Check(names[2], PASS if same else FAIL,
                         f"{phase_encoding_label(pe, affine)}, dcm2niix "
                         f"{phase_encoding_label(ref_pe, ref_affine)} (rtsc {pe}, dcm2niix "
                         f"{ref_pe} in its own voxel axes)",
                         data={"rtsc": pe, "dcm2niix": ref_pe}))
    ref_mb = int(sidecar.get("MultibandAccelerationFactor") or 1)
    mb = info.multiband_factor
    out.append(Check(names[3], PASS if (mb or 1) == ref_mb and mb is not None else FAIL,
                     f"{mb if mb is not None else 'unknown'}, dcm2niix {ref_mb}",
                     data={"rtsc": mb, "dcm2niix": ref_mb}))
    return out


def _s(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g} s"


def unavailable(status: str, why: str) -> list[Check]:
    """Every dcm2niix line with one status and reason (SKIP: not installed; FAIL: it
    made nothing of the series)."""
    return [Check(name, status, why) for name in CHECK_NAMES]
