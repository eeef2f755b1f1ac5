"""A real DICOM peer: dcmtk's storescu and echoscu against a real `rtsc run` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from dicom_files import dataset_bytes
from conftest import Collector, free_port
from rtsc.config import merge, config_from_dict, to_dict
from rtsc.volume import series_id
from simulator.scanner import run_simulation

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


pytestmark = pytest.mark.system


@pytest.fixture
def rtsc_run(tmp_path):
    """`rtsc run` as a subprocess on free ports; yields (port, pub endpoint, snapshot, proc)."""
    port, pub, snap = free_port(), free_port(), free_port()
    cfg = {
        "receiver": {"port": port},
        "publish": {"endpoint": f"tcp://127.0.0.1:{pub}",
                    "snapshot_endpoint": f"tcp://127.0.0.1:{snap}"},
        # A series of copies announces no run length: it ends this long after its last
        # volume (sent unpaced: no gap between volumes comes near it).
        # No report.html: nothing here reads it, and SIGTERM would wait ~2 s for it.
        "session": {"dir": str(tmp_path / "sessions"), "series_timeout_s": 3.0,
                    "report": False},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    log_path = tmp_path / "rtsc.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rtsc.cli", "run", "--config", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 30
    while "Ctrl-C to stop" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()
        assert time.time() < deadline, "rtsc run did not start"
        time.sleep(0.1)
    yield port, f"tcp://127.0.0.1:{pub}", proc, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_echoscu_gets_an_answer(rtsc_run):
    port, _pub, _proc, log_path = rtsc_run
    result = subprocess.run([ECHOSCU, "-aec", "RTSC", "127.0.0.1", str(port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    time.sleep(0.2)
    assert "C-ECHO from" in log_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("fmt,shape,n", [("slices", [64, 64, 36], 20), ("mosaic", [64, 64, 36], 20)])
def test_storescu_series_to_rtsc_run(rtsc_run, tmp_path, fmt, shape, n):
    """storescu (default socket options: no TCP_NODELAY) sends a series; all of it lands."""
    port, pub, proc, log_path = rtsc_run
    collector = Collector(pub)
    time.sleep(0.5)
    sim_cfg = config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "format": fmt, "shape": shape, "n_volumes": n, "speed": 0.0,
        "max_trans_mm": 3.0, "max_rot_deg": 3.0, "n_jumps": 4}})).simulator
    sim = run_simulation(sim_cfg, out_dir=tmp_path / "scan")
    assert len(sim.files) == (n * shape[2] if fmt == "slices" else n)
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", str(port),
                             *map(str, sim.files)], capture_output=True, text=True,
                            timeout=300, env=env)
    seconds = time.time() - t0
    assert result.returncode == 0, result.stderr
    try:
        assert collector.ended.wait(30), log_path.read_text()[-3000:]
    finally:
        collector.close()
    if fmt == "slices":
        # Without the receiver's quick ACKs, small files from a sender that keeps
        # Nagle on took ~44 ms each (docs/benchmarks.md); 720 files must not stall like that.
        assert seconds / len(sim.files) < 0.02, f"{seconds:.1f} s for {len(sim.files)} files"

    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(n))
    assert {m.header["series"] for m in volumes} == {series_id(sim.series_uid)}
    # Motion accuracy holds on data that came through dcmtk and the assembler.
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    estimated = np.array([[m.header[k] for k in names] for m in volumes])
    truth_motion = np.loadtxt(sim.truth_dir / "motion.tsv", skiprows=1)[:, :6]
    trans = np.abs(estimated[:, :3] - truth_motion[:, :3])
    rot = np.degrees(np.abs(estimated[:, 3:] - truth_motion[:, 3:]))
    assert np.median(trans) < 0.03 and trans.max() < 0.1, (np.median(trans), trans.max())
    assert np.median(rot) < 0.03 and rot.max() < 0.1, (np.median(rot), rot.max())
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == n
    quantised = np.load(sim.truth_dir / "bold_quantised.npy")
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), quantised)
    truth_affine = np.array(__import__("json").loads((sim.truth_dir / "truth.json").read_text())["affine_ras"])
    np.testing.assert_allclose(img.affine, truth_affine, atol=1e-4)
    archive = Path(end["outputs"]["dicom"])
    archived = sorted(archive.glob("*.dcm"))
    assert len(archived) == len(sim.files)

    assert {dataset_bytes(p) for p in archived} == {dataset_bytes(p) for p in sim.files}

    # SIGTERM ends `rtsc run` cleanly, with its summary.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert f"{n} volumes" in log_path.read_text()
