"""A Publisher holding a realistic snapshot, in its own process, for the snapshot abuse tests.

``python tests/snapshot_server.py [N_VOLUMES]`` publishes a series.start, N_VOLUMES (300)
volume messages with the metrics and carpet samples a brain run carries, and the
``mean`` and ``tsnr`` maps of a 64x64x36 grid; then prints one JSON line
``{"endpoint": ..., "snapshot_endpoint": ..., "pid": ...}`` and publishes one more
volume for each line ``volume`` read from stdin (answering ``ok``), answers ``stats``
with :attr:`Publisher.snapshot_stats` as JSON, and closes on end of input.
:func:`publish_run` does the same on a Publisher in the calling process.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from rtsc import messages as m
from rtsc.conventions import MOTION_NAMES
from rtsc.output.publish import Publisher

SERIES = "abuse0123456"
SHAPE = (64, 64, 36)
CARPET_VOXELS = 2000  # publish.carpet_voxels' default


def volume_message(index: int, rng: np.random.Generator) -> m.Message:
    """A volume message about the size of a brain run's (headers ~2 kB, 8 kB of carpet)."""
    n_slices = SHAPE[2]
    metrics = {name: float(rng.normal(0, 0.1)) for name in MOTION_NAMES}
    metrics.update(
        framewise_displacement=float(rng.uniform(0, 0.3)), dvars=float(rng.uniform(10, 20)),
        std_dvars=float(rng.uniform(0.8, 1.2)), global_signal=float(rng.uniform(900, 1000)),
        roi={"motor": float(rng.normal())}, roi_mean={"motor": 950.0},
        roi_detrended={"motor": 949.0}, feedback=float(rng.normal()),
        usable_frames={"fd_0.2": index, "fd_0.3": index},
        tsnr=float(rng.uniform(40, 60)), snr=float(rng.uniform(80, 120)),
        slice_tsnr=[float(v) for v in rng.uniform(30, 70, n_slices)],
        slice_spikes=[], clean_minutes=index * 2.0 / 60, session_clean_minutes=index * 2.0 / 60,
        stage_ms={"motion": 12.0, "dvars": 0.4, "signal": 0.8, "glm": 6.0, "roi": 0.2, "qc": 1.0},
        timing={"acquired_to_received_s": 0.3, "received_to_assembled_s": 0.01})
    return m.volume(index, time.time() - 0.4, time.time() - 0.2, metrics,
                    carpet=rng.normal(1000, 10, CARPET_VOXELS).astype(np.float32),
                    carpet_mask_voxels=30000)


def publish_run(pub: Publisher, n_volumes: int = 300, seed: int = 0) -> None:
    """series.start, ``n_volumes`` volume messages and two 64x64x36 float32 maps."""
    rng = np.random.default_rng(seed)
    pub.publish(m.series_start(SHAPE, (3.0, 3.0, 3.5), 2.0, n_volumes, "brain"), SERIES)
    for index in range(n_volumes):
        pub.publish(volume_message(index, rng), SERIES)
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    for name in ("mean", "tsnr"):
        pub.publish(m.map_message(name, affine, rng.uniform(0, 1000, SHAPE), n_volumes - 1),
                    SERIES)


def main(argv: list[str]) -> int:
    n_volumes = int(argv[0]) if argv else 300
    rng = np.random.default_rng(1)
    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as pub:
        publish_run(pub, n_volumes)
        print(json.dumps({"endpoint": pub.endpoint, "snapshot_endpoint": pub.snapshot_endpoint,
                          "pid": os.getpid()}), flush=True)
        index = n_volumes
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(pub.snapshot_stats), flush=True)
                continue
            pub.publish(volume_message(index, rng), SERIES)
            index += 1
            print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
