"""Real GE series at their real rate: sent volume by volume at the TR the headers give,
every volume is published well within its TR and nothing falls behind.

GE writes one file per slice with AcquisitionNumber 1 on all of them; before the
vendor-rule numbering rtsc published one volume of these series and lost the rest.
"""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest

from scanner_corpus import BY_KEY
from rtsc.volume import series_id
from simulator.sender import send_series


def volumes_as_sent(key: str) -> tuple[list[list[pydicom.Dataset]], float, str]:
    """The series' datasets grouped per volume in acquisition order, its TR (s), its UID.

    The volume of each file comes from the instance-number cycle (the scanner writes
    ``ImagesInAcquisition`` slices per volume, or (0021,104F) when that counts the run),
    read here independently of rtsc."""
    series = BY_KEY[key]
    datasets = sorted((pydicom.dcmread(p) for p in series.files()),
                      key=lambda ds: int(ds.InstanceNumber))
    slices = int(datasets[0][0x0021104F].value)
    assert len(datasets) == slices * series.n_volumes
    volumes = [datasets[t * slices:(t + 1) * slices] for t in range(series.n_volumes)]
    return volumes, float(datasets[0].RepetitionTime) / 1000.0, str(datasets[0].SeriesInstanceUID)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["stc-ge-triggertime", "pyneal-ge"])
def test_ge_series_at_its_tr_is_published_within_the_tr(service_factory, key):
    volumes, tr_s, uid = volumes_as_sent(key)
    service, collector = service_factory(session={"series_timeout_s": 2.0, "report": False})
    t0 = time.time()
    report = send_series(volumes, "127.0.0.1", service.receiver.port, tr_s=tr_s, speed=1.0)
    assert report.n_failed == 0
    sent_s = time.time() - t0
    assert sent_s >= (len(volumes) - 1) * tr_s - 0.05  # paced at the real rate
    deadline = time.time() + 10
    while len(collector.topic("volume")) < len(volumes) and time.time() < deadline:
        time.sleep(0.05)
    published = [m.header for m in collector.topic("volume") if m.header["series"] == series_id(uid)]
    assert [h["index"] for h in published] == list(range(len(volumes)))
    latency = np.array([h["latency_s"] for h in published])
    # Published within half a TR of its last slice's arrival: the first volume (which
    # also sets the series up: reference, masks, design) and then each within a tenth.
    assert latency[0] < 0.5 * tr_s and latency[1:].max() < 0.1 * tr_s, latency
    codes = {m.header["code"] for m in collector.topic("alert")}
    # pyneal's GE run has no dummy scans: volume 0 is 1.7x brighter than the next ones
    # (not yet at the steady state); the registration must still follow the head.
    assert not codes & {"processing_lag", "unplaced", "late_slice", "missing_slices",
                        "late_volume", "no_volume", "registration_failed"}, codes
    assert all(h["framewise_displacement"] is not None for h in published)
