"""`rtsc verify` on real scanner series (tests/scanner_corpus.py), whole and broken.

Whole corpus series of each vendor and layout pass every line, with the values the
catalogue and dcm2niix give; copies broken on purpose (PixelData cut short, a slice
removed, one SliceThickness wrong) fail on the line that names the fault, and the CLI
exits 1; without dcm2niix its lines are SKIP. The checks on their own are fed facts of
a real series altered one at a time. ``--listen`` runs as a subprocess on a free port
and receives a series from dcmtk's storescu.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtsc import cli
from rtsc.config import AssemblerConfig, SeriesFilterConfig, load_config
from rtsc.dicom.assemble import Assembler
from rtsc.dicom.incoming import Incoming
from rtsc.verify import checks, dcm2niix
from rtsc.verify.folder import ACCEPTED_SYNTAXES, assemble_group, read_folder, verify_folder
from rtsc.verify.listen import Arrivals, timing_checks
from rtsc.verify.report import to_json
from rtsc.volume import Volume
from scanner_corpus import BY_KEY

REPO = Path(__file__).resolve().parents[2]
STORESCU = "/usr/bin/storescu"
DCM2NIIX = dcm2niix.find_dcm2niix()
HEADER_LINES = ["volumes", "matrix", "voxel size", "orientation", "TR", "run length",
                "slice times", "phase encoding", "transfer syntax"]
TABLE = HEADER_LINES + list(dcm2niix.CHECK_NAMES)

pytestmark = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix (PyPI) not installed")

# One series per vendor and layout, with what the catalogue and dcm2niix say of it:
# matrix, TR (s), multiband factor, phase encoding as the console names it.
KNOWN = {
    "nih-ge-4": ((64, 64, 15), 5.0, 1, "A>>P"),  # GE single slices, interleaved
    "nih-siemens-pa": ((72, 72, 5), 2.43537, 1, "P>>A"),  # Siemens mosaic (VE11)
    "stc-siemens-xa10-mb": ((64, 64, 6), 0.5, 2, "A>>P"),  # XA enhanced multi-frame, SMS 2
    "pyneal-ge": ((64, 64, 18), 1.0, 1, "P>>A"),  # a GE MRDC export, no dcm2niix Ref
}


def _config():
    return load_config(None)


_REPORTS: dict[str, object] = {}


def corpus_report(key: str, partial: bool = True):
    """verify_folder's report of a corpus series (cached: the series are read once)."""
    if (key, partial) not in _REPORTS:
        _REPORTS[(key, partial)] = verify_folder(BY_KEY[key].path, _config(), DCM2NIIX,
                                                 partial=partial)
    return _REPORTS[(key, partial)]


def by_name(series_report) -> dict[str, checks.Check]:
    return {c.name: c for c in series_report.checks + series_report.timing}


def status(series_report) -> dict[str, str]:
    return {name: c.status for name, c in by_name(series_report).items()}


def line(state: str, name: str, value: str = "") -> str:
    """A table line as printed (its start, when ``value`` is the start of the value)."""
    return f"  {state}  {name:<24s} {value}"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rtsc.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


# -- whole corpus series pass every line --------------------------------------------------


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("key", list(KNOWN))
def test_corpus_series_pass_every_line_with_the_known_values(key):
    series = BY_KEY[key]
    report = corpus_report(key)
    (found,) = report.series
    assert [c.name for c in found.checks] == TABLE
    assert status(found) == dict.fromkeys(TABLE, "PASS"), \
        [f"{c.name}: {c.value}" for c in found.checks if c.status != "PASS"]
    assert report.passed and report.dcm2niix
    shape, tr, mb, pe = KNOWN[key]
    lines = by_name(found)
    assert lines["volumes"].data["n_volumes"] == series.n_volumes
    assert lines["volumes"].data["n_files"] == len(series.files())
    assert lines["run length"].data == {"announced": series.n_expected,
                                        "present": series.n_volumes, "missing": []}
    assert tuple(lines["matrix"].data["shape"]) == shape
    assert lines["TR"].data["tr_s"] == pytest.approx(tr)
    assert lines["slice times"].data["multiband_factor"] == mb
    assert len(lines["slice times"].data["slice_times_s"]) == shape[2]
    assert lines["phase encoding"].data["label"] == pe
    assert lines["orientation"].data["axcodes"] == "LPS"
    assert lines["dcm2niix voxels"].data["volumes_dcm2niix"] == series.n_volumes
    assert lines["dcm2niix affine"].data["max_abs_diff_mm"] <= 1e-3
    assert found.manufacturer == series.vendor.upper()
    assert found.layout == series.layout


