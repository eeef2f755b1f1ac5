"""The spinal cord simulator: phantom geometry, slice-wise motion, physiology files, DICOM
timing and phase-encoding fields, tSNR truth, and a cord run sent over C-STORE."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.nicom import csareader

from rtsc.config import CordSimConfig, SimulatorConfig, config_from_dict, merge, to_dict
from simulator.cord import (_fourier_shift, cord_response, expected_slice_tsnr,
                            iter_cord_volumes, noise_free_signal, plan_cord_run,
                            slice_order_times)
from simulator.cord_phantom import CORD_INTENSITY
from simulator.physio import ProgressiveBidsWriter, generate_traces, mdh_ms
from simulator.scanner import run_simulation



def cord_config(shape: tuple[int, int, int], n_volumes: int, seed: int,
                **cord: float) -> SimulatorConfig:
    """The simulator's cord run on ``shape`` voxels of 1 x 1 x 5 mm at TR 2.3 s."""
    return SimulatorConfig(anatomy="spinal_cord", n_volumes=n_volumes, seed=seed,
                           cord=CordSimConfig(shape=list(shape), voxel_size_mm=[1.0, 1.0, 5.0],
                                              tr_s=2.3, **cord))


@pytest.fixture(scope="module")
def plan():
    return plan_cord_run(cord_config((128, 128, 24), 60, seed=3))


def test_cord_geometry_and_intensities(plan):
    maps, masks = plan.maps, plan.masks()
    for k in (0, 12, 23):
        cord = masks["cord"][:, :, k]
        width_rl = cord.any(axis=1).sum() * 1.0   # voxels along i (x) with cord, mm
        depth_ap = cord.any(axis=0).sum() * 1.0
        assert 6.5 <= width_rl <= 9.0 and 12.0 <= depth_ap <= 15.0, (k, width_rl, depth_ap)
        canal = cord | masks["csf"][:, :, k]
        assert 11.5 <= canal.any(axis=1).sum() <= 15 and 19.5 <= canal.any(axis=0).sum() <= 23
    gm_fraction = maps.gm.sum() / maps.cord.sum()
    assert 0.17 <= gm_fraction <= 0.23
    # the activated dorsal horn: left (RAS x < 0), posterior (y below the canal centre), GM
    xyz = plan.grid.ras_coordinates().reshape(*plan.grid.shape, 3)
    dh = masks["dorsal_horn"]
    assert dh.sum() > 40 and np.all(masks["gm"][dh] | (maps.gm[dh] > 0.4))
    centre_y = plan.maps.centre_ras[:, 1][np.nonzero(dh)[2]]
    assert np.all(xyz[dh][:, 0] < plan.maps.centre_ras[np.nonzero(dh)[2], 0])
    assert np.all(xyz[dh][:, 1] < centre_y)
    # contrasts in pure tissue (maps.base is before each slice's factor)
    base = maps.base
    cord_i = base[maps.cord > 0.99].mean()
    csf_i = base[maps.csf > 0.99].mean()
    tissue_i = np.median(base[maps.tissue > 0.99])
    assert 0.85 <= cord_i / csf_i <= 0.95
    assert 2.2 <= cord_i / tissue_i <= 2.8
    assert CORD_INTENSITY["csf"] * 0.9 == pytest.approx(cord_i, rel=0.05)
    f = maps.slice_factor
    assert f.max() == pytest.approx(1.0) and f.min() == pytest.approx(0.65)


def test_slice_wise_motion_is_locked_to_physiology(plan):
    shifts = plan.slice_shifts
    assert shifts.shape == (60, 24, 2)
    calm = np.setdiff1d(np.arange(60), plan.swallows)
    rms = np.sqrt((shifts[calm] ** 2).mean(axis=(0, 1)))
    assert rms[1] > 2.5 * rms[0] > 0  # A-P dominant
    # A-P shift follows the belt at each slice's acquisition time
    belt = plan.physio.respiratory_at(plan.acquisition_times_s)
    for k in (0, 23):
        r = np.corrcoef(belt[calm, k], shifts[calm, k, 1])[0, 1]
        assert r > 0.9, (k, r)
    # different slices of one volume move differently (acquired at different times)
    assert np.ptp(shifts[calm, :, 1], axis=1).mean() > 0.1
    # swallows: large brief jumps in one or two consecutive volumes
    assert len(plan.swallows) >= 2
    assert np.all(np.abs(shifts[list(plan.swallows), :, 1]).min(axis=1) > 1.2)
    assert np.abs(shifts[calm, :, 1]).max() < 0.8


