"""Every real fMRI series of the corpus through a running rtsc, against dcm2niix.

The series (tests/scanner_corpus.py: GE, Siemens mosaic and Siemens XA enhanced
multi-frame files written by real scanners) reach a running service two ways: sent
by dcmtk's storescu over a real DICOM association in acquisition order, and dropped
into a watched folder. Each must come out whole: every volume published, and
``bold.nii.gz`` equal to dcm2niix's conversion of the same files (the corpus' ``Ref/``,
or dcm2niix run here for the series that ship none): voxels exact after both are
reoriented to RAS+, affine within 1e-3 mm; and its ``bold.json`` equal to dcm2niix's
sidecar: RepetitionTime and SliceTiming within 1 ms, MultibandAccelerationFactor and
PhaseEncodingDirection (mapped through both readers' orientations); ``series.start``
announces the run length the headers give. The series dcm_qa_stc copied from
dcm_qa_nih (same files, same UIDs) are sent once; their references must equal the first
volumes of what rtsc made of the whole series.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from scanner_corpus import (BY_KEY, CorpusSeries, dicom_series, phase_encoding_world,
                            slice_times_world)
from rtsc.volume import series_id

STORESCU = "/usr/bin/storescu"
DCM2NIIX = shutil.which("dcm2niix") or str(Path(__import__("sys").executable).with_name("dcm2niix"))
SERIES = dicom_series(whole_only=True)
PARTS = [s for s in dicom_series() if s.part_of]
# Series whose files are only the first volumes of a longer run end by this timeout.
SERIES_TIMEOUT_S = 3.0


pytestmark = [pytest.mark.system, pytest.mark.slow]


def acquisition_order(series: CorpusSeries) -> list[Path]:
    """The series' files in the order the scanner made them (InstanceNumber)."""
    def number(path: Path) -> tuple[int, str]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
        return int(ds.get("InstanceNumber") or 0), path.name
    return sorted(series.files(), key=number)


def series_uid(series: CorpusSeries) -> str:
    ds = pydicom.dcmread(series.files()[0], stop_before_pixels=True,
                         specific_tags=["SeriesInstanceUID"])
    return str(ds.SeriesInstanceUID)


