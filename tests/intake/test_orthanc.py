"""A real PACS router: Orthanc (Debian's package) forwards every stored instance to rtsc.

The simulator sends a 100-volume mosaic series to Orthanc over C-STORE; Orthanc's Lua
``OnStoredInstance`` forwards each instance to rtsc; all 100 volumes must arrive and be
processed, byte-identical to what the simulator sent. Orthanc runs on free loopback
ports with its own storage folder: its HTTP server refuses remote clients
(``RemoteAccessAllowed: false``) and its DICOM server accepts C-STORE only from the
simulator's AE title at 127.0.0.1 (``DicomCheckModalityHost``). Orthanc 1.10 has no
bind-address option, so these are the loopback guards. ``TCP_NODELAY=1`` is set in its
environment (dcmtk-based peers wait ~40 ms per file otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import free_port

from rtsc.volume import series_id
from simulator.scanner import run_simulation

ORTHANC = "/usr/sbin/Orthanc"
N_VOLUMES = 100

LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   SendToModality(instanceId, 'rtsc')
   Delete(instanceId)
end
"""


pytestmark = [pytest.mark.system, pytest.mark.slow]


@pytest.fixture
def orthanc_factory(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(rtsc_port: int, calling_ae: str) -> int:
        http, dicom = free_port(), free_port()
        (tmp_path / "forward.lua").write_text(LUA)
        config = {
            "Name": "rtsc-test", "StorageDirectory": str(tmp_path / "orthanc-storage"),
            "IndexDirectory": str(tmp_path / "orthanc-storage"),
            "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC", "DicomPort": dicom, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"sim": [calling_ae, "127.0.0.1", 104],
                                "rtsc": ["RTSC", "127.0.0.1", rtsc_port]},
            "LuaScripts": [str(tmp_path / "forward.lua")], "Plugins": [],
            "StorageCompression": False,
            # A router's copy need not be fsynced for this test (rtsc fsyncs its archive);
            # with it, each instance costs Orthanc ~90 ms on this disk.
            "SyncStorageArea": False, "SaveJobs": False,
        }
        path = tmp_path / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(tmp_path / "orthanc.log", "w")
        proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TCP_NODELAY="1"))
        procs.append(proc)
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "orthanc.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1) as r:
                    assert json.load(r)["DicomAet"] == "ORTHANC"
                    break
            except OSError:
                assert time.time() < deadline, "Orthanc did not start"
                time.sleep(0.1)
        return dicom

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_orthanc_forwards_a_100_volume_series_to_rtsc(service_factory, orthanc_factory,
                                                      tmp_path):
    service, collector = service_factory(session={"report": False},
                                         motion={"enabled": False},
                                         simulator={"n_volumes": N_VOLUMES,
                                                    "shape": [32, 32, 16]})
    cfg = service.config.simulator
    orthanc_port = orthanc_factory(service.receiver.port, cfg.calling_ae)
    t0 = time.time()
    sim = run_simulation(cfg, send_to=("127.0.0.1", orthanc_port), called_ae="ORTHANC",
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == N_VOLUMES
    print(f"sent to Orthanc in {time.time() - t0:.1f} s")
    assert collector.ended.wait(120), (tmp_path / "orthanc.log").read_text()[-3000:]
    seconds = time.time() - t0
    volumes = collector.topic("volume")
    assert sorted(m.header["index"] for m in volumes) == list(range(N_VOLUMES))
    assert {m.header["series"] for m in volumes} == {series_id(sim.series_uid)}
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == N_VOLUMES and end["summary"]["missing_volumes"] == []
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj),
                                  np.load(sim.truth_dir / "bold_quantised.npy"))
    archived = list(Path(end["outputs"]["dicom"]).glob("*.dcm"))
    assert len(archived) == N_VOLUMES
    print(f"{N_VOLUMES} volumes through Orthanc in {seconds:.1f} s")
