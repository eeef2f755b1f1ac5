"""Backpressure: a burst faster than the pipeline never blocks the receiver; the
pipeline catches up, or (backlog: newest) runs the live stages on the newest volume
while every volume is archived, published and in bold.nii.gz."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from faults_helpers import send_in_background
from rtsc.pipeline.stages import SignalStage

N = 30
SLOW_S = 0.15


@pytest.fixture
def slow_signal(monkeypatch):
    calls: list[int] = []
    original = SignalStage.update

    def slow(self, volume, upstream=None):
        calls.append(volume.index)
        time.sleep(SLOW_S)
        return original(self, volume, upstream)

    monkeypatch.setattr(SignalStage, "update", slow)
    return calls


def _burst(service, collector):
    sent = send_in_background(service.receiver.port, N, speed=0.0,  # as fast as possible
                              pregenerate=True)
    assert sent.done.wait(60) and sent.error is None and sent.n_acked_files == N
    published_when_sent = len(collector.topic("volume"))
    assert collector.ended.wait(60)
    return sent, published_when_sent


def _check_outputs(collector, sent):
    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(N))
    end = collector.topic("series.end")[0].header
    series_dir = Path(end["outputs"]["bold"]).parent
    archived = sorted((series_dir / "dicom").glob("*.dcm"))
    assert len(archived) == N
    bold = np.asarray(nib.load(end["outputs"]["bold"]).dataobj)
    assert bold.shape[3] == N
    # every volume in bold.nii.gz equals its archived mosaic's pixels (first tile row)
    first = pydicom.dcmread(archived[-1]).pixel_array
    nx = bold.shape[0]
    np.testing.assert_array_equal(first[:nx, :nx].T, bold[:, :, 0, N - 1])
    rows = (series_dir / "confounds.tsv").read_text().splitlines()[1:]
    assert len(rows) == N
    return volumes, end


@pytest.mark.slow
def test_burst_catch_up(service_factory, slow_signal):
    service, collector = service_factory(pipeline={"backlog": "catch_up"})
    sent, published_when_sent = _burst(service, collector)
    # the receiver acknowledged the whole burst long before the slow pipeline was done
    assert published_when_sent < N // 2
    volumes, end = _check_outputs(collector, sent)
    assert sorted(slow_signal) == list(range(N))
    assert all(m.header.get("global_signal") is not None for m in volumes)
    assert end["summary"]["skipped_volumes"] == []


@pytest.mark.slow
def test_burst_skip_to_newest(service_factory, slow_signal):
    service, collector = service_factory(pipeline={"backlog": "newest"})
    sent, published_when_sent = _burst(service, collector)
    volumes, end = _check_outputs(collector, sent)
    skipped = [m.header["index"] for m in volumes if "skipped" in m.header["flags"]]
    processed = [m.header["index"] for m in volumes if "skipped" not in m.header["flags"]]
    assert skipped and processed
    assert processed[-1] == N - 1  # the newest volume always gets the live outputs
    assert sorted(slow_signal) == processed  # the slow stage ran only on those
    assert end["summary"]["skipped_volumes"] == skipped
    assert all(volumes[i].header.get("global_signal") is None for i in skipped)
    assert all(volumes[i].header.get("global_signal") is not None for i in processed)
    # far less time in the slow stage than catching up would take
    assert len(processed) < N / 2
    # no false "missing volume" alerts: the timing stage saw every volume
    assert not [m for m in collector.topic("alert") if m.header["code"] in
                ("missing_volume", "missing_volumes")]


@pytest.mark.slow
def test_backlog_beyond_memory_limit_is_read_back_from_the_archive(service_factory, slow_signal,
                                                                   monkeypatch):
    import rtsc.dicom.incoming as incoming_module

    reads: list[str] = []
    original = incoming_module._read_archived

    def counting(path, *args, **kw):
        reads.append(path.name)
        return original(path, *args, **kw)

    monkeypatch.setattr(incoming_module, "_read_archived", counting)
    service, collector = service_factory(receiver={"queue_in_memory": 2},
                                         pipeline={"backlog": "catch_up"})
    sent, published_when_sent = _burst(service, collector)
    assert published_when_sent < N // 2
    volumes, end = _check_outputs(collector, sent)
    assert len(reads) > N // 2  # most of the burst waited on disk, not in memory
    assert sorted(slow_signal) == list(range(N))
    assert all(m.header.get("global_signal") is not None for m in volumes)
