"""Simulator -> C-STORE -> receiver -> assembler -> pipeline -> ZeroMQ, end to end on loopback."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from anatomies import HEADS, simulator_section
from dicom_files import dataset_bytes
from rtsc.client import Subscriber, request_snapshot
from rtsc.conventions import rigid_matrix
from rtsc.pipeline.motion.register import registration_mask
from rtsc.volume import series_id
from simulator.scanner import run_simulation


ROOT = Path(__file__).resolve().parents[2]


def _check_run(service, collector, sim, n: int, sent_files: list[Path] | None = None,
               motion_tol: tuple[float, float] = (0.1, 0.1)):
    """Check a finished run; ``motion_tol`` is the largest error allowed (mm, degrees)."""
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

    # Motion parameters match the simulator's ground truth.
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    estimated = np.array([[m.header[k] for k in names] for m in volumes])
    true_motion = np.loadtxt(sim.truth_dir / "motion.tsv", skiprows=1)[:, :6]
    assert np.abs(estimated[:, :3] - true_motion[:, :3]).max() < motion_tol[0]
    assert np.degrees(np.abs(estimated[:, 3:] - true_motion[:, 3:]).max()) < motion_tol[1]

    # Global signal = mask mean of the motion-corrected volume: recompute it offline,
    # reslicing with scipy and the simulator's own rigid-matrix code.
    affine = np.array(truth["affine_ras"])
    data0 = quantised[..., 0].astype(np.float32)
    mask = data0 > 0.2 * np.percentile(data0, 98)
    grid = np.indices(quantised.shape[:3]).reshape(3, -1)
    center = affine[:3, :3] @ ((np.array(quantised.shape[:3]) - 1) / 2) + affine[:3, 3]
    # rtsc interpolates the head (its registration mask dilated by 3 voxels, whole
    # extent of each row along i) and keeps the acquired background.
    head = ndimage.binary_dilation(registration_mask(data0), iterations=3)
    head_rows = (np.maximum.accumulate(head, axis=0)
                 & np.maximum.accumulate(head[::-1], axis=0)[::-1])
    # SPM's rule: a sample within 0.05 voxel of the grid is clamped onto it; one farther
    # out is invalid, and the voxel leaves the run's validity mask (AND over volumes)
    # and every statistic (the mask below is AND-ed with it)
    expected = []
    corrected_sum = np.zeros(quantised.shape[:3])
    corrected_all = np.zeros(quantised.shape, dtype=np.float32)
    top = np.array(quantised.shape[:3])[:, None] - 1
    run_valid = np.ones(quantised.shape[:3], bool)
    for t in range(n):
        q = np.linalg.inv(affine) @ rigid_matrix(estimated[t], center) @ affine
        coords = q[:3, :3] @ grid + q[:3, 3:4]
        inside = np.all((coords >= -0.05) & (coords <= top + 0.05), axis=0)
        corrected = ndimage.map_coordinates(quantised[..., t].astype(np.float64),
                                            np.clip(coords, 0, top), order=1)
        corrected = np.where(inside, corrected, np.nan).reshape(quantised.shape[:3])
        corrected = np.where(head_rows, corrected, quantised[..., t])
        run_valid &= np.isfinite(corrected)
        assert volumes[t].header["valid_voxels"] == run_valid.sum()
        expected.append(corrected[mask & run_valid].mean())
        corrected_sum += corrected
        corrected_all[..., t] = corrected
    np.testing.assert_allclose([m.header["global_signal"] for m in volumes], expected, rtol=1e-4)
    mask &= run_valid

    confounds = (series_dir / "confounds.tsv").read_text().splitlines()
    assert len(confounds) == n + 1 and confounds[0].startswith("trans_x\t")

    # DVARS: confounds.tsv (exact at series end) equals Nipype's compute_dvars on the
    # offline-corrected series with the same mask; the live values are close to it.
    from nipype.algorithms.confounds import compute_dvars

    nib.save(nib.Nifti1Image(corrected_all, affine), series_dir.parent / "corrected.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), series_dir.parent / "mask.nii.gz")
    dvars_std, dvars_nstd, _vx = compute_dvars(str(series_dir.parent / "corrected.nii.gz"),
                                               str(series_dir.parent / "mask.nii.gz"),
                                               remove_zerovariance=True)
    table = np.genfromtxt(series_dir / "confounds.tsv", delimiter="\t", names=True,
                          missing_values="n/a", filling_values=np.nan)
    assert np.isnan(table["dvars"][0])
    np.testing.assert_allclose(table["dvars"][1:], dvars_nstd, rtol=1e-3)
    np.testing.assert_allclose(table["std_dvars"][1:], dvars_std, rtol=1e-3)
    live = np.array([m.header["dvars"] for m in volumes[2:]], dtype=float)
    np.testing.assert_allclose(live[-1], dvars_nstd[-1], rtol=1e-3)
    qc = json.loads((series_dir / "qc.json").read_text())
    assert qc["n_volumes"] == n
    # tSNR of the motion-corrected series, recomputed offline from the scipy reslice
    offline = corrected_all.mean(-1) / corrected_all.std(-1, ddof=1)
    assert qc["tsnr"] == pytest.approx(np.median(offline[mask]), rel=1e-3)
    assert volumes[-1].header["tsnr"] == qc["tsnr"]
    archived = sorted((series_dir / "dicom").glob("*.dcm"))
    if sent_files is not None:
        assert len(archived) == len(sent_files)
        sent = {dataset_bytes(p) for p in sent_files}
        assert {dataset_bytes(p) for p in archived} == sent
    return series_dir, corrected_sum / n


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_cstore_mosaic_series_end_to_end(service_factory, tmp_path, head):
    """The phantom, and real anatomy cut by the field of view (simulator.real_anatomy)."""
    service, collector = service_factory(simulator=simulator_section(head))
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == 20
    series_dir, corrected_mean = _check_run(service, collector, sim, 20)
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
    np.testing.assert_allclose(mean_maps[0].arrays[0], corrected_mean, rtol=1e-4, atol=1e-2)
    with Subscriber(service.publisher.endpoint,
                    snapshot_endpoint=service.publisher.snapshot_endpoint) as late:
        replayed = [late.receive(timeout_s=1) for _ in range(len(snap))]
    assert [m.topic for m in replayed] == topics


@pytest.mark.slow
def test_written_files_sent_again_are_archived_byte_identical(service_factory, tmp_path):
    """Files written by the simulator and sent by our SCU arrive byte-identical."""
    from rtsc.config import merge, config_from_dict, to_dict
    from simulator.sender import send_files

    service, collector = service_factory()
    cfg = config_from_dict(merge(to_dict(service.config),
                                 {"simulator": {"format": "slices", "shape": [32, 32, 12],
                                                "voxel_size_mm": [6.0, 6.0, 9.0],
                                                "n_volumes": 5}})).simulator
    sim = run_simulation(cfg, out_dir=tmp_path / "scan")
    report = send_files(sim.files, "127.0.0.1", service.receiver.port)
    assert report.n_failed == 0
    # 6 x 6 x 9 mm voxels: registration is coarser than at 3 mm.
    _check_run(service, collector, sim, 5, sent_files=sim.files, motion_tol=(0.5, 1.0))


def test_cstore_multiframe_series_end_to_end(service_factory, tmp_path):
    """Enhanced MR files (one per volume, Siemens XA style) through the whole pipeline."""
    from rtsc.config import merge, config_from_dict, to_dict

    service, collector = service_factory()
    cfg = config_from_dict(merge(to_dict(service.config), {"simulator": {
        "format": "multiframe", "n_volumes": 8, "shape": [32, 32, 12],
        "voxel_size_mm": [6.0, 6.0, 9.0]}})).simulator
    sim = run_simulation(cfg, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == 8
    assert collector.ended.wait(30), "no series.end"
    volumes = collector.topic("volume")
    assert [m.header["index"] for m in volumes] == list(range(8))
    assert {m.header["series"] for m in volumes} == {series_id(sim.series_uid)}
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == 8 and end["summary"]["missing_volumes"] == []
    img = nib.load(end["outputs"]["bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj),
                                  np.load(sim.truth_dir / "bold_quantised.npy"))
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    np.testing.assert_allclose(img.affine, np.array(truth["affine_ras"]), atol=1e-4)
    archived = sorted((Path(end["outputs"]["bold"]).parent / "dicom").glob("*.dcm"))
    assert len(archived) == 8
    assert pydicom.dcmread(archived[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"


def _kernel_signatures() -> dict[str, list]:
    """Every compiled signature of rtsc's numba kernels loaded so far."""
    import sys

    from numba.core.registry import CPUDispatcher

    found: dict[str, list] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("rtsc"):
            for attr, obj in list(vars(module).items()):
                if isinstance(obj, CPUDispatcher):
                    found[f"{name}.{attr}"] = list(obj.signatures)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mosaic", "slices"])
