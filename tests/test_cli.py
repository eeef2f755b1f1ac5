"""The `rtsc` console script, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zmq

from rtsc.cli import build_parser
from rtsc_subprocess import rtsc_command

SUBCOMMANDS = ("run", "display", "simulate", "demo", "replay", "report", "verify", "web",
               "bridge", "archive-qc", "history")
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def run_cli(*args: str, cwd: Path, timeout: float = 120,
            tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if tmpdir is not None:  # the demo keeps its ground truth in a temporary folder
        tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([*rtsc_command(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.system
def test_help_lists_subcommands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"\b{name}\b", result.stdout), name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_accepts_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"replay": ["somewhere"], "report": ["somewhere"], "archive-qc": ["somewhere"],
             "history": ["list"]}.get(name, [])
    args = build_parser().parse_args([name, "--config", "my.yaml", *extra])
    assert args.command == name
    assert args.config == Path("my.yaml")
    # and its help documents the option
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([name, "--help"])
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.system
def test_subcommand_help_mentions_config_in_subprocess(tmp_path: Path) -> None:
    result = run_cli("simulate", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--config" in result.stdout and "--out" in result.stdout and "--send" in result.stdout


@pytest.mark.system
def test_run_with_unknown_key_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("receiver:\n  port: 0\n  colour: blue\n", encoding="utf-8")
    result = run_cli("run", "--config", str(bad), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "receiver.colour" in result.stderr
    assert "ae_title" in result.stderr  # what is allowed
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sessions").exists()


@pytest.mark.system
def test_run_with_busy_publish_endpoint_exits_2(tmp_path: Path) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)  # someone (another rtsc run) holds the endpoint
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    cfg = tmp_path / "busy.yaml"
    cfg.write_text(f"receiver: {{port: 0}}\nsession: {{dir: ./s}}\n"
                   f"publish: {{endpoint: 'tcp://127.0.0.1:{port}', "
                   f"snapshot_endpoint: 'tcp://127.0.0.1:*'}}\n", encoding="utf-8")
    try:
        result = run_cli("run", "--config", str(cfg), cwd=tmp_path, timeout=60)
    finally:
        sock.close()
        ctx.term()
    assert result.returncode == 2
    assert "publish.endpoint" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.system
def test_run_with_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.system
def test_simulate_writes_files_and_truth(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("simulator:\n  shape: [16, 16, 8]\n  voxel_size_mm: [3.0, 3.0, 4.0]\n",
                   encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("simulate", "--config", str(cfg), "--out", str(out),
                     "--n-volumes", "3", "--speed", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "simulated 3 volumes" in result.stdout
    assert "3 DICOM files" in result.stdout

    dicom = sorted((out / "dicom").iterdir())
    assert len(dicom) == 3  # one mosaic per volume
    for path in dicom:
        with path.open("rb") as fh:
            assert fh.read(132)[128:] == b"DICM"

    truth = out / "truth"
    meta = json.loads((truth / "truth.json").read_text())
    assert meta["shape"] == [16, 16, 8] and meta["n_volumes"] == 3
    assert meta["voxel_size_mm"] == [3.0, 3.0, 4.0] and meta["format"] == "mosaic"
    quantised = np.load(truth / "bold_quantised.npy")
    assert quantised.shape == (16, 16, 8, 3) and quantised.dtype == np.int16
    assert quantised.max() > 0
    lines = (truth / "motion.tsv").read_text().splitlines()
    assert lines[0].split("\t") == [*MOTION_COLUMNS, "framewise_displacement"]
    assert len(lines) == 1 + 3
    first = [float(v) for v in lines[1].split("\t")]
    assert first[-1] == 0.0  # the first volume has FD 0


@pytest.mark.system
def test_simulate_without_target_exits_2(tmp_path: Path) -> None:
    result = run_cli("simulate", "--n-volumes", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "--send" in result.stderr and "--out" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing simulated


@pytest.mark.system
def test_simulate_bad_send_address_exits_2(tmp_path: Path) -> None:
    result = run_cli("simulate", "--send", "localhost", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.system
@pytest.mark.slow
def test_demo_headless(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    result = run_cli("demo", "--headless", "--n-volumes", "4", "--speed", "0", cwd=tmp_path,
                     timeout=180, tmpdir=scratch)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b4 volumes\b", result.stdout), result.stdout
    assert "latency" in result.stdout
    assert "missing none" in result.stdout

    series_dirs = [p for p in (tmp_path / "sessions").iterdir() if p.is_dir()]
    assert len(series_dirs) == 1
    series_dir = series_dirs[0]
    assert re.fullmatch(r"\d{8}-\d{6}_[0-9a-f]{12}", series_dir.name)
    assert str(Path("sessions") / series_dir.name / "bold.nii.gz") in result.stdout
    img = nib.load(series_dir / "bold.nii.gz")
    assert img.shape == (64, 64, 36, 4)  # built-in simulator defaults
    assert len(list((series_dir / "dicom").glob("*.dcm"))) == 4
    confounds = (series_dir / "confounds.tsv").read_text().splitlines()
    assert confounds[0].split("\t")[:6] == MOTION_COLUMNS and len(confounds) == 5
    assert json.loads((series_dir / "qc.json").read_text())["n_volumes"] == 4
    (truth,) = list(scratch.iterdir())
    assert f"ground truth in {truth}" in result.stdout
    assert np.load(truth / "bold_quantised.npy").shape == (64, 64, 36, 4)
    # The dashboard ran as its own process: PNGs after volumes 1 and 2 and at the end;
    # the report was written at the series end.
    pngs = sorted(p.name for p in (tmp_path / "dashboard").glob("*.png"))
    assert pngs == sorted(["dashboard_vol0001.png", "dashboard_vol0002.png",
                           f"dashboard_{series_dir.name.split('_')[-1]}.png"])
    report = (series_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # motion, FD, DVARS, tSNR (no GLM)


@pytest.mark.system
@pytest.mark.slow
def test_demo_uses_config_yaml_of_cwd(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "simulator:\n  shape: [16, 16, 8]\nsession:\n  dir: ./out\n", encoding="utf-8")
    result = run_cli("demo", "--headless", "--n-volumes", "2", "--speed", "0", cwd=tmp_path,
                     timeout=180, tmpdir=tmp_path / "scratch")
    assert result.returncode == 0, result.stderr
    assert "2 volumes" in result.stdout and "16x16x8" in result.stdout
    (series_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert nib.load(series_dir / "bold.nii.gz").shape == (16, 16, 8, 2)


@pytest.mark.system
def test_run_with_busy_dicom_port_exits_2_naming_the_key(tmp_path):
    """A second `rtsc run` on a taken DICOM port says which key to change."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "busy.yaml"
        cfg.write_text(
            f"receiver: {{port: {port}}}\n"
            "publish: {endpoint: 'tcp://127.0.0.1:*', snapshot_endpoint: 'tcp://127.0.0.1:*'}\n"
            f"session: {{dir: '{tmp_path / 'sessions'}'}}\n")
        result = run_cli("run", "--config", str(cfg), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "receiver.port" in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