def test_slice_order_times():
    inter = slice_order_times(6, 2.4, "interleaved")  # even nz: 1, 3, 5, 0, 2, 4
    assert np.allclose(inter, [1.2, 0.0, 1.6, 0.4, 2.0, 0.8])
    assert np.allclose(slice_order_times(5, 2.5, "interleaved"), [0, 1.5, 0.5, 2.0, 1.0])
    assert np.allclose(slice_order_times(4, 2.0, "ascending"), [0, 0.5, 1.0, 1.5])


def test_volume_model_noise_free_and_fourier_shift(plan):
    # an integer shift is an exact roll; the model volume equals the documented formula
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(16, 12, 3))
    moved = _fourier_shift(stack, np.array([[2.0, -3.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert np.allclose(moved[:, :, 0], np.roll(stack[:, :, 0], (2, -3), axis=(0, 1)))
    assert np.allclose(moved[:, :, 1], np.roll(stack[:, :, 1], 1, axis=1))
    quiet = plan_cord_run(cord_config((64, 64, 4), 12, seed=1, noise_sigma=0, resp_shift_mm=0,
                                      cardiac_shift_mm=0, n_swallows=0))
    vol = next(iter_cord_volumes(quiet, 5, 6))
    t = 5
    m = quiet.maps
    pc, pr = quiet.cardiac_phase[t], quiet.respiratory_phase[t]
    a = quiet.amplitudes
    grad = (1.0 + 0.3 * np.linspace(1.0, -1.0, 64))[None, :, None]
    expected = m.base * m.slice_factor * (1 + quiet.drift[t]) * (
        1 + 0.04 * m.dorsal_horn * quiet.response[t]
        + (a["cardiac_csf"] * m.csf + a["cardiac_cord"] * m.cord)
        * (0.8 * np.cos(pc - 0.6) + 0.4 * np.cos(2 * pc - 1.9))
        + a["respiratory"] * (m.cord + m.csf + 0.5 * m.tissue) * grad * (np.cos(pr) + 0.3 * np.sin(2 * pr))
        + a["interaction"] * m.csf * np.cos(pc + pr))
    assert np.allclose(vol.data, expected, rtol=1e-5, atol=1e-3)
    assert np.allclose(noise_free_signal(quiet, t), expected)


@pytest.mark.slow
def test_expected_tsnr_matches_a_measured_still_run():
    still = plan_cord_run(cord_config((128, 128, 24), 60, seed=4, resp_shift_mm=0,
                                      cardiac_shift_mm=0, n_swallows=0))

    truth = expected_slice_tsnr(still)
    cord = still.maps.cord > 0.5
    data = np.stack([v.data[cord] for v in iter_cord_volumes(still)])
    vox_tsnr = data.mean(axis=0) / data.std(axis=0)
    k = np.nonzero(cord)[2]
    measured = np.array([np.median(vox_tsnr[k == z]) for z in range(24)])
    assert np.all(np.abs(measured / truth["expected"] - 1) < 0.05)  # measured: 3.1 % at most
    assert np.median(np.abs(measured / truth["expected"] - 1)) < 0.025
    assert np.all(truth["thermal"] > truth["expected"])  # physiology costs tSNR


def test_progressive_physio_writer(tmp_path):
    traces = generate_traces(20.0, 2.0, 10, seed=2, hz=50.0)
    writer = ProgressiveBidsWriter(traces, tmp_path, "x")
    writer.advance(4.0)
    rows = np.loadtxt(tmp_path / "x_physio.tsv")
    assert rows.shape[0] == np.count_nonzero(traces.times_s <= 4.0 + 1e-9)
    writer.finish()
    rows = np.loadtxt(tmp_path / "x_physio.tsv")
    assert np.allclose(rows[:, 0], traces.cardiac, atol=1e-6)
    # true cardiac phase is linear between beats, and the waveform peaks at the beats
    peaks = np.nonzero((traces.cardiac[1:-1] > traces.cardiac[:-2])
                       & (traces.cardiac[1:-1] >= traces.cardiac[2:])
                       & (traces.cardiac[1:-1] > 0.9))[0] + 1
    beats = traces.beats_s[(traces.beats_s > traces.times_s[1]) & (traces.beats_s < traces.times_s[-2])]
    assert peaks.size == beats.size
    assert np.all(np.abs(traces.times_s[peaks] - beats) <= 1.0 / traces.hz)


def _cfg(**cord):
    return config_from_dict(merge(to_dict(config_from_dict({})), {"simulator": {
        "anatomy": "spinal_cord", "n_volumes": 5, "speed": 0.0, "cord": cord}})).simulator


def test_cord_run_files_dicom_and_physio_timing(tmp_path):
    sim = run_simulation(_cfg(slice_order="interleaved"), out_dir=tmp_path / "run")
    truth = tmp_path / "run" / "truth"
    meta = json.loads((truth / "truth.json").read_text())
    assert meta["shape"] == [128, 128, 24] and meta["tr_s"] == 2.3
    shifts = np.load(truth / "slice_shifts.npy")
    assert shifts.shape == (5, 24, 2)
    for name in ("cord", "gm", "csf", "dorsal_horn"):
        img = nib.load(truth / f"{name}_mask.nii.gz")
        assert img.shape == (128, 128, 24) and np.asarray(img.dataobj).any()
    tsnr = np.genfromtxt(truth / "slice_tsnr.tsv", names=True, delimiter="\t")
    assert tsnr.size == 24 and np.all(tsnr["tsnr_expected"] > 5)

    ds = pydicom.dcmread(sim.files[0])
    assert ds.InPlanePhaseEncodingDirection == "COL"
    csa = csareader.get_csa_header(ds)["tags"]
    assert csa["BandwidthPerPixelPhaseEncode"]["items"] == [17.0]
    times_ms = np.array(csa["MosaicRefAcqTimes"]["items"])
    assert np.allclose(times_ms, np.array(meta["slice_times_s"]) * 1000, atol=1e-4)
    assert np.allclose(np.array(meta["slice_times_s"]), slice_order_times(24, 2.3))
    volume_data = np.load(truth / "bold_quantised.npy")[..., 0]
    assert np.array_equal(ds.pixel_array[:128, :128], volume_data[:, :, 0].T)

    physio = tmp_path / "run" / "physio"
    side = json.loads((physio / "sub-sim_task-cord_physio.json").read_text())
    assert side["Columns"] == ["cardiac", "respiratory", "trigger"]
    with gzip.open(physio / "sub-sim_task-cord_physio.tsv.gz", "rt") as fh:
        rows = np.loadtxt(fh)
    plain = np.loadtxt(physio / "sub-sim_task-cord_physio.tsv")  # the progressive copy
    assert np.array_equal(rows, plain)
    # the trigger marks each volume start, StartTime counts from volume 0
    trig_t = side["StartTime"] + np.nonzero(rows[:, 2])[0] / side["SamplingFrequency"]
    assert np.allclose(trig_t, np.arange(5) * 2.3, atol=1.0 / side["SamplingFrequency"])
    # Siemens log: its MDH clock (ms since midnight) matches the DICOM AcquisitionTime
    text = (physio / "sub-sim_task-cord.puls").read_text()
    start_ms = int(text.split("LogStartMDHTime:")[1].split()[0])
    stop_ms = int(text.split("LogStopMDHTime:")[1].split()[0])
    tm = ds.AcquisitionTime
    acq_ms = (int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:])) * 1000
    assert acq_ms - start_ms == pytest.approx(-side["StartTime"] * 1000, abs=1.5)
    samples = [t for t in text.split("\n")[0].split()[8:] if t not in ("5000", "5003")]
    assert len(samples) == rows.shape[0]
    assert (stop_ms - start_ms) == pytest.approx(len(samples) * 1000 / side["SamplingFrequency"],
                                                 abs=1)
    assert mdh_ms(meta["start_time"]) == pytest.approx(acq_ms, abs=1)


@pytest.mark.slow
def test_cord_run_sent_over_cstore(service_factory, tmp_path):
    service, collector = service_factory(session={"series_timeout_s": 5.0})
    cfg = config_from_dict(merge(to_dict(service.config), {"simulator": {
        "anatomy": "spinal_cord", "n_volumes": 4, "speed": 0.0, "format": "slices"}})).simulator
    sim = run_simulation(cfg, send_to=("127.0.0.1", service.receiver.port),
                         truth_dir=tmp_path / "truth")
    assert sim.failures == 0 and sim.n_files == 4 * 24
    assert collector.ended.wait(60), "no series.end"
    start = collector.topic("series.start")[0].header
    assert start["shape"] == [128, 128, 24] and start["tr_s"] == pytest.approx(2.3)
    end = collector.topic("series.end")[0].header
    assert end["n_volumes"] == 4
    bold = nib.load(end["outputs"]["bold"])
    assert np.array_equal(np.asarray(bold.dataobj), np.load(sim.truth_dir / "bold_quantised.npy"))
    assert (sim.truth_dir / "physio" / "sub-sim_task-cord_physio.tsv.gz").exists()


def test_hrf_options_and_anatomy_config():
    from rtsc.errors import ConfigError

    t = np.arange(0, 40, 0.05)
    brief = [(0.0, 0.5, "task")]
    assert 4.0 <= t[np.argmax(cord_response(brief, t, "spm"))] <= 6.0
    assert 8.0 <= t[np.argmax(cord_response(brief, t, "delayed"))] <= 10.0
    with pytest.raises(ConfigError, match=r"simulator.anatomy: 'heart' is not allowed"):
        config_from_dict({"simulator": {"anatomy": "heart"}})
    with pytest.raises(ConfigError, match=r"simulator.cord.hrf"):
        config_from_dict({"simulator": {"cord": {"hrf": "fir"}}})