def reference(series: CorpusSeries, scratch: Path) -> tuple[nib.Nifti1Image, dict]:
    """dcm2niix's NIfTI and BIDS sidecar of the series: the corpus' Ref/, else made here."""
    if series.ref_nifti is not None:
        return nib.load(series.ref_nifti), json.loads(series.ref_json.read_text())
    out = scratch / f"dcm2niix-{series.key}"
    if not out.exists():
        out.mkdir(parents=True)
        result = subprocess.run([DCM2NIIX, "-z", "n", "-b", "y", "-f", "ref", "-o", str(out),
                                 str(series.path)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    (found,) = sorted(out.glob("ref*.nii"))
    return nib.load(found), json.loads(found.with_suffix(".json").read_text())


def sidecar_problems(series: CorpusSeries, ours: dict, ours_affine: np.ndarray, ref: dict,
                     ref_affine: np.ndarray) -> list[str]:
    """How rtsc's bold.json differs from dcm2niix's sidecar."""
    problems = []
    if abs(ours.get("RepetitionTime", -1.0) - ref["RepetitionTime"]) > 1e-3:
        problems.append(f"RepetitionTime {ours.get('RepetitionTime')}, dcm2niix "
                        f"{ref['RepetitionTime']}")
    if "SliceTiming" in ref:
        times = ours.get("SliceTiming")
        axis, ours_world = slice_times_world(times or [], ours_affine)
        ref_axis, ref_world = slice_times_world(ref["SliceTiming"], ref_affine)
        if times is None or axis != ref_axis or ours_world.shape != ref_world.shape \
                or np.abs(ours_world - ref_world).max() > 1e-3:
            problems.append(f"SliceTiming {times}, dcm2niix {ref['SliceTiming']}")
    if ours.get("MultibandAccelerationFactor") != ref.get("MultibandAccelerationFactor"):
        problems.append(f"MultibandAccelerationFactor {ours.get('MultibandAccelerationFactor')}"
                        f", dcm2niix {ref.get('MultibandAccelerationFactor')}")
    if "PhaseEncodingDirection" in ref and (
            "PhaseEncodingDirection" not in ours
            or phase_encoding_world(ours["PhaseEncodingDirection"], ours_affine)
            != phase_encoding_world(ref["PhaseEncodingDirection"], ref_affine)):
        problems.append(f"PhaseEncodingDirection {ours.get('PhaseEncodingDirection')}, "
                        f"dcm2niix {ref['PhaseEncodingDirection']}")
    return [f"{series.key}: bold.json {p}" for p in problems]


def service_sections(tmp_path: Path, **extra) -> dict:
    return dict(session={"dir": str(tmp_path / "sessions"), "series_timeout_s": SERIES_TIMEOUT_S,
                         "report": False},
                assembler={"slice_timeout_s": 2.0}, **extra)


def wait_for_ends(collector, n_series: int, timeout_s: float) -> dict[str, dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ends = {m.header["series"]: m.header for m in collector.topic("series.end")}
        if len(ends) >= n_series:
            return ends
        time.sleep(0.2)
    return {m.header["series"]: m.header for m in collector.topic("series.end")}


def check_outputs(collector, scratch: Path) -> list[str]:
    """Every series against its reference; the list of what is wrong (empty: all good)."""
    ends = wait_for_ends(collector, len(SERIES), timeout_s=240)
    problems = []
    bad_alerts = [m.header for m in collector.topic("alert")
                  if m.header["code"] in ("unplaced", "late_slice", "bad_dicom", "unsupported",
                                          "missing_slices", "skipped_series", "internal_error",
                                          "geometry_changed")]
    problems += [f"alert {a['code']}: {a['message']}" for a in bad_alerts]
    for series in SERIES:
        sid = series_id(series_uid(series))
        end = ends.get(sid)
        if end is None:
            problems.append(f"{series.key}: no series.end")
            continue
        indices = sorted(m.header["index"] for m in collector.topic("volume")
                         if m.header["series"] == sid)
        if indices != list(range(series.n_volumes)):
            problems.append(f"{series.key}: volumes {indices}, {series.n_volumes} expected")
        (start,) = [m.header for m in collector.topic("series.start")
                    if m.header["series"] == sid]
        if start["n_expected"] != series.n_expected:
            problems.append(f"{series.key}: n_expected {start['n_expected']}, the headers "
                            f"announce {series.n_expected}")
        ref_image, ref_sidecar = reference(series, scratch)
        ours_image = nib.load(end["outputs"]["bold"])
        sidecar_path = Path(end["outputs"]["bold"]).with_name("bold.json")
        if not sidecar_path.exists():
            problems.append(f"{series.key}: no bold.json")
        else:
            problems += sidecar_problems(series, json.loads(sidecar_path.read_text()),
                                         ours_image.affine, ref_sidecar, ref_image.affine)
        if "SliceTiming" in ref_sidecar and start.get("slice_times_s") is None:
            problems.append(f"{series.key}: series.start without slice_times_s")
        ours = nib.as_closest_canonical(ours_image)
        ref = nib.as_closest_canonical(ref_image)
        if ours.shape != ref.shape:
            problems.append(f"{series.key}: shape {ours.shape}, dcm2niix {ref.shape}")
            continue
        ours_data, ref_data = np.asarray(ours.dataobj), np.asarray(ref.dataobj)
        if not np.array_equal(ours_data, ref_data):
            problems.append(f"{series.key}: {int((ours_data != ref_data).sum())} voxels differ")
        error_mm = float(np.abs(ours.affine - ref.affine).max())
        if error_mm > 1e-3:
            problems.append(f"{series.key}: affine differs by {error_mm:.4f} mm")
    for part in PARTS:
        whole = ends.get(series_id(series_uid(BY_KEY[part.part_of])))
        if whole is None:
            continue  # reported above
        ours = nib.as_closest_canonical(nib.load(whole["outputs"]["bold"]))
        ref = nib.as_closest_canonical(reference(part, scratch)[0])
        first = np.asarray(ours.dataobj)[..., :part.n_volumes]
        if first.shape != ref.shape or not np.array_equal(first, np.asarray(ref.dataobj)):
            problems.append(f"{part.key}: the first {part.n_volumes} volumes of "
                            f"{part.part_of} differ from its reference")
    return problems


def test_every_corpus_series_sent_by_storescu_equals_dcm2niix(service_factory, tmp_path):
    service, collector = service_factory(**service_sections(tmp_path))
    for series in SERIES:
        result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1",
                                 str(service.receiver.port),
                                 *map(str, acquisition_order(series))],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{series.key}: {result.stderr}"
    assert check_outputs(collector, tmp_path) == []


def test_every_corpus_series_dropped_in_a_watched_folder_equals_dcm2niix(service_factory,
                                                                         tmp_path):
    incoming = tmp_path / "export"
    incoming.mkdir()
    service, collector = service_factory(**service_sections(
        tmp_path, receiver={"enabled": False},
        watcher={"dir": str(incoming), "poll_s": 0.05, "settle_s": 0.05}))
    for series in SERIES:
        folder = incoming / series.key
        folder.mkdir()
        for path in acquisition_order(series):
            shutil.copyfile(path, folder / path.name)
    assert check_outputs(collector, tmp_path) == []


def test_glm_runs_on_real_siemens_mosaics_from_the_protocols_run_length(service_factory,
                                                                       tmp_path):
    """Siemens mosaics carry no NumberOfTemporalPositions; the run length is the
    protocol's lRepetitions + 1 (389 + 1 for this VB13 run). Without it the GLM had no
    design and switched itself off unless glm.n_volumes was set."""
    series = BY_KEY["stc-siemens-b13"]
    events = tmp_path / "events.tsv"
    events.write_text("onset\tduration\ttrial_type\n20\t20\ttask\n60\t20\ttask\n")
    service, collector = service_factory(**service_sections(
        tmp_path, glm={"events": str(events), "contrasts": {"task": "task"}}))
    result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", str(service.receiver.port),
                             *map(str, acquisition_order(series))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ends = wait_for_ends(collector, 1, timeout_s=60)
    (start,) = collector.topic("series.start")
    assert start.header["n_expected"] == 390
    design = start.header["design"]
    assert design is not None and design["names"] == ["task"]
    assert len(design["columns"][0]) == 390
    codes = [m.header["code"] for m in collector.topic("alert")]
    assert "glm_disabled" not in codes and len(ends) == 1
