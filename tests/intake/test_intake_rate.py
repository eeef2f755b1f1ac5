"""Single-slice intake does not depend on the sender's socket options.

dcmtk's storescu with its defaults (Nagle on) and with TCP_NODELAY=1 sends a 1,000-file
single-slice series each to a running rtsc service. A receiver that waits on the
sender's socket options takes ~44 ms per file with the default (docs/benchmarks.md) against
~2.5 ms with TCP_NODELAY; rtsc acknowledges at once, so the two rates must be close
(loosely: the default within 2x of TCP_NODELAY) and every volume must be assembled.
"""

from __future__ import annotations

import os
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from rtsc.volume import series_id
from simulator.scanner import run_simulation

STORESCU = "/usr/bin/storescu"
N_VOLUMES, SHAPE = 20, [32, 32, 50]  # 1,000 files


pytestmark = [pytest.mark.system, pytest.mark.slow]


def _send(files, port: int, nodelay: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    t0 = time.perf_counter()
    result = subprocess.run([STORESCU, "-aec", "RTSC", "127.0.0.1", str(port),
                             *map(str, files)], capture_output=True, text=True, timeout=300,
                            env=env)
    seconds = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    return seconds


def test_storescu_default_and_nodelay_deliver_at_the_same_rate(service_factory, tmp_path):
    service, collector = service_factory(session={"report": False}, motion={"enabled": False},
                                         qc={"enabled": False})
    cfg = service.config.simulator
    sim_cfg = type(cfg)(**{**cfg.__dict__, "format": "slices", "shape": SHAPE,
                           "n_volumes": N_VOLUMES, "voxel_size_mm": [6.0, 6.0, 3.0]})
    sim = run_simulation(sim_cfg, out_dir=tmp_path / "scan")
    assert len(sim.files) == 1000
    # The same files twice: the second copy is archived in full (the receiver's work is
    # the same) and its datasets dropped by the assembler as duplicates.
    seconds = {nodelay: _send(sim.files, service.receiver.port, nodelay)
               for nodelay in (False, True)}
    assert collector.ended.wait(60)
    print(f"1000 files: storescu default {seconds[False]:.2f} s "
          f"({seconds[False]:.2f} ms/file), TCP_NODELAY=1 {seconds[True]:.2f} s")
    assert seconds[False] < 2 * seconds[True], seconds
    assert seconds[False] / 1000 < 0.02  # far from the 44 ms/file stall
    assert service.receiver.n_stored == 2000
    end = collector.topic("series.end")[0].header
    assert end["series"] == series_id(sim.series_uid) and end["n_volumes"] == N_VOLUMES
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj),
                                  np.load(sim.truth_dir / "bold_quantised.npy"))