def test_no_kernel_is_compiled_once_the_service_has_started(service_factory, tmp_path, fmt):
    """Start-up warms every kernel up with the argument types the run gives it (a
    read-only array is a type of its own): a compilation on the worker would hold the
    first volume for a second or more with an empty numba cache (a fresh install)."""
    service, collector = service_factory(simulator={"format": fmt, "n_volumes": 6})
    before = _kernel_signatures()
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0
    assert collector.ended.wait(60)
    assert len(collector.topic("volume")) == 6
    after = _kernel_signatures()
    compiled = {name: [s for s in sigs if s not in before.get(name, [])]
                for name, sigs in after.items()}
    assert {name: sigs for name, sigs in compiled.items() if sigs} == {}


class _SlowStage:
    """A pipeline stage that takes ``seconds`` per volume (a stalled observer)."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def update(self, volume, upstream=None):
        import time

        from rtsc.pipeline.stages import StageResult

        time.sleep(self.seconds)
        return StageResult()

    def maps(self):
        return {}

    def summary(self):
        return {}


@pytest.mark.slow
@pytest.mark.parametrize("stall_s", [0.0, 0.4])
def test_answer_waits_for_the_publish_but_not_for_long(service_factory, monkeypatch,
                                                      tmp_path, stall_s):
    """An idle worker's dataset is archived alongside the processing (system calls only,
    no GIL) but answered once its volume is published, so the sender's next dataset
    does not compete with the processing; a stalled pipeline delays the answer by
    receiver.archive_wait_ms at most. Success always comes after the archive write."""
    import time

    import rtsc.service.series as service_module
    from rtsc.intake.receiver import Receiver
    from rtsc.pipeline.series import build_stages
    from rtsc.output.session import SessionStore

    def stages(*args, **kwargs):
        found, alerts = build_stages(*args, **kwargs)
        return [*found, _SlowStage(stall_s)] if stall_s else found, alerts

    committed: list[float] = []
    answered: list[float] = []
    # Receiver._archive returns the status both data paths answer with, right before
    # the answer (pynetdicom's _on_store, rtsc.intake.dataphase's _on_store_lean).
    original_write, original_store = SessionStore.write, Receiver._archive

    def write(store, path, payload):
        written = original_write(store, path, payload)
        commit = written.commit

        def timed_commit():
            done = commit()
            committed.append(time.time())
            return done
        written.commit = timed_commit
        return written

    def on_store(receiver, *args):
        status = original_store(receiver, *args)
        answered.append(time.time())
        return status

    monkeypatch.setattr(service_module, "build_stages", stages)
    monkeypatch.setattr(SessionStore, "write", write)
    monkeypatch.setattr(Receiver, "_archive", on_store)
    service, collector = service_factory(simulator={"n_volumes": 4, "speed": 4.0},
                                         receiver={"archive_wait_ms": 50.0})
    sim = run_simulation(service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0
    assert collector.ended.wait(30)
    volumes = [m.header for m in collector.topic("volume")]
    assert [h["index"] for h in volumes] == [0, 1, 2, 3] and len(answered) == 4
    assert all(c <= a for c, a in zip(committed, answered, strict=True))
    # volume 0 pays the series' set-up (reference, masks, files): past the wait
    for header, done, answer in list(zip(volumes, committed, answered))[1:]:
        waited = answer - header["t_received"]
        if stall_s:  # answered after the 50 ms wait, long before the stalled publish
            assert 0.045 < waited < stall_s / 2 < header["t_published"] - answer
            assert done < answer  # archived alongside the processing, not after it
        else:  # the worker was idle: answered once the volume was published
            assert answer >= header["t_published"] and waited < 0.05


def test_objects_alive_at_start_are_left_out_of_garbage_collection(service_factory):
    """The objects of a started service (modules, compiled kernels, dictionaries) are
    frozen, so a full cyclic collection in the middle of a run does not walk them (77 ms
    for a bare `rtsc run` process); stopping gives them back to the collector."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    service, _ = service_factory()
    assert gc.get_freeze_count() > 100_000  # numba, numpy, pydicom, pynetdicom, rtsc
    start = time.perf_counter()
    gc.collect()
    frozen_collect_s = time.perf_counter() - start
    service.stop()
    assert gc.get_freeze_count() == 0
    start = time.perf_counter()
    gc.collect()
    full_collect_s = time.perf_counter() - start
    assert frozen_collect_s < full_collect_s, (frozen_collect_s, full_collect_s)



BLAS_PROBE = """
import sys, tempfile, time
from pathlib import Path
from threadpoolctl import threadpool_info
from conftest import make_config
from rtsc.service.run import RunService

def blas_threads():
    return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})

before = blas_threads()
service = RunService(make_config(Path(tempfile.mkdtemp()), pipeline={"threads": 1}))
service.start()
deadline = time.time() + 10
while blas_threads() != [1] and time.time() < deadline:
    time.sleep(0.01)
during = blas_threads()
service.stop()
print(before, during, blas_threads())
"""


@pytest.mark.system
def test_blas_threads_are_held_to_pipeline_threads_while_the_worker_runs(tmp_path):
    """`rtsc run` with BLAS's own default (a thread per core): while the worker runs, BLAS
    has `pipeline.threads` (1), not a thread per core beside the receiver's threads."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    result = subprocess.run([sys.executable, "-c", BLAS_PROBE], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    before, during, after = result.stdout.strip().splitlines()[-1].split("] [")
    assert os.cpu_count() >= 2 and before == f"[{os.cpu_count()}", result.stdout
    assert during == "1" and after == f"{os.cpu_count()}]", result.stdout
