"""A simulated cord run sent over C-STORE to `rtsc run` (a real subprocess) in spinal
cord mode: the volume messages carry the per-slice fields, the slice translations match
the simulator's truth, the phase-encoding fields come from the DICOM, and
confounds.tsv has the per-slice columns."""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import Collector, free_port, make_config
from rtsc.config import merge
from simulator.scanner import run_simulation
from rtsc_subprocess import rtsc_command

N = 12
REFERENCE_VOLUMES = 3


pytestmark = [pytest.mark.system, pytest.mark.slow]


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("rtsc run did not open its DICOM port")


def test_cord_run_over_cstore_to_rtsc_run(tmp_path: Path):
    dicom_port, pub_port, rep_port = free_port(), free_port(), free_port()
    config_text = (
        f"receiver: {{port: {dicom_port}, host: 127.0.0.1}}\n"
        f"publish: {{endpoint: 'tcp://127.0.0.1:{pub_port}', "
        f"snapshot_endpoint: 'tcp://127.0.0.1:{rep_port}'}}\n"
        f"session: {{dir: '{tmp_path / 'sessions'}', report: false}}\n"
        "pipeline: {mode: spinal_cord}\n"
        f"spinal_cord: {{moco: {{reference_volumes: {REFERENCE_VOLUMES}}}}}\n")
    (tmp_path / "cord.yaml").write_text(config_text, encoding="utf-8")
    process = subprocess.Popen([*rtsc_command(), "run", "--config", str(tmp_path / "cord.yaml")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"OPENBLAS_NUM_THREADS": "1",
                                               **__import__("os").environ})
    try:
        _wait_for_port(dicom_port, process)
        collector = Collector(f"tcp://127.0.0.1:{pub_port}")
        time.sleep(0.5)
        sim = make_config(tmp_path, simulator=merge(
            {"anatomy": "spinal_cord", "n_volumes": N, "speed": 0.0},
            {"cord": {"physio_progressive": False}})).simulator
        result = run_simulation(sim, send_to=("127.0.0.1", dicom_port),
                                truth_dir=tmp_path / "truth")
        assert result.failures == 0
        assert collector.ended.wait(60), "no series.end"
        collector.close()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert "slice-wise motion: FD mean" in stdout  # the run's summary at exit

    (start,) = [m.header for m in collector.topic("series.start")]
    assert start["mode"] == "spinal_cord" and start["shape"] == [128, 128, 24]
    volumes = [m.header for m in collector.topic("volume")]
    assert [h["index"] for h in volumes] == list(range(N))
    for h in volumes[:REFERENCE_VOLUMES - 1]:
        assert h["slice_trans_x"] is None and "before_reference" in h["flags"]
    for h in volumes[REFERENCE_VOLUMES - 1:]:
        for name in ("slice_trans_x", "slice_trans_y", "slice_tsnr", "slice_signal",
                     "pe_shift_mm"):
            assert len(h[name]) == 24, name
        assert h["trans_x"] is None  # no rigid parameters in this mode
        assert h["framewise_displacement"] is not None
        assert h["pe_axis"] == "j" and h["pe_offset_hz_rms"] is not None  # from the DICOM
        assert "slice_moco" in h["stage_ms"] and "cord_qc" in h["stage_ms"]
    assert all(v is not None for v in volumes[-1]["slice_tsnr"])
    # the translations are the simulator's (relative to the reference volumes' mean)
    truth = np.load(tmp_path / "truth" / "slice_shifts.npy")
    truth = truth - truth[:REFERENCE_VOLUMES].mean(axis=0)
    published = np.array([[h["slice_trans_x"], h["slice_trans_y"]]
                          for h in volumes[REFERENCE_VOLUMES - 1:]]).transpose(0, 2, 1)
    error = published - truth[REFERENCE_VOLUMES - 1:]
    assert np.sqrt(np.mean(error ** 2)) < 0.1
    # confounds.tsv: per-slice columns, complete after the run (the first volumes too)
    (end,) = [m.header for m in collector.topic("series.end")]
    with open(end["outputs"]["confounds"], encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == N
    column = np.array([[float(r[f"slice_trans_y_{k:02d}"]) for k in range(24)] for r in rows])
    np.testing.assert_allclose(column, truth[..., 1], atol=0.1)
    assert "slice_trans_rms_mm" in rows[0]
    assert end["summary"]["slice_moco"]["volumes"] == N
