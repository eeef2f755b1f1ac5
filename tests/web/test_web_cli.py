"""`rtsc web` as a process: its config, its address line, its JSON, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from rtsc import messages
from rtsc.output.publish import Publisher

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cli-test-token-0123456789"


@pytest.mark.system
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_rtsc_web_serves_its_configured_sources(tmp_path: Path, stop: int) -> None:
    pub = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    pub.start()
    pub.publish(messages.series_start([8, 8, 4], [3.0] * 3, 2.0, 5, "brain"), "0123456789ab")
    pub.publish(messages.volume(0, None, time.time(), {}), "0123456789ab")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"web": {"port": 0, "token": TOKEN, "sources": [
        {"name": "mr1", "endpoint": pub.endpoint, "snapshot_endpoint": pub.snapshot_endpoint},
        {"name": "mr2", "endpoint": "tcp://127.0.0.1:9"}]}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rtsc.cli", "web", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("rtsc web: http://127.0.0.1:"), line + proc.stderr.read()
        assert "mr1 (" in line and "mr2 (" in line and "?token=..." in line and TOKEN not in line
        url = line.split()[2].split("/?")[0].rstrip("/")
        deadline = time.monotonic() + 20
        while True:  # uvicorn starts serving once the feed has its snapshots
            try:
                response = httpx.get(url + "/api/state", params={"token": TOKEN})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        state = {s["name"]: s for s in response.json()["scanners"]}
        assert state["mr1"]["series"] == "0123456789ab" and state["mr1"]["last_index"] == 0
        assert state["mr2"]["series"] is None
        assert httpx.get(url + "/api/state").status_code == 401
    finally:
        proc.send_signal(stop)
        assert proc.wait(20) == 0, proc.stderr.read()
        pub.close()


def test_rtsc_web_refuses_a_bad_port(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "rtsc.cli", "web", "--port", "70000"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "--port 70000" in result.stderr
