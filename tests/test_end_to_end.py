"""Simulator -> C-STORE -> receiver -> assembler -> pipeline -> ZeroMQ, end to end on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtsc.client import Subscriber, request_snapshot
from rtsc.volume import series_id
from simulator.scanner import run_simulation


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]  # preamble+DICM, group-length element, group


def _check_run(service, collector, sim, n: int, sent_files: list[Path] | None = None) -> Path:
    assert collector.ended.wait(30), "no series.end"
    starts = collector.topic("series.start")
    volumes = collector.topic("volume")
    ends = collector.topic("series.end")
    assert len(starts) == 1 and len(ends) == 1
    assert [m.header["index"] for m in volumes] == list(range(n))
    sid = series_id(sim.series_uid)
    assert {m.header["series"] for m in volumes} == {sid}
    start = starts[0].header
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    assert start["shape"] == truth["shape"]
    assert start["tr_s"] == pytest.approx(truth["tr_s"])
    assert start["n_expected"] == n
    assert all(m.header["latency_s"] >= 0 for m in volumes)
    end = ends[0].header
    assert end["n_volumes"] == n and end["summary"]["missing_volumes"] == []

    series_dir = Path(end["outputs"]["bold"]).parent
    quantised = np.load(sim.truth_dir / "bold_quantised.npy")
    img = nib.load(end["outputs"]["bold"])
    assert img.shape == quantised.shape
    np.testing.assert_array_equal(np.asarray(img.dataobj), quantised)
    np.testing.assert_allclose(img.affine, np.array(truth["affine_ras"]), atol=1e-4)

    # Global signal in the message equals an offline recomputation from the truth.
    data0 = quantised[..., 0].astype(np.float32)
    mask = data0 > 0.2 * np.percentile(data0, 98)
    expected = [float(quantised[..., t][mask].mean()) for t in range(n)]
    np.testing.assert_allclose([m.header["global_signal"] for m in volumes], expected, rtol=1e-5)

    confounds = (series_dir / "confounds.tsv").read_text().splitlines()
    assert len(confounds) == n + 1 and confounds[0].startswith("trans_x\t")
    qc = json.loads((series_dir / "qc.json").read_text())
    assert qc["n_volumes"] == n
    archived = sorted((series_dir / "dicom").glob("*.dcm"))
    if sent_files is not None:
        assert len(archived) == len(sent_files)
        sent = {_dataset_bytes(p) for p in sent_files}
        assert {_dataset_bytes(p) for p in archived} == sent
    return series_dir


def test_cstore_mosaic_series_end_to_end(service_factory, tmp_path):
    service, collector = service_factory()
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == 20
    series_dir = _check_run(service, collector, sim, 20)
    # Archive: every sent dataset is on disk; its pixels are the simulator's.
    archived = sorted((series_dir / "dicom").glob("*.dcm"))
    assert len(archived) == 20
    first = pydicom.dcmread(archived[0])
    assert "MOSAIC" in first.ImageType

    # A late subscriber gets the whole run from the snapshot.
    snap = request_snapshot(service.publisher.snapshot_endpoint)
    topics = [m.topic for m in snap]
    assert topics[0] == "series.start" and topics[-1] == "series.end"
    assert [m.header["index"] for m in snap if m.topic == "volume"] == list(range(20))
    mean_maps = [m for m in snap if m.topic == "map" and m.header["name"] == "mean"]
    assert len(mean_maps) == 1
    quantised = np.load(sim.truth_dir / "bold_quantised.npy").astype(np.float64)
    np.testing.assert_allclose(mean_maps[0].arrays[0], quantised.mean(axis=3), rtol=1e-5, atol=1e-3)
    with Subscriber(service.publisher.endpoint,
                    snapshot_endpoint=service.publisher.snapshot_endpoint) as late:
        replayed = [late.receive(timeout_s=1) for _ in range(len(snap))]
    assert [m.topic for m in replayed] == topics


def test_written_files_sent_again_are_archived_byte_identical(service_factory, tmp_path):
    """Files written by the simulator and sent by our SCU arrive byte-identical."""
    from rtsc.config import merge, config_from_dict, to_dict
    from simulator.sender import send_files

    service, collector = service_factory()
    cfg = config_from_dict(merge(to_dict(service.config),
                                 {"simulator": {"format": "slices", "shape": [32, 32, 12],
                                                "n_volumes": 5}})).simulator
    sim = run_simulation(cfg, out_dir=tmp_path / "scan")
    report = send_files(sim.files, "127.0.0.1", service.receiver.port)
    assert report.n_failed == 0
    _check_run(service, collector, sim, 5, sent_files=sim.files)
