"""The end-of-run report: written at series end, self-contained, and rendered by Chromium."""

from __future__ import annotations

import base64
import io
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from rtsc.output.report import ReportJobs, build_report, offline_tsnr, write_report


PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _series_dir(messages) -> Path:
    end = next(m.header for m in messages if m.topic == "series.end")
    return Path(end["outputs"]["bold"]).parent


def _images(text: str) -> list[np.ndarray]:
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(b)), format="png")
            for b in PNG.findall(text)]


@pytest.mark.slow
def test_report_written_at_series_end_self_contained(recorded_run):
    messages, _, _ = recorded_run
    end = next(m.header for m in messages if m.topic == "series.end")
    series_dir = _series_dir(messages)
    assert end["outputs"]["report"] == str(series_dir / "report.html")
    text = (series_dir / "report.html").read_text(encoding="utf-8")  # written by the service
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert not re.search(r"src=['\"](?!data:)", text)  # every image is embedded
    images = _images(text)
    # motion, FD, DVARS/global signal, tSNR, activation (t:task)
    assert len(images) == 5 and all(im.ndim == 3 and im.shape[0] > 100 for im in images)
    for title in ("Motion", "Framewise displacement", "DVARS and global signal", "tSNR",
                  "Activation: task", "Usable frames", "QC summary"):
        assert f"<h2>{title}" in text
    # The usable-frame table counts the FD column of confounds.tsv.
    table = np.genfromtxt(series_dir / "confounds.tsv", delimiter="\t", names=True,
                          missing_values="n/a", filling_values=np.nan)
    fd = table["framewise_displacement"]
    qc = json.loads((series_dir / "qc.json").read_text())
    for t in (0.2, 0.3, 0.4):
        usable = int(np.sum(fd <= t))
        assert f"<td>&le; {t:g} mm</td><td>{usable} of {fd.size}</td>" in text
        assert f"<td>{usable * qc['tr_s'] / 60:.2f}</td>" in text
    assert f"<td>n_volumes</td><td>{qc['n_volumes']}</td>" in text
    # The QC stage's verdict and its reasons, from qc.json.
    assert qc["verdict"] in ("pass", "warn", "fail")
    assert f"verdict: <span class='{qc['verdict']}'>{qc['verdict']}</span>" in text
    for reason in qc["verdict_reasons"]:
        assert html.escape(reason) in text


@pytest.mark.slow
def test_report_uses_the_qc_stage_outputs_when_present(recorded_run, tmp_path):
    messages, _, _ = recorded_run
    copy = tmp_path / "series"
    shutil.copytree(_series_dir(messages), copy, ignore=shutil.ignore_patterns("dicom"))
    bold = np.asanyarray(nib.load(copy / "bold.nii.gz").dataobj).astype(np.float64)
    expected = bold.mean(axis=-1) / np.where(bold.std(axis=-1) > 0, bold.std(axis=-1), np.inf)
    np.testing.assert_allclose(offline_tsnr(copy / "bold.nii.gz"), expected, rtol=1e-5)
    nib.save(nib.Nifti1Image(expected.astype(np.float32), np.eye(4)), copy / "maps" / "tsnr.nii.gz")
    qc = json.loads((copy / "qc.json").read_text())
    qc.update(verdict="fail", verdict_reasons=["FD over 0.2 mm in 30 % of frames"])
    (copy / "qc.json").write_text(json.dumps(qc))
    text = build_report(copy)
    assert "<span class='fail'>fail</span>" in text and "FD over 0.2 mm" in text
    assert "computed here from bold.nii.gz" not in text  # the QC stage's map is used


def test_report_failure_is_reported_not_raised(tmp_path):
    jobs = ReportJobs()
    assert jobs.start("abc", tmp_path / "missing") is None
    failures = jobs.poll(wait_s=60)
    assert len(failures) == 1 and failures[0][0] == "abc"
    assert "not a finished series directory" in failures[0][1]
    assert len(jobs) == 0


@pytest.mark.system
@pytest.mark.slow
def test_report_renders_in_headless_chromium(recorded_run, tmp_path):
    messages, _, _ = recorded_run
    report = write_report(_series_dir(messages), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,3600", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(shot)[..., :3]
    assert image.shape[:2] == (3600, 1200)
    # Rendered figures: many strongly coloured pixels (plot lines, the viridis tSNR
    # mosaic); a page whose images failed to load is text on white.
    colourful = (image.max(axis=-1) - image.min(axis=-1)) > 0.3
    assert colourful.sum() > 20000, colourful.sum()
    # Each figure block is in the page: rows with colour are spread over its height.
    rows = np.flatnonzero(colourful.any(axis=1))
    assert rows.max() - rows.min() > 2000
