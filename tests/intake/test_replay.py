"""`rtsc replay`: real BOLD (nitime's fmri1.nii.gz) and a simulator DICOM folder through
the whole pipeline; the GLM's t and effect maps equal nilearn's fit of the same file."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import Collector
from real_data import FMRI1, fetch
from rtsc.config import config_from_dict, merge, to_dict
from rtsc.intake.replay import ReplayItem, feed, run_replay
from simulator.scanner import run_simulation

# 40 volumes at TR 1.35 s = 54 s: two 10.8 s (8-volume) task blocks.
EVENTS = "onset\tduration\ttrial_type\n10.8\t10.8\ttask\n32.4\t10.8\ttask\n"


def _config(tmp_path: Path, **sections):
    base = {"session": {"dir": str(tmp_path / "sessions"), "report": False},
            "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"}}
    return config_from_dict(merge(base, sections))


def test_feed_keeps_tr_pace():
    out: queue.Queue = queue.Queue()
    stamps = []
    items = [ReplayItem(t // 2, 0.1, lambda: stamps.append(time.monotonic()) or "x")
             for t in range(10)]  # 5 volumes of 2 files each
    assert feed(items, out, speed=2.0) == 10 and out.qsize() == 10
    starts = np.array(stamps[::2]) - stamps[0]
    np.testing.assert_allclose(starts, np.arange(5) * 0.05, atol=0.03)
    assert np.all(np.diff(starts) >= 0.05 - 0.005)


def test_real_bold_nifti_replay_glm_equals_nilearn(tmp_path):
    from nilearn.glm.first_level import FirstLevelModel

    path = fetch(FMRI1)
    events = tmp_path / "events.tsv"
    events.write_text(EVENTS)
    cfg = _config(tmp_path, motion={"enabled": False},
                  glm={"events": str(events), "motion_confounds": 0,
                       "contrasts": {"task": "task"}})
    collected = {}

    def subscribe(service):
        collected["c"] = Collector(service.publisher.endpoint)
        time.sleep(0.3)

    try:
        (end,) = run_replay(cfg, path, speed=0, on_started=subscribe)
        time.sleep(0.2)
    finally:
        collected["c"].close()
    source = nib.load(path)
    assert end["n_volumes"] == 40 and end["summary"]["missing_volumes"] == []
    volumes = collected["c"].topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(40))
    start = collected["c"].topic("series.start")[0].header
    assert start["tr_s"] == pytest.approx(1.35) and start["shape"] == [10, 10, 18]
    bold = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(bold.dataobj), np.asarray(source.dataobj))
    np.testing.assert_allclose(bold.affine, source.affine, atol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FirstLevelModel(t_r=1.35, hrf_model="spm", drift_model="cosine",
                                high_pass=1 / 128, noise_model="ols", signal_scaling=False,
                                mask_img=False, minimize_memory=False)
        model.fit(source, events=pd.read_csv(events, sep="\t"))
        t_ref = model.compute_contrast("task", stat_type="t", output_type="stat").get_fdata()
        beta_ref = model.compute_contrast("task", output_type="effect_size").get_fdata()
    assert end["summary"]["glm_columns"] == model.design_matrices_[0].shape[1]
    t_ours = nib.load(end["outputs"]["map:t:task"]).get_fdata()
    beta_ours = nib.load(end["outputs"]["map:beta:task"]).get_fdata()
    # rtsc fits within its automatic mask (first volume above 0.2 x its 98th percentile).
    first = np.asarray(source.dataobj[..., 0], dtype=np.float64)
    mask = first > 0.2 * np.percentile(first, 98)
    assert mask.sum() > 1000
    np.testing.assert_allclose(t_ours[mask], t_ref[mask], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(beta_ours[mask], beta_ref[mask], rtol=1e-4, atol=1e-4)
    assert np.all(t_ours[~mask] == 0)


@pytest.mark.system
@pytest.mark.slow
def test_cli_replays_a_dicom_folder(tmp_path):
    sim_cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": "slices", "shape": [24, 24, 10], "voxel_size_mm": [6.0, 6.0, 8.0],
        "n_volumes": 6, "speed": 0.0}})).simulator
    sim = run_simulation(sim_cfg, out_dir=tmp_path / "scan")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "session": {"dir": str(tmp_path / "sessions"), "report": False},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"}}))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "rtsc.cli", "replay", str(sim.dicom_dir),
                             "--speed", "0", "--config", str(cfg_path)],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 volumes" in result.stdout, result.stdout
    (series_dir,) = [p for p in (tmp_path / "sessions").iterdir() if p.is_dir()]
    img = nib.load(series_dir / "bold.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj),
                                  np.load(sim.truth_dir / "bold_quantised.npy"))
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    np.testing.assert_allclose(img.affine, np.array(truth["affine_ras"]), atol=1e-4)
    assert len(list((series_dir / "dicom").glob("*.dcm"))) == len(sim.files)