@pytest.mark.system
def test_a_partial_folder_fails_the_run_length_unless_allowed():
    # XA10: the corpus keeps 18 of the 450 volumes its protocol announces.
    (strict,) = corpus_report("stc-siemens-xa10-mb", partial=False).series
    failed = [name for name, s in status(strict).items() if s != "PASS"]
    assert failed == ["run length"]
    assert "18 of 450" in by_name(strict)["run length"].value
    assert "volumes 18-449" in by_name(strict)["run length"].value


@pytest.mark.system
@pytest.mark.slow
def test_cli_prints_the_table_and_exits_0_on_a_folder_of_four_series(tmp_path):
    folder = BY_KEY["nih-siemens-ap"].path.parent  # 20180918Si: PE AP, PA, RL, LR
    out = tmp_path / "verify.json"
    result = run_cli("verify", str(folder), "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for number, label in ((3, "A>>P"), (4, "P>>A"), (5, "R>>L"), (6, "L>>R")):
        assert f"series {number} EPIPE" in text
        assert f"({label})" in text
    assert text.count("  PASS  ") == 4 * len(TABLE) and "FAIL" not in text
    assert text.rstrip().splitlines()[-2] == "rtsc verify: PASS (4 series, every check passed)"
    results = json.loads(out.read_text())
    assert results["passed"] is True and results["mode"] == "folder"
    assert [s["series_number"] for s in results["series"]] == [3, 4, 5, 6]
    assert all(c["status"] == "PASS" for s in results["series"] for c in s["checks"])
    # series named by the hashed id, number and cleaned description: no header text
    ds = pydicom.dcmread(BY_KEY["nih-siemens-ap"].files()[0], stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "InstitutionName", "StudyInstanceUID",
                    "SeriesInstanceUID"):
        value = str(ds.get(keyword) or "").strip()
        if len(value) > 3:
            assert value not in text and value not in out.read_text(), keyword
    assert str(folder) not in text


# -- broken on purpose --------------------------------------------------------------------


def _copy(key: str, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of a corpus series and its files in acquisition order (InstanceNumber)."""
    folder = tmp_path / key
    shutil.copytree(BY_KEY[key].path, folder)
    files = [p for p in folder.iterdir() if p.suffix == ".dcm"]
    files.sort(key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    return folder, files


@pytest.mark.system
@pytest.mark.slow
def test_pixel_data_cut_short_fails_the_volumes_line(tmp_path, capsys):
    folder, files = _copy("nih-ge-4", tmp_path)
    ds = pydicom.dcmread(files[36])  # image 37: volume 2, its 7th image
    ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
    ds.save_as(files[36])
    assert cli.main(["--log-level", "ERROR", "verify", str(folder)]) == 1
    text = capsys.readouterr().out
    (found,) = verify_folder(folder, _config(), DCM2NIIX).series
    lines = by_name(found)
    assert lines["volumes"].status == "FAIL"
    assert "bad_dicom 1, missing_slices 1" in lines["volumes"].value
    assert lines["volumes"].details[0] == ("image 37: truncated PixelData: 4096 bytes, 8192 "
                                           "expected for 1x64x64 int16")
    assert lines["volumes"].details[1].startswith("volume 2: 1 of 15 slices never arrived")
    for name in HEADER_LINES[1:]:  # the file's fault is not the geometry's or the timing's
        assert lines[name].status == "PASS", name
    # dcm2niix refuses the file: nothing to compare with is a failure, not a pass
    assert {lines[n].status for n in dcm2niix.CHECK_NAMES} == {"FAIL"}
    assert "dcm2niix made no image" in lines["dcm2niix voxels"].value
    assert line("FAIL", "volumes") in text and "rtsc verify: FAIL" in text


@pytest.mark.system
@pytest.mark.slow
def test_a_slice_removed_fails_volumes_and_the_comparison(tmp_path):
    folder, files = _copy("nih-ge-4", tmp_path)
    files[36].unlink()
    result = run_cli("verify", str(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    assert line("FAIL", "volumes", "10 volumes from 149 files") in result.stdout
    (found,) = verify_folder(folder, _config(), DCM2NIIX).series
    lines = by_name(found)
    assert lines["volumes"].details == ("volume 2: 1 of 15 slices never arrived (slices "
                                        "6); zero-filled",)
    assert lines["run length"].status == "PASS"  # all 10 volumes, one with a hole
    # dcm2niix stacks the 149 images as one volume: the matrices differ
    assert lines["dcm2niix voxels"].status == "FAIL"
    assert "64x64x15, dcm2niix 64x64x149" in lines["dcm2niix voxels"].value


@pytest.mark.system
def test_a_wrong_slice_thickness_fails_the_voxel_size_line(tmp_path, capsys):
    folder, files = _copy("nih-ge-4", tmp_path)
    ds = pydicom.dcmread(files[100])
    assert ds.SliceThickness == 3
    ds.SliceThickness = 4
    ds.save_as(files[100])
    assert cli.main(["--log-level", "ERROR", "verify", str(folder)]) == 1
    text = capsys.readouterr().out
    assert line("FAIL", "voxel size", "3.750 x 3.750 x 5.000 mm (SliceThickness differs "
                "between files: 3 in 149, 4 in 1") in text
    assert text.count("  FAIL  ") == 1


def test_without_dcm2niix_its_lines_are_skip(monkeypatch, capsys):
    monkeypatch.setattr(dcm2niix, "find_dcm2niix", lambda: None)
    assert cli.main(["--log-level", "ERROR", "verify", str(BY_KEY["nih-siemens-rl"].path)]) == 0
    text = capsys.readouterr().out
    for name in dcm2niix.CHECK_NAMES:
        assert line("SKIP", name, "dcm2niix not installed") in text
    for name in HEADER_LINES:
        assert line("PASS", name) in text
    assert "rtsc verify: PASS (1 series, every check passed; dcm2niix not installed, its " \
           "checks skipped)" in text


@pytest.mark.system
def test_series_of_one_folder_are_grouped_and_non_bold_ones_skipped(tmp_path):
    # A session folder: a BOLD series, a localizer (a copy of another series under its
    # own UID and description), a duplicated file and a README.
    bold = tmp_path / "session" / "bold"
    shutil.copytree(BY_KEY["nih-siemens-ap"].path, bold)
    shutil.copyfile(next(bold.glob("*.dcm")), bold / "again.dcm")
    scout = tmp_path / "session" / "scout"
    scout.mkdir()
    for path in BY_KEY["nih-siemens-pa"].files():
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "localizer"
        ds.SeriesNumber = 1
        ds.save_as(scout / path.name)
    report = verify_folder(tmp_path / "session", _config(), DCM2NIIX)
    skipped, checked = report.series
    assert skipped.series_number == 1 and skipped.checks == []
    assert skipped.skipped == "SeriesDescription contains 'localizer' (localizer)"
    assert checked.series_number == 3 and checked.n_files == 3
    assert status(checked) == dict.fromkeys(TABLE, "PASS")
    assert by_name(checked)["volumes"].value == ("2 volumes from 3 files; unplaced 0, late 0, "
                                                 "duplicate 1")
    assert report.passed
    assert any("left out: not DICOM" in note for note in report.notes)
    assert to_json(report)["series"][0]["skipped"].startswith("SeriesDescription")


# -- the checks on their own, on facts of a real series altered one at a time ------------


@pytest.fixture(scope="module")
def ge_facts() -> checks.SeriesFacts:
    (group,), _ = read_folder(BY_KEY["nih-ge-4"].path)
    run = assemble_group(group, _config())
    (facts,) = run.facts.values()
    return facts


def test_header_checks_pass_on_the_real_facts(ge_facts):
    assert {c.status for c in checks.header_checks(ge_facts, ACCEPTED_SYNTAXES)} == {"PASS"}


def test_tr_against_the_volumes_acquisition_times(ge_facts):
    facts = copy.copy(ge_facts)
    # GE writes the series' start in every image: no step to cross-check with
    assert "not cross-checked" in checks.check_tr(facts).value
    facts.t_acquired = {i: 1000.0 + 5.0 * i for i in facts.indices}
    assert checks.check_tr(facts).status == "PASS"
    facts.t_acquired = {i: 1000.0 + 5.5 * i for i in facts.indices}  # 10 % slower than TR
    tr = checks.check_tr(facts)
    assert tr.status == "FAIL" and tr.value == "5.000 s (volumes acquired every 5.500 s)"


def test_orientation_fails_on_sheared_slices(ge_facts):
    facts = copy.copy(ge_facts)
    facts.affine = ge_facts.affine.copy()
    facts.affine[1, 2] += 5.0 * np.tan(np.radians(10))  # a 10 degree gantry tilt
    result = checks.check_orientation(facts)
    assert result.status == "FAIL" and "sheared" in result.value
    assert result.data["shear_deg"] == pytest.approx(10.0, abs=0.01)


def test_slice_times_beyond_the_tr_or_against_the_multiband_factor(ge_facts):
    facts = copy.copy(ge_facts)
    times = list(ge_facts.info.slice_times_s)
    assert checks.check_slice_times(facts).value.startswith(
        "15 slices at 0-4.667 s within TR 5 s, interleaved along I-S, multiband 1")
    facts.info = dataclasses.replace(ge_facts.info, slice_times_s=tuple(times[:-1] + [5.0]))
    assert "beyond the TR" in checks.check_slice_times(facts).value
    facts.info = dataclasses.replace(ge_facts.info, multiband_factor=3)
    result = checks.check_slice_times(facts)
    assert result.status == "FAIL" and "slices per time 1 (15x) for multiband 3" in result.value
    facts.info = dataclasses.replace(ge_facts.info, slice_times_s=None)
    assert checks.check_slice_times(facts).status == "FAIL"
    facts.manufacturer = "PHILIPS"
    assert checks.check_slice_times(facts).status == "SKIP"


def test_run_length_names_the_missing_volumes(ge_facts):
    facts = copy.copy(ge_facts)
    facts.indices = [i for i in ge_facts.indices if i not in (4, 7, 8)]
    result = checks.check_run_length(facts)
    assert result.status == "FAIL" and result.value == "7 of 10 announced; missing volumes 4, 7-8"
    facts.indices = list(range(12))
    assert checks.check_run_length(facts).value == "12 volumes but 10 announced"


def test_compressed_transfer_syntax_fails(ge_facts):
    facts = copy.copy(ge_facts)
    facts.syntaxes = checks.Counter({"1.2.840.10008.1.2.4.70": 150})
    result = checks.check_transfer_syntax(facts, ACCEPTED_SYNTAXES)
    assert result.status == "FAIL" and "JPEG Lossless" in result.value


def test_matrix_and_voxel_size_against_the_headers(ge_facts):
    facts = copy.copy(ge_facts)
    facts.header_nz = 16
    assert "the headers announce 16 slices" in checks.check_matrix(facts).value
    facts = copy.copy(ge_facts)
    facts.positions = list(ge_facts.positions[:-1]) + [ge_facts.positions[-1] + 1.0]
    assert "not evenly spaced" in checks.check_voxel_size(facts).value


def _mosaic_volumes(key: str) -> list[Volume]:
    assembler = Assembler(AssemblerConfig(), series_filter=SeriesFilterConfig(enabled=False))
    out = []
    for path in BY_KEY[key].files():
        out += [e for e in assembler.add(Incoming(pydicom.dcmread(path), None, 0.0, "folder"))
                if isinstance(e, Volume)]
    return out


def _reference(key: str) -> dcm2niix.Reference:
    series = BY_KEY[key]
    return dcm2niix.Reference(nib.load(series.ref_nifti), json.loads(series.ref_json.read_text()))


def test_voxel_comparison_finds_one_changed_voxel_and_a_shifted_affine():
    volumes = _mosaic_volumes("nih-siemens-ap")
    same = dcm2niix.VoxelComparison(_reference("nih-siemens-ap"))
    for volume in volumes:
        same.add(volume)
    assert [c.status for c in same.checks()] == ["PASS", "PASS"]
    changed = dcm2niix.VoxelComparison(_reference("nih-siemens-ap"))
    data = volumes[1].data.copy(order="F")
    data[30, 40, 2] += 1
    changed.add(volumes[0])
    changed.add(dataclasses.replace(volumes[1], data=data))
    voxels, affine = changed.checks()
    assert voxels.status == "FAIL" and affine.status == "PASS"
    assert voxels.value == "1 of 2 volumes differ (first: volume 1, 1 voxels, max |diff| 1)"
    shifted = dcm2niix.VoxelComparison(_reference("nih-siemens-ap"))
    moved = volumes[0].affine.copy()
    moved[0, 3] += 0.01
    shifted.add(dataclasses.replace(volumes[0], affine=moved))
    voxels, affine = shifted.checks()
    assert affine.status == "FAIL" and affine.data["max_abs_diff_mm"] == pytest.approx(0.01)
    assert voxels.status == "FAIL"  # one of dcm2niix's two volumes has no counterpart


def test_sidecar_checks_within_one_ms_and_through_both_orientations(ge_facts):
    ref = _reference("nih-ge-4")
    ref_affine = np.asarray(ref.image.affine)
    base = dcm2niix.sidecar_checks(ge_facts.info, ge_facts.affine, ref.sidecar, ref_affine)
    assert [c.status for c in base] == ["PASS"] * 4
    assert ref.sidecar["PhaseEncodingDirection"] != ge_facts.info.phase_encoding_direction

    def statuses(**changes):
        sidecar = dict(ref.sidecar, **changes)
        return [c.status for c in dcm2niix.sidecar_checks(ge_facts.info, ge_facts.affine,
                                                          sidecar, ref_affine)]

    times = list(ref.sidecar["SliceTiming"])
    assert statuses(SliceTiming=times[:3] + [times[3] + 0.0005] + times[4:]) == ["PASS"] * 4
    assert statuses(SliceTiming=times[:3] + [times[3] + 0.002] + times[4:])[1] == "FAIL"
    assert statuses(SliceTiming=times[::-1])[1] == "FAIL"  # the other stacking order
    assert statuses(RepetitionTime=5.002)[0] == "FAIL"
    assert statuses(PhaseEncodingDirection="j")[2] == "FAIL"
    assert statuses(MultibandAccelerationFactor=2)[3] == "FAIL"


def test_timing_checks_from_published_headers():
    def headers(times, latency=0.02):
        return [{"index": i, "t_received": t, "latency_s": latency} for i, t in enumerate(times)]

    start = {"tr_s": 2.0, "n_expected": 5}
    end = {"summary": {"missing_volumes": []}}
    live = timing_checks(Arrivals(start, headers([0, 2.0, 4.01, 6.0, 8.0]), [], end))
    assert [c.status for c in live] == ["PASS"] * 4
    # steps 2.0, 2.01, 1.99, 2.0 s: numpy's 95th percentile interpolates 2.0 and 2.01
    assert live[1].data["p95_s"] == pytest.approx(2.0085)
    assert live[1].value.startswith("median 2.000 s, p95 2.00") and live[1].value.endswith(
        " s (TR 2 s)")
    slow = timing_checks(Arrivals(start, headers([0, 2.5, 5.0, 7.5, 10.0], latency=2.5), [],
                                  end))
    assert [c.status for c in slow] == ["PASS", "FAIL", "FAIL", "PASS"]
    lost = timing_checks(Arrivals(start, headers([0, 2.0, 4.0]), [{"code": "late_volume"}],
                                  {"summary": {"n_missing_volumes": 2, "missing_volumes": [[3, 4]]}}))
    assert lost[0].value == "3 of 5 announced"
    assert lost[3].status == "FAIL" and lost[3].value == "missing volumes 3-4; late_volume 1"


# -- --listen: the real receiver, a series sent by storescu -------------------------------


def _listen(tmp_path: Path, *extra: str, **session) -> tuple[subprocess.Popen, str, "queue.Queue"]:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "receiver": {"port": 0, "host": "127.0.0.1"},
        "session": {"dir": str(tmp_path / "sessions"), "report": False, **session},
        "assembler": {"slice_timeout_s": 1.0}}))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "rtsc.cli", "--log-level", "WARNING", "verify", "--listen",
         "--config", str(config), "--json", str(tmp_path / "verify.json"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, process.stderr.read()
            continue
        if "listening as AE title RTSC on 127.0.0.1:" in line:
            port = line.split("127.0.0.1:")[1].split(";")[0]
            return process, port, lines
    process.kill()
    raise AssertionError("rtsc verify --listen did not start")


def _finish(process: subprocess.Popen, lines: "queue.Queue") -> str:
    process.wait(timeout=120)
    time.sleep(0.2)
    text = []
    while not lines.empty():
        text.append(lines.get())
    return "".join(text)


def _send(port: str, files: list[Path]) -> None:
    result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", port, *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.system
@pytest.mark.slow
def test_listen_times_a_series_sent_by_storescu_and_checks_its_archive(tmp_path):
    process, port, lines = _listen(tmp_path, "--timeout", "90")
    _send(port, _copy("nih-ge-4", tmp_path)[1])
    text = _finish(process, lines)
    assert process.returncode == 0, text + process.stderr.read()
    assert "series 4 AxialEPI-FMRIInterleavedItoS [c9c7b3185534]: receiving (TR 5.0 s, 10 " \
           "volumes announced)" in text
    assert "  arrival timing\n" + line("PASS", "volumes received", "10 of 10 announced\n") in text
    assert line("PASS", "late or missing", "none\n") in text
    for name in TABLE:
        assert line("PASS", name) in text
    results = json.loads((tmp_path / "verify.json").read_text())
    (series,) = results["series"]
    assert results["mode"] == "listen" and results["passed"] is True
    timing = {c["check"]: c for c in series["timing"]}
    assert [c["status"] for c in series["timing"]] == ["PASS"] * 4
    assert timing["volumes received"]["data"] == {"received": 10, "announced": 10}
    assert 0 < timing["latency"]["data"]["median_ms"] <= timing["latency"]["data"]["p95_ms"] \
        < 5000
    # storescu sends as fast as it can: far faster than the 5 s TR
    assert timing["volume interval"]["data"]["median_s"] < 2.5
    assert "sent faster than acquired" in timing["volume interval"]["value"]
    checked = {c["check"]: c for c in series["checks"]}
    assert checked["volumes"]["data"]["n_files"] == 150  # the archive: every dataset
    archived = list((tmp_path / "sessions").glob("*_c9c7b3185534/dicom/*.dcm"))
    assert len(archived) == 150


@pytest.mark.system
@pytest.mark.slow
def test_listen_reports_a_series_cut_short(tmp_path):
    # The last volume never comes: the series ends after session.series_timeout_s.
    process, port, lines = _listen(tmp_path, "--timeout", "90", series_timeout_s=1.0)
    _send(port, _copy("nih-ge-4", tmp_path)[1][:135])
    text = _finish(process, lines)
    assert process.returncode == 1, text
    assert line("PASS", "volumes received", "9 of 10 announced\n") in text
    assert line("FAIL", "late or missing", "missing volume 9; series_incomplete 1") in text
    assert line("FAIL", "run length", "9 of 10 announced: volume 9 missing") in text


@pytest.mark.system
@pytest.mark.slow
def test_listen_stopped_before_anything_arrived(tmp_path):
    process, _, lines = _listen(tmp_path)
    process.send_signal(signal.SIGINT)
    text = _finish(process, lines)
    assert process.returncode == 1, text
    assert "FAIL  no series received" in text
    assert "rtsc verify: FAIL (no BOLD series checked)" in text


@pytest.mark.system
def test_multi_echo_series_is_checked_echo_by_echo(tmp_path):
    # Three echoes under one SeriesInstanceUID (EchoNumbers 1-3), different voxels each:
    # rtsc makes three series; each is compared with dcm2niix's image of its echo.
    from simulator.dicom_series import new_series_info
    from simulator.dicom_writer import volume_to_mosaic
    from simulator.phantom import Grid

    rng = np.random.default_rng(7)
    shape, n = (16, 16, 8), 3
    affine = Grid(shape, (3.0, 3.0, 3.0)).affine()
    infos = [new_series_info(6, 1.0, n_volumes=n, te_s=te, series_description="me_bold",
                             series_uid="1.2.826.0.1.3680043.8.498.77", start_time=time.time())
             for te in (0.015, 0.035, 0.055)]
    for t in range(n):
        for e, info in enumerate(infos):
            ds = volume_to_mosaic(rng.integers(100, 2000, size=shape).astype(np.int16), affine,
                                  info, t)
            ds.EchoNumbers = str(e + 1)
            ds.save_as(tmp_path / f"{t}_{e}.dcm", enforce_file_format=True)
    report = verify_folder(tmp_path, _config(), DCM2NIIX)
    assert [s.description for s in report.series] == ["me_bold", "me_bold_echo2",
                                                      "me_bold_echo3"]
    for series in report.series:
        assert status(series) == dict.fromkeys(TABLE, "PASS"), series.description
        assert by_name(series)["dcm2niix voxels"].data["volumes_dcm2niix"] == n
